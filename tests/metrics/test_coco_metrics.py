"""COCO metrics: equality with pycocotools' COCOeval on generated data (crowd regions, images
without detections or ground truth, > 100 detections on one image), validation before the C
code sees anything, and the real RLEs of the COCO API's result files."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.metrics.coco import (
    STAT_NAMES,
    counts_to_rle_string,
    evaluate_coco,
    rle_string_to_counts,
    validate_detections,
    validate_ground_truth,
)
from segpipe.metrics.semantic import MetricsInputError

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


def _pycocotools(gt, dets, iou_type, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        d = c.loadRes(copy.deepcopy(dets))
        ev = COCOeval(c, d, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equals_pycocotools(iou_type):
    gt, dets = make_dataset()
    before = copy.deepcopy((gt, dets))
    got = evaluate_coco(gt, dets, iou_type)
    assert (gt, dets) == before, "inputs must not be modified"
    ref = _pycocotools(gt, dets, iou_type)
    assert list(got[iou_type]) == list(STAT_NAMES)
    for name, v in zip(STAT_NAMES, ref):
        assert got[iou_type][name] == (None if v == -1 else pytest.approx(v, abs=0)), name
    assert got[iou_type]["AP"] is not None and 0 < got[iou_type]["AP"] < 1
    # per-class AP equals COCOeval restricted to that one category
    for cat in gt["categories"]:
        single = _pycocotools(gt, dets, iou_type, cat_ids=[cat["id"]])[0]
        assert got["per_class"][cat["name"]] == (None if single == -1 else pytest.approx(single, abs=1e-12))
    assert got["per_class"]["cone"] is None  # detections but no ground truth


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
])
def test_detection_validation_names_the_detection(det, message):
    with pytest.raises(MetricsInputError, match=message):
        validate_detections([det], _gt_one(), "bbox", "dt.json")


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


def test_real_rles_evaluate_equal_to_pycocotools():
    # ground truth from the first half of the real masks, detections: all of them (real shapes,
    # many overlapping, sizes from the real images)
    results = _results("instances_val2014_fakesegm100_results.json")
    images = {}
    for r in results:
        images.setdefault(r["image_id"], r["segmentation"]["size"])
    gt = {"images": [{"id": i, "height": s[0], "width": s[1]} for i, s in images.items()],
          "categories": [{"id": c, "name": f"c{c}"} for c in sorted({r["category_id"] for r in results})],
          "annotations": [{"id": k + 1, "image_id": r["image_id"], "category_id": r["category_id"], "iscrowd": 0,
                           "area": float(mask_util.area(r["segmentation"])),
                           "bbox": [float(v) for v in mask_util.toBbox(r["segmentation"])],
                           "segmentation": r["segmentation"]} for k, r in enumerate(results[::2])]}
    got = evaluate_coco(gt, results, "segm")
    ref = _pycocotools(gt, results, "segm")
    assert [got["segm"][n] for n in STAT_NAMES] == [None if v == -1 else pytest.approx(v, abs=0) for v in ref]
