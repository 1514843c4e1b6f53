"""Boundary IoU of semantic label maps (Cheng et al., *Boundary IoU*, CVPR 2021), summed over a split.

For class ``c`` of one image, with ``G = (gt == c)`` and ``P = (pred == c)``:
``boundary(M) = M and not erode(M padded by 1 px of zeros, 3 x 3, d iterations)`` (padding removed
again), ``d = max(1, round(ratio * image diagonal))``. Pixels whose ground truth is ``ignore_index``
leave both boundaries. ``|boundary(G) & boundary(P)|`` and ``|boundary(G) | boundary(P)|`` are summed
over the split's images; a class's Boundary IoU is their ratio, ``boundary_iou`` the mean over the
classes with a non-zero union. ``BoundaryIoU`` holds the two int64 count vectors, which add across
workers like ``ConfusionMatrix``. See ``docs/metrics.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.metrics.semantic import MetricsInputError, _joint_histogram, _mean, _ratio, _to_numpy

# The paper's default (2% of the image diagonal); evaluate's ``boundary_ratio`` and the CLIs' defaults.
DEFAULT_RATIO = 0.02


def check_ratio(ratio: Any, what: str = "boundary ratio") -> float:
    """``ratio`` as a float, or ValueError naming ``what`` unless it is a finite number > 0."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} must be a number > 0, got {ratio!r}")
    if not (math.isfinite(float(ratio)) and ratio > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {ratio!r}")
    return float(ratio)


def dilation_pixels(height: int, width: int, ratio: float = DEFAULT_RATIO) -> int:
    """``d = max(1, round(ratio * sqrt(height^2 + width^2)))``: the boundary width in pixels.

    Python's ``round`` (halves to even) on a correctly rounded ``sqrt``, as the paper's reference
    code computes it; ``ratio * diagonal`` is a half-integer only for Pythagorean sizes.
    """
    return max(1, int(round(ratio * math.sqrt(height * height + width * width))))


def _windows(a: np.ndarray, size: int, axis: int, op: np.ufunc) -> np.ndarray:
    """``op`` (minimum or maximum) over every run of ``size`` consecutive elements along ``axis``:
    the array shortens by ``size - 1`` there. Doubling, ``log2(size)`` whole-array operations:
    the windows of length ``2s`` combine two of length ``s``, and any length combines two
    overlapping windows of the largest power of two below it."""

    def cut(x: np.ndarray, start: int, stop: int) -> np.ndarray:
        return x[(slice(None),) * axis + (slice(start, stop),)]

    out, s = a, 1
    while 2 * s <= size:
        n = out.shape[axis]
        out = op(cut(out, 0, n - s), cut(out, s, n))
        s *= 2
    if s < size:
        n, r = out.shape[axis], size - s
        out = op(cut(out, 0, n - r), cut(out, r, n))
    return out


def label_boundaries(labels: np.ndarray, d: int) -> np.ndarray:
    """``H x W`` bool: whether each pixel lies on the boundary of the region of its own label.

    Eroding ``labels == v`` (zero-padded by 1 px) ``d`` times with a 3 x 3 square keeps exactly the
    pixels whose ``(2d + 1) x (2d + 1)`` window lies inside the image and holds only ``v``; so a
    pixel is on its label's boundary iff its window crosses the image edge or holds two labels,
    i.e. the window's minimum and maximum label differ. Separable sliding minima and maxima give
    every label's boundary at once, whatever the number of classes. ``boundary(labels == v)`` is
    ``(labels == v) & label_boundaries(labels, d)``.
    """
    if labels.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {labels.shape}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    h, w = labels.shape
    out = np.ones((h, w), dtype=bool)  # windows that cross the image edge
    if h > 2 * d and w > 2 * d:
        size = 2 * d + 1
        lo = _windows(_windows(labels, size, 0, np.minimum), size, 1, np.minimum)
        hi = _windows(_windows(labels, size, 0, np.maximum), size, 1, np.maximum)
        out[d:h - d, d:w - d] = lo != hi
    return out


def boundary_mask(mask: np.ndarray, d: int) -> np.ndarray:
    """``boundary(M)`` of one binary ``H x W`` mask (bool), as defined above."""
    m = np.asarray(mask).astype(bool)
    return m & label_boundaries(m.view(np.uint8), d)


def _compact_dtype(num_classes: int) -> np.dtype:
    # labels 0..K-1 plus one "no class" value K
    if num_classes < 255:
        return np.dtype(np.uint8)
    if num_classes < 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.int64)


