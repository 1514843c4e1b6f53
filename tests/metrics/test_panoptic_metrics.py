"""Panoptic quality: hand-computed cases (IoU threshold, void, crowd, things vs stuff), the real
COCO panoptic sample with perturbed predictions against a deliberately simple second
implementation, input errors naming the image and segment, the CLI end to end, and segment
PNG encoding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.commands.metrics import main
from segpipe.formats.pngs import id_to_rgb, read_id_png, rgb_to_id
from segpipe.metrics import panoptic
from segpipe.metrics.panoptic import PQStat, compute
from segpipe.metrics.semantic import MetricsInputError
from segpipe.panoptic import encode_png, segments_info

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "formats" / "coco_dataset" / "coco_panoptic"

# thing 1 "worker", stuff 2 "soil", thing 3 "cone"
CATS = [{"id": 1, "name": "worker", "isthing": 1}, {"id": 2, "name": "soil", "isthing": 0},
        {"id": 3, "name": "cone", "isthing": 1}]


def _stat(cats=CATS) -> PQStat:
    return PQStat([c["id"] for c in cats])


def _compute(stat: PQStat, cats=CATS) -> dict:
    return stat.compute([c["name"] for c in cats], [bool(c["isthing"]) for c in cats])


def _segs(*entries) -> list[dict]:
    """``(id, category_id)`` or ``(id, category_id, iscrowd)`` tuples as segments_info."""
    return [{"id": e[0], "category_id": e[1], "iscrowd": e[2] if len(e) > 2 else 0} for e in entries]


def _row(*runs) -> np.ndarray:
    """A 1 x N map from ``(id, length)`` runs, left to right."""
    return np.array([sum(([i] * n for i, n in runs), [])])


def _close(a, b, tol=1e-12):
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert a == pytest.approx(b, abs=tol)


# --------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------


def test_perfect_prediction_is_one_whatever_the_ids():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 3, 3, 2]])
    pred = np.array([[9, 9, 4, 4], [9, 9, 4, 4], [0, 7, 7, 4]])
    stat = _stat()
    stat.update(gt, _segs((1, 1), (2, 2), (3, 3)), pred, _segs((9, 1), (4, 2), (7, 3)))
    m = _compute(stat)
    for key in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff"):
        _close(m[key], 1.0)
    assert m["per_class"]["worker"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_iou_above_half_matches_and_below_does_not():
    # Image 1: worker gt cols 0-7, predicted cols 2-9: IoU 6 / 10 = 0.6 -> TP.
    #   soil gt cols 8-19 (12 px), predicted cols 0-1 + 10-19 (12 px): IoU 10 / 14.
    a = _stat()
    a.update(_row((1, 8), (2, 12)), _segs((1, 1), (2, 2)),
             _row((6, 2), (5, 8), (6, 10)), _segs((5, 1), (6, 2)))
    # Image 2: worker gt cols 0-6, predicted (shifted) cols 3-9: IoU 4 / 10 = 0.4 -> FP + FN.
    #   soil gt cols 7-19 (13 px), predicted cols 0-2 + 10-19 (13 px): IoU 10 / 16.
    b = _stat()
    b.update(_row((1, 7), (2, 13)), _segs((1, 1), (2, 2)),
             _row((6, 3), (5, 7), (6, 10)), _segs((5, 1), (6, 2)))
    assert (a.tp.tolist(), a.fp.tolist(), a.fn.tolist()) == ([1, 1, 0], [0, 0, 0], [0, 0, 0])
    assert (b.tp.tolist(), b.fp.tolist(), b.fn.tolist()) == ([0, 1, 0], [1, 0, 0], [1, 0, 0])
    _close(_compute(b)["per_class"]["worker"]["pq"], 0.0)
    assert _compute(b)["per_class"]["worker"]["sq"] is None  # no TP: undefined for the class...
    _close(_compute(b)["sq"], (0 + 10 / 16) / 2)  # ...and 0 in the mean, as panopticapi

    m = _compute(a + b)
    worker, soil = m["per_class"]["worker"], m["per_class"]["soil"]
    assert (worker["tp"], worker["fp"], worker["fn"]) == (1, 1, 1)
    _close(worker["pq"], 0.6 / (1 + 0.5 + 0.5))
    _close(worker["sq"], 0.6)
    _close(worker["rq"], 0.5)
    _close(soil["pq"], (10 / 14 + 10 / 16) / 2)
    _close(soil["rq"], 1.0)
    assert m["per_class"]["cone"] == {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0}
    _close(m["pq"], (0.3 + (10 / 14 + 10 / 16) / 2) / 2)  # cone is left out of the mean
    _close(m["pq_things"], 0.3)
    _close(m["rq_things"], 0.5)
    _close(m["pq_stuff"], soil["pq"])


def test_void_pixels_leave_the_union_and_excuse_false_positives():
    # worker gt cols 0-3, void cols 4-7. A prediction over cols 0-7 has plain IoU 4 / 8 = 0.5
    # (no match); without its 4 void pixels the union is 4 and IoU 1.
    stat = _stat()
    stat.update(_row((1, 4), (0, 4)), _segs((1, 1)), _row((5, 8)), _segs((5, 1)))
    m = _compute(stat)
    assert m["per_class"]["worker"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}

    # soil gt cols 0-3, void cols 4-11; no soil predicted (FN). Unmatched predictions:
    # 7 (worker) cols 0-1, on soil: FP.  8 (cone) cols 2-3 on soil + 8-9 void: exactly half in
    # void, which is not *more* than half: FP.  9 (cone) cols 4-7 and 6 (cone) cols 10-11: all
    # void, ignored.
    gt = _row((2, 4), (0, 8))
    pred = np.array([[7, 7, 8, 8, 9, 9, 9, 9, 8, 8, 6, 6]])
    stat = _stat()
    stat.update(gt, _segs((2, 2)), pred, _segs((7, 1), (8, 3), (9, 3), (6, 3)))
    assert (stat.tp.tolist(), stat.fp.tolist(), stat.fn.tolist()) == ([0, 0, 0], [1, 0, 1], [0, 1, 0])


def test_crowd_regions_are_never_matched_and_excuse_predictions_of_their_category():
    # gt: worker crowd (id 3) cols 0-5, worker (id 4) cols 6-9, soil (id 5) cols 10-13.
    gt = _row((3, 6), (4, 4), (5, 4))
    gt_segs = _segs((3, 1, 1), (4, 1), (5, 2))
    # pred: a worker exactly on the crowd (not a TP, not an FP: all in crowd of its category),
    # a worker on id 4 (TP), a cone on soil cols 10-11 + ... (FP), soil cols 12-13 (IoU 0.5: FN, FP).
    pred = _row((1, 6), (2, 4), (8, 2), (9, 2))
    pred_segs = _segs((1, 1), (2, 1), (8, 3), (9, 2))
    stat = _stat()
    stat.update(gt, gt_segs, pred, pred_segs)
    assert (stat.tp.tolist(), stat.fp.tolist(), stat.fn.tolist()) == ([1, 0, 0], [0, 1, 1], [0, 1, 0])

    # A crowd region of another category does not excuse; void + crowd together do.
    gt = _row((3, 4), (0, 2), (5, 6))
    gt_segs = _segs((3, 1, 1), (5, 2))
    pred = _row((1, 2), (2, 4), (6, 6))  # 1 cone on crowd-worker; 2 worker: 2 crowd + 2 void
    stat = _stat()
    stat.update(gt, gt_segs, pred, _segs((1, 3), (2, 1), (6, 2)))
    assert (stat.tp.tolist(), stat.fp.tolist(), stat.fn.tolist()) == ([0, 1, 0], [0, 0, 1], [0, 0, 0])


def test_every_crowd_region_of_the_category_counts():
    # Two crowd regions of one category; a prediction 2 px in each (4 px) lies wholly in crowd.
    # panopticapi would count only the last crowd region (2 of 4: an FP); see docs/metrics.md.
    gt = _row((3, 4), (4, 4), (5, 4))
    stat = _stat()
    stat.update(gt, _segs((3, 1, 1), (4, 1, 1), (5, 2)), _row((0, 2), (1, 4), (2, 6)), _segs((1, 1), (2, 2)))
    assert (stat.tp.tolist(), stat.fp.tolist(), stat.fn.tolist()) == ([0, 1, 0], [0, 0, 0], [0, 0, 0])


def test_things_and_stuff_are_averaged_apart():
    gt = _row((1, 4), (2, 4))
    stat = _stat()
    stat.update(gt, _segs((1, 1), (2, 2)), _row((1, 4), (0, 4)), _segs((1, 1)))
    m = _compute(stat)
    _close(m["pq_things"], 1.0)
    _close(m["pq_stuff"], 0.0)
    _close(m["sq_stuff"], 0.0)
    _close(m["pq"], 0.5)
    # Only things in the table: the stuff averages are undefined.
    things = [CATS[0], CATS[2]]
    stat = _stat(things)
    stat.update(_row((1, 4)), _segs((1, 1)), _row((1, 4)), _segs((1, 1)))
    m = _compute(stat, things)
    assert (m["pq_stuff"], m["sq_stuff"], m["rq_stuff"]) == (None, None, None)
    _close(m["pq"], 1.0)


def test_nothing_scored_is_null_and_torch_inputs_work():
    stat = _stat()
    stat.update(torch.tensor([[0, 3, 3]]), _segs((3, 1, 1)), torch.tensor([[0, 0, 0]]), [])
    m = _compute(stat)
    assert m["pq"] is None and m["pq_things"] is None and stat.images == 1


def test_merge_sums_and_checks_categories():
    a, b = _stat(), _stat()
    a.update(_row((1, 4)), _segs((1, 1)), _row((1, 4)), _segs((1, 1)))
    b.update(_row((1, 4)), _segs((1, 1)), _row((0, 4)), [])
    total = _stat().merge(a).merge(b)
    assert (total.tp.tolist(), total.fn.tolist(), total.images) == ([1, 0, 0], [1, 0, 0], 2)
    assert (a + b).tp.tolist() == total.tp.tolist()
    with pytest.raises(ValueError, match="cannot combine"):
        a.merge(_stat(CATS[:2]))


@pytest.mark.parametrize(("gt", "gt_segs", "pred", "pred_segs", "match"), [
    (_row((1, 2)), _segs((1, 1), (5, 2)), _row((1, 2)), _segs((1, 1)), r"ground truth: segments_info id\(s\) \[5\] have no pixels"),
    (_row((1, 2)), _segs((1, 1)), _row((1, 1), (4, 1)), _segs((1, 1)), r"prediction: segment id\(s\) \[4\] .*no segments_info entry"),
    (_row((1, 2)), _segs((1, 1)), _row((1, 2)), _segs((1, 9)), "prediction: segment id 1 has unknown category_id 9"),
    (_row((1, 2)), _segs((1, 1)), _row((1, 3)), _segs((1, 1)), r"predicted segment map is 3 x 1 .* ground truth is 2 x 1"),
    (_row((1, 2)), _segs((1, 1), (1, 2)), _row((1, 2)), _segs((1, 1)), "ground truth: segment id 1 appears twice"),
    (_row((1, 2)), _segs((1, 1)), _row((1, 2)), _segs((1, 1), (0, 1)), "prediction: segment id 0 in segments_info"),
    (_row((1, 2)), _segs((1, 1, 2)), _row((1, 2)), _segs((1, 1)), "ground truth: segment id 1 has iscrowd=2"),
])
def test_errors_name_the_image_and_segment(gt, gt_segs, pred, pred_segs, match):
    with pytest.raises(MetricsInputError, match=f"^image id 40: {match}"):
        _stat().update(gt, gt_segs, pred, pred_segs, where="image id 40")


# --------------------------------------------------------------------------------------
# A second, deliberately simple implementation: pixel loops and plain dicts
# --------------------------------------------------------------------------------------


def reference_counts(gt_map, gt_segs, pred_map, pred_segs) -> dict[int, list]:
    """{category: [iou_sum, tp, fp, fn]} of one image, from COCO's rules written out directly."""
    inter: dict[tuple[int, int], int] = {}
    gt_area: dict[int, int] = {}
    pred_area: dict[int, int] = {}
    for g_row, p_row in zip(np.asarray(gt_map).tolist(), np.asarray(pred_map).tolist()):
        for g, p in zip(g_row, p_row):
            inter[(g, p)] = inter.get((g, p), 0) + 1
            gt_area[g] = gt_area.get(g, 0) + 1
            pred_area[p] = pred_area.get(p, 0) + 1
    gts = {s["id"]: s for s in gt_segs}
    preds = {s["id"]: s for s in pred_segs}
    out: dict[int, list] = {}

    def row(cat):
        return out.setdefault(cat, [0.0, 0, 0, 0])

    gt_hit, pred_hit = set(), set()
    for g, gs in gts.items():
        if gs.get("iscrowd", 0):
            continue
        for p, ps in preds.items():
            if ps["category_id"] != gs["category_id"]:
                continue
            i = inter.get((g, p), 0)
            union = gt_area[g] + pred_area[p] - i - inter.get((0, p), 0)
            if i / union > 0.5:
                row(gs["category_id"])[0] += i / union
                row(gs["category_id"])[1] += 1
                gt_hit.add(g)
                pred_hit.add(p)
    for p, ps in preds.items():
        if p in pred_hit:
            continue
        ignored = inter.get((0, p), 0)
        for g, gs in gts.items():
            if gs.get("iscrowd", 0) and gs["category_id"] == ps["category_id"]:
                ignored += inter.get((g, p), 0)
        if ignored / pred_area[p] <= 0.5:
            row(ps["category_id"])[2] += 1
    for g, gs in gts.items():
        if g not in gt_hit and not gs.get("iscrowd", 0):
            row(gs["category_id"])[3] += 1
    return out


