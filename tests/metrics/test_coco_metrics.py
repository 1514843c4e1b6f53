"""COCO metrics: equality with pycocotools' COCOeval (the reference; the engine is faster-coco-eval)
on generated data (crowd regions, images without detections or ground truth, > 100 detections on
one image, area-range edges, tied scores) and on the real RLEs and boxes of the COCO API's result
files; Boundary AP against a pycocotools reference; validation before the C code sees anything."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.metrics.boundary import boundary_mask, dilation_pixels
from segpipe.metrics.coco import (
    STAT_NAMES,
    collector_paused,
    counts_to_rle_string,
    evaluate_coco,
    first_bad_rle_string,
    rle_string_to_counts,
    validate_detections,
    validate_ground_truth,
)
from segpipe.metrics.semantic import MetricsInputError

TOL = 1e-6  # the bound we promise; the engines differ by at most ~1e-16 (summation order) here

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RESULTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "formats" / "coco_results"


def _rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def _blob(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    y1, x1 = rng.integers(y0 + 2, h + 1), rng.integers(x0 + 2, w + 1)
    m[y0:y1, x0:x1] = 1
    return m


def _bbox(mask):
    return [float(v) for v in mask_util.toBbox(_rle(mask))]


def make_dataset(seed: int = 0):
    """Ground truth and detections covering the cases COCOeval treats specially."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 1, "name": "worker"}, {"id": 2, "name": "excavator"}, {"id": 5, "name": "cone"}]
    images, anns, dets = [], [], []
    aid = 1
    for iid in range(1, 9):
        h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid}.jpg"})
        n_gt = 0 if iid == 3 else int(rng.integers(1, 5))  # image 3: no ground truth
        for _ in range(n_gt):
            m = _blob(rng, h, w)
            cat = int(rng.choice([1, 2]))  # category 5 never has ground truth
            seg = _rle(m)
            if aid % 3 == 0:  # some as polygons
                x, y, bw, bh = _bbox(m)
                seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            anns.append({"id": aid, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "area": float(m.sum()), "bbox": _bbox(m), "segmentation": seg})
            aid += 1
            if iid == 5:
                continue  # image 5: ground truth but no detections
            jit = np.roll(m, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
            if jit.any():
                dets.append({"image_id": iid, "category_id": cat, "score": float(rng.random()),
                             "segmentation": _rle(jit), "bbox": _bbox(jit)})
        if iid == 2:  # a crowd region, as uncompressed RLE like real COCO
            m = _blob(rng, h, w)
            counts = _runs(m)
            anns.append({"id": aid, "image_id": iid, "category_id": 1, "iscrowd": 1, "area": float(m.sum()),
                         "bbox": _bbox(m), "segmentation": {"size": [h, w], "counts": counts}})
            aid += 1
        n_fp = 150 if iid == 4 else int(rng.integers(0, 4))  # image 4: > 100 detections
        for _ in range(n_fp):
            m = _blob(rng, h, w)
            dets.append({"image_id": iid, "category_id": int(rng.choice([1, 2, 5])), "score": float(rng.random()),
                         "segmentation": _rle(m), "bbox": _bbox(m)})
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, dets


def make_sized_dataset(seed: int = 0):
    """Larger images: objects in every area range, ground-truth areas exactly on the range edges
    (32^2, 96^2), boxes of exactly those areas, 1-15 detections on most images and 120 on one
    (maxDets 1, 10, 100), scores tied within and across images."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 3, "name": "truck"}, {"id": 7, "name": "worker"}]
    images, anns, dets = [], [], []
    for iid in range(1, 13):
        h, w = int(rng.integers(150, 260)), int(rng.integers(150, 260))
        images.append({"id": iid, "height": h, "width": w})
        for k in range(int(rng.integers(1, 6))):
            side = int(rng.choice([6, 20, 32, 60, 96, 140]))
            side = min(side, h - 2, w - 2)
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            m = np.zeros((h, w), np.uint8)
            m[y:y + side, x:x + side] = 1
            cat = int(rng.choice([3, 7]))
            area = float(m.sum()) if k else float(rng.choice([32.0 ** 2, 96.0 ** 2]))  # on an edge
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "area": area, "bbox": _bbox(m), "segmentation": _rle(m)})
            for _ in range(int(rng.integers(0, 3))):
                d = np.roll(m, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
                dets.append({"image_id": iid, "category_id": cat, "score": round(float(rng.random()), 1),
                             "segmentation": _rle(d), "bbox": _bbox(d)})
        for j in range(120 if iid == 6 else int(rng.integers(0, 12))):
            m = _blob(rng, h, w)
            box = _bbox(m)
            if j % 7 == 0:  # a box of exactly 32 x 32 or 96 x 96 (the area COCOeval uses)
                s = float(rng.choice([32, 96]))
                box = [box[0], box[1], s, s]
            dets.append({"image_id": iid, "category_id": int(rng.choice([3, 7])),
                         "score": round(float(rng.random()), 1), "segmentation": _rle(m), "bbox": box})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _pycocotools_eval(gt, dets, iou_type, cat_ids=None, evaluator=COCOeval):
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        d = c.loadRes(copy.deepcopy(dets))
        ev = evaluator(c, d, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _pycocotools(gt, dets, iou_type, cat_ids=None):
    return _pycocotools_eval(gt, dets, iou_type, cat_ids).stats


def assert_equals_pycocotools(got, gt, dets, iou_type):
    """The 12 stats (-1 as None) and the per-class AP (from pycocotools' precision array) agree."""
    ev = _pycocotools_eval(gt, dets, iou_type)
    assert [k for k in got[iou_type] if k != "boundary_AP"] == list(STAT_NAMES)
    for name, v in zip(STAT_NAMES, ev.stats):
        assert got[iou_type][name] == (None if v == -1 else pytest.approx(v, abs=TOL)), name
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        p = p[p > -1]
        assert got["per_class"][names[cat]] == (pytest.approx(p.mean(), abs=TOL) if p.size else None), names[cat]
    assert set(got["per_class"]) == set(names.values())


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equals_pycocotools(iou_type):
    gt, dets = make_dataset()
    before = copy.deepcopy((gt, dets))
    got = evaluate_coco(gt, dets, iou_type)
    assert (gt, dets) == before, "inputs must not be modified"
    assert_equals_pycocotools(got, gt, dets, iou_type)
    assert got[iou_type]["AP"] is not None and 0 < got[iou_type]["AP"] < 1
    # per-class AP equals COCOeval restricted to that one category
    for cat in gt["categories"]:
        single = _pycocotools(gt, dets, iou_type, cat_ids=[cat["id"]])[0]
        assert got["per_class"][cat["name"]] == (None if single == -1 else pytest.approx(single, abs=TOL))
    assert got["per_class"]["cone"] is None  # detections but no ground truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_area_ranges_max_dets_and_ties_equal_pycocotools(iou_type, seed):
    gt, dets = make_sized_dataset(seed)
    got = evaluate_coco(gt, dets, iou_type, boundary_ratio=None)
    assert_equals_pycocotools(got, gt, dets, iou_type)
    stats = got[iou_type]
    assert all(stats[k] is not None for k in ("APs", "APm", "APl", "AR1", "AR10", "AR100"))
    assert stats["AR1"] < stats["AR10"] <= stats["AR100"]


def test_missing_iscrowd_means_not_crowd():
    gt, dets = make_dataset()
    bare = copy.deepcopy(gt)
    for a in bare["annotations"]:
        if not a["iscrowd"]:
            del a["iscrowd"]
    assert evaluate_coco(bare, dets, "segm") == evaluate_coco(gt, dets, "segm")


def test_annotation_ids_are_only_names():
    # COCOeval marks a match with the matched annotation's id, 0 meaning "unmatched": pycocotools
    # never matches an annotation whose id is 0. Ids are renumbered inside, so they cannot matter.
    gt, dets = make_dataset()
    renamed = copy.deepcopy(gt)
    for a, new_id in zip(renamed["annotations"], np.random.default_rng(0).permutation(len(gt["annotations"]))):
        a["id"] = int(new_id) - 3  # shuffled, negative and 0
    assert evaluate_coco(renamed, dets, "segm") == evaluate_coco(gt, dets, "segm")
    one = {"images": [{"id": 1, "height": 10, "width": 10}], "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16.0,
                            "bbox": [2.0, 2.0, 4.0, 4.0]}]}
    det = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2.0, 2.0, 4.0, 4.0]}]
    assert evaluate_coco(one, det, "bbox")["bbox"]["AP"] == 1.0
    assert _pycocotools(one, det, "bbox")[0] == 0.0  # pycocotools' own result on id 0


