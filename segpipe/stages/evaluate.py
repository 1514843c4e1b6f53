"""``segpipe evaluate``: score a checkpoint on one split of a shard set; write DVC metrics and plots.

    segpipe evaluate --model CKPT --shards DIR [--split val] --out DIR [--device cpu] [--params params.yaml] [--set ...]
    segpipe evaluate --baselines --shards DIR --out DIR
    segpipe evaluate --fuse-best EVALS --shards DIR --out DIR

Label maps and detections come from ``segpipe.inference``, the code ``segpipe predict`` serves
with: each image whole, at its own resolution, in fp32. The split is cut into chunks of whole
batches inside one shard (:func:`plan_chunks`), and ``evaluate.engine`` runs them in this process
(``local``) or on a Ray Data actor pool (``ray``, for large splits; the same numbers, since every
chunk is scored by the same :class:`ChunkScorer` in the same batches). Each chunk returns its
confusion matrix (summed), its COCO ground truth and detections, and its overlays. Output
(``DIR`` is replaced whole; every file is written once, at the end)::

    metrics.json        DVC metrics: checkpoint path + sha256, shard manifest sha256, split, arch,
                        task, semantic metrics, segm / bbox COCO stats for instance-capable models,
                        and ``panoptic`` (PQ/SQ/RQ, things/stuff, per class) for panoptic-capable ones
    confusion.csv       actual,predicted rows for DVC's confusion template (see docs/metrics.md)
    confusion_counts.csv  actual,predicted,count: the exact pixel counts
    per_class_iou.csv   class,iou
    per_class_pq.csv    class,pq (models with a panoptic output, MaskFormer; a header only otherwise)
    overlays/*.png      image | ground truth | prediction, in class colours
    detections.json     COCO results (instance-capable models; [] for semantic-only ones)

``--fuse-best EVALS`` fuses the best semantic and the best instance model evaluated under EVALS
(Panoptic FPN's heuristic, ``evaluate.panoptic.fusion``) and writes only ``metrics.json`` (task
``panoptic``, both checkpoints with their sha256, the fusion params) and ``per_class_pq.csv``.

Conventions (instance models rendered to label maps, nulls, PQ, ...) are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segpipe.files import atomic_dir, atomic_write_json, atomic_write_text
from segpipe.metrics.semantic import (
    ConfusionMatrix,
    MetricsInputError,
    ThingsVsBackground,
    class_names,
    compute,
    mean_over,
)
from segpipe.params import EvaluateParams, FusionParams, add_params_arguments, from_args

if TYPE_CHECKING:
    from segpipe.checkpoint import CheckpointMeta
    from segpipe.inference import Prediction, Predictor
    from segpipe.shards import ShardSet

CONFUSION_ROWS = 10_000  # rows of confusion.csv: enough for percent-level shading, small to diff
CHUNK_BATCHES = 4  # batches per unit of work: small enough to spread a 100-image split over actors


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction side by side (``H x 3W x 3``)."""
    from segpipe.inference import colorize

    return np.concatenate([image, colorize(gt, pal), colorize(pred, pal)], axis=1)


def gt_annotations(sample: dict[str, Any], image_id: int, first_id: int, thing_ids: set[int]) -> list[dict[str, Any]]:
    """COCO ground-truth annotations of one shard sample (ids from ``first_id``)."""
    anns = []
    for k, inst in enumerate(sample["instances"]):
        if int(inst["category_id"]) not in thing_ids:
            raise MetricsInputError(
                f"image {sample['image_id']}: instance #{k} has category {inst['category_id']}, not a thing class "
                f"of the checkpoint ({sorted(thing_ids)})")
        anns.append({"id": first_id + k, "image_id": image_id, "category_id": int(inst["category_id"]),
                     "iscrowd": int(inst["iscrowd"]), "area": float(inst["area"]),
                     "bbox": [float(v) for v in inst["bbox"]], "segmentation": inst["segmentation"]})
    return anns


