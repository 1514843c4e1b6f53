"""``segpipe drift``: does a drop look like the data the champion was trained on?

    segpipe drift --reference SHARDS --input DROP [--json [FILE]] [--model M | --no-model]
                  [--split S] [--registry DIR] [--engine local|ray] [--device cpu|cuda] [--params FILE]

``SHARDS`` is a shard set (folder or URI; split ``drift.split``, default train). ``DROP`` is a COCO
collection folder (``images/``, ``annotations/instances.json``, optional ``masks/``: what ``segpipe
synth`` writes and the ingest flow takes), or a folder of plain images (or a URI of one): then only
the image features and the model's confidence are compared. Each side is an evenly spaced sample of
at most ``drift.max_images`` images. One two-sample measure per feature
(``segpipe.quality``):

=====================  =======  ==========================================================
feature                measure  of
=====================  =======  ==========================================================
width, height          KS       per-image size (skipped for tiled reference shards)
brightness             KS       per-image mean luma (Rec. 601)
red, green, blue       PSI      pooled pixel values, ``drift.bins`` bins per channel
class_shares           PSI      pooled label-map pixels per class (drop with ``masks/``)
instances_per_image    KS       annotations per image, crowds left out (drop with annotations)
confidence             KS       the model's per-image mean top-1 probability
=====================  =======  ==========================================================

A feature has drifted when its value exceeds its threshold (``drift.thresholds``); a KS feature
also needs a p-value below ``drift.alpha`` (a handful of images can show a large statistic by
chance). The model (``--model``, default: the registry's champion when there is one; ``--no-model``
skips it) runs through ``segpipe.inference`` like ``segpipe select``'s. Prints a table; ``--json
FILE`` writes the report (``--json`` alone prints it instead)::

    {"reference": {...}, "input": {...}, "model": {...} | null, "drifted": bool,
     "drifted_features": [...], "features": {name: {"measure", "value", "threshold", "drifted",
     "p_value" (ks), "reference", "input"}}, "skipped": {name: reason}}
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import atomic_write_json
from segpipe.params import DriftParams, add_params_arguments, from_args
from segpipe.quality import ImageStats
from segpipe.registry import DEFAULT_REGISTRY

KS_FEATURES = ("width", "height", "brightness", "instances_per_image", "confidence")


@dataclass
class Side:
    """What one side (reference or drop) contributes: per-image statistics, and the labels'
    (``class_pixels``: pooled per class, ``instances``: per image) when it has them. ``frames``
    are FrameScorer rows (``{"id", "image"}`` or ``{"id", "path"}``) for the model."""

    images: list[ImageStats] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    class_pixels: np.ndarray | None = None
    instances: list[int] | None = None
    classes: list[dict[str, Any]] | None = None
    tiled: bool = False
    about: dict[str, Any] = field(default_factory=dict)


def reference_side(shards: str | Path, split: str, params: DriftParams) -> Side:
    """An evenly spaced sample of a shard set's split."""
    from segpipe.quality import class_pixels, evenly_spaced, image_stats
    from segpipe.shards import ShardError, decode_row, iter_rows, open_shards

    shard_set = open_shards(shards)
    shard_set.files_of(split)  # ShardError naming the splits there are
    keep = set(evenly_spaced(shard_set.rows(split), params.max_images))
    side = Side(class_pixels=np.zeros(shard_set.num_classes, np.int64), instances=[], classes=list(shard_set.classes))
    for i, row in enumerate(iter_rows(shard_set, split=split)):
        if i not in keep:
            continue
        sample = decode_row(row)
        side.images.append(image_stats(sample["image"], params.bins))
        side.class_pixels += class_pixels(sample["semantic"], shard_set.num_classes)
        side.instances.append(sum(1 for inst in sample["instances"] if not inst["iscrowd"]))
        side.frames.append({"id": len(side.frames), "image": bytes(row["image"])})
        side.tiled |= sample["source_image_id"] != sample["image_id"]
    if not side.images:
        raise ShardError(f"{shards}: split {split!r} has no rows")
    side.about = {"shards": str(shards), "split": split, "images": len(side.images), "rows": shard_set.rows(split),
                  "manifest_sha256": shard_set.manifest_sha256}
    return side