def test_empty_detections_score_zero_where_ground_truth_exists():
    gt, _ = make_dataset()
    got = evaluate_coco(gt, [], "segm")
    assert got["segm"]["AP"] == 0.0 and got["segm"]["AR100"] == 0.0
    assert got["per_class"]["worker"] == 0.0 and got["per_class"]["cone"] is None


def test_no_ground_truth_at_all_is_null():
    gt, dets = make_dataset()
    gt = {**gt, "annotations": []}
    got = evaluate_coco(gt, dets, "bbox")
    assert all(v is None for v in got["bbox"].values())


def _gt_one():
    return {"images": [{"id": 1, "height": 4, "width": 5}],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4.0,
                             "bbox": [0, 0, 2, 2], "segmentation": {"size": [4, 5], "counts": [0, 2, 18]}}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["annotations"][0]["segmentation"].update(counts=[0, 2, 17]), r"annotation id 10: RLE run lengths sum to 19"),
    (lambda g: g["annotations"][0]["segmentation"].update(size=[5, 4]), r"annotation id 10: RLE size \[5, 4\] != image size"),
    (lambda g: g["annotations"][0]["segmentation"].update(counts="0\x7f"), r"annotation id 10: malformed RLE"),
    (lambda g: g["annotations"][0]["segmentation"].update(counts="0`"), r"ends inside a number"),
    (lambda g: g["annotations"][0].update(segmentation=[[0, 0, 2, 2]]), r"annotation id 10: polygon 0"),
    (lambda g: g["annotations"][0].update(bbox=[0, float("nan"), 1, 1]), r"annotation id 10: bbox"),
    (lambda g: g["annotations"][0].pop("area"), r"annotation id 10: 'area'"),
    (lambda g: g["annotations"][0].update(image_id=7), r"annotation id 10: image_id 7"),
    (lambda g: g["annotations"][0].update(iscrowd=2), r"iscrowd"),
    (lambda g: g["images"].append({"id": 1, "height": 4, "width": 5}), r"duplicate image id 1"),
])
def test_ground_truth_validation_names_the_annotation(mutate, message):
    gt = _gt_one()
    mutate(gt)
    with pytest.raises(MetricsInputError, match=message):
        validate_ground_truth(gt, "segm", "gt.json")