def reference_summary(counts: dict[int, list], cats: list[dict]) -> dict:
    per_class, groups = {}, {"": [], "_things": [], "_stuff": []}
    for c in cats:
        iou, tp, fp, fn = counts.get(c["id"], [0.0, 0, 0, 0])
        if tp + fp + fn == 0:
            per_class[c["name"]] = {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0}
            continue
        pq, sq, rq = iou / (tp + fp / 2 + fn / 2), (iou / tp if tp else None), tp / (tp + fp / 2 + fn / 2)
        per_class[c["name"]] = {"pq": pq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn}
        for key in ("", "_things" if c["isthing"] else "_stuff"):
            groups[key].append((pq, sq or 0.0, rq))
    out = {}
    for key, vals in groups.items():
        for j, name in enumerate(("pq", "sq", "rq")):
            out[name + key] = sum(v[j] for v in vals) / len(vals) if vals else None
    out["per_class"] = per_class
    return out


def _assert_same(got: dict, want: dict) -> None:
    for key in want:
        if key == "per_class":
            continue
        _close(got[key], want[key], 1e-6)
    assert got["per_class"].keys() == want["per_class"].keys()
    for name, w in want["per_class"].items():
        g = got["per_class"][name]
        assert (g["tp"], g["fp"], g["fn"]) == (w["tp"], w["fp"], w["fn"]), name
        for key in ("pq", "sq", "rq"):
            _close(g[key], w[key], 1e-6)


