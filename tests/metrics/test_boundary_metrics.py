"""Boundary IoU of label maps: the definition (iterated 3 x 3 erosion of the zero-padded mask)
against the one-pass min/max filter, hand-computed cases, ignore pixels, and accumulators that
sum like one pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from segpipe.metrics.boundary import (
    DEFAULT_RATIO,
    BoundaryIoU,
    boundary_mask,
    compute,
    dilation_pixels,
    label_boundaries,
    with_boundary_iou,
)
from segpipe.metrics.semantic import MetricsInputError
from segpipe.metrics.semantic import compute as semantic_compute


def eroded_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """The definition, literally: pad by 1 px of zeros, erode d times with a 3 x 3 square, unpad."""
    m = mask.astype(bool)
    eroded = ndimage.binary_erosion(np.pad(m, 1), structure=np.ones((3, 3), bool), iterations=d)[1:-1, 1:-1]
    return m & ~eroded


def distance_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """The same through a chessboard distance transform: kept by d erosions = more than d px
    (chessboard) from every zero of the padded mask."""
    m = mask.astype(bool)
    dist = ndimage.distance_transform_cdt(np.pad(m, 1), metric="chessboard")[1:-1, 1:-1]
    return m & (dist <= d)


def reference_counts(gt, pred, k, ignore, ratio=DEFAULT_RATIO):
    """Per-class intersections and unions, one class and one image at a time, by the definition."""
    inter, union = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for g, p in zip(gt, pred):
        d = dilation_pixels(*g.shape, ratio)
        keep = g != ignore
        for c in range(k):
            bg = eroded_boundary(g == c, d) & keep
            bp = eroded_boundary(p == c, d) & keep
            inter[c] += (bg & bp).sum()
            union[c] += (bg | bp).sum()
    return inter, union


def scenes(rng, n, h, w, k, ignore=255):
    """Blocky label maps with thin structures, noisy predictions, ignored bands."""
    gts, preds = [], []
    for _ in range(n):
        cell = int(rng.integers(3, 9))
        blocks = rng.integers(0, k, (h // cell + 1, w // cell + 1))
        g = np.kron(blocks, np.ones((cell, cell), np.int64))[:h, :w].astype(np.uint8)
        g[int(rng.integers(0, h)), :] = rng.integers(0, k)  # a 1-px line across
        p = np.roll(g, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        p[rng.random((h, w)) < 0.05] = rng.integers(0, k)
        g[:, int(rng.integers(0, w))] = ignore
        p[g == ignore] = 250  # anything may be predicted where the ground truth is ignored
        gts.append(g)
        preds.append(p)
    return gts, preds


@pytest.mark.parametrize("h, w, ratio, d", [
    (256, 256, 0.02, 7), (1024, 1024, 0.02, 29), (10, 10, 0.02, 1), (480, 640, 0.02, 16),
    (45, 60, 0.02, 2),  # 1.5 px: Python's round, as the paper's code (halves to even)
    (75, 100, 0.02, 2),  # 2.5 px
    (20, 20, 0.07, 2),
])
def test_dilation_pixels(h, w, ratio, d):
    assert dilation_pixels(h, w, ratio) == d == max(1, round(ratio * math.sqrt(h * h + w * w)))


@pytest.mark.parametrize("d", [1, 2, 3, 7, 40])
def test_one_pass_boundaries_equal_iterated_erosion_and_distance_transform(d):
    rng = np.random.default_rng(d)
    for h, w in [(31, 47), (64, 64), (5, 90)]:
        labels = np.kron(rng.integers(0, 4, (h // 3 + 1, w // 3 + 1)), np.ones((3, 3), np.int64))[:h, :w]
        labels[rng.random((h, w)) < 0.02] = 4  # single pixels
        on = label_boundaries(labels.astype(np.uint8), d)
        for v in range(5):
            mask = labels == v
            want = eroded_boundary(mask, d)
            assert np.array_equal(want, distance_boundary(mask, d))
            assert np.array_equal(mask & on, want), (h, w, v)
            assert np.array_equal(boundary_mask(mask, d), want)


def test_square_shifted_by_one_pixel():
    # 20 x 20 (d = 1): a 10 x 10 square of class 1, predicted one pixel to the right
    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 1
    pred = np.roll(gt, 1, axis=1)
    acc = BoundaryIoU(2)
    acc.update(gt, pred)
    # class 1: two 36-px rings sharing their top and bottom rows but the first column (9 + 9)
    assert acc.intersection[1] == 18 and acc.union[1] == 36 + 36 - 18
    # class 0: the 76-px image frame plus a 44-px ring outside each square; the rings share
    # 11 px of their top and bottom rows
    assert acc.intersection[0] == 76 + 22 and acc.union[0] == 120 + 120 - 98
    m = acc.compute(["ground", "worker"])
    assert m["per_class"] == {"ground": pytest.approx(98 / 142), "worker": pytest.approx(18 / 54)}
    assert m["boundary_iou"] == pytest.approx((98 / 142 + 18 / 54) / 2)


def test_thin_line_is_all_boundary():
    line = np.zeros((20, 20), np.uint8)
    line[10, 3:17] = 1
    same, below = BoundaryIoU(2), BoundaryIoU(2)
    same.update(line, line)
    below.update(line, np.roll(line, 1, axis=0))
    assert same.intersection[1] == same.union[1] == 14  # every pixel of a 1-px line
    # a line one pixel lower shares no boundary pixel, however close
    assert below.intersection[1] == 0 and below.union[1] == 28
    assert below.compute()["per_class"]["1"] == 0.0


@pytest.mark.parametrize("ratio, frame", [(0.02, 20 * 20 - 18 * 18), (0.07, 20 * 20 - 16 * 16)])
def test_image_edges_are_boundary(ratio, frame):
    # a class covering the whole image has the image's frame, d px wide, as its boundary
    full = np.ones((20, 20), np.uint8)
    acc = BoundaryIoU(2, ratio=ratio)
    acc.update(full, full)
    assert acc.intersection[1] == acc.union[1] == frame
    assert acc.union[0] == 0
    assert acc.compute()["per_class"] == {"0": None, "1": 1.0}


def test_ignored_pixels_leave_both_boundaries():
    square = np.zeros((20, 20), np.uint8)
    square[5:15, 5:15] = 1
    gt = square.copy()
    gt[5, 5:15] = 255  # the square's top row is unlabelled in the ground truth
    acc = BoundaryIoU(2, ignore_index=255)
    acc.update(gt, square)
    # gt class 1 is rows 6-14: a 9 x 10 ring of 34 px. The predicted 36-px ring loses the 10
    # ignored pixels of its top row: 26 px, all on the gt ring (its row 14, columns 5 and 14).
    assert acc.intersection[1] == 26 and acc.union[1] == 34
    # ignored pixels count as "not class 0" for the ground truth's class 0 too, so its ring
    # matches the prediction's
    assert acc.intersection[0] == acc.union[0] == 76 + 44
    # without an ignore label, 255 is an error
    with pytest.raises(MetricsInputError, match="ground truth value 255 is not a class id"):
        BoundaryIoU(2, ignore_index=None).update(gt, square)


def test_matches_the_definition_on_random_scenes():
    rng = np.random.default_rng(0)
    gt, pred = scenes(rng, 6, 37, 53, 5)
    for ratio in (0.02, 0.1):
        acc = BoundaryIoU(5, 255, ratio)
        for g, p in zip(gt, pred):
            acc.update(g, p, where="scene")
        inter, union = reference_counts(gt, pred, 5, 255, ratio)
        assert np.array_equal(acc.intersection, inter) and np.array_equal(acc.union, union)
        assert (union > 0).all() and (inter < union).any()


def test_dtypes_and_batches_give_the_same_counts():
    rng = np.random.default_rng(1)
    gt, pred = scenes(rng, 4, 40, 40, 3)
    one = BoundaryIoU(3)
    for g, p in zip(gt, pred):
        one.update(g, p)
    wide = BoundaryIoU(3)
    for g, p in zip(gt, pred):
        wide.update(g.astype(np.int64), p.astype(np.int32))
    batch = BoundaryIoU(3)
    batch.update(np.stack(gt), np.stack(pred))
    for other in (wide, batch):
        assert np.array_equal(one.counts, other.counts)
    many = BoundaryIoU(300, ignore_index=1000)  # uint16 labels inside
    for g, p in zip(gt, pred):
        many.update(np.where(g == 255, 1000, g.astype(np.uint16)), p.astype(np.uint16))
    assert np.array_equal(many.counts[:, :3], one.counts) and not many.counts[:, 3:].any()


def test_accumulators_sum_like_one_pass():
    rng = np.random.default_rng(2)
    gt, pred = scenes(rng, 9, 30, 45, 4)
    whole = BoundaryIoU(4)
    parts = [BoundaryIoU(4) for _ in range(3)]
    for i, (g, p) in enumerate(zip(gt, pred)):
        whole.update(g, p)
        parts[i % 3].update(g, p)
    summed = parts[0] + parts[1] + parts[2]
    assert np.array_equal(summed.counts, whole.counts)
    merged = BoundaryIoU(4).merge(parts[0]).merge(parts[1]).merge(parts[2])
    assert np.array_equal(merged.counts, whole.counts)
    # as workers send them: int64 bytes, summed, wrapped back
    total = sum(np.frombuffer(p.counts.tobytes(), np.int64).reshape(2, 4) for p in parts)
    assert BoundaryIoU.from_array(total).compute() == whole.compute()
    with pytest.raises(ValueError, match="cannot combine"):
        parts[0] + BoundaryIoU(4, ratio=0.05)
    with pytest.raises(ValueError, match="intersections <= unions"):
        BoundaryIoU.from_array(np.array([[2, 0], [1, 0]]))


@pytest.mark.parametrize("gt, pred, message", [
    (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), r"img.png: ground truth shape \(4, 4\) != prediction"),
    (np.full((4, 4), 7, np.uint8), np.zeros((4, 4), np.uint8), r"img.png: ground truth value 7 is not a class id in \[0, 3\)"),
    (np.full((4, 4), -1, np.int64), np.zeros((4, 4), np.int64), r"ground truth value -1"),
    (np.zeros((4, 4), np.uint8), np.full((4, 4), 3, np.uint8), r"prediction value 3 at a labelled pixel"),
    (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), r"expected an integer label array"),
    (np.zeros(4, np.uint8), np.zeros(4, np.uint8), r"expected H x W or N x H x W"),
])
def test_errors_name_the_image(gt, pred, message):
    with pytest.raises(MetricsInputError, match=message):
        BoundaryIoU(3).update(gt, pred, where="img.png")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes"), ({"num_classes": 3, "ignore_index": 2}, "is a class id"),
    ({"num_classes": 3, "ratio": 0}, "ratio"), ({"num_classes": 3, "ratio": float("nan")}, "ratio"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BoundaryIoU(**kwargs)


def test_compute_and_merge_into_semantic_metrics():
    m = compute(np.array([3, 0, 0]), np.array([4, 2, 0]), ["a", "b", "c"])
    assert m == {"boundary_iou": pytest.approx(0.375), "per_class": {"a": 0.75, "b": 0.0, "c": None}}
    assert compute(np.zeros(2, np.int64), np.zeros(2, np.int64))["boundary_iou"] is None
    sem = semantic_compute(np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]]), ["a", "b", "c"])
    both = with_boundary_iou(sem, m)
    assert list(both)[:4] == ["pixel_acc", "mean_acc", "miou", "boundary_iou"]
    assert both["boundary_iou"] == pytest.approx(0.375)
    assert both["per_class"]["a"] == {**sem["per_class"]["a"], "boundary_iou": 0.75}
    assert both["per_class"]["c"]["boundary_iou"] is None
    assert "boundary_iou" not in sem and "boundary_iou" not in sem["per_class"]["a"]  # pure
    with pytest.raises(ValueError, match="class names differ"):
        with_boundary_iou(sem, compute(np.zeros(3, np.int64), np.zeros(3, np.int64)))
