"""Scoring a model on a split of a shard set: what evaluate, fuse and promote's re-scoring share.

The split is cut into chunks of whole batches inside one shard (:func:`plan_chunks`). A chunk
scorer (:class:`ChunkScorer` for one checkpoint, :class:`FusedChunkScorer` for a semantic model
fused with an instance model) predicts each image through ``segpipe.inference`` (the code
``segpipe predict`` serves with: each image whole, at its own resolution, fp32) and returns flat
counts: per source collection, a confusion matrix, COCO ground truth and detections, and PQ
accumulators. ``segpipe.inference.map_rows`` runs the chunks in this process or on a Ray Data
actor pool; :func:`summarise` adds the counts up in split order (so both engines give the same
numbers) into the metrics of ``metrics.json``, overall and ``per_collection``.

:func:`score_checkpoint` and :func:`score_fused` are the two entry points. Which metrics a
checkpoint gets is decided once, by :class:`Scoring`, from what its architecture outputs:

- every model: the semantic metrics of its label maps (``segpipe.metrics.semantic``), against all
  classes (semantic models) or against the thing classes plus one background (instance models);
- models with an ``instances`` output: COCO ``segm`` and ``bbox`` stats of their detections;
- models with a ``panoptic`` output, and fused pairs: PQ / SQ / RQ (``segpipe.metrics.panoptic``).
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segpipe.files import atomic_write_json, atomic_write_text
from segpipe.metrics.semantic import (
    ConfusionMatrix,
    MetricsInputError,
    ThingsVsBackground,
    class_names,
    compute,
    mean_over,
)
from segpipe.params import EvaluateParams, FusionParams

if TYPE_CHECKING:
    from segpipe.checkpoint import CheckpointMeta
    from segpipe.inference import Prediction, Predictor
    from segpipe.shards import ShardSet

CONFUSION_ROWS = 10_000  # rows of confusion.csv: enough for percent-level shading, small to diff
CHUNK_BATCHES = 4  # batches per unit of work: small enough to spread a 100-image split over actors
# A source collection's metrics in metrics.json's per_collection block: the scalars, not per class
# (per_collection.csv and the summary's collection x model table show them).
COLLECTION_KEYS = ("images", "pixel_acc", "mean_acc", "miou", "boundary_iou", "fwiou", "mdice", "miou_things")


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, pal: np.ndarray,
            classes: Sequence[Mapping[str, Any]] = ()) -> np.ndarray:
    """image | ground truth | prediction side by side (``H x 3W x 3``), above a legend naming the
    colour of every class in the ground truth or the prediction (``classes``: the class table,
    ``{"id", "name"}`` each; ``segpipe.inference.legend``)."""
    from segpipe.inference import colorize, legend

    panels = np.concatenate([image, colorize(gt, pal), colorize(pred, pal)], axis=1)
    values = np.union1d(np.unique(gt), np.unique(pred))
    return np.concatenate([panels, legend(values.tolist(), classes, pal, panels.shape[1])], axis=0)


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


def csv_field(text: str) -> str:
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


def semantic_result(mat: np.ndarray, names: Sequence[str], thing_names: Sequence[str],
                    boundary: np.ndarray | None = None, ignore: int = 255) -> dict[str, Any]:
    """Semantic metrics of a confusion matrix, plus ``miou_things`` over the thing classes in ``names``,
    and Boundary IoU (``boundary_iou``, per class too) from ``boundary``: the ``2 x K`` counts of a
    ``segpipe.metrics.boundary.BoundaryIoU``."""
    result = compute(mat, list(names))
    if boundary is not None:
        from segpipe.metrics.boundary import BoundaryIoU, with_boundary_iou

        result = with_boundary_iou(result, BoundaryIoU.from_array(boundary, ignore).compute(list(names)))
    things = [n for n in names if n in set(thing_names)]
    if things:
        result["miou_things"] = mean_over(result, "iou", things)
    return result


def per_class_iou_csv(result: dict[str, Any]) -> str:
    """``class,iou[,boundary_iou]`` of the classes scored (boundary IoU empty where undefined)."""
    boundary = any("boundary_iou" in v for v in result["per_class"].values())
    rows = ["class,iou,boundary_iou" if boundary else "class,iou"]
    for n, v in result["per_class"].items():
        if v["iou"] is None:
            continue
        b = v.get("boundary_iou")
        rows.append(f"{csv_field(n)},{v['iou']:.6f}" + ((f",{b:.6f}" if b is not None else ",") if boundary else ""))
    return "\n".join(rows) + "\n"


def per_class_pq_csv(panoptic: dict[str, Any] | None) -> str:
    """``class,pq`` of the classes scored (header only without panoptic metrics)."""
    rows = ["class,pq"] + [f"{csv_field(n)},{v['pq']:.6f}" for n, v in (panoptic or {}).get("per_class", {}).items()
                           if v["pq"] is not None]
    return "\n".join(rows) + "\n"


PER_COLLECTION_COLUMNS = ("miou", "boundary_iou", "miou_things", "pixel_acc", "mdice", "segm.AP", "segm.AP50",
                          "panoptic.pq")


def per_collection_csv(per_collection: dict[str, dict[str, Any]]) -> str:
    """``collection,images,<metric>...``: one row per source collection (empty cells where undefined)."""
    from segpipe.results import metric_value

    cols = [c for c in PER_COLLECTION_COLUMNS if any(metric_value(m, c) is not None for m in per_collection.values())]
    lines = [",".join(["collection", "images", *cols])]
    for name, m in per_collection.items():
        cells = [csv_field(name), str(m.get("images", ""))]
        cells += ["" if (v := metric_value(m, c)) is None else f"{v:.6f}" for c in cols]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# What is scored
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """How a model's outputs are scored: its label space (``names``, ``thing_ids``, ``ignore``),
    whether its label maps are scored against all classes (``task`` semantic) or against its thing
    classes plus one background (``task`` instance, see ThingsVsBackground), and whether its
    detections (``instances``: COCO stats) and panoptic segments (``panoptic``: PQ) are scored."""

    task: str
    names: tuple[str, ...]
    thing_ids: tuple[int, ...]
    ignore: int
    instances: bool
    panoptic: bool
    # Boundary IoU's band (evaluate.boundary_ratio): of the label maps of semantic models, and in Boundary AP
    # of detections; None: not scored
    boundary_ratio: float | None = None

    @classmethod
    def for_meta(cls, meta: CheckpointMeta, outputs: Iterable[str] | None = None,
                 boundary_ratio: float | None = None) -> Scoring:
        """A checkpoint's outputs (those of them in ``outputs`` when given); Boundary IoU with
        ``boundary_ratio`` for semantic models. MetricsInputError when an instance model has no
        thing classes."""
        from segpipe.models import spec_of

        has = spec_of(meta.arch).outputs if outputs is None else frozenset(outputs)
        scoring = cls(meta.task, tuple(class_names(list(meta.classes), meta.num_classes)),
                      tuple(meta.thing_ids or ()), meta.ignore_index, "instances" in has, "panoptic" in has,
                      boundary_ratio)
        if scoring.task == "instance":
            try:
                scoring.things()
            except MetricsInputError as e:
                raise MetricsInputError(f"{meta.arch}: {e}") from None
        return scoring

    def things(self) -> ThingsVsBackground | None:
        return self._things

    @cached_property
    def _things(self) -> ThingsVsBackground | None:
        return ThingsVsBackground(list(self.names), list(self.thing_ids), self.ignore) if self.task == "instance" else None

    @property
    def cm_names(self) -> list[str]:
        things = self.things()
        return list(things.names) if things else list(self.names)

    def matrix(self) -> ConfusionMatrix:
        things = self.things()
        return things.matrix() if things else ConfusionMatrix(len(self.names), self.ignore)

    def update(self, cm: ConfusionMatrix, gt: np.ndarray, pred: np.ndarray, where: str) -> None:
        things = self.things()
        if things:
            things.update(cm, gt, pred, where=where)
        else:
            cm.update(gt, pred, where=where)

    @property
    def boundary_scored(self) -> bool:
        """Boundary IoU of the label maps: semantic models (an instance model's maps are things + one background)."""
        return self.boundary_ratio is not None and self.task == "semantic"

    def boundary(self) -> Any:
        """Boundary IoU accumulators (segpipe.metrics.boundary), or None when not scored."""
        if not self.boundary_scored:
            return None
        from segpipe.metrics.boundary import BoundaryIoU

        return BoundaryIoU(len(self.names), self.ignore, self.boundary_ratio)

    def pq_stat(self) -> Any:
        """PQ accumulators over every class id (segpipe.metrics.panoptic)."""
        from segpipe.metrics.panoptic import PQStat

        return PQStat(range(len(self.names)))

    def panoptic_result(self, stat: Any) -> dict[str, Any]:
        things = set(self.thing_ids)
        return stat.compute(list(self.names), [c in things for c in range(len(self.names))])


# --------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------


class ChunkScorer:
    """Scores chunks of a split (see :func:`plan_chunks`) with one predictor: what a Ray actor or
    this process runs. A result is a flat row: ``first``, ``images``, ``collections`` (JSON:
    ``[name, images]`` of the source collections of the chunk's images, in order of first
    appearance), ``confusion`` (int64
    bytes: one matrix per collection, stacked in that order), ``coco`` (JSON: ground-truth images
    with their collection, annotations, detections), ``panoptic`` (JSON: PQStat counts per
    collection; "" when not scored) and ``overlays`` (JSON: ``[name, base64 PNG]`` of the split's
    first ``num_overlays`` images)."""

    def __init__(self, predictor: Predictor, shards: dict[str, Any], split: str, batch_size: int,
                 num_overlays: int, scoring: Scoring | None = None, boundary_ratio: float | None = None) -> None:
        from segpipe.inference import palette
        from segpipe.shards import ShardSet

        self.predictor, self.split, self.batch_size, self.num_overlays = predictor, split, batch_size, num_overlays
        self.shards = ShardSet.from_dict(shards)
        self.scoring = scoring or Scoring.for_meta(predictor.meta, boundary_ratio=boundary_ratio)
        self.pal = palette(list(predictor.meta.classes))
        self._table: tuple[int, Any] | None = None  # the last shard read: consecutive chunks share it

    def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
        """The predictions scored, one per sample (whole images, see segpipe.inference)."""
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

        sc = self.scoring
        cms: dict[str, ConfusionMatrix] = {}
        bounds: dict[str, Any] = {}
        seen: dict[str, int] = {}
        pqs: dict[str, Any] = {}
        images, anns, dets, overlays = [], [], [], []
        things = set(sc.thing_ids)
        position = chunk["first"]
        for batch in batches(self.samples(chunk), self.batch_size):
            for s, pred in zip(batch, self.predict(batch)):
                gt, image_id, collection = s["semantic"], position + 1, s["collection"]
                where = f"image {s['image_id']}"
                sc.update(cms.setdefault(collection, sc.matrix()), gt, pred.labels, where=where)
                seen[collection] = seen.get(collection, 0) + 1
                if sc.boundary_scored:
                    bounds.setdefault(collection, sc.boundary()).update(gt, pred.labels, where=where)
                if sc.panoptic:
                    try:
                        gt_map, gt_info = sample_ground_truth(s, sc.thing_ids, sc.ignore)
                    except ValueError as e:
                        raise MetricsInputError(str(e)) from None
                    pqs.setdefault(collection, sc.pq_stat()).update(gt_map, gt_info, *pred.panoptic, where=where)
                if sc.instances:
                    h, w = gt.shape[:2]
                    images.append({"id": image_id, "height": int(h), "width": int(w), "file_name": str(s["image_id"]),
                                   "collection": collection})
                    anns += gt_annotations(s, image_id, len(anns) + 1, things)
                    dets += coco_results(pred.instances, image_id, int(h), int(w), things)
                if position < self.num_overlays:
                    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s["image_id"]))
                    png = _png(overlay(s["image"], gt, pred.labels, self.pal, self.predictor.meta.classes))
                    overlays.append([f"{position:03d}_{name}.png", base64.b64encode(png).decode("ascii")])
                position += 1
        names = list(cms)
        stacked = np.stack([cms[n].mat for n in names]) if names else np.zeros((0,), dtype=np.int64)
        return {"first": chunk["first"], "images": position - chunk["first"],
                "collections": json.dumps([[n, seen[n]] for n in names]),
                "confusion": stacked.tobytes(),
                "boundary": np.stack([bounds[n].counts for n in names]).tobytes() if bounds else b"",
                "coco": json.dumps({"images": images, "annotations": anns, "detections": dets}),
                "panoptic": json.dumps({n: p.to_json() for n, p in pqs.items()}) if sc.panoptic else "",
                "overlays": json.dumps(overlays)}