def drop_side(drop: str | Path, params: DriftParams, num_classes: int) -> Side:
    """A COCO collection folder (labels used), or plain images: an evenly spaced sample of them."""
    from segpipe.commands.predict import list_images, read_image
    from segpipe.quality import evenly_spaced, image_stats
    from segpipe.storage import resolve

    where = resolve(drop, "--input")
    folder = where.local_path() if where.local else None
    if folder is not None and (folder / "annotations" / "instances.json").is_file():
        return coco_side(folder, params, num_classes)
    if folder is not None and (folder / "images").is_dir():
        where = resolve(folder / "images", "--input")
    files = list_images(where.uri)
    side = Side()
    for i in evenly_spaced(len(files), params.max_images):
        side.images.append(image_stats(read_image(files[i]), params.bins))
        side.frames.append({"id": len(side.frames), "path": files[i]})
    side.about = {"path": str(drop), "images": len(side.images), "files": len(files), "labelled": False}
    return side


def coco_side(folder: Path, params: DriftParams, num_classes: int) -> Side:
    """A COCO collection: images, and the labels it has (``masks/`` for class shares, annotations
    for instances per image). Records the converter would quarantine for reader problems are skipped."""
    from segpipe.commands.predict import read_image
    from segpipe.formats.coco import read_collection
    from segpipe.quality import class_pixels, evenly_spaced, image_stats

    source = read_collection(folder)
    records = [r for r in source.records() if not r.problems and r.image_path is not None]
    masks = (folder / "masks").is_dir()
    side = Side(class_pixels=np.zeros(num_classes, np.int64) if masks else None, instances=[],
                classes=[{"id": c.id, "name": c.name} for c in source.classes])
    for i in evenly_spaced(len(records), params.max_images):
        r = records[i]
        side.images.append(image_stats(read_image(r.image_path), params.bins))
        side.frames.append({"id": len(side.frames), "path": str(r.image_path)})
        side.instances.append(sum(1 for inst in r.instances if not inst.get("iscrowd")))
        if masks and r.semantic is not None:
            side.class_pixels += class_pixels(r.semantic(), num_classes)
    side.about = {"path": str(folder), "images": len(side.images), "records": len(records), "labelled": True,
                  "masks": masks}
    return side


def model_confidence(model_ref: str | Path, registry: Path | str, sides: list[Side], params: DriftParams,
                     device: str, engine: str) -> tuple[list[list[float]], dict[str, Any]]:
    """Each side's per-image mean top-1 probability of the model, and what the model was."""
    from segpipe.commands.select import FrameScorer
    from segpipe.inference import map_rows
    from segpipe.quality import probability_model
    from segpipe.results import CheckpointRef

    directory, meta = probability_model(model_ref, registry)
    rows, owner = [], []
    for s, side in enumerate(sides):
        for f in side.frames:
            owner.append((s, f["id"]))
            rows.append({**f, "id": len(rows)})
    worker = {"tile": params.window.tile, "overlap": params.window.overlap, "batch_size": params.window.batch_size,
              "embed": False}
    out: list[list[float]] = [[float("nan")] * len(side.frames) for side in sides]
    for r in map_rows(rows, directory, FrameScorer, worker, engine=engine, device=device, outputs={"semantic"}):
        s, i = owner[r["id"]]
        out[s][i] = float(r["confidence"])
    return out, {"ref": str(model_ref), "arch": meta.arch, "sha256": CheckpointRef.of(directory).sha256,
                 "trained_on": meta.shards_manifest_sha256}