def _add(total: dict, counts: dict) -> None:
    for cat, vals in counts.items():
        t = total.setdefault(cat, [0.0, 0, 0, 0])
        for j in range(4):
            t[j] += vals[j]


def _sample(split: str) -> tuple[dict, dict, np.ndarray, Path]:
    doc_path = SAMPLE / "annotations" / f"panoptic_{split}.json"
    if not doc_path.exists():
        pytest.skip(f"shared sample data not found: {doc_path}")
    doc = json.loads(doc_path.read_text())
    ann = doc["annotations"][0]
    png = doc_path.with_suffix("") / ann["file_name"]
    return doc, ann, read_id_png(png), png


def perturbations(gt: np.ndarray, segs: list[dict], cat_ids: list[int], seed: int = 0):
    """(name, pred map, pred segments_info): the ground truth shifted, merged, split, dropped,
    relabelled, and random block maps."""
    cats = {s["id"]: s["category_id"] for s in segs}
    ids = sorted(cats)

    def listed(m, cat_of):
        return [{"id": int(i), "category_id": cat_of[int(i)]} for i in np.unique(m) if i != 0]

    yield "identity", gt.copy(), listed(gt, cats)
    for axis in (0, 1):
        for step in (1, -1, 2):
            m = np.roll(gt, step, axis=axis)
            yield f"shift {axis} {step}", m, listed(m, cats)
    if len(ids) >= 2:
        m = np.where(np.isin(gt, ids[:2]), ids[0], gt)
        yield "merged", m, listed(m, cats)
    for i in ids:
        half = np.zeros_like(gt, dtype=bool)
        half[: gt.shape[0] // 2] = True
        m = np.where((gt == i) & half, 1000 + i, gt)
        yield f"split {i}", m, listed(m, {**cats, 1000 + i: cats[i]})
        m = np.where(gt == i, 0, gt)
        yield f"dropped {i}", m, listed(m, cats)
        m = gt.copy()
        yield f"relabelled {i}", m, listed(m, {**cats, i: cat_ids[(cat_ids.index(cats[i]) + 1) % len(cat_ids)]})
    rng = random.Random(seed)
    h, w = gt.shape
    for k in range(12):
        m = np.zeros_like(gt)
        cat_of = {}
        for sid in range(1, rng.randint(1, 5)):
            y0, x0 = rng.randrange(h), rng.randrange(w)
            m[y0:y0 + rng.randint(1, h), x0:x0 + rng.randint(1, w)] = sid
            cat_of[sid] = rng.choice(cat_ids)
        yield f"random {k}", m, listed(m, cat_of)


@pytest.mark.parametrize("thing_names", [(), ("a",), ("a", "b")])
def test_real_sample_perturbations_agree_with_the_simple_implementation(thing_names):
    doc, ann, gt, _ = _sample("val")
    cats = [{**c, "isthing": int(c["name"] in thing_names)} for c in doc["categories"]]
    cat_ids = [c["id"] for c in cats]
    total_ref: dict = {}
    total = _stat(cats)
    for name, pred, pred_segs in perturbations(gt, ann["segments_info"], cat_ids):
        stat = _stat(cats)
        stat.update(gt, ann["segments_info"], pred, pred_segs, where=name)
        ref = reference_counts(gt, ann["segments_info"], pred, pred_segs)
        _assert_same(_compute(stat, cats), reference_summary(ref, cats))
        total.merge(stat)
        _add(total_ref, ref)
    _assert_same(_compute(total, cats), reference_summary(total_ref, cats))
    # the identity keeps "a" perfect; the crowd "b" region is never a TP or an FN
    assert total.fn[cat_ids.index(2)] == 0 and total.tp[cat_ids.index(2)] == 0


def test_real_train_sample_with_its_own_ids():
    # a.png is one segment of id 460551 (R, G and B all used by the id).
    doc, ann, gt, _ = _sample("train")
    assert np.unique(gt).tolist() == [460551] == [s["id"] for s in ann["segments_info"]]
    stat = _stat(doc["categories"])
    pred = np.where(np.arange(gt.shape[1]) < 3, 12, 0)[None].repeat(gt.shape[0], 0)  # 3 of 5 columns
    stat.update(gt, ann["segments_info"], pred, [{"id": 12, "category_id": 1}], where="image id 5")
    _close(_compute(stat, doc["categories"])["per_class"]["a"]["pq"], 0.6)


@pytest.mark.parametrize("dense_limit", [panoptic._DENSE_LIMIT, 0])
def test_random_scenes_with_crowd_and_void_agree_with_the_simple_implementation(monkeypatch, dense_limit):
    monkeypatch.setattr(panoptic, "_DENSE_LIMIT", dense_limit)  # 0: the sparse (np.unique) path
    rng = np.random.default_rng(7)
    total, total_ref = _stat(), {}
    for _ in range(40):
        h, w = rng.integers(3, 12, size=2)
        gt = np.zeros((h, w), dtype=np.int64)
        gt_segs = []
        for sid in range(1, rng.integers(2, 7)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            gt[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = sid * 1000
        for sid in np.unique(gt[gt > 0]).tolist():
            gt_segs.append({"id": sid, "category_id": int(rng.integers(1, 4)), "iscrowd": int(rng.random() < 0.25)})
        pred = gt.copy() // 1000
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
        noise = rng.random((h, w)) < 0.15
        pred[noise] = rng.integers(0, 8, size=int(noise.sum()))
        pred_segs = [{"id": i, "category_id": int(rng.integers(1, 4))} for i in np.unique(pred[pred > 0]).tolist()]
        stat = _stat()
        stat.update(gt, gt_segs, pred, pred_segs)
        ref = reference_counts(gt, gt_segs, pred, pred_segs)
        _assert_same(_compute(stat), reference_summary(ref, CATS))
        total.merge(stat)
        _add(total_ref, ref)
    _assert_same(_compute(total), reference_summary(total_ref, CATS))
    assert total.tp.sum() > 0 and total.fp.sum() > 0 and total.fn.sum() > 0


def test_compute_checks_its_inputs():
    z = np.zeros(2)
    with pytest.raises(ValueError, match="not unique"):
        compute(z, z, z, z, ["a", "a"], [True, False])
    with pytest.raises(ValueError, match="3 class names"):
        compute(z, z, z, z, ["a", "b", "c"], [True, False, True])


# --------------------------------------------------------------------------------------
# `segpipe metrics panoptic`
# --------------------------------------------------------------------------------------


def _write_pred(root: Path, image_id, file_name: str, seg_map: np.ndarray, segs: list[dict]) -> Path:
    """A prediction JSON + PNG folder written with the segpipe.panoptic helpers."""
    (root / "pred").mkdir(parents=True, exist_ok=True)
    (root / "pred" / file_name).write_bytes(encode_png(seg_map))
    doc = {"annotations": [{"image_id": image_id, "file_name": file_name, "segments_info": segments_info(seg_map, segs)}]}
    (root / "pred.json").write_text(json.dumps(doc))
    return root / "pred.json"


def _cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code), capsys.readouterr().err
    return 0, capsys.readouterr().out


def test_cli_scores_the_real_sample_end_to_end(tmp_path, capsys):
    doc, ann, gt, _ = _sample("val")
    pred = np.roll(gt, 1, axis=1)  # shifted one column right
    segs = [{"id": 7, "category_id": 1}, {"id": 20, "category_id": 2}]
    pred_json = _write_pred(tmp_path, 40, "b.png", pred, segs)
    out = tmp_path / "out" / "pq.json"
    gt_json = SAMPLE / "annotations" / "panoptic_val.json"
    rc, text = _cli(["panoptic", "--gt", str(gt_json), "--gt-dir", str(gt_json.with_suffix("")),
                     "--pred", str(pred_json), "--pred-dir", str(tmp_path / "pred"), "--out", str(out)], capsys)
    assert rc == 0 and "pq 0.0000" in text, text
    m = json.loads(out.read_text())
    assert list(m) == ["pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff",
                       "rq_stuff", "images", "per_class"]
    # "a": gt cols 0-1, pred cols 1-2 (col 2 is crowd "b", not void): IoU 10 / 30 -> FN + FP.
    #   "b" predicted cols 3-4: 10 px in the crowd region, 10 on void -> ignored.
    want = reference_summary(reference_counts(gt, ann["segments_info"], pred, segs), doc["categories"])
    _assert_same(m, want)
    assert m["per_class"]["a"] == {"pq": 0.0, "sq": None, "rq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    assert m["per_class"]["b"]["pq"] is None and m["pq_things"] is None and m["images"] == 1
    assert (m["pq"], m["pq_stuff"]) == (0.0, 0.0)

    # The PNG folders default to the JSON paths without .json (panopticapi's convention).
    (tmp_path / "pred").rename(tmp_path / "pred_default")
    pred_json.rename(tmp_path / "pred_default.json")
    rc, _ = _cli(["panoptic", "--gt", str(gt_json), "--pred", str(tmp_path / "pred_default.json"),
                  "--out", str(out)], capsys)
    assert rc == 0 and json.loads(out.read_text()) == m


def test_cli_perfect_prediction(tmp_path, capsys):
    _, ann, gt, _ = _sample("val")
    pred_json = _write_pred(tmp_path, 40, "b.png", gt, [{"id": 7, "category_id": 1}, {"id": 20, "category_id": 2}])
    gt_json = SAMPLE / "annotations" / "panoptic_val.json"
    out = tmp_path / "pq.json"
    rc, text = _cli(["panoptic", "--gt", str(gt_json), "--pred", str(pred_json), "--out", str(out)], capsys)
    assert rc == 0, text
    m = json.loads(out.read_text())
    assert (m["pq"], m["sq"], m["rq"], m["pq_stuff"]) == (1.0, 1.0, 1.0, 1.0)


def _error(tmp_path, capsys, args) -> str:
    rc, err = _cli(args, capsys)
    assert rc == 1 and err.startswith("segpipe metrics: error: "), err
    assert not (tmp_path / "pq.json").exists()
    return err


def test_cli_errors_name_the_file_image_and_segment(tmp_path, capsys):
    _, _, gt, _ = _sample("val")
    gt_json = str(SAMPLE / "annotations" / "panoptic_val.json")
    out = str(tmp_path / "pq.json")
    segs = [{"id": 7, "category_id": 1}, {"id": 20, "category_id": 2}]

    pred_json = _write_pred(tmp_path, 40, "b.png", gt, segs)
    doc = json.loads(pred_json.read_text())
    doc["annotations"][0]["segments_info"].pop()  # id 20 in the PNG, not in the JSON
    pred_json.write_text(json.dumps(doc))
    err = _error(tmp_path, capsys, ["panoptic", "--gt", gt_json, "--pred", str(pred_json), "--out", out])
    assert "image id 40" in err and "[20]" in err and "no segments_info entry" in err

    doc["annotations"][0]["segments_info"] += [{"id": 20, "category_id": 5}]
    pred_json.write_text(json.dumps(doc))
    err = _error(tmp_path, capsys, ["panoptic", "--gt", gt_json, "--pred", str(pred_json), "--out", out])
    assert "image id 40" in err and "segment id 20 has unknown category_id 5" in err

    doc["annotations"][0]["image_id"] = 41
    pred_json.write_text(json.dumps(doc))
    err = _error(tmp_path, capsys, ["panoptic", "--gt", gt_json, "--pred", str(pred_json), "--out", out])
    assert "no prediction for 1 ground-truth image id(s), e.g. 40" in err

    _write_pred(tmp_path, 40, "b.png", np.zeros((10, 4), np.int32), [])
    err = _error(tmp_path, capsys, ["panoptic", "--gt", gt_json, "--pred", str(pred_json), "--out", out])
    assert "b.png: image id 40: PNG is 4 x 10 but the ground truth" in err

    # The train sample's PNG is 5 x 5 but its image is declared 10 x 5.
    train_json = str(SAMPLE / "annotations" / "panoptic_train.json")
    _write_pred(tmp_path, 5, "a.png", np.zeros((5, 5), np.int32), [])
    err = _error(tmp_path, capsys, ["panoptic", "--gt", train_json, "--pred", str(pred_json), "--out", out])
    assert "a.png: PNG is 5 x 5 but image id 5 is declared 10 x 5" in err

    doc = json.loads(pred_json.read_text())
    doc["annotations"][0]["file_name"] = "../gt/x.png"
    pred_json.write_text(json.dumps(doc))
    err = _error(tmp_path, capsys, ["panoptic", "--gt", train_json, "--pred", str(pred_json), "--out", out])
    assert "image id 5: file_name '../gt/x.png' climbs out of its folder" in err

    err = _error(tmp_path, capsys, ["panoptic", "--gt", gt_json, "--pred", str(tmp_path / "nope.json"), "--out", out])
    assert "nope.json: file not found" in err


def test_cli_that_scores_nothing_fails(tmp_path, capsys):
    gt_root = tmp_path / "gt"
    (gt_root / "gt").mkdir(parents=True)
    gt_map = np.array([[0, 3, 3], [0, 3, 3]])  # void and a crowd region only
    (gt_root / "gt" / "x.png").write_bytes(encode_png(gt_map))
    gt_doc = {"categories": [dict(c) for c in CATS], "annotations": [
        {"image_id": 1, "file_name": "x.png", "segments_info": [{"id": 3, "category_id": 1, "iscrowd": 1}]}]}
    (gt_root / "gt.json").write_text(json.dumps(gt_doc))
    pred_json = _write_pred(tmp_path, 1, "x.png", np.array([[0, 0, 5], [0, 0, 5]]), [{"id": 5, "category_id": 1}])
    args = ["panoptic", "--gt", str(gt_root / "gt.json"), "--pred", str(pred_json), "--out", str(tmp_path / "pq.json")]
    err = _error(tmp_path, capsys, args)
    assert "nothing to score in 1 image(s)" in err

    gt_doc["annotations"] = []
    (gt_root / "gt.json").write_text(json.dumps(gt_doc))
    pred_json.write_text(json.dumps({"annotations": []}))
    err = _error(tmp_path, capsys, args)
    assert "no images in 'annotations'" in err

    gt_doc["categories"][0] = {"id": 1, "name": "worker"}
    (gt_root / "gt.json").write_text(json.dumps(gt_doc))
    err = _error(tmp_path, capsys, args)
    assert "category id 1 ('worker') has isthing=None" in err


# --------------------------------------------------------------------------------------
# Segment PNGs
# --------------------------------------------------------------------------------------


def test_segment_png_round_trips_and_ids_decode_to_the_json(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice([0, 1, 255, 256, 65535, 65536, 460551, (1 << 24) - 1], size=(6, 9)).astype(np.int32)
    path = tmp_path / "seg.png"
    path.write_bytes(encode_png(ids))
    back = read_id_png(path)
    np.testing.assert_array_equal(back, ids)
    np.testing.assert_array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    segs = segments_info(back, [{"id": int(i), "category_id": 1} for i in np.unique(ids) if i])
    assert [s["id"] for s in segs] == [int(i) for i in np.unique(back) if i]
    for s in segs:
        ys, xs = np.nonzero(back == s["id"])
        assert s["area"] == len(ys) and s["iscrowd"] == 0
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_real_sample_png_re_encodes_identically(tmp_path):
    _, ann, gt, png = _sample("val")
    assert sorted(np.unique(gt).tolist()) == [0] + sorted(s["id"] for s in ann["segments_info"])
    (tmp_path / "b.png").write_bytes(encode_png(gt))
    np.testing.assert_array_equal(read_id_png(tmp_path / "b.png"), gt)
    from PIL import Image

    with Image.open(png) as a, Image.open(tmp_path / "b.png") as b:
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b))
    segs = segments_info(gt, ann["segments_info"])
    assert [(s["id"], s["category_id"], s["iscrowd"], s["area"]) for s in segs] == [(7, 1, 0, 20), (20, 2, 1, 20)]
    assert [s["bbox"] for s in segs] == [[0.0, 0.0, 2.0, 10.0], [2.0, 0.0, 2.0, 10.0]]


def test_segment_writing_errors():
    with pytest.raises(ValueError, match="segment id 16777216 cannot be stored as RGB"):
        encode_png(np.array([[1 << 24]]))
    with pytest.raises(ValueError, match="segment id -1"):
        id_to_rgb(np.array([[-1]]))
    with pytest.raises(ValueError, match=r"segment id\(s\) \[2\] in the map have no entry"):
        segments_info(np.array([[1, 2]]), [{"id": 1, "category_id": 1}])
    with pytest.raises(ValueError, match="segment id 3 has no pixels"):
        segments_info(np.array([[1, 1]]), [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 1}])