class FusedChunkScorer(ChunkScorer):
    """Scores chunks with the fusion (``segpipe.inference.fuse``) of the predictor's semantic maps
    and the detections of ``instance_checkpoint``, loaded once beside it, so both engines run it.
    Only the panoptic result is scored: each model's own numbers are its own evaluation's."""

    def __init__(self, predictor: Predictor, instance_checkpoint: str, fusion: FusionParams,
                 shards: dict[str, Any], split: str, batch_size: int) -> None:
        from segpipe.inference import Predictor

        scoring = Scoring.for_meta(predictor.meta, outputs={"semantic", "panoptic"})
        super().__init__(predictor, shards, split, batch_size, 0, scoring)
        self.instance = Predictor.load(instance_checkpoint, predictor.request.detection, predictor.device,
                                       outputs={"instances"})
        self.fusion = fusion

    def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
        from segpipe.inference import Prediction, fuse

        images = [s["image"] for s in samples]
        return [Prediction(sem.labels, None, fuse(sem, inst, self.scoring.thing_ids, self.fusion))
                for sem, inst in zip(self.predictor.images(images), self.instance.images(images))]


# --------------------------------------------------------------------------------------
# Adding chunks up
# --------------------------------------------------------------------------------------


def _coco(scoring: Scoring, images: list[dict[str, Any]], anns: list[dict[str, Any]],
          dets: list[dict[str, Any]], boundary_ratio: float | None) -> dict[str, Any]:
    from segpipe.metrics.coco import collector_paused, evaluate_coco

    gt = {"images": [{k: v for k, v in im.items() if k != "collection"} for im in images], "annotations": anns,
          "categories": [{"id": t, "name": scoring.names[t]} for t in scoring.thing_ids]}
    out = {}
    with collector_paused():  # COCO evaluation builds many small objects: the collector only slows it
        for iou_type in ("segm", "bbox"):
            coco = evaluate_coco(gt, dets, iou_type, "shard ground truth", "detections",
                                 boundary_ratio=boundary_ratio if iou_type == "segm" else None)
            out[iou_type] = {**coco[iou_type], "per_class": coco["per_class"]}
    return out