def compare(reference: Side, drop: Side, params: DriftParams,
            confidence: list[list[float]] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every feature's verdict (``FeatureDrift.to_json``) and the features skipped, with why."""
    from segpipe.checkpoint import class_table_difference
    from segpipe.quality import CHANNELS, histogram_mean, judge_ks, judge_psi

    t, alpha = params.thresholds, params.alpha
    features: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in ("width", "height"):
        if reference.tiled:
            skipped[name] = "the reference shards are tiled (convert.tile_size): their rows are not whole images"
            continue
        features[name] = judge_ks(name, [getattr(s, name) for s in reference.images],
                                  [getattr(s, name) for s in drop.images], getattr(t, name), alpha)
    features["brightness"] = judge_ks("brightness", [s.brightness for s in reference.images],
                                      [s.brightness for s in drop.images], t.brightness, alpha)
    ref_hist = np.sum([s.histograms for s in reference.images], axis=0)
    drop_hist = np.sum([s.histograms for s in drop.images], axis=0)
    for c, name in enumerate(CHANNELS):
        features[name] = judge_psi(name, ref_hist[c], drop_hist[c], getattr(t, name),
                                   (histogram_mean(ref_hist[c]), histogram_mean(drop_hist[c])))
    differ = (class_table_difference(reference.classes or [], drop.classes) if drop.classes is not None else None)
    if drop.classes is None:
        skipped["class_shares"] = skipped["instances_per_image"] = "the drop has no labels (plain images)"
    elif differ:
        skipped["class_shares"] = skipped["instances_per_image"] = f"the class tables differ ({differ})"
    else:
        if drop.class_pixels is None:
            skipped["class_shares"] = "the drop has no masks/ (label maps)"
        elif drop.class_pixels.sum() == 0 or reference.class_pixels.sum() == 0:
            skipped["class_shares"] = "no labelled pixel on one side"
        else:
            features["class_shares"] = judge_psi("class_shares", reference.class_pixels, drop.class_pixels,
                                                 t.class_shares)
        features["instances_per_image"] = judge_ks("instances_per_image", reference.instances, drop.instances,
                                                   t.instances_per_image, alpha)
    if confidence is not None:
        features["confidence"] = judge_ks("confidence", confidence[0], confidence[1], t.confidence, alpha)
    return {name: f.to_json() for name, f in features.items()}, skipped


def run(params: DriftParams, reference: str | Path, drop: str | Path, model_ref: str | Path | None = None,
        registry: Path | str = DEFAULT_REGISTRY, split: str | None = None, device: str = "cpu",
        engine: str = "local") -> dict[str, Any]:
    """The drift report of ``drop`` against ``reference`` (see the module docstring). With
    ``model_ref`` None, confidence is skipped."""
    from segpipe.quality import NoProbabilities

    ref = reference_side(reference, split or params.split, params)
    new = drop_side(drop, params, len(ref.class_pixels))
    confidence, model, why = None, None, "no model (no champion in the registry, or --no-model)"
    if model_ref is not None:
        try:
            confidence, model = model_confidence(model_ref, registry, [ref, new], params, device, engine)
        except NoProbabilities as e:
            why = str(e)
    features, skipped = compare(ref, new, params, confidence)
    if confidence is None:
        skipped["confidence"] = why
    drifted = [name for name, f in features.items() if f["drifted"]]
    return {"reference": ref.about, "input": new.about, "model": model, "alpha": params.alpha,
            "drifted": bool(drifted), "drifted_features": drifted, "features": features, "skipped": skipped}


def default_model(registry: Path | str) -> str | None:
    """``champion`` when the registry has one, else None."""
    from segpipe.registry import read_index

    return "champion" if read_index(registry)["aliases"].get("champion") else None


def main(argv: list[str] | None = None) -> None:
    import torch

    from segpipe.params import ENGINES
    from segpipe.quality import format_drift_table

    parser = argparse.ArgumentParser(prog="segpipe drift", description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="shard set the model was trained on (folder or URI)")
    parser.add_argument("--input", required=True, help="the drop: a COCO collection folder, or a folder of images")
    parser.add_argument("--json", dest="json_out", nargs="?", const="-", metavar="FILE",
                        help="write the report to FILE (alone: print it instead of the table)")
    parser.add_argument("--split", help="reference split (default: params drift.split)")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", help="champion | vN | CHECKPOINT_DIR (default: the champion, when there is one)")
    models.add_argument("--no-model", action="store_true", help="compare the images and labels only")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--engine", choices=ENGINES, default="local")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "drift")
    model = None if args.no_model else args.model or default_model(args.registry)
    report = run(params, args.reference, args.input, model, args.registry, args.split, args.device, args.engine)
    if args.json_out == "-":
        print(json.dumps(report, indent=2))
        return
    if args.json_out:
        from segpipe.storage import require_local

        atomic_write_json(require_local(args.json_out, "--json"), report)
    print(format_drift_table(report["features"], report["skipped"]))
    print(f"drifted: {', '.join(report['drifted_features']) or 'nothing'}")


if __name__ == "__main__":
    main()
