"""``segpipe baselines``: the reference predictors a model must beat, fitted and scored.

    segpipe baselines --shards DIR|URI --out models/baselines

* ``majority``: every pixel is the most frequent class of the train split.
* ``colour``: a per-pixel lookup from quantised RGB (``baselines.colour_bits`` per channel) to the
  class most frequent at that colour in the train split; colours never seen in training get the
  majority class. It knows nothing of shape or context, so a model that does not beat it has
  learnt no more than "this colour is usually that class".

Both are pure: ``fit_*`` take ``(image, semantic)`` pairs and return a frozen predictor whose
``predict(image)`` gives an ``H x W`` label map. They are fitted on the train split only and scored
on ``evaluate.split`` with the metrics the models get (``segpipe.scoring.semantic_result``, per
collection too). Promote's ``beats_baseline`` gate and the summary read them. Output (replaced
whole): ``OUT/<name>/metrics.json`` and ``OUT/<name>/per_class_iou.csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import atomic_dir, atomic_write_json, atomic_write_text
from segpipe.metrics.boundary import BoundaryIoU
from segpipe.metrics.semantic import ConfusionMatrix, MetricsInputError, class_names
from segpipe.params import BaselinesParams, EvaluateParams, add_params_arguments, from_args

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



def run(params: BaselinesParams, scoring: EvaluateParams, shards: Path | str, out: Path | str) -> dict[str, dict[str, Any]]:
    """Fit the reference predictors on the train split of ``shards`` and score them on
    ``scoring.split``; write ``out/<name>/`` (``out`` replaced whole). Returns {name: metrics}."""
    from segpipe.scoring import COLLECTION_KEYS, per_class_iou_csv, semantic_result
    from segpipe.shards import iter_samples, open_shards
    from segpipe.storage import resolve

    s = open_shards(resolve(shards, "--shards"))
    if not s.rows("train"):
        raise MetricsInputError(f"{s.root}: no train split to fit the baselines on")
    names = class_names(list(s.classes), s.num_classes)
    thing_names = [names[t] for t in s.thing_ids]
    predictors = fit_baselines(((x["image"], x["semantic"]) for x in iter_samples(s, split="train")),
                               s.num_classes, s.ignore_index, params.colour_bits)
    matrices: dict[str, dict[str, ConfusionMatrix]] = {k: {} for k in predictors}
    bounds: dict[str, dict[str, BoundaryIoU]] = {k: {} for k in predictors}
    images: dict[str, int] = {}
    for sample in iter_samples(s, split=scoring.split):
        c = sample["collection"]
        images[c] = images.get(c, 0) + 1
        where = f"image {sample['image_id']}"
        for k, predictor in predictors.items():
            pred = predictor.predict(sample["image"])
            matrices[k].setdefault(c, ConfusionMatrix(s.num_classes, s.ignore_index)).update(sample["semantic"], pred,
                                                                                          where=where)
            bounds[k].setdefault(c, BoundaryIoU(s.num_classes, s.ignore_index, scoring.boundary_ratio)).update(
                sample["semantic"], pred, where=where)
    if not images:
        raise MetricsInputError(f"split {scoring.split!r} of {s.root} has no images")
    metrics = {}
    with atomic_dir(Path(out)) as tmp:
        for k, per in matrices.items():
            b = bounds[k]
            result = semantic_result(sum(cm.mat for cm in per.values()), names, thing_names,
                                     sum(x.counts for x in b.values()), s.ignore_index)
            per_collection = {c: {**{m: v for m, v in semantic_result(cm.mat, names, thing_names, b[c].counts,
                                                                      s.ignore_index).items()
                                     if m in COLLECTION_KEYS}, "images": images[c]} for c, cm in sorted(per.items())}
            metrics[k] = {"baseline": k, "arch": f"baseline:{k}", "task": "semantic", "fitted_on": "train",
                          "colour_bits": params.colour_bits if k == "colour" else None,
                          "shards_manifest_sha256": s.manifest_sha256, "split": scoring.split,
                          "scoring": scoring.scoring_key(), **result, "images": sum(images.values()),
                          "per_collection": per_collection}
            atomic_write_json(tmp / k / "metrics.json", metrics[k])
            atomic_write_text(tmp / k / "per_class_iou.csv", per_class_iou_csv(result))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard set folder or URI")
    parser.add_argument("--out", required=True, help="output directory (replaced whole)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    scoring = from_args(args, "evaluate")
    for name, b in run(from_args(args, "baselines"), scoring, args.shards, args.out).items():
        print(f"baseline {name} on {scoring.split} ({b['images']} images): miou {b['miou']:.4f} -> {Path(args.out) / name}")