def _scalars(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "per_class"}


def summarise(scoring: Scoring, results: Iterable[dict[str, Any]], out: Path | None = None) -> dict[str, Any]:
    """Add up chunk results (any order) into the metrics of the split, with a ``per_collection``
    block; with ``out``, also write the plots, overlays and ``detections.json`` there."""
    from segpipe.metrics.panoptic import PQStat

    k = len(scoring.cm_names)
    mats: dict[str, np.ndarray] = {}
    bounds: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    pqs: dict[str, Any] = {}
    images, anns, dets = [], [], []
    overlays: list[tuple[str, str]] = []
    for r in sorted(results, key=lambda r: r["first"]):
        seen = json.loads(r["collections"])
        stacked = np.frombuffer(r["confusion"], dtype=np.int64).reshape(len(seen), k, k)
        for (name, n), mat in zip(seen, stacked):
            mats[name] = mats.get(name, 0) + mat
            counts[name] = counts.get(name, 0) + int(n)
        if r["boundary"]:
            for (name, _), b in zip(seen, np.frombuffer(r["boundary"], dtype=np.int64).reshape(len(seen), 2, -1)):
                bounds[name] = bounds.get(name, 0) + b
        coco = json.loads(r["coco"])
        for a in coco["annotations"]:  # numbered across chunks, in split order
            a["id"] += len(anns)
        images += coco["images"]
        anns += coco["annotations"]
        dets += coco["detections"]
        for name, stat_json in (json.loads(r["panoptic"]) if r["panoptic"] else {}).items():
            stat = PQStat.from_json(stat_json)
            pqs[name] = pqs[name].merge(stat) if name in pqs else stat
        overlays += json.loads(r["overlays"])
    n_images = sum(counts.values())
    if n_images == 0:
        raise MetricsInputError("the split has no images")
    thing_names = [scoring.names[t] for t in scoring.thing_ids]
    mat = sum(mats.values())
    result = semantic_result(mat, scoring.cm_names, thing_names, sum(bounds.values()) if bounds else None,
                             scoring.ignore)
    if scoring.task == "instance":
        result["semantic_classes"] = "things+background"
    if scoring.instances:
        result.update(_coco(scoring, images, anns, dets, scoring.boundary_ratio))
    if scoring.panoptic:
        total = scoring.pq_stat()
        for stat in pqs.values():
            total.merge(stat)
        result["panoptic"] = scoring.panoptic_result(total)
    result["images"] = n_images
    result["per_collection"] = _per_collection(scoring, result, mats, bounds, counts, pqs, images, anns, dets,
                                               thing_names)
    if out is not None:
        _write_outputs(out, scoring, mat, result, dets, overlays)
    return result