@pytest.mark.parametrize("det, message", [
    ({"image_id": 2, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}, r"detection #0: image_id 2"),
    ({"image_id": 1, "category_id": 3, "score": 0.5, "bbox": [0, 0, 1, 1]}, r"category_id 3"),
    ({"image_id": 1, "category_id": 1, "score": float("inf"), "bbox": [0, 0, 1, 1]}, r"'score'"),
    ({"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, -1, 1]}, r"negative width"),
    ({"image_id": 1, "category_id": 1, "score": 0.5}, r"bbox must be"),
    ({"image_id": [1], "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}, r"image_id \[1\] is not in"),
    ({"image_id": 1, "category_id": 1, "score": True, "bbox": [0, 0, 1, 1]}, r"'score' must be a finite number"),
    ({"image_id": 1, "category_id": 1, "score": 10 ** 400, "bbox": [0, 0, 1, 1]}, r"'score'"),
    ({"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, "1"]}, r"bbox must be 4 finite numbers"),
])
def test_detection_validation_names_the_detection(det, message):
    with pytest.raises(MetricsInputError, match=message):
        validate_detections([det], _gt_one(), "bbox", "dt.json")


def test_validation_names_the_first_bad_item():
    good = {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1],
            "segmentation": {"size": [4, 5], "counts": "02?1"}}
    assert rle_string_to_counts("02?1") == [0, 2, 15, 3]
    dets = [dict(good) for _ in range(6)]
    dets[4]["score"] = None
    dets[2]["segmentation"] = {"size": [4, 5], "counts": "02?2"}  # sums to 21
    dets[3]["bbox"] = [0, 0, -1, 1]
    with pytest.raises(MetricsInputError, match=r"detection #3 \(image_id 1\): bbox has a negative width"):
        validate_detections(dets, _gt_one(), "segm", "dt.json")
    dets[3]["bbox"] = [0, 0, 1, 1]
    dets[4]["score"] = 0.1
    # RLE contents are checked last, all strings at once
    with pytest.raises(MetricsInputError, match=r"detection #2 \(image_id 1\): RLE run lengths sum to 21"):
        validate_detections(dets, _gt_one(), "segm", "dt.json")
    del dets[2]["bbox"]
    with pytest.raises(MetricsInputError, match=r"detection #2 \(image_id 1\): no 'bbox' where detection #0 has one"):
        validate_detections(dets, _gt_one(), "segm", "dt.json")


def test_uncompressed_and_polygon_detections_are_accepted():
    gt = _gt_one()
    dets = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": {"size": [4, 5], "counts": [0, 2, 18]}},
            {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]]}]
    got = evaluate_coco(gt, dets, "segm")
    assert got["segm"]["AP50"] == pytest.approx(1.0)


def _results(name):
    path = RESULTS / name
    if not path.exists():
        pytest.skip(f"shared sample data not found: {path}")
    return json.loads(path.read_text())


def test_real_rles_decode_and_round_trip():
    results = _results("instances_val2014_fakesegm100_results.json")
    assert len(results) == 734
    for r in results:
        seg = r["segmentation"]
        h, w = seg["size"]
        counts = rle_string_to_counts(seg["counts"])
        assert sum(counts) == h * w
        assert counts_to_rle_string(counts) == seg["counts"]
        mask = mask_util.decode(seg)
        assert mask.shape == (h, w) and int(mask.sum()) == int(mask_util.area(seg))
        again = mask_util.encode(np.asfortranarray(mask))
        assert again["counts"].decode() == seg["counts"]


def _real_ground_truth(results):
    """Ground truth from every other real mask (real shapes, many overlapping, the real image
    sizes); some made crowd regions, as uncompressed RLE like COCO's."""
    images = {}
    for r in results:
        images.setdefault(r["image_id"], r["segmentation"]["size"])
    anns = []
    for k, r in enumerate(results[::2]):
        seg, crowd = r["segmentation"], int(k % 23 == 5)
        if crowd:
            seg = {"size": seg["size"], "counts": rle_string_to_counts(seg["counts"])}
        anns.append({"id": k + 1, "image_id": r["image_id"], "category_id": r["category_id"], "iscrowd": crowd,
                     "area": float(mask_util.area(r["segmentation"])),
                     "bbox": [float(v) for v in mask_util.toBbox(r["segmentation"])], "segmentation": seg})
    return {"images": [{"id": i, "height": s[0], "width": s[1]} for i, s in images.items()],
            "categories": [{"id": c, "name": f"c{c}"} for c in sorted({r["category_id"] for r in results})],
            "annotations": anns}


def test_real_rles_evaluate_equal_to_pycocotools():
    results = _results("instances_val2014_fakesegm100_results.json")
    gt = _real_ground_truth(results)
    assert any(a["iscrowd"] for a in gt["annotations"])
    got = evaluate_coco(gt, results, "segm", boundary_ratio=None)
    assert_equals_pycocotools(got, gt, results, "segm")
    # the same detections with the boxes of the box results file: areas come from the boxes
    boxes = _results("instances_val2014_fakebbox100_results.json")
    boxed = [{**r, "bbox": b["bbox"]} for r, b in zip(results, boxes)]
    assert_equals_pycocotools(evaluate_coco(gt, boxed, "segm", boundary_ratio=None), gt, boxed, "segm")


def test_real_boxes_evaluate_equal_to_pycocotools():
    gt = _real_ground_truth(_results("instances_val2014_fakesegm100_results.json"))
    boxes = _results("instances_val2014_fakebbox100_results.json")
    got = evaluate_coco(gt, boxes, "bbox")
    assert_equals_pycocotools(got, gt, boxes, "bbox")
    assert 0 < got["bbox"]["AP"] < 1


def test_collector_paused_restores_the_collector_state():
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------
# Boundary AP
# --------------------------------------------------------------------------------------


def _boundary_rle(seg, h, w, ratio):
    mask = mask_util.decode(seg)
    b = boundary_mask(mask, dilation_pixels(h, w, ratio)).astype(np.uint8)
    return mask_util.encode(np.asfortranarray(b))


class _BoundaryCOCOeval(COCOeval):
    """pycocotools' COCOeval matching on min(mask IoU, boundary IoU), crowd regions on mask IoU
    alone (the paper's rule), boundaries from segpipe.metrics.boundary."""

    ratio = 0.02

    def computeIoU(self, imgId, catId):
        ious = super().computeIoU(imgId, catId)
        if len(ious) == 0:
            return ious
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: self.params.maxDets[-1]]
        img = self.cocoGt.imgs[imgId]
        h, w = img["height"], img["width"]
        crowd = [int(g["iscrowd"]) for g in gt]
        b = np.asarray(mask_util.iou([_boundary_rle(d["segmentation"], h, w, self.ratio) for d in dt],
                                     [_boundary_rle(g["segmentation"], h, w, self.ratio) for g in gt], crowd))
        keep = ~np.asarray(crowd, bool)
        ious[:, keep] = np.minimum(ious[:, keep], b[:, keep])
        return ious


@pytest.mark.parametrize("data, ratio", [(make_sized_dataset, 0.02), (make_sized_dataset, 0.05), (make_dataset, 0.02)])
def test_boundary_ap_equals_a_pycocotools_reference(data, ratio):
    gt, dets = data(3)  # make_dataset: polygons and uncompressed RLE too
    # a crowd region, matched on mask IoU alone
    img = gt["images"][0]
    m = np.zeros((img["height"], img["width"]), np.uint8)
    m[10:60, 10:90] = 1
    gt["annotations"].append({"id": 999, "image_id": img["id"], "category_id": gt["categories"][0]["id"], "iscrowd": 1,
                              "area": float(m.sum()), "bbox": _bbox(m), "segmentation": _rle(m)})
    for image in gt["images"]:  # sizes where ratio x diagonal is a half pixel are rounded differently
        x = ratio * np.hypot(image["height"], image["width"])
        assert abs(x - np.floor(x) - 0.5) > 1e-6
    got = evaluate_coco(gt, dets, "segm", boundary_ratio=ratio)
    _BoundaryCOCOeval.ratio = ratio
    ref = _pycocotools_eval(gt, dets, "segm", evaluator=_BoundaryCOCOeval).stats[0]
    assert got["segm"]["boundary_AP"] == pytest.approx(ref, abs=TOL)
    assert got["segm"]["boundary_AP"] < got["segm"]["AP"]
    assert_equals_pycocotools(got, gt, dets, "segm")  # the mask numbers do not change


def test_boundary_ap_of_perfect_and_of_shifted_masks():
    h, w = 120, 160  # d = 4
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    dets, shifted = [], []
    for k, (y, x, s) in enumerate([(5, 5, 40), (60, 70, 50), (10, 100, 30)]):
        m = np.zeros((h, w), np.uint8)
        m[y:y + s, x:x + s] = 1
        gt["annotations"].append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                  "area": float(m.sum()), "bbox": _bbox(m), "segmentation": _rle(m)})
        dets.append({"image_id": 1, "category_id": 1, "score": 0.9 - k / 10, "segmentation": _rle(m)})
        moved = np.roll(m, 3, axis=1)
        shifted.append({**dets[-1], "segmentation": _rle(moved)})
    assert evaluate_coco(gt, dets, "segm")["segm"]["boundary_AP"] == 1.0
    got = evaluate_coco(gt, shifted, "segm")["segm"]
    # 3 px on 30-50 px squares: mask IoU >= 0.83, boundary IoU (4 px bands) about 0.4-0.5
    assert got["AP50"] == 1.0 and got["boundary_AP"] < 0.2


