"""Semantic metrics: hand-computed cases, a randomized check against the direct formulas,
input validation, and summing across workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.metrics.semantic import ConfusionMatrix, MetricsInputError, compute, mean_over


def _scores(gt, pred, k, ignore=255):
    cm = ConfusionMatrix(k, ignore)
    cm.update(np.array(gt, dtype=np.uint8), np.array(pred, dtype=np.uint8))
    return cm, cm.compute()


def _close(a, b):
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert a == pytest.approx(b, abs=1e-12)


def test_2x2_all_metrics():
    # conf (rows gt, cols pred) = [[1, 0], [1, 2]]
    cm, m = _scores([[0, 1], [1, 1]], [[0, 0], [1, 1]], 2)
    assert cm.mat.tolist() == [[1, 0], [1, 2]]
    _close(m["pixel_acc"], 3 / 4)
    _close(m["mean_acc"], (1 + 2 / 3) / 2)
    _close(m["per_class"]["0"]["iou"], 1 / 2)
    _close(m["per_class"]["1"]["iou"], 2 / 3)
    _close(m["miou"], 7 / 12)
    _close(m["fwiou"], 1 / 4 * 1 / 2 + 3 / 4 * 2 / 3)
    _close(m["per_class"]["0"]["dice"], 2 / 3)
    _close(m["per_class"]["1"]["dice"], 4 / 5)
    _close(m["mdice"], (2 / 3 + 4 / 5) / 2)
    assert m["pixels"] == 4


def test_2x2_ignored_pixel_is_skipped_whatever_its_prediction():
    # the ignored pixel is predicted 200 (not a class): skipped, not an error
    cm, m = _scores([[0, 255], [1, 1]], [[0, 200], [1, 0]], 2)
    assert cm.mat.tolist() == [[1, 0], [1, 1]]
    _close(m["pixel_acc"], 2 / 3)
    _close(m["mean_acc"], (1 + 1 / 2) / 2)
    _close(m["miou"], 1 / 2)
    _close(m["fwiou"], 1 / 3 * 1 / 2 + 2 / 3 * 1 / 2)
    _close(m["mdice"], (2 / 3 + 2 / 3) / 2)


def test_3x3_class_absent_everywhere_is_null_and_excluded():
    # class 2 appears only as a prediction on an ignored pixel: absent from gt and prediction
    gt = [[0, 0, 0], [1, 1, 255], [0, 1, 0]]
    pred = [[0, 0, 1], [1, 0, 2], [0, 1, 0]]
    cm, m = _scores(gt, pred, 3)
    assert cm.mat.tolist() == [[4, 1, 0], [1, 2, 0], [0, 0, 0]]
    _close(m["pixel_acc"], 6 / 8)
    _close(m["per_class"]["0"]["acc"], 4 / 5)
    _close(m["per_class"]["1"]["acc"], 2 / 3)
    assert m["per_class"]["2"] == {"iou": None, "dice": None, "acc": None}
    _close(m["mean_acc"], (4 / 5 + 2 / 3) / 2)
    _close(m["per_class"]["0"]["iou"], 4 / 6)
    _close(m["per_class"]["1"]["iou"], 2 / 4)
    _close(m["miou"], (4 / 6 + 2 / 4) / 2)
    _close(m["fwiou"], 5 / 8 * 4 / 6 + 3 / 8 * 2 / 4)
    _close(m["mdice"], (8 / 10 + 4 / 6) / 2)


def test_3x3_class_only_predicted_counts_zero_in_iou_but_null_acc():
    gt = [[0, 0, 1], [1, 1, 1], [0, 0, 0]]
    pred = [[0, 2, 1], [1, 1, 2], [0, 0, 0]]
    cm, m = _scores(gt, pred, 3)
    assert cm.mat.tolist() == [[4, 0, 1], [0, 3, 1], [0, 0, 0]]
    pc = m["per_class"]
    assert pc["2"]["acc"] is None
    assert pc["2"]["iou"] == 0.0 and pc["2"]["dice"] == 0.0
    _close(pc["0"]["iou"], 4 / 5)
    _close(pc["1"]["iou"], 3 / 4)
    _close(m["miou"], (4 / 5 + 3 / 4 + 0) / 3)
    _close(m["mean_acc"], (4 / 5 + 3 / 4) / 2)
    _close(m["mdice"], (8 / 9 + 6 / 7 + 0) / 3)
    _close(m["fwiou"], 5 / 9 * 4 / 5 + 4 / 9 * 3 / 4)
    _close(m["pixel_acc"], 7 / 9)
    _close(mean_over(m, "iou", ["0", "1"]), (4 / 5 + 3 / 4) / 2)


def test_empty_matrix_gives_nulls():
    m = compute(np.zeros((3, 3), dtype=np.int64), ["a", "b", "c"])
    assert m["pixel_acc"] is None and m["miou"] is None and m["fwiou"] is None and m["mdice"] is None
    assert m["per_class"]["a"] == {"iou": None, "dice": None, "acc": None}


def _direct(gt, pred, k, ignore):
    """The textbook formulas, one boolean mask per class."""
    valid = gt != ignore
    iou, dice, acc, freq = [], [], [], []
    for c in range(k):
        g = (gt == c) & valid
        p = (pred == c) & valid
        inter = (g & p).sum()
        union = (g | p).sum()
        iou.append(inter / union if union else None)
        dice.append(2 * inter / (g.sum() + p.sum()) if union else None)
        acc.append(inter / g.sum() if g.sum() else None)
        freq.append(g.sum() / valid.sum())
    keep = [v for v in iou if v is not None]
    return {
        "pixel_acc": ((gt == pred) & valid).sum() / valid.sum(),
        "miou": np.mean(keep),
        "mdice": np.mean([v for v in dice if v is not None]),
        "mean_acc": np.mean([v for v in acc if v is not None]),
        "fwiou": sum(f * v for f, v in zip(freq, iou) if f > 0),
        "iou": iou, "dice": dice, "acc": acc,
    }


@pytest.mark.parametrize("seed", range(5))
def test_random_against_direct_formula(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    cm = ConfusionMatrix(k, 255)
    gts, preds = [], []
    for _ in range(4):  # several updates, different sizes
        h, w = rng.integers(1, 40, size=2)
        gt = rng.integers(0, k, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        # a class absent from the gt of all images (but maybe predicted)
        gt[gt == k - 1] = 0
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, k, (h, w))).astype(np.uint8)
        pred[gt == 255] = rng.integers(0, 256)  # anything at ignored pixels
        cm.update(gt, pred)
        gts.append(gt.ravel())
        preds.append(pred.ravel())
    m = cm.compute()
    ref = _direct(np.concatenate(gts), np.concatenate(preds), k, 255)
    for key in ("pixel_acc", "miou", "mdice", "mean_acc", "fwiou"):
        assert m[key] == pytest.approx(ref[key], abs=1e-12), key
    for c in range(k):
        for key in ("iou", "dice", "acc"):
            _close(m["per_class"][str(c)][key], ref[key][c])


def test_dtypes_and_torch_give_the_same_matrix():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, (3, 17, 19)).astype(np.uint8)
    gt[:, 0] = 255
    pred = rng.integers(0, 5, gt.shape).astype(np.uint8)
    ref = ConfusionMatrix(5)
    ref.update(gt, pred)
    for conv in (lambda a: a.astype(np.int64), lambda a: a.astype(np.int32), lambda a: a.astype(np.uint16),
                 lambda a: torch.from_numpy(a.astype(np.int64)), torch.from_numpy):
        cm = ConfusionMatrix(5)
        cm.update(conv(gt), conv(pred))
        np.testing.assert_array_equal(cm.mat, ref.mat)


def test_wide_path_ignore_outside_uint8_and_large_values():
    gt = np.array([[0, -1, 1], [2, 2, -1]], dtype=np.int64)
    pred = np.array([[0, 1000, 1], [2, 0, -5]], dtype=np.int64)
    cm = ConfusionMatrix(3, ignore_index=-1)
    cm.update(gt, pred)
    assert cm.mat.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # the same data with a uint8-range ignore and a prediction > 255 at an ignored pixel
    cm2 = ConfusionMatrix(3, ignore_index=255)
    cm2.update(np.where(gt == -1, 255, gt), np.where(gt == -1, 300, pred))
    np.testing.assert_array_equal(cm2.mat, cm.mat)


def test_large_update_is_chunked_correctly():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 4, (1100, 1000)).astype(np.uint8)  # > one chunk of 2**20 pixels
    gt[::7] = 255
    pred = rng.integers(0, 4, gt.shape).astype(np.uint8)
    cm = ConfusionMatrix(4)
    cm.update(gt, pred)
    v = gt != 255
    ref = np.bincount(4 * gt[v].astype(np.int64) + pred[v], minlength=16).reshape(4, 4)
    np.testing.assert_array_equal(cm.mat, ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_out_of_range_values_name_the_value_and_where(dtype):
    cm = ConfusionMatrix(3)
    with pytest.raises(MetricsInputError, match=r"img7\.png: ground truth value 7 is not a class id"):
        cm.update(np.array([[0, 7]], dtype=dtype), np.array([[0, 1]], dtype=dtype), where="img7.png")
    with pytest.raises(MetricsInputError, match=r"prediction value 9 at a labelled pixel"):
        cm.update(np.array([[0, 1]], dtype=dtype), np.array([[0, 9]], dtype=dtype))
    with pytest.raises(MetricsInputError, match=r"shape"):
        cm.update(np.zeros((2, 2), dtype), np.zeros((2, 3), dtype))
    with pytest.raises(MetricsInputError, match=r"integer label array"):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    assert cm.mat.sum() == 0  # failed updates add nothing


def test_negative_values_are_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(MetricsInputError, match=r"ground truth value -2"):
        cm.update(np.array([0, -2]), np.array([0, 1]))


def test_ignore_index_must_not_be_a_class():
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        ConfusionMatrix(3, ignore_index=1)


def test_sum_across_workers_equals_one_pass():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 6, (8, 20, 20)).astype(np.uint8)
    pred = rng.integers(0, 6, gt.shape).astype(np.uint8)
    whole = ConfusionMatrix(6)
    whole.update(gt, pred)
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    for i in range(8):
        (a if i % 2 else b).update(gt[i], pred[i])
    np.testing.assert_array_equal((a + b).mat, whole.mat)
    np.testing.assert_array_equal(ConfusionMatrix.from_array(a.mat + b.mat).mat, whole.mat)
    a.merge(b)
    np.testing.assert_array_equal(a.mat, whole.mat)
    with pytest.raises(ValueError, match="cannot combine"):
        a + ConfusionMatrix(5)


def test_names_label_per_class():
    m = compute(np.array([[2, 0], [0, 1]]), ["road", "worker"])
    assert list(m["per_class"]) == ["road", "worker"]
    with pytest.raises(ValueError, match="class names"):
        compute(np.eye(2, dtype=int), ["a"])


def test_things_vs_background_maps_stuff_and_misses_to_background():
    from segpipe.metrics.semantic import BACKGROUND, ThingsVsBackground

    names = ["soil", "road", "pipe", "truck"]
    things = ThingsVsBackground(names, [2, 3], ignore_index=255)
    assert things.names == ["pipe", "truck", BACKGROUND]
    cm = things.matrix()
    gt = np.array([[0, 2], [2, 255]])  # stuff, pipe / pipe, ignore
    pred = np.array([[3, 2], [255, 3]])  # truck (false positive), pipe hit / no detection, anything
    things.update(cm, gt, pred)
    assert cm.mat.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    # pipe IoU 1/2, truck 0/1: mean 1/4; the background is not a thing
    assert things.thing_miou(cm.mat) == pytest.approx(0.25)


def test_things_vs_background_names_the_image_with_a_bad_value():
    from segpipe.metrics.semantic import MetricsInputError, ThingsVsBackground

    things = ThingsVsBackground(["soil", "pipe"], [1])
    with pytest.raises(MetricsInputError, match="img7: ground truth value 9"):
        things.update(things.matrix(), np.array([[9]]), np.array([[1]]), where="img7")
    with pytest.raises(MetricsInputError, match="img7: prediction value 4"):
        things.update(things.matrix(), np.array([[1]]), np.array([[4]]), where="img7")
    with pytest.raises(MetricsInputError, match="no"):
        ThingsVsBackground(["soil"], [])