def _per_collection(scoring: Scoring, overall: dict[str, Any], mats: dict[str, np.ndarray],
                    bounds: dict[str, np.ndarray], counts: dict[str, int],
                    pqs: dict[str, Any], images: list[dict[str, Any]], anns: list[dict[str, Any]],
                    dets: list[dict[str, Any]], thing_names: list[str]) -> dict[str, dict[str, Any]]:
    """The metrics of each source collection (``COLLECTION_KEYS``, COCO and PQ scalars). With one
    collection they are the overall numbers."""
    if len(mats) == 1:
        (name,) = mats
        block = {k: overall[k] for k in COLLECTION_KEYS if k in overall}
        for key in ("segm", "bbox", "panoptic"):
            if key in overall:
                block[key] = _scalars(overall[key])
        return {name: block}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(mats):
        block = {k: v for k, v in semantic_result(mats[name], scoring.cm_names, thing_names, bounds.get(name),
                                                  scoring.ignore).items() if k in COLLECTION_KEYS}
        block["images"] = counts[name]
        if scoring.instances:
            mine = [im for im in images if im["collection"] == name]
            ids = {im["id"] for im in mine}
            coco = _coco(scoring, mine, [a for a in anns if a["image_id"] in ids],
                         [d for d in dets if d["image_id"] in ids], scoring.boundary_ratio)
            block.update({key: _scalars(v) for key, v in coco.items()})
        if scoring.panoptic and name in pqs:
            block["panoptic"] = _scalars(scoring.panoptic_result(pqs[name]))
        out[name] = block
    return out