def confusion_rows(mat: np.ndarray, names: Sequence[str], rows: int = CONFUSION_ROWS) -> list[tuple[str, str]]:
    """``(actual, predicted)`` rows whose counts are proportional to ``mat`` (largest remainder).

    DVC's confusion template counts rows rather than reading a count column, and one row per
    pixel would be millions of rows.
    """
    total = mat.sum()
    if total == 0:
        return []
    share = mat.astype(np.float64) / total * rows
    n = np.floor(share).astype(np.int64)
    rest = rows - int(n.sum())
    if rest > 0:
        order = np.argsort(-(share - n), axis=None, kind="stable")[:rest]
        n.flat[order] += 1
    out = []
    for a, p in zip(*np.nonzero(n)):
        out.extend([(names[a], names[p])] * int(n[a, p]))
    return out


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if re.search(r'[",\n]', text) else text


def batches(samples: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def plan_chunks(shards: ShardSet, split: str, rows_per_chunk: int) -> list[dict[str, int]]:
    """The split as units of work: ``{"file", "start", "stop", "first"}``, rows ``[start, stop)``
    of the split's ``file``-th shard, ``first`` the split-wide position of row ``start``."""
    chunks, first = [], 0
    for i, f in enumerate(shards.files_of(split)):
        for start in range(0, f.rows, rows_per_chunk):
            stop = min(f.rows, start + rows_per_chunk)
            chunks.append({"file": i, "start": start, "stop": stop, "first": first + start})
        first += f.rows
    return chunks


def semantic_result(mat: np.ndarray, names: Sequence[str], thing_names: Sequence[str]) -> dict[str, Any]:
    """Semantic metrics of a confusion matrix, plus ``miou_things`` over the thing classes in ``names``."""
    result = compute(mat, list(names))
    things = [n for n in names if n in set(thing_names)]
    if things:
        result["miou_things"] = mean_over(result, "iou", things)
    return result


def per_class_pq_csv(panoptic: dict[str, Any] | None) -> str:
    """``class,pq`` of the classes scored (header only without panoptic metrics)."""
    rows = ["class,pq"] + [f"{_csv_field(n)},{v['pq']:.6f}" for n, v in (panoptic or {}).get("per_class", {}).items()
                           if v["pq"] is not None]
    return "\n".join(rows) + "\n"


def pq_counts(stat: Any) -> str:
    """A PQStat's accumulators as JSON (a chunk result's ``panoptic`` column)."""
    return json.dumps({"iou_sum": stat.iou_sum.tolist(), "tp": stat.tp.tolist(), "fp": stat.fp.tolist(),
                       "fn": stat.fn.tolist(), "images": stat.images})


def per_class_iou_csv(result: dict[str, Any]) -> str:
    rows = ["class,iou"] + [f"{_csv_field(n)},{v['iou']:.6f}" for n, v in result["per_class"].items()
                            if v["iou"] is not None]
    return "\n".join(rows) + "\n"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


class Scoring:
    """How a checkpoint's label maps are scored: against all classes (semantic models), or against
    its thing classes plus one background (instance models, see ThingsVsBackground)."""

    def __init__(self, meta: CheckpointMeta) -> None:
        from segpipe.models import spec_of

        self.task, self.ignore = meta.task, meta.ignore_index
        self.names = class_names(list(meta.classes), meta.num_classes)
        self.thing_ids = list(meta.thing_ids or ())
        self.instances = "instances" in spec_of(meta.arch).outputs
        self.panoptic = "panoptic" in spec_of(meta.arch).outputs
        self.things: ThingsVsBackground | None = None
        if self.task == "instance":
            try:
                self.things = ThingsVsBackground(self.names, self.thing_ids, self.ignore)
            except MetricsInputError as e:
                raise MetricsInputError(f"{meta.arch}: {e}") from None
        self.cm_names = self.things.names if self.things else self.names

    def matrix(self) -> ConfusionMatrix:
        return self.things.matrix() if self.things else ConfusionMatrix(len(self.names), self.ignore)

    def pq_stat(self) -> Any:
        """PQ accumulators over every class id (segpipe.metrics.panoptic)."""
        from segpipe.metrics.panoptic import PQStat

        return PQStat(range(len(self.names)))

    def panoptic_result(self, stat: Any) -> dict[str, Any]:
        things = set(self.thing_ids)
        return stat.compute(self.names, [c in things for c in range(len(self.names))])

    def update(self, cm: ConfusionMatrix, gt: np.ndarray, pred: np.ndarray, where: str) -> None:
        if self.things:
            self.things.update(cm, gt, pred, where=where)
        else:
            cm.update(gt, pred, where=where)


class ChunkScorer:
    """Scores chunks of a split (see :func:`plan_chunks`) with one predictor: what a Ray actor or
    this process runs. A result is a flat row: ``first``, ``images``, ``confusion`` (int64 bytes),
    ``coco`` (JSON: ground-truth images and annotations, detections), ``panoptic`` (JSON: PQ
    accumulators, :func:`pq_counts`; "" for models without a panoptic output) and ``overlays``
    (JSON: ``[name, base64 PNG]`` of the split's first ``num_overlays`` images)."""

    def __init__(self, predictor: Predictor, shards: dict[str, Any], split: str, batch_size: int,
                 num_overlays: int) -> None:
        from segpipe.inference import palette
        from segpipe.shards import ShardSet

        self.predictor, self.split, self.batch_size, self.num_overlays = predictor, split, batch_size, num_overlays
        self.shards = ShardSet.from_dict(shards)
        self.scoring = Scoring(predictor.meta)
        self.pal = palette(list(predictor.meta.classes))
        self._table: tuple[int, Any] | None = None  # the last shard read: consecutive chunks share it

    def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
        """The predictions evaluate scores, one per sample (whole images, see segpipe.inference)."""
        return self.predictor.images([s["image"] for s in samples])

    def samples(self, chunk: dict[str, int]) -> list[dict[str, Any]]:
        from segpipe.shards import decode_row, read_shard

        if self._table is None or self._table[0] != chunk["file"]:
            self._table = chunk["file"], read_shard(self.shards, self.shards.files_of(self.split)[chunk["file"]])
        rows = self._table[1].slice(chunk["start"], chunk["stop"] - chunk["start"]).to_pylist()
        return [decode_row(r) for r in rows]

    def __call__(self, chunk: dict[str, int]) -> dict[str, Any]:
        from segpipe.inference import coco_results
        from segpipe.panoptic import sample_ground_truth

        cm = self.scoring.matrix()
        pq = self.scoring.pq_stat() if self.scoring.panoptic else None
        images, anns, dets, overlays = [], [], [], []
        things = set(self.scoring.thing_ids)
        position = chunk["first"]
        for batch in batches(self.samples(chunk), self.batch_size):
            for s, pred in zip(batch, self.predict(batch)):
                gt, image_id = s["semantic"], position + 1
                self.scoring.update(cm, gt, pred.labels, where=f"image {s['image_id']}")
                if pq is not None:
                    try:
                        gt_map, gt_info = sample_ground_truth(s, self.scoring.thing_ids, self.scoring.ignore)
                    except ValueError as e:
                        raise MetricsInputError(str(e)) from None
                    pq.update(gt_map, gt_info, *pred.panoptic, where=f"image {s['image_id']}")
                if self.scoring.instances:
                    h, w = gt.shape[:2]
                    images.append({"id": image_id, "height": int(h), "width": int(w), "file_name": str(s["image_id"])})
                    anns += gt_annotations(s, image_id, len(anns) + 1, things)
                    dets += coco_results(pred.instances, image_id, int(h), int(w), things)
                if position < self.num_overlays:
                    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s["image_id"]))
                    png = _png(overlay(s["image"], gt, pred.labels, self.pal))
                    overlays.append([f"{position:03d}_{name}.png", base64.b64encode(png).decode("ascii")])
                position += 1
        return {"first": chunk["first"], "images": position - chunk["first"], "confusion": cm.mat.tobytes(),
                "coco": json.dumps({"images": images, "annotations": anns, "detections": dets}),
                "panoptic": pq_counts(pq) if pq is not None else "", "overlays": json.dumps(overlays)}