def test_boundary_ap_rounds_half_pixels_down():
    # faster-coco-eval computes d = round(ratio x diagonal) with halves rounded down; the paper's
    # code (and our semantic Boundary IoU) rounds them to even: 1.5 -> 1 here, 2 there
    from faster_coco_eval.core import mask as fast_mask

    m = np.ones((45, 60), np.uint8)  # diagonal 75: 0.02 x 75 = 1.5
    got = fast_mask.decode(fast_mask.rleToBoundary(fast_mask.encode(np.asfortranarray(m)), 0.02)).astype(bool)
    assert dilation_pixels(45, 60, 0.02) == 2
    assert np.array_equal(got, boundary_mask(m, 1))


def test_boundary_ap_only_for_segm_and_when_asked():
    gt, dets = make_dataset()
    assert "boundary_AP" not in evaluate_coco(gt, dets, "bbox")["bbox"]
    assert "boundary_AP" not in evaluate_coco(gt, dets, "segm", boundary_ratio=None)["segm"]
    with pytest.raises(ValueError, match="boundary_ratio"):
        evaluate_coco(gt, dets, "segm", boundary_ratio=-0.1)
    assert evaluate_coco(gt, [], "segm")["segm"]["boundary_AP"] == 0.0


# --------------------------------------------------------------------------------------
# The vectorised RLE string check
# --------------------------------------------------------------------------------------