def _write_outputs(out: Path, scoring: Scoring, mat: np.ndarray, result: dict[str, Any], dets: list[dict[str, Any]],
                   overlays: list[tuple[str, str]]) -> None:
    # every architecture writes the same files, so one dvc.yaml foreach entry fits all
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for name, png in overlays:
        (out / "overlays" / name).write_bytes(base64.b64decode(png))
    atomic_write_json(out / "detections.json", dets)
    names = scoring.cm_names
    lines = ["actual,predicted"] + [f"{csv_field(a)},{csv_field(p)}" for a, p in confusion_rows(mat, names)]
    atomic_write_text(out / "confusion.csv", "\n".join(lines) + "\n")
    counts = ["actual,predicted,count"] + [f"{csv_field(names[a])},{csv_field(names[p])},{int(mat[a, p])}"
                                           for a, p in zip(*np.nonzero(mat))]
    atomic_write_text(out / "confusion_counts.csv", "\n".join(counts) + "\n")
    atomic_write_text(out / "per_class_iou.csv", per_class_iou_csv(result))
    atomic_write_text(out / "per_class_pq.csv", per_class_pq_csv(result.get("panoptic")))
    atomic_write_text(out / "per_collection.csv", per_collection_csv(result["per_collection"]))


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _chunks(shards: ShardSet, params: EvaluateParams) -> list[dict[str, int]]:
    chunks = plan_chunks(shards, params.split, params.batch_size * CHUNK_BATCHES)
    if not chunks:
        raise MetricsInputError(f"split {params.split!r} of {shards.root} has no images")
    return chunks


