"""Semantic segmentation metrics from a confusion matrix accumulated batch by batch.

``ConfusionMatrix`` holds a plain ``K x K`` int64 array (rows: ground truth, columns: prediction)
that sums across workers; ``compute(conf)`` turns any such array into the metrics. Pixels whose
ground truth is ``ignore_index`` are skipped whatever their prediction. See ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.errors import UserError


class MetricsInputError(UserError, ValueError):
    """Input to a metric is invalid; the message names the file, image id or annotation id at fault."""


# Pixels per bincount call: keeps the uint16 code buffer (2 MiB) in cache and memory flat however
# large one update is.
_CHUNK = 1 << 20


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise MetricsInputError(f"{what}: expected an integer label array, got dtype {a.dtype}")
    return a


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows gt, columns prediction).

    ``update(gt, pred)`` takes numpy arrays or torch tensors of any equal shape. Matrices of the
    same shape add (``a + b``, ``merge``), so workers can accumulate separately; ``.mat`` is the
    plain ndarray, and ``ConfusionMatrix.from_array`` wraps one back.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes}); "
                             f"use a value outside [0, {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    @classmethod
    def from_array(cls, mat: np.ndarray, ignore_index: int | None = 255) -> ConfusionMatrix:
        """Wrap a ``K x K`` count array (e.g. one summed over workers)."""
        mat = np.asarray(mat)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or not np.issubdtype(mat.dtype, np.integer):
            raise ValueError(f"expected a square integer matrix, got shape {mat.shape} dtype {mat.dtype}")
        cm = cls(mat.shape[0], ignore_index)
        cm.mat += mat
        return cm

    def update(self, gt: Any, pred: Any, where: str = "") -> None:
        """Add the pixels of one image or batch. ``where`` (a file or image id) prefixes errors.

        Raises MetricsInputError when shapes differ, or when a pixel's ground truth is outside
        ``[0, K)`` and not ``ignore_index``, or a labelled pixel's prediction is outside ``[0, K)``.
        """
        prefix = f"{where}: " if where else ""
        g = _to_numpy(gt, f"{prefix}ground truth")
        p = _to_numpy(pred, f"{prefix}prediction")
        if g.shape != p.shape:
            raise MetricsInputError(f"{prefix}ground truth shape {g.shape} != prediction shape {p.shape}")
        if g.size == 0:
            return
        small_ignore = self.ignore_index is None or 0 <= self.ignore_index < 256
        if small_ignore and _in_uint8_range(g) and _in_uint8_range(p):
            self._add_joint(_joint_histogram(g, p), g.size, prefix)
        else:
            self._update_wide(g, p, prefix)

    def _add_joint(self, hist: np.ndarray, n: int, prefix: str) -> None:
        # hist: 256 x 256 counts of (gt value, pred value) over n pixels; everything outside the
        # K x K block is either ignored (the ignore row) or invalid input. Checks read O(K * 256)
        # entries, not the whole table.
        k = self.num_classes
        block = hist[:k]
        seen = int(block.sum())
        if self.ignore_index is not None:
            seen += int(hist[self.ignore_index].sum())
        if seen != n:
            rows = hist.sum(axis=1)
            bad = [int(v) for v in np.flatnonzero(rows) if v >= k and v != self.ignore_index]
            raise MetricsInputError(
                f"{prefix}ground truth value {bad[0]} is not a class id in [0, {k})"
                + (f" nor ignore_index {self.ignore_index}" if self.ignore_index is not None else "")
            )
        bad_pred = np.flatnonzero(block[:, k:].any(axis=0))
        if bad_pred.size:
            raise MetricsInputError(
                f"{prefix}prediction value {int(bad_pred[0]) + k} at a labelled pixel is not a class id in [0, {k})"
            )
        self.mat += block[:, :k]

    def _update_wide(self, g: np.ndarray, p: np.ndarray, prefix: str) -> None:
        """Any integer dtype and range: mask explicitly (slower; values beyond uint8 are rare)."""
        k = self.num_classes
        g = g.reshape(-1)
        p = p.reshape(-1)
        if self.ignore_index is not None:
            keep = g != self.ignore_index
            if not keep.all():
                g, p = g[keep], p[keep]
        if g.size == 0:
            return
        for arr, name in ((g, "ground truth"), (p, "prediction")):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                extra = f" nor ignore_index {self.ignore_index}" if name == "ground truth" and self.ignore_index is not None else ""
                where_ = " at a labelled pixel" if name == "prediction" else ""
                raise MetricsInputError(f"{prefix}{name} value {bad}{where_} is not a class id in [0, {k}){extra}")
        code = g.astype(np.int64) * k + p
        self.mat += np.bincount(code, minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (in place); returns self."""
        self._check_compatible(other)
        self.mat += other.mat
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.mat = self.mat + other.mat
        return out

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot combine ConfusionMatrix with {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot combine confusion matrices of {self.num_classes} classes (ignore {self.ignore_index}) "
                f"and {other.num_classes} classes (ignore {other.ignore_index})"
            )

    def compute(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """``compute(self.mat, names)``."""
        return compute(self.mat, names)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, pixels={int(self.mat.sum())})"


def _in_uint8_range(a: np.ndarray) -> bool:
    """Whether every value of an integer array lies in [0, 255] (one reduction pass)."""
    if a.dtype == np.uint8:
        return True
    if a.dtype.kind == "i":
        # negative values are huge when read as unsigned: one max() checks both ends
        a = a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return int(a.max()) <= 255


