"""segpipe.quality: regions and their scores (audit), frame uncertainty and selection (select),
per-image statistics and two-sample measures (drift), on hand-made arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segpipe import quality
from segpipe.params import AUDIT_METHODS, SELECT_STRATEGIES
from segpipe.quality import (
    FrameUncertainty,
    audit_scores,
    class_thresholds,
    evenly_spaced,
    image_stats,
    judge_ks,
    judge_psi,
    k_center_greedy,
    label_regions,
    precision_at_k,
    psi,
    rank_order,
    region_probability_sums,
    select_frames,
    standardise,
)


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def test_method_names_are_the_params():
    assert quality.AUDIT_METHODS == AUDIT_METHODS
    assert quality.STRATEGIES == SELECT_STRATEGIES


def test_label_regions_annotations_then_uncovered_components():
    sem = np.zeros((10, 12), np.uint8)
    sem[:, 6:] = 1  # two stuff classes side by side
    sem[0, 0] = 255  # ignore
    sem[5, 3] = 1  # a 1-pixel island of class 1 inside class 0: below min_area
    box = np.zeros_like(sem, bool)
    box[2:5, 7:10] = True
    sem[box] = 2
    sem[8:10, 0:2] = 3  # a thing-class blob without annotation: a region of the label map
    regions = label_regions(sem, [{"id": 77, "category_id": 2, "iscrowd": 0, "segmentation": rle(box)}], 255, 4)
    assert [(r.annotation_id, r.class_id, r.area) for r in regions] == [
        (77, 2, 9), (None, 0, 60 - 1 - 1 - 4), (None, 1, 60 - 9), (None, 3, 4)]
    assert regions[0].bbox == (7, 2, 3, 3) and regions[3].bbox == (0, 8, 2, 2)
    assert not regions[1].mask[0, 0] and not regions[2].mask[box].any()  # ignore and the annotation left out
    # 8-connected: two diagonal pixels are one region
    diag = np.full((4, 4), 255, np.uint8)
    diag[0, 0] = diag[1, 1] = 5
    assert [r.area for r in label_regions(diag, [], 255, 1)] == [2]


def test_regions_are_judged_by_their_inside():
    sem = np.zeros((12, 12), np.uint8)
    sem[:, 10:] = 1  # a 2-pixel strip along the right edge: one column of it is inside (the frame erodes nothing)
    box = np.zeros((12, 12), bool)
    box[2:8, 2:8] = True
    sem[box] = 2
    ann = {"id": 5, "category_id": 2, "iscrowd": 0, "segmentation": rle(box)}
    regions = label_regions(sem, [ann], 255, min_area=13, border=1)
    assert [(r.annotation_id, r.class_id) for r in regions] == [(5, 2), (None, 0)]  # the strip: 12 inside < 13
    assert len(label_regions(sem, [ann], 255, min_area=12, border=1)) == 3
    assert regions[0].interior(1, min_area=13).sum() == 16  # 6 x 6 without its edge
    assert regions[0].interior(1, min_area=20).sum() == 36  # too little inside: judged whole
    assert regions[0].interior(0).sum() == 36
    kept = label_regions(sem, [ann], 255, min_area=13, border=3)[0]  # nothing inside: still scored, whole
    assert kept.annotation_id == 5 and kept.interior(3, min_area=13).sum() == 36


def test_region_probability_sums():
    probs = np.zeros((2, 2, 2))
    probs[0] = [[1.0, 0.5], [0.2, 0.0]]
    probs[1] = 1 - probs[0]
    a = quality.Region(0, np.array([[True, True], [False, False]]))
    b = quality.Region(1, np.array([[False, False], [True, True]]))
    np.testing.assert_allclose(region_probability_sums(probs, [a.mask, b.mask]), [[1.5, 0.5], [0.2, 1.8]])


def test_audit_scores_self_confidence_and_confident_learning():
    # class 1 is one the model is always unsure of (p ~ 0.4 on its regions); region 4 is labelled 0
    # but looks like class 1 to the model
    mean = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1, 0])
    t = class_thresholds(mean, labels, 3)
    np.testing.assert_allclose(t[:2], [(0.9 + 0.8 + 0.3) / 3, 0.5])
    assert math.isnan(t[2])
    sc = audit_scores(mean, labels, "self_confidence")
    np.testing.assert_allclose(sc.score, [0.1, 0.2, 0.4, 0.6, 0.7])
    np.testing.assert_array_equal(sc.predicted, [0, 0, 1, 0, 1])
    cl = audit_scores(mean, labels, "confident_learning")
    # calibrated: c = min(1, p / t); score = the best other class's c minus the label's
    np.testing.assert_allclose(cl.score, [0.2 - 1, 0.4 - 1, 0.6 - 1, 0.9 - 0.8, 1 - 0.45])
    np.testing.assert_array_equal(cl.predicted, [0, 0, 1, 0, 1])  # another class only where the score is > 0
    assert rank_order(sc.score, list(range(5)))[:2] == [4, 3] == rank_order(cl.score, list(range(5)))[:2]
    # a class the model has barely learned (p(1) ~ 0.3 on its own regions), and region 2, labelled 0,
    # that has as much of class 1 as any: self-confidence lists every class-1 region first,
    # confident learning lists region 2 first
    unsure = np.array([[0.9, 0.1], [0.95, 0.05], [0.55, 0.45], [0.7, 0.3], [0.65, 0.35], [0.6, 0.4], [0.75, 0.25]])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    assert rank_order(audit_scores(unsure, labels, "self_confidence").score, list(range(7)))[:5] == [6, 3, 4, 5, 2]
    cl = audit_scores(unsure, labels, "confident_learning")
    assert rank_order(cl.score, list(range(7)))[0] == 2 and cl.predicted[2] == 1
    with pytest.raises(ValueError, match="valid: confident_learning, self_confidence"):
        audit_scores(mean, labels, "vote")


def test_rank_order_breaks_ties_by_key_and_precision_at_k():
    assert rank_order(np.array([0.5, 0.9, 0.5]), ["b", "z", "a"]) == [1, 2, 0]
    assert precision_at_k(["a", "x", "b", "y"], {"a", "b"}) == 0.5
    assert precision_at_k(["a", "b"], {"a", "b"}, k=1) == 1.0
    assert math.isnan(precision_at_k(["a"], set()))


def test_frame_uncertainty_known_values():
    k, h, w = 4, 3, 5
    uniform = np.full((k, h, w), 1 / k)
    sure = np.zeros((k, h, w))
    sure[2] = 1.0
    u = quality.frame_uncertainty([uniform])
    assert u.entropy == pytest.approx(1.0) and u.margin == pytest.approx(1.0) and u.confidence == pytest.approx(0.25)
    s = quality.frame_uncertainty([sure])
    assert s.entropy == pytest.approx(0.0, abs=1e-9) and s.margin == pytest.approx(0.0) and s.confidence == 1.0
    np.testing.assert_allclose(s.class_shares, [0, 0, 1, 0])
    # strips are pixels of one image: half sure, half uniform
    both = FrameUncertainty()
    both.add(uniform)
    both.add(sure)
    assert both.entropy == pytest.approx(0.5) and both.confidence == pytest.approx(0.625)
    two = np.zeros((k, 1, 1))
    two[:, 0, 0] = [0.5, 0.3, 0.2, 0.0]
    assert quality.frame_uncertainty([two]).margin == pytest.approx(0.8)
    assert quality.uncertainty_of(0.3, 0.7, "margin") == 0.7 and quality.uncertainty_of(0.3, 0.7, "diverse") == 0.3


def test_k_center_picks_each_duplicate_once_and_stops():
    points = np.array([[0.0, 0], [0, 0], [10, 0], [10, 0], [0, 10]])
    picks = k_center_greedy(points, np.array([0.9, 0.9, 0.1, 0.2, 0.1]), k=5)
    assert [i for i, _ in picks] == [0, 3, 4]  # the heaviest, then the heavier of the far duplicates
    assert picks[0][1] is None and picks[1][1] == pytest.approx(10.0)
    # far enough (beyond `near`), uncertainty alone decides; closer, the pick is worth less
    near = np.array([[0.0, 0], [1, 0], [5, 0]])
    assert [i for i, _ in k_center_greedy(near, np.array([0.9, 0.8, 0.3]), 2)] == [0, 2]
    assert [i for i, _ in k_center_greedy(near, np.array([0.9, 0.8, 0.3]), 2, near=0.5)] == [0, 1]


def test_select_frames_strategies():
    u = np.array([0.1, 0.5, 0.4, 0.5])
    assert [p.index for p in select_frames(u, 3, "entropy")] == [1, 3, 2]
    emb = np.array([[0.0, 1], [0, 1], [5, 1], [0, 1]])  # frames 0, 1 and 3 are one frame
    picks = select_frames(u, 4, "diverse", emb)
    assert [p.index for p in picks] == [1, 2]
    assert picks[1].distance is not None and picks[1].uncertainty == 0.4
    with pytest.raises(ValueError, match="one embedding per frame"):
        select_frames(u, 2, "diverse")
    with pytest.raises(ValueError, match="valid: diverse, entropy, margin"):
        select_frames(u, 2, "random")


def test_standardise_and_typical_distance():
    x = np.array([[1.0, 5, 0], [3, 5, 0], [5, 5, 0]])
    z = standardise(x)
    np.testing.assert_allclose(z[:, 0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    np.testing.assert_array_equal(z[:, 1:], 0)  # constant dimensions carry nothing
    assert quality.typical_distance(np.array([[0.0], [0], [3]])) == 3.0
    assert quality.typical_distance(np.zeros((3, 2))) == 0.0


def test_image_stats():
    im = np.zeros((4, 6, 3), np.uint8)
    im[..., 0] = 255
    im[:2, :, 2] = 100
    s = image_stats(im, bins=4)
    assert (s.height, s.width) == (4, 6)
    assert s.brightness == pytest.approx(0.299 * 255 + 0.114 * 50)
    np.testing.assert_array_equal(s.histograms, [[0, 0, 0, 24], [24, 0, 0, 0], [12, 12, 0, 0]])
    assert quality.histogram_mean(np.array([0, 0, 0, 24])) == pytest.approx(224.0)
    np.testing.assert_array_equal(quality.class_pixels(np.array([[0, 1], [255, 1]]), 3), [1, 2, 0])


def test_psi_values():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    e, a = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert psi(e, a) == pytest.approx((0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5))
    assert math.isfinite(psi([1, 0], [0, 1]))  # an empty bin is floored, not infinite
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])


def test_ks_needs_a_large_statistic_and_a_small_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    same = judge_ks("x", a, b, threshold=0.3, alpha=0.01)
    assert not same.drifted and same.value < 0.3
    shifted = judge_ks("x", a, b + 2, threshold=0.3, alpha=0.01)
    assert shifted.drifted and shifted.value > 0.6 and shifted.p_value < 1e-10
    # three images against three: a full gap, but not significant at 0.01
    few = judge_ks("x", [1, 2, 3], [7, 8, 9], threshold=0.3, alpha=0.01)
    assert few.value == 1.0 and few.p_value > 0.01 and not few.drifted
    j = judge_psi("red", np.array([5, 5]), np.array([9, 1]), 0.25, (1.0, 2.0)).to_json()
    assert j["drifted"] and j["measure"] == "psi" and "p_value" not in j and (j["reference"], j["input"]) == (1.0, 2.0)


def test_evenly_spaced_and_table():
    assert evenly_spaced(3, 5) == [0, 1, 2]
    assert evenly_spaced(10, 4) == [0, 3, 6, 9]
    table = quality.format_drift_table(
        {"brightness": {"measure": "ks", "value": 0.8, "threshold": 0.3, "drifted": True, "p_value": 1e-8,
                        "reference": 110.0, "input": 60.0}},
        {"confidence": "no model"})
    lines = table.splitlines()
    assert lines[1].split()[:5] == ["brightness", "ks", "0.8000", "0.3", "YES"] and "110 -> 60" in lines[1]
    assert lines[2].split() == ["confidence", "skipped:", "no", "model"]