def _counted(results: Iterable[dict[str, Any]], on_images: Callable[[int], None] | None) -> Iterator[dict[str, Any]]:
    """``results`` as they come, calling ``on_images(n)`` with each chunk's image count (a progress line)."""
    for r in results:
        if on_images is not None:
            on_images(int(r["images"]))
        yield r


def score_checkpoint(checkpoint: Path, shards: ShardSet, params: EvaluateParams, device: str = "cpu",
                     out: Path | None = None, on_images: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The metrics of the checkpoint folder ``checkpoint`` on ``params.split`` of ``shards`` (with
    its provenance: arch, task, checkpoint path + sha256, shard manifest, split, scoring key);
    with ``out``, the plots, overlays and detections are written there too. ``on_images(n)`` is
    called as each chunk of ``n`` images is scored."""
    from segpipe.checkpoint import check_classes, load_meta
    from segpipe.inference import PanopticSettings, map_rows
    from segpipe.results import CheckpointRef

    checkpoint = Path(checkpoint)
    meta = load_meta(checkpoint)
    check_classes(checkpoint, meta, list(shards.classes))
    # an instance model without thing classes fails here, before it is loaded
    scoring = Scoring.for_meta(meta, boundary_ratio=params.boundary_ratio)
    ref = CheckpointRef.of(checkpoint)
    worker = {"shards": shards.to_dict(), "split": params.split, "batch_size": params.batch_size,
              "num_overlays": params.num_overlays if out is not None else 0, "boundary_ratio": params.boundary_ratio}
    results = map_rows(_chunks(shards, params), checkpoint, ChunkScorer, worker, engine=params.engine,
                       detection=params.detection, device=device, panoptic=PanopticSettings(maskformer=params.panoptic))
    result = summarise(scoring, _counted(results, on_images), out)
    return {"arch": meta.arch, "task": meta.task, "checkpoint": ref.to_json(),
            "shards_manifest_sha256": shards.manifest_sha256,
            "trained_on_shards_manifest_sha256": meta.shards_manifest_sha256, "split": params.split,
            "scoring": params.scoring_key(), **result}


def score_fused(semantic: Path, instance: Path, fusion: FusionParams, shards: ShardSet, params: EvaluateParams,
                device: str = "cpu") -> dict[str, Any]:
    """The panoptic metrics of the fusion of the semantic checkpoint ``semantic`` with the instance
    checkpoint ``instance`` on ``params.split`` of ``shards`` (Panoptic FPN's heuristic with
    ``fusion``; detections kept by ``params.detection``), with the provenance of a fused result."""
    from segpipe.checkpoint import check_classes, load_meta
    from segpipe.inference import map_rows
    from segpipe.params import as_dict
    from segpipe.results import FUSED_ARCH, CheckpointRef

    pair = {"semantic": Path(semantic), "instance": Path(instance)}
    metas = {k: load_meta(v) for k, v in pair.items()}
    for k, v in pair.items():
        check_classes(v, metas[k], list(shards.classes))
    scoring = Scoring.for_meta(metas["semantic"], outputs={"semantic", "panoptic"})
    if not scoring.thing_ids:
        raise MetricsInputError(f"{pair['semantic']}: no thing classes to fuse instances of")
    refs = {k: {"arch": metas[k].arch, **CheckpointRef.of(v).to_json()} for k, v in pair.items()}
    worker = {"instance_checkpoint": str(pair["instance"]), "fusion": fusion, "shards": shards.to_dict(),
              "split": params.split, "batch_size": params.batch_size}
    results = map_rows(_chunks(shards, params), pair["semantic"], FusedChunkScorer, worker, engine=params.engine,
                       detection=params.detection, device=device, outputs={"semantic"})
    result = summarise(scoring, results)
    panoptic_only = {"panoptic": result["panoptic"], "images": result["images"],
                     "per_collection": {n: {k: v for k, v in m.items() if k in ("images", "panoptic")}
                                        for n, m in result["per_collection"].items()}}
    return {"arch": FUSED_ARCH, "task": "panoptic", "checkpoints": refs, "fusion": as_dict(fusion),
            "detection": as_dict(params.detection), "shards_manifest_sha256": shards.manifest_sha256,
            "split": params.split, "scoring": params.scoring_key(), **panoptic_only}