def evaluate(meta: CheckpointMeta, results: Iterable[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Sum the chunk results of :class:`ChunkScorer` (any order); write the plots, overlays and
    ``detections.json`` under ``out`` and return the metrics (without provenance)."""
    scoring = Scoring(meta)
    mat = scoring.matrix().mat
    pq = scoring.pq_stat() if scoring.panoptic else None
    parts = []
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for r in sorted(results, key=lambda r: r["first"]):
        mat += np.frombuffer(r["confusion"], dtype=mat.dtype).reshape(mat.shape)
        parts.append((r["images"], json.loads(r["coco"])))
        if pq is not None:
            add_pq_counts(pq, r["panoptic"])
        for name, png in json.loads(r["overlays"]):
            (out / "overlays" / name).write_bytes(base64.b64decode(png))
    n_images = sum(n for n, _ in parts)
    if n_images == 0:
        raise MetricsInputError("the split has no images")
    result = semantic_result(mat, scoring.cm_names, [scoring.names[t] for t in scoring.thing_ids])
    if scoring.task == "instance":
        result["semantic_classes"] = "things+background"
    detections: list[dict[str, Any]] = []
    if scoring.instances:
        from segpipe.metrics.coco import evaluate_coco

        images = [img for _, c in parts for img in c["images"]]
        anns = [a for _, c in parts for a in c["annotations"]]
        for i, a in enumerate(anns, 1):  # numbered across chunks, in split order
            a["id"] = i
        detections = [d for _, c in parts for d in c["detections"]]
        gt = {"images": images, "annotations": anns,
              "categories": [{"id": t, "name": scoring.names[t]} for t in scoring.thing_ids]}
        for iou_type in ("segm", "bbox"):
            coco = evaluate_coco(gt, detections, iou_type, "shard ground truth", "detections")
            result[iou_type] = {**coco[iou_type], "per_class": coco["per_class"]}
    if pq is not None:
        result["panoptic"] = scoring.panoptic_result(pq)
    result["images"] = n_images
    # every architecture writes the same files, so one dvc.yaml foreach entry fits all
    atomic_write_json(out / "detections.json", detections)
    lines = ["actual,predicted"] + [f"{_csv_field(a)},{_csv_field(p)}" for a, p in confusion_rows(mat, scoring.cm_names)]
    atomic_write_text(out / "confusion.csv", "\n".join(lines) + "\n")
    counts = ["actual,predicted,count"] + [
        f"{_csv_field(scoring.cm_names[a])},{_csv_field(scoring.cm_names[p])},{int(mat[a, p])}"
        for a, p in zip(*np.nonzero(mat))]
    atomic_write_text(out / "confusion_counts.csv", "\n".join(counts) + "\n")
    atomic_write_text(out / "per_class_iou.csv", per_class_iou_csv(result))
    atomic_write_text(out / "per_class_pq.csv", per_class_pq_csv(result.get("panoptic")))
    return result


def add_pq_counts(stat: Any, counts: str) -> None:
    """Add a chunk's :func:`pq_counts` into ``stat``."""
    c = json.loads(counts)
    stat.iou_sum += np.asarray(c["iou_sum"], dtype=np.float64)
    for k in ("tp", "fp", "fn"):
        getattr(stat, k)[:] += np.asarray(c[k], dtype=np.int64)
    stat.images += int(c["images"])


def run(params: EvaluateParams, model_dir: Path, shards: Path, out: Path, device: str = "cpu") -> dict[str, Any]:
    """Evaluate the checkpoint ``model_dir`` on ``params.split`` of ``shards`` with
    ``params.engine``; write ``out`` (replaced whole) and return the metrics.json content."""
    from segpipe.checkpoint import check_classes, load_meta, weights_sha256
    from segpipe.inference import DetectionSettings, map_rows
    from segpipe.shards import open_shards

    model_dir, out = Path(model_dir), Path(out)
    shard_set = open_shards(shards)
    meta = load_meta(model_dir)
    check_classes(model_dir, meta, list(shard_set.classes))
    Scoring(meta)  # an instance model without thing classes fails here, before any model is loaded
    chunks = plan_chunks(shard_set, params.split, params.batch_size * CHUNK_BATCHES)
    if not chunks:
        raise MetricsInputError(f"split {params.split!r} has no images")
    detection = DetectionSettings(params.score_threshold, params.mask_threshold, params.max_detections)
    worker = {"shards": shard_set.to_dict(), "split": params.split, "batch_size": params.batch_size,
              "num_overlays": params.num_overlays}
    with atomic_dir(out) as tmp:
        results = map_rows(chunks, model_dir, ChunkScorer, worker, engine=params.engine, detection=detection,
                           device=device, panoptic=params.panoptic)
        result = evaluate(meta, results, tmp)
        metrics = {
            "arch": meta.arch,
            "task": meta.task,
            "checkpoint": {"path": str(model_dir), "sha256": weights_sha256(model_dir)},
            "shards_manifest_sha256": shard_set.manifest_sha256,
            "trained_on_shards_manifest_sha256": meta.shards_manifest_sha256,
            "split": params.split,
            **result,
        }
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------------------
# The fused pair: the best semantic model + the best instance model, as one panoptic model
# --------------------------------------------------------------------------------------

FUSED_ARCH = "fused"


def best_pair(evals: Mapping[str, Mapping[str, Any]], fusion: FusionParams, shards_sha256: str | None = None,
              split: str | None = None) -> tuple[str, str]:
    """``(semantic, instance)``: the names of the evals to fuse, the best ``task: semantic`` one on
    ``fusion.semantic_metric`` and the best ``task: instance`` one on ``fusion.instance_metric``
    (ties: the first name in sorted order), among those scored on ``shards_sha256`` and ``split``
    when given. MetricsInputError naming what is missing when either has no candidate."""
    from segpipe.metrics import metric_value

    def best(task: str, metric: str) -> str:
        scored = [(v, name) for name, m in sorted(evals.items()) if m.get("task") == task
                  and (shards_sha256 is None or m.get("shards_manifest_sha256") == shards_sha256)
                  and (split is None or m.get("split") == split)
                  and (v := metric_value(dict(m), metric)) is not None]
        if not scored:
            raise MetricsInputError(f"no {task} evaluation with a finite {metric} (evaluate.panoptic.fusion."
                                    f"{task}_metric) on these shards and split {split!r} among {sorted(evals) or 'none'}")
        top = max(v for v, _ in scored)
        return next(name for v, name in scored if v == top)

    return best("semantic", fusion.semantic_metric), best("instance", fusion.instance_metric)


def read_evals(folder: Path, skip: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{name: metrics}`` of every ``folder/<name>/metrics.json`` of a model (not ``skip``, not a
    panoptic fusion); MetricsInputError naming a file that is not valid JSON."""
    out = {}
    for f in sorted(Path(folder).glob("*/metrics.json")):
        if skip is not None and f.parent.resolve() == Path(skip).resolve():
            continue
        try:
            m = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MetricsInputError(f"{f}: not a readable metrics file: {e}") from None
        if isinstance(m, dict) and m.get("task") in ("semantic", "instance"):
            out[f.parent.name] = m
    return out


class FusedChunkScorer(ChunkScorer):
    """Scores chunks with the fusion (``segpipe.inference.fuse``) of the predictor's semantic maps
    and the detections of ``instance_checkpoint``, loaded once beside it, so both engines run it.
    Only the panoptic result counts: each model's own numbers are its own evaluation's."""

    def __init__(self, predictor: Predictor, instance_checkpoint: str, fusion: FusionParams,
                 shards: dict[str, Any], split: str, batch_size: int) -> None:
        from segpipe.inference import Predictor

        super().__init__(predictor, shards, split, batch_size, 0)
        self.instance = Predictor.load(instance_checkpoint, predictor.request.detection, predictor.device,
                                       outputs={"instances"})
        self.fusion = fusion
        self.scoring.instances, self.scoring.panoptic = False, True

    def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
        from segpipe.inference import Prediction, fuse

        images = [s["image"] for s in samples]
        return [Prediction(sem.labels, None, fuse(sem, inst, self.scoring.thing_ids, self.fusion))
                for sem, inst in zip(self.predictor.images(images), self.instance.images(images))]


def _evaluated_checkpoint(name: str, m: dict[str, Any], evals: Path) -> dict[str, Any]:
    """The checkpoint an eval names, its sha256 checked: ``{"eval", "arch", "path", "sha256"}``."""
    from segpipe.checkpoint import is_checkpoint, weights_sha256

    ck = m.get("checkpoint")
    where = evals / name / "metrics.json"
    if not isinstance(ck, dict) or not isinstance(ck.get("path"), str):
        raise MetricsInputError(f"{where}: no 'checkpoint' path")
    path = Path(ck["path"])
    if not is_checkpoint(path) and is_checkpoint(evals / name / path):
        path = evals / name / path
    if not is_checkpoint(path):
        raise MetricsInputError(f"{where}: checkpoint {ck['path']!r} is not a checkpoint directory")
    sha = weights_sha256(path)
    if sha != ck.get("sha256"):
        raise MetricsInputError(f"{path}: sha256 {sha} differs from the evaluated {ck.get('sha256')} "
                                "(changed since evaluation; rerun segpipe evaluate)")
    return {"eval": str(evals / name), "arch": m.get("arch"), "path": str(path), "sha256": sha}


def run_fused(params: EvaluateParams, evals: Path, shards: Path, out: Path, device: str = "cpu") -> dict[str, Any]:
    """Evaluate the fusion of the best semantic and the best instance model under ``evals`` (see
    :func:`best_pair`) on ``params.split`` of ``shards`` with ``params.engine``; write
    ``out/metrics.json`` (task ``panoptic``, both checkpoints with their sha256, the fusion params,
    the panoptic metrics) and ``out/per_class_pq.csv`` (``out`` replaced whole). Without a pair
    (no instance or no semantic evaluation), metrics.json says why under ``skipped``."""
    from segpipe.checkpoint import check_classes, load_meta
    from segpipe.inference import DetectionSettings, map_rows
    from segpipe.params import as_dict
    from segpipe.shards import open_shards

    evals, out = Path(evals), Path(out)
    shard_set = open_shards(shards)
    fusion = params.panoptic.fusion
    found = read_evals(evals, skip=out)
    try:
        sem_name, inst_name = best_pair(found, fusion, shard_set.manifest_sha256, params.split)
    except MetricsInputError as e:
        # A run without an instance (or a semantic) model has no pair: say so, and let promote
        # report the candidate as unreadable, rather than fail every pipeline of semantic models.
        skipped = {"arch": FUSED_ARCH, "task": "panoptic", "skipped": str(e), "fusion": as_dict(fusion),
                   "shards_manifest_sha256": shard_set.manifest_sha256, "split": params.split}
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "metrics.json", skipped)
            atomic_write_text(tmp / "per_class_pq.csv", per_class_pq_csv(None))
        return skipped
    pair = {"semantic": _evaluated_checkpoint(sem_name, found[sem_name], evals),
            "instance": _evaluated_checkpoint(inst_name, found[inst_name], evals)}
    metas = {k: load_meta(Path(v["path"])) for k, v in pair.items()}
    for k, v in pair.items():
        check_classes(Path(v["path"]), metas[k], list(shard_set.classes))
    scoring = Scoring(metas["semantic"])
    if not scoring.thing_ids:
        raise MetricsInputError(f"{pair['semantic']['path']}: no thing classes to fuse instances of")
    chunks = plan_chunks(shard_set, params.split, params.batch_size * CHUNK_BATCHES)
    if not chunks:
        raise MetricsInputError(f"split {params.split!r} has no images")
    detection = DetectionSettings(params.score_threshold, params.mask_threshold, params.max_detections)
    worker = {"instance_checkpoint": pair["instance"]["path"], "fusion": fusion, "shards": shard_set.to_dict(),
              "split": params.split, "batch_size": params.batch_size}
    with atomic_dir(out) as tmp:
        results = map_rows(chunks, Path(pair["semantic"]["path"]), FusedChunkScorer, worker, engine=params.engine,
                           detection=detection, device=device, outputs={"semantic"})
        stat, n_images = scoring.pq_stat(), 0
        for r in sorted(results, key=lambda r: r["first"]):
            add_pq_counts(stat, r["panoptic"])
            n_images += r["images"]
        panoptic = scoring.panoptic_result(stat)
        metrics = {
            "arch": FUSED_ARCH,
            "task": "panoptic",
            "checkpoints": pair,
            "fusion": as_dict(fusion),
            "detection": {"score_threshold": params.score_threshold, "mask_threshold": params.mask_threshold,
                          "max_detections": params.max_detections},
            "shards_manifest_sha256": shard_set.manifest_sha256,
            "split": params.split,
            "panoptic": panoptic,
            "images": n_images,
        }
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "per_class_pq.csv", per_class_pq_csv(panoptic))
    return metrics


def run_baselines(params: EvaluateParams, shards: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Fit the reference predictors of ``segpipe.baselines`` on the train split and score them on
    ``params.split`` like a model; write ``out/<name>/metrics.json`` and ``per_class_iou.csv``
    (``out`` replaced whole). Returns {name: metrics}."""
    from segpipe.baselines import fit_baselines
    from segpipe.shards import iter_samples, open_shards

    s = open_shards(shards)
    if not s.rows("train"):
        raise MetricsInputError(f"{s.root}: no train split to fit the baselines on")
    names = class_names(list(s.classes), s.num_classes)
    thing_names = [names[t] for t in s.thing_ids]
    predictors = fit_baselines(((x["image"], x["semantic"]) for x in iter_samples(s, split="train")),
                               s.num_classes, s.ignore_index, params.colour_bits)
    matrices = {k: ConfusionMatrix(s.num_classes, s.ignore_index) for k in predictors}
    n = 0
    for sample in iter_samples(s, split=params.split):
        n += 1
        for k, predictor in predictors.items():
            matrices[k].update(sample["semantic"], predictor.predict(sample["image"]), where=f"image {sample['image_id']}")
    if n == 0:
        raise MetricsInputError(f"split {params.split!r} has no images")
    metrics = {}
    with atomic_dir(out) as tmp:
        for k, cm in matrices.items():
            result = semantic_result(cm.mat, names, thing_names)
            metrics[k] = {"baseline": k, "arch": f"baseline:{k}", "task": "semantic", "fitted_on": "train",
                          "colour_bits": params.colour_bits if k == "colour" else None,
                          "shards_manifest_sha256": s.manifest_sha256, "split": params.split, **result, "images": n}
            atomic_write_json(tmp / k / "metrics.json", metrics[k])
            atomic_write_text(tmp / k / "per_class_iou.csv", per_class_iou_csv(result))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe evaluate", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="checkpoint directory")
    what.add_argument("--baselines", action="store_true",
                      help="score the reference predictors (majority class, colour lookup) fitted on the train split")
    what.add_argument("--fuse-best", type=Path, metavar="EVALS",
                      help="score the panoptic fusion of the best semantic and the best instance model evaluated "
                           "under EVALS (segpipe evaluate --out EVALS/<arch>; evaluate.panoptic.fusion)")
    parser.add_argument("--shards", required=True, type=Path, help="shard set directory")
    parser.add_argument("--split", help="split to evaluate (default: evaluate.split in params)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced whole)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda (with evaluate.engine: ray, one GPU per actor); default: %(default)s")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "evaluate")
    if args.split:
        import dataclasses

        params = dataclasses.replace(params, split=args.split)
    from segpipe.checkpoint import CheckpointError
    from segpipe.shards import ShardError

    try:
        if args.baselines:
            for name, b in run_baselines(params, args.shards, args.out).items():
                print(f"baseline {name} on {params.split} ({b['images']} images): miou {b['miou']:.4f} -> {args.out / name}")
            return
        if args.fuse_best:
            f = run_fused(params, args.fuse_best, args.shards, args.out, args.device)
            if "skipped" in f:
                print(f"segpipe evaluate: no fused pair: {f['skipped']} -> {args.out}", file=sys.stderr)
                return
            pq = f["panoptic"]["pq"]
            print(f"fused {f['checkpoints']['semantic']['arch']} + {f['checkpoints']['instance']['arch']} on "
                  f"{params.split} ({f['images']} images): pq {'null' if pq is None else f'{pq:.4f}'} -> {args.out}")
            return
        m = run(params, args.model, args.shards, args.out, args.device)
    except (MetricsInputError, CheckpointError, ShardError) as e:
        raise SystemExit(f"segpipe evaluate: error: {e}") from None
    summary = f"miou {m['miou']:.4f}" if m["miou"] is not None else "miou null"
    if "segm" in m:
        summary += f", segm AP {m['segm']['AP']}" if m["segm"]["AP"] is None else f", segm AP {m['segm']['AP']:.4f}"
    if "panoptic" in m:
        pq = m["panoptic"]["pq"]
        summary += ", pq null" if pq is None else f", pq {pq:.4f}"
    print(f"{m['arch']} on {params.split} ({m['images']} images): {summary} -> {args.out}")

