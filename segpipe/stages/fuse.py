"""``segpipe fuse``: the best semantic and the best instance model, fused into one panoptic model and scored.

    segpipe fuse --evals models/eval --shards DIR|URI --out models/fused

Among the results under ``--evals`` (``segpipe evaluate --out EVALS/<arch>``) computed on these
shards and ``evaluate.split``, the best ``task: semantic`` one on ``fuse.semantic_metric`` and the
best ``task: instance`` one on ``fuse.instance_metric`` are fused by Panoptic FPN's heuristic
(``fuse.fusion``) and scored with PQ by ``segpipe.scoring`` (detections kept by
``evaluate.detection``, so the instance model's detections are the ones its own evaluation
scored). Output (replaced whole)::

    metrics.json       task ``panoptic``, both checkpoints with their sha256, the fusion params,
                       the panoptic metrics, overall and per collection; or ``skipped``: why no
                       pair was fused (a run without an instance model)
    per_class_pq.csv   class,pq

The output lies outside ``models/eval``: a DVC stage cannot depend on a folder holding its own output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segpipe.files import atomic_dir, atomic_write_json, atomic_write_text
from segpipe.metrics.semantic import MetricsInputError
from segpipe.params import EvaluateParams, FuseParams, add_params_arguments, as_dict, from_args
from segpipe.results import FUSED_ARCH, EvalResult, read_results


def best_pair(evals: dict[str, EvalResult], params: FuseParams, manifest: str, split: str) -> tuple[str, str]:
    """``(semantic, instance)``: the names of the results to fuse, the best ``task: semantic`` one
    on ``params.semantic_metric`` and the best ``task: instance`` one on ``params.instance_metric``
    (ties: the first name in sorted order), among the models scored on ``manifest`` and ``split``.
    MetricsInputError naming what is missing when either has no candidate."""

    def best(task: str, metric: str) -> str:
        scored = [(v, name) for name, r in sorted(evals.items())
                  if r.kind == "model" and r.task == task and (r.manifest, r.split) == (manifest, split)
                  and (v := r.metric(metric)) is not None]
        if not scored:
            raise MetricsInputError(f"no {task} evaluation with a finite {metric} (fuse.{task}_metric) on these "
                                    f"shards and split {split!r} among {sorted(evals) or 'none'}")
        top = max(v for v, _ in scored)
        return next(name for v, name in scored if v == top)

    return best("semantic", params.semantic_metric), best("instance", params.instance_metric)


def run(params: FuseParams, scoring: EvaluateParams, evals: Path | str, shards: Path | str, out: Path | str,
        device: str = "cpu") -> dict[str, Any]:
    """Fuse and score the best pair under ``evals`` (see :func:`best_pair`) on ``scoring.split`` of
    ``shards``; write ``out`` (replaced whole) and return its metrics.json content."""
    from segpipe.scoring import per_class_pq_csv, score_fused
    from segpipe.shards import open_shards
    from segpipe.storage import resolve

    out = Path(out)
    shard_set = open_shards(resolve(shards, "--shards"))
    found = read_results(evals, skip=out)
    try:
        sem, inst = best_pair(found.ok, params, shard_set.manifest_sha256, scoring.split)
    except MetricsInputError as e:
        # A run without an instance (or a semantic) model has no pair: say so, and let promote
        # report the candidate as unreadable, rather than fail every pipeline of semantic models.
        unread = "; unreadable: " + "; ".join(found.problems.values()) if found.problems else ""
        metrics = {"arch": FUSED_ARCH, "task": "panoptic", "skipped": f"{e}{unread}", "fusion": as_dict(params.fusion),
                   "shards_manifest_sha256": shard_set.manifest_sha256, "split": scoring.split}
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "metrics.json", metrics)
            atomic_write_text(tmp / "per_class_pq.csv", per_class_pq_csv(None))
        return metrics
    paths = {"semantic": found.ok[sem].verify()["model"], "instance": found.ok[inst].verify()["model"]}
    metrics = score_fused(paths["semantic"], paths["instance"], params.fusion, shard_set, scoring, device)
    for key, name in (("semantic", sem), ("instance", inst)):
        metrics["checkpoints"][key]["eval"] = str(Path(evals) / name)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "per_class_pq.csv", per_class_pq_csv(metrics["panoptic"]))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe fuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", required=True, help="folder of evaluate outputs (EVALS/<arch>/metrics.json)")
    parser.add_argument("--shards", required=True, help="shard set folder or URI")
    parser.add_argument("--out", required=True, help="output directory (replaced whole)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda; default: %(default)s")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    f = run(from_args(args, "fuse"), from_args(args, "evaluate"), args.evals, args.shards, args.out, args.device)
    if "skipped" in f:
        print(f"segpipe fuse: no fused pair: {f['skipped']} -> {args.out}", file=sys.stderr)
        return
    pq = f["panoptic"]["pq"]
    print(f"fused {f['checkpoints']['semantic']['arch']} + {f['checkpoints']['instance']['arch']} on {f['split']} "
          f"({f['images']} images): pq {'null' if pq is None else f'{pq:.4f}'} -> {args.out}")