class BoundaryIoU:
    """Accumulates per-class boundary intersections and unions (int64, length ``num_classes``).

    ``update(gt, pred)`` takes one ``H x W`` image or an ``N x H x W`` batch (numpy or torch,
    integer labels). ``d`` comes from each image's own size. Accumulators with the same
    ``num_classes``, ``ignore_index`` and ``ratio`` add (``a + b``, ``merge``); ``counts`` is the
    plain ``2 x K`` array (row 0 intersections, row 1 unions) and ``BoundaryIoU.from_array`` wraps
    one back, e.g. after ``np.frombuffer(counts_bytes, np.int64).reshape(2, K)``.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, ratio: float = DEFAULT_RATIO) -> None:
        if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes}); "
                             f"use a value outside [0, {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.ratio = check_ratio(ratio)
        self.intersection = np.zeros(self.num_classes, dtype=np.int64)
        self.union = np.zeros(self.num_classes, dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        """``2 x K`` int64: intersections, unions (a copy)."""
        return np.stack([self.intersection, self.union])

    @classmethod
    def from_array(cls, counts: np.ndarray, ignore_index: int | None = 255,
                   ratio: float = DEFAULT_RATIO) -> BoundaryIoU:
        """Wrap a ``2 x K`` count array (e.g. one summed over workers)."""
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[0] != 2 or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"expected a 2 x K integer array, got shape {counts.shape} dtype {counts.dtype}")
        if (counts < 0).any() or (counts[0] > counts[1]).any():
            raise ValueError("boundary counts must be >= 0 with intersections <= unions")
        acc = cls(counts.shape[1], ignore_index, ratio)
        acc.intersection += counts[0]
        acc.union += counts[1]
        return acc

    def update(self, gt: Any, pred: Any, where: str = "") -> None:
        """Add one image (``H x W``) or a batch (``N x H x W``). ``where`` prefixes errors.

        Raises MetricsInputError, like ``ConfusionMatrix.update``, when shapes differ, a ground-truth
        value is outside ``[0, K)`` and not ``ignore_index``, or a labelled pixel's prediction is
        outside ``[0, K)``.
        """
        prefix = f"{where}: " if where else ""
        g = _to_numpy(gt, f"{prefix}ground truth")
        p = _to_numpy(pred, f"{prefix}prediction")
        if g.shape != p.shape:
            raise MetricsInputError(f"{prefix}ground truth shape {g.shape} != prediction shape {p.shape}")
        if g.ndim == 2:
            self._update_image(g, p, prefix)
        elif g.ndim == 3:
            for i in range(g.shape[0]):
                self._update_image(g[i], p[i], f"{prefix}image {i} of the batch: ")
        else:
            raise MetricsInputError(f"{prefix}expected H x W or N x H x W label maps, got shape {g.shape}")

    def _update_image(self, g: np.ndarray, p: np.ndarray, prefix: str) -> None:
        if g.size == 0:
            return
        gl, pl = self._compact(g, p, prefix)
        k = self.num_classes
        d = dilation_pixels(g.shape[0], g.shape[1], self.ratio)
        # each pixel's class on the gt / predicted boundary, or k (none): ignored pixels are on no
        # boundary (their gt label is k already); one joint histogram then counts both
        # boundaries and their intersection per class
        on_g = np.where(label_boundaries(gl, d), gl, gl.dtype.type(k))
        on_p = label_boundaries(pl, d)
        if self.ignore_index is not None:
            on_p &= gl != k
        on_p = np.where(on_p, pl, pl.dtype.type(k))
        if k < 256:
            joint = _joint_histogram(on_g, on_p)[: k + 1, : k + 1]
        else:
            code = on_g.astype(np.int64) * (k + 1) + on_p
            joint = np.bincount(code.ravel(), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        inter = np.diagonal(joint)[:k]
        self.intersection += inter
        self.union += joint[:k].sum(axis=1) + joint[:, :k].sum(axis=0) - inter

    def _compact(self, g: np.ndarray, p: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """Validated label maps in the smallest dtype, values ``0..K-1`` and ``K`` for "no class":
        ground truth ``ignore_index``, and a prediction outside ``[0, K)`` (allowed only where the
        ground truth is ignored, where it differs from every class just the same)."""
        k = self.num_classes
        labelled = None if self.ignore_index is None else g != self.ignore_index
        g_bad = (g < 0) | (g >= k) if g.dtype.kind == "i" else g >= k
        if labelled is not None:
            g_bad &= labelled
        if g_bad.any():
            bad = int(g[g_bad].flat[0])
            raise MetricsInputError(
                f"{prefix}ground truth value {bad} is not a class id in [0, {k})"
                + (f" nor ignore_index {self.ignore_index}" if self.ignore_index is not None else ""))
        p_out = (p < 0) | (p >= k) if p.dtype.kind == "i" else p >= k
        p_bad = p_out if labelled is None else p_out & labelled
        if p_bad.any():
            raise MetricsInputError(
                f"{prefix}prediction value {int(p[p_bad].flat[0])} at a labelled pixel is not a class id in [0, {k})")
        dtype = _compact_dtype(k)
        gl = g.astype(dtype, copy=False) if labelled is None else np.where(labelled, g, k).astype(dtype, copy=False)
        pl = np.where(p_out, k, p).astype(dtype, copy=False) if p_out.any() else p.astype(dtype, copy=False)
        return gl, pl

    def merge(self, other: BoundaryIoU) -> BoundaryIoU:
        """Add ``other``'s counts into this accumulator (in place); returns self."""
        self._check_compatible(other)
        self.intersection += other.intersection
        self.union += other.union
        return self

    def __add__(self, other: BoundaryIoU) -> BoundaryIoU:
        self._check_compatible(other)
        out = BoundaryIoU(self.num_classes, self.ignore_index, self.ratio)
        out.intersection = self.intersection + other.intersection
        out.union = self.union + other.union
        return out

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, BoundaryIoU):
            raise TypeError(f"cannot combine BoundaryIoU with {type(other).__name__}")
        mine = (self.num_classes, self.ignore_index, self.ratio)
        theirs = (other.num_classes, other.ignore_index, other.ratio)
        if mine != theirs:
            raise ValueError(f"cannot combine boundary IoU accumulators of (classes, ignore_index, ratio) "
                             f"{mine} and {theirs}")

    def compute(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """``compute(self.intersection, self.union, names)``."""
        return compute(self.intersection, self.union, names)

    def __repr__(self) -> str:
        return (f"BoundaryIoU(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"ratio={self.ratio}, union={int(self.union.sum())})")


def compute(intersection: np.ndarray, union: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"boundary_iou": mean, "per_class": {name: intersection / union}}``.

    A class with an empty union (no boundary pixel in ground truth or prediction over the split)
    is None and left out of the mean; the mean over no class is None.
    """
    intersection, union = np.asarray(intersection), np.asarray(union)
    if intersection.shape != union.shape or intersection.ndim != 1:
        raise ValueError(f"intersection {intersection.shape} and union {union.shape} must be equal-length vectors")
    k = intersection.shape[0]
    if names is None:
        names = [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} boundary IoU counts")
    per_class = _ratio(intersection, union)
    return {"boundary_iou": _mean(per_class), "per_class": dict(zip(names, per_class))}


def with_boundary_iou(metrics: dict[str, Any], boundary: dict[str, Any]) -> dict[str, Any]:
    """Semantic ``metrics`` (``segpipe.metrics.semantic.compute``) with ``boundary`` (:func:`compute`)
    added: ``boundary_iou`` right after ``miou``, and ``per_class[name]["boundary_iou"]``. Pure."""
    missing = set(metrics["per_class"]) ^ set(boundary["per_class"])
    if missing:
        raise ValueError(f"class names differ between the semantic and boundary metrics: {sorted(missing)}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "per_class":
            value = {n: {**m, "boundary_iou": boundary["per_class"][n]} for n, m in value.items()}
        out[key] = value
        if key == "miou":
            out["boundary_iou"] = boundary["boundary_iou"]
    out.setdefault("boundary_iou", boundary["boundary_iou"])
    return out