def _python_check(s, area):
    try:
        runs = rle_string_to_counts(s)
    except ValueError:
        return False
    return all(r >= 0 for r in runs) and sum(runs) == area


def test_vectorised_rle_check_equals_the_python_decoder():
    rng = np.random.default_rng(0)
    strings, areas = [], []
    for _ in range(3000):
        hi = int(rng.choice([20, 5000, 2 ** 33]))
        runs = [int(v) for v in rng.integers(0, hi, int(rng.integers(0, 12)))]
        s, area = counts_to_rle_string(runs), sum(runs)
        kind = int(rng.integers(0, 6))
        if kind == 1 and s:  # a character changed, maybe outside the alphabet
            p = int(rng.integers(0, len(s)))
            s = s[:p] + chr(int(rng.integers(40, 120))) + s[p + 1:]
        elif kind == 2 and s:  # truncated
            s = s[: int(rng.integers(0, len(s)))]
        elif kind == 3:
            area += int(rng.integers(-2, 3))
        elif kind == 4:  # not ASCII
            p = int(rng.integers(0, len(s) + 1))
            s = s[:p] + "\u00e9" + s[p:]
        strings.append(s)
        areas.append(area)
    valid = [_python_check(s, a) for s, a in zip(strings, areas)]
    assert 0.2 < np.mean(valid) < 0.8
    for _ in range(2000):
        a = int(rng.integers(0, len(strings)))
        b = a + int(rng.integers(0, 40))
        want = next((i for i, ok in enumerate(valid[a:b]) if not ok), None)
        assert first_bad_rle_string(strings[a:b], areas[a:b]) == want, (a, b)


def test_vectorised_rle_check_leaves_huge_numbers_to_python():
    big = counts_to_rle_string([2 ** 45, 3, 2 ** 45])  # numbers of > 8 characters: flagged
    assert _python_check(big, 2 ** 46 + 3)
    assert first_bad_rle_string(["0", big], [0, 2 ** 46 + 3]) == 1
    # in a real image the Python decoder has the last word
    gt = _gt_one()
    gt["annotations"][0]["segmentation"]["counts"] = big
    with pytest.raises(MetricsInputError, match=r"annotation id 10: RLE run lengths sum to 70368744177667, expected 4 x 5"):
        validate_ground_truth(gt, "segm", "gt.json")


def test_real_rles_pass_the_vectorised_check():
    results = _results("instances_val2014_fakesegm100_results.json")
    strings = [r["segmentation"]["counts"] for r in results]
    areas = [r["segmentation"]["size"][0] * r["segmentation"]["size"][1] for r in results]
    assert first_bad_rle_string(strings, areas) is None
    broken = list(strings)
    broken[400] = broken[400][:-1] + chr(ord(broken[400][-1]) ^ 1)  # one flipped bit at the end
    assert first_bad_rle_string(broken, areas) == 400
