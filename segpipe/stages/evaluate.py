"""``segpipe evaluate``: score a checkpoint on one split of a shard set; write DVC metrics and plots.

    segpipe evaluate --model CKPT --shards DIR|URI [--split val] --out DIR [--device cpu] [--params params.yaml] [--set ...]

Label maps and detections come from ``segpipe.inference``, the code ``segpipe predict`` serves
with, and are scored by ``segpipe.scoring`` (shared with the fuse stage and with promote's
re-scoring of the champion), in this process or on a Ray Data actor pool (``evaluate.engine``;
the same numbers either way). Output (``DIR`` is replaced whole; every file is written once, at
the end)::

    metrics.json        DVC metrics (``segpipe.results.EvalResult``): checkpoint path + sha256, shard
                        manifest sha256, split, scoring key, arch, task, semantic metrics, segm / bbox
                        COCO stats for instance-capable models, ``panoptic`` (PQ/SQ/RQ, things/stuff,
                        per class) for panoptic-capable ones, and ``per_collection``: the same
                        scalars for each source collection of the split (data/raw/<name>)
    confusion.csv       actual,predicted rows for DVC's confusion template (see docs/metrics.md)
    confusion_counts.csv  actual,predicted,count: the exact pixel counts
    per_class_iou.csv   class,iou
    per_class_pq.csv    class,pq (models with a panoptic output, MaskFormer; a header only otherwise)
    per_collection.csv  collection,images,<metric>...: one row per source collection
    overlays/*.png      image | ground truth | prediction, in class colours, above a legend naming them
    detections.json     COCO results (instance-capable models; [] for semantic-only ones)

Conventions (instance models rendered to label maps, nulls, PQ, ...) are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from segpipe.files import atomic_dir, atomic_write_json
from segpipe.params import EvaluateParams, add_params_arguments, from_args


def run(params: EvaluateParams, model_dir: Path | str, shards: Path | str, out: Path | str,
        device: str = "cpu") -> dict[str, Any]:
    """Evaluate the checkpoint ``model_dir`` on ``params.split`` of ``shards`` (a folder or URI);
    write ``out`` (replaced whole) and return the metrics.json content."""
    from segpipe.progress import Progress
    from segpipe.scoring import score_checkpoint
    from segpipe.shards import open_shards
    from segpipe.storage import resolve

    shard_set = open_shards(resolve(shards, "--shards"))
    with Progress(f"evaluate {Path(out).name}", total=shard_set.rows(params.split)) as bar, \
            atomic_dir(Path(out)) as tmp:
        metrics = score_checkpoint(Path(model_dir), shard_set, params, device, out=tmp, on_images=bar.advance)
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def summary_line(m: dict[str, Any], split: str) -> str:
    """One line: the architecture, the split, its headline numbers."""
    def fmt(v: Any) -> str:
        return "null" if v is None else f"{v:.4f}"

    text = f"miou {fmt(m['miou'])}"
    if "segm" in m:
        text += f", segm AP {fmt(m['segm']['AP'])}"
    if "panoptic" in m:
        text += f", pq {fmt(m['panoptic']['pq'])}"
    if len(m.get("per_collection", {})) > 1:
        text += "; per collection miou " + ", ".join(f"{k} {fmt(v.get('miou'))}" for k, v in m["per_collection"].items())
    return f"{m['arch']} on {split} ({m['images']} images): {text}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--shards", required=True, help="shard set folder or URI (s3://, gs://, file://)")
    parser.add_argument("--split", help="split to evaluate (default: evaluate.split in params)")
    parser.add_argument("--out", required=True, help="output directory (replaced whole)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda (with evaluate.engine: ray, one GPU per actor); default: %(default)s")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "evaluate")
    if args.split:
        params = dataclasses.replace(params, split=args.split)
    m = run(params, args.model, args.shards, args.out, args.device)
    print(f"{summary_line(m, params.split)} -> {args.out}")
