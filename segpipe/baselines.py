"""Reference predictors a trained model has to beat, fitted on the train split only.

* ``majority``: every pixel is the most frequent class of the train split.
* ``colour``: a per-pixel lookup from quantised RGB (``bits`` per channel) to the class most
  frequent at that colour in the train split; colours never seen in training get the majority
  class. It knows nothing of shape or context, so a model that does not beat it has learnt no
  more than "this colour is usually that class".

Both are pure: ``fit_*`` take ``(image, semantic)`` pairs and return a frozen predictor whose
``predict(image)`` gives an ``H x W`` label map. ``segpipe evaluate --baselines`` scores them on
the same split and with the same metrics as the models.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

BASELINES = ("majority", "colour")


@dataclass(frozen=True)
class Majority:
    label: int

    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], self.label, dtype=np.int64)


@dataclass(frozen=True)
class ColourLookup:
    bits: int
    table: np.ndarray  # 2 ** (3 * bits) class ids, indexed by colour_index

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.table[colour_index(image, self.bits)]


def colour_index(image: np.ndarray, bits: int) -> np.ndarray:
    """``H x W`` bin of each pixel of an ``H x W x 3`` uint8 image: the top ``bits`` of R, G and B."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    q = (image >> (8 - bits)).astype(np.int64)
    return (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]


def _labelled(semantic: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    return (semantic != ignore_index) & (semantic < num_classes)


def fit_baselines(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore_index: int,
                  bits: int = 4) -> dict[str, Majority | ColourLookup]:
    """Both baselines, fitted in one pass over ``(image, semantic)`` pairs: ``{"majority", "colour"}``.
    Ties go to the lowest class id."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    bins = 1 << (3 * bits)
    counts = np.zeros(bins * num_classes, dtype=np.int64)
    for image, sem in pairs:
        if image.shape[:2] != sem.shape:
            raise ValueError(f"image {image.shape[:2]} and label map {sem.shape} differ in size")
        keep = _labelled(sem, num_classes, ignore_index)
        idx = colour_index(image, bits)[keep] * num_classes + sem[keep].astype(np.int64)
        counts += np.bincount(idx, minlength=bins * num_classes)
    counts = counts.reshape(bins, num_classes)
    per_class = counts.sum(0)
    if not per_class.any():
        raise ValueError("no labelled pixel to fit the colour baseline on")
    majority = Majority(int(np.argmax(per_class)))
    table = np.where(counts.any(1), counts.argmax(1), majority.label).astype(np.int64)
    return {"majority": majority, "colour": ColourLookup(bits, table)}