def _joint_histogram(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """256 x 256 counts of (gt, pred) value pairs of two integer arrays with values in [0, 255].

    One code per pixel (gt << 8 | pred) and one bincount per chunk: no masking pass for ignored
    pixels and, for uint8 input, no int64 copy of the image (the code is uint16).
    """
    g = g.reshape(-1)
    p = p.reshape(-1)
    code_dtype = np.uint16 if g.dtype == np.uint8 and p.dtype == np.uint8 else np.intp
    buf = np.empty(min(_CHUNK, g.size), dtype=code_dtype)
    hist = None
    for start in range(0, g.size, _CHUNK):
        gs = g[start:start + _CHUNK]
        code = buf[: gs.size]
        np.left_shift(gs, 8, out=code, dtype=code_dtype, casting="unsafe")
        np.bitwise_or(code, p[start:start + _CHUNK], out=code, dtype=code_dtype, casting="unsafe")
        counts = np.bincount(code, minlength=1 << 16)
        hist = counts if hist is None else hist + counts
    return hist.reshape(256, 256)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [None if d == 0 else float(n) / float(d) for n, d in zip(num, den)]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def compute(conf: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a ``K x K`` confusion matrix (rows ground truth, columns prediction).

    Returns ``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou``, ``mdice``, ``pixels`` and
    ``per_class`` ``{name: {"iou", "dice", "acc"}}`` (names default to the class ids as strings).
    A per-class value whose denominator is zero is None (``iou``/``dice``: the class is absent from
    ground truth and prediction; ``acc``: absent from ground truth) and is left out of its mean;
    a mean over no classes, or any metric of an empty matrix, is None.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {conf.shape}")
    k = conf.shape[0]
    if names is None:
        names = [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    if len(set(names)) != k:
        raise ValueError(f"class names are not unique: {list(names)}")
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    total = gt_count.sum()
    union = gt_count + pred_count - tp

    acc = _ratio(tp, gt_count)
    iou = _ratio(tp, union)
    dice = _ratio(2 * tp, gt_count + pred_count)
    # Frequency weights are ground-truth shares; a class with no ground truth weighs 0.
    fwiou = None
    if total > 0:
        fwiou = float(sum((gt_count[c] / total) * iou[c] for c in range(k) if gt_count[c] > 0))
    return {
        "pixel_acc": float(tp.sum() / total) if total > 0 else None,
        "mean_acc": _mean(acc),
        "miou": _mean(iou),
        "fwiou": fwiou,
        "mdice": _mean(dice),
        "pixels": int(total),
        "per_class": {n: {"iou": iou[c], "dice": dice[c], "acc": acc[c]} for c, n in enumerate(names)},
    }


def mean_over(metrics: dict[str, Any], key: str, names: Sequence[str]) -> float | None:
    """Mean of ``per_class[name][key]`` over ``names``, skipping nulls (e.g. mIoU over thing classes)."""
    return _mean([metrics["per_class"][n][key] for n in names])


BACKGROUND = "(background)"  # the merged stuff / no-detection class of instance-only models


def class_names(classes: Sequence[dict[str, Any]], num_classes: int) -> list[str]:
    """Names by class id from a manifest or checkpoint class table (ids without an entry: the id)."""
    by_id = {int(c["id"]): str(c["name"]) for c in classes}
    return [by_id.get(i, str(i)) for i in range(num_classes)]


class ThingsVsBackground:
    """Scores instance-only models, whose label maps cover things only, as semantic maps.

    Such models say nothing about stuff, so their maps are scored against the thing classes plus
    one merged ``(background)`` class: stuff ground truth and pixels no detection covers both map
    to it. Train validation and ``segpipe evaluate`` share this, so their numbers agree.
    """

    def __init__(self, names: Sequence[str], thing_ids: Sequence[int], ignore_index: int = 255) -> None:
        if not thing_ids:
            raise MetricsInputError("an instance model needs thing classes; the class table has none")
        self.num_classes, self.ignore_index = len(names), int(ignore_index)
        self.thing_names = [names[t] for t in thing_ids]
        self.names = [*self.thing_names, BACKGROUND]
        lut_size = max(self.num_classes, self.ignore_index + 1, 256)
        bg = len(thing_ids)
        self.gt_lut = np.full(lut_size, bg, dtype=np.uint8)
        self.gt_lut[self.ignore_index] = 255
        self.pred_lut = np.full(lut_size, bg, dtype=np.uint8)
        for j, t in enumerate(thing_ids):
            self.gt_lut[t] = self.pred_lut[t] = j

    def matrix(self) -> ConfusionMatrix:
        return ConfusionMatrix(len(self.names), 255)

    def update(self, cm: ConfusionMatrix, gt: np.ndarray, pred: np.ndarray, where: str = "") -> None:
        """Add one image: ``gt`` class ids (or ``ignore_index``), ``pred`` thing class ids where a
        detection covers the pixel and ``ignore_index`` elsewhere."""
        at = f"{where}: " if where else ""
        gt, pred = np.asarray(gt), np.asarray(pred)
        bad = gt[(gt < 0) | ((gt >= self.num_classes) & (gt != self.ignore_index))]
        if bad.size:
            raise MetricsInputError(f"{at}ground truth value {int(bad[0])} is not a class id in [0, {self.num_classes})")
        bad = pred[(pred < 0) | ((pred >= self.num_classes) & (pred != self.ignore_index))]
        if bad.size:
            raise MetricsInputError(f"{at}prediction value {int(bad[0])} is not a class id in [0, {self.num_classes})")
        cm.update(self.gt_lut[gt], self.pred_lut[pred], where=where)

    def thing_miou(self, mat: np.ndarray) -> float | None:
        """Mean IoU over the thing classes of a matrix this object's ``matrix()`` accumulated."""
        return mean_over(compute(mat, self.names), "iou", self.thing_names)
