"""``segpipe evaluate``: score a checkpoint on one split of a shard set; write DVC metrics and plots.

    segpipe evaluate --model CKPT --shards DIR [--split val] --out DIR [--params params.yaml] [--set ...]

Samples stream from the shards in batches; each image is evaluated at its own resolution (a
batch is padded to a multiple of 32 and the outputs cropped back). The confusion matrix is
accumulated image by image; detections are written to ``detections.json`` as they come. Output
(``DIR`` is replaced whole)::

    metrics.json        DVC metrics: checkpoint path + sha256, shard manifest sha256, split, arch,
                        task, semantic metrics, and segm / bbox COCO stats for instance-capable models
    confusion.csv       actual,predicted rows for DVC's confusion template (see docs/metrics.md)
    confusion_counts.csv  actual,predicted,count: the exact pixel counts
    per_class_iou.csv   class,iou
    overlays/*.png      image | ground truth | prediction, in class colours
    detections.json     COCO results (instance-capable models; [] for semantic-only ones)

Conventions (instance models rendered to label maps, nulls, ...) are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from segpipe.params import EvaluateParams, ParamsError, add_params_arguments, from_args

PAD_MULTIPLE = 32
CONFUSION_ROWS = 10_000  # rows of confusion.csv: enough for percent-level shading, small to diff
NO_PREDICTION_COLOR = (0, 0, 0)


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def pad_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``H x W x 3`` uint8 images of any sizes -> one normalised ``B x 3 x Hp x Wp`` tensor, each
    image top-left, padded with zeros (the ImageNet mean) to a common multiple of 32."""
    from segpipe.models import normalize

    hp = -(-max(im.shape[0] for im in images) // PAD_MULTIPLE) * PAD_MULTIPLE
    wp = -(-max(im.shape[1] for im in images) // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = torch.zeros(len(images), 3, hp, wp)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[0], : im.shape[1]] = normalize(im)[0]
    return batch


def label_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int32


@torch.no_grad()
def predict_semantic(model: torch.nn.Module, images: Sequence[np.ndarray], num_classes: int) -> list[np.ndarray]:
    """Argmax label maps (``H x W``, uint8 when K <= 256), one per image at its own size."""
    logits = model(pad_batch(images))  # B x K x Hp x Wp
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected B x {num_classes} x H x W")
    labels = logits.argmax(1).to(label_dtype(num_classes))
    return [labels[i, : im.shape[0], : im.shape[1]].numpy() for i, im in enumerate(images)]


@torch.no_grad()
def predict_instances(model: torch.nn.Module, images: Sequence[np.ndarray], params: EvaluateParams) -> list[dict[str, np.ndarray]]:
    """Per image: ``labels`` (N), ``scores`` (N), ``boxes`` (N x 4, x1 y1 x2 y2 clipped to the image),
    ``masks`` (N x H x W bool), best score first, at most ``params.max_detections``."""
    x = pad_batch(images)
    if hasattr(model, "predict_instances"):
        accepted = inspect.signature(model.predict_instances).parameters
        kwargs = {k: v for k, v in (("score_threshold", params.score_threshold),
                                    ("max_detections", params.max_detections),
                                    ("mask_threshold", params.mask_threshold)) if k in accepted}
        outputs = model.predict_instances(x, **kwargs)
    else:
        outputs = model(x)
    return [select_detections(d, im.shape[0], im.shape[1], params.score_threshold, params.mask_threshold,
                              params.max_detections) for im, d in zip(images, outputs)]


def select_detections(d: dict[str, torch.Tensor], height: int, width: int, score_threshold: float,
                      mask_threshold: float, max_detections: int) -> dict[str, np.ndarray]:
    """One image's raw detections (on any device) -> numpy ``labels``, ``scores``, ``boxes``
    (clipped to the image) and binary ``masks`` cropped to ``height x width``: scores at least
    ``score_threshold``, best first, at most ``max_detections``."""
    scores = d["scores"].float()
    keep = scores >= score_threshold
    order = scores[keep].argsort(descending=True)[:max_detections]
    masks = d["masks"][keep][order][:, 0, :height, :width] > mask_threshold
    boxes = d["boxes"][keep][order].float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return {"labels": d["labels"][keep][order].cpu().numpy().astype(np.int64),
            "scores": scores[keep][order].cpu().numpy(), "boxes": boxes.cpu().numpy(), "masks": masks.cpu().numpy()}


def render_instances(inst: dict[str, np.ndarray], height: int, width: int, none_value: int) -> np.ndarray:
    """A label map of detections: each pixel takes the class of the best-scoring mask covering it;
    pixels no mask covers are ``none_value``."""
    out = np.full((height, width), none_value, dtype=np.int64)
    for i in range(len(inst["scores"]) - 1, -1, -1):  # worst first, so better scores paint over
        out[inst["masks"][i]] = inst["labels"][i]
    return out


def detections_to_coco(inst: dict[str, np.ndarray], image_id: int, thing_ids: set[int]) -> list[dict[str, Any]]:
    """COCO result dicts (compressed RLE + xywh box) of one image's detections of thing classes."""
    from pycocotools import mask as mask_util

    keep = [i for i, lab in enumerate(inst["labels"]) if int(lab) in thing_ids]
    if not keep:
        return []
    masks = np.asfortranarray(inst["masks"][keep].transpose(1, 2, 0).astype(np.uint8))
    rles = mask_util.encode(masks)
    out = []
    for j, i in enumerate(keep):
        x1, y1, x2, y2 = (float(v) for v in inst["boxes"][i])
        out.append({
            "image_id": image_id,
            "category_id": int(inst["labels"][i]),
            "score": round(float(inst["scores"][i]), 5),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "segmentation": {"size": [int(v) for v in rles[j]["size"]], "counts": rles[j]["counts"].decode()},
        })
    return out


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


def palette(classes: Sequence[dict[str, Any]], size: int) -> np.ndarray:
    """``size x 3`` uint8 colours indexed by label value; values without a class are black."""
    pal = np.zeros((size, 3), dtype=np.uint8)
    pal[:] = NO_PREDICTION_COLOR
    for c in classes:
        if 0 <= int(c["id"]) < size:
            pal[int(c["id"])] = c.get("color", (128, 128, 128))
    return pal


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction side by side (``H x 3W x 3``)."""
    def colour(lab: np.ndarray) -> np.ndarray:
        return pal[np.clip(lab.astype(np.int64), 0, len(pal) - 1)]

    return np.concatenate([image, colour(gt), colour(pred)], axis=1)


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


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


class Evaluator:
    """Accumulates everything ``segpipe evaluate`` reports, one batch at a time."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], params: EvaluateParams, out: Path) -> None:
        from segpipe.models import task_of

        self.model, self.meta, self.params, self.out = model, meta, params, out
        self.task = task_of(meta["arch"])
        self.num_classes = int(meta["num_classes"])
        self.ignore = int(meta.get("ignore_index", 255))
        self.classes = list(meta["classes"])
        self.names = class_names(self.classes, self.num_classes)
        self.thing_ids = sorted(int(c["id"]) for c in self.classes if c.get("isthing"))
        self.instances = self.task == "instance" or hasattr(model, "predict_instances")
        self.things: ThingsVsBackground | None = None
        if self.task == "instance":
            try:
                self.things = ThingsVsBackground(self.names, self.thing_ids, self.ignore)
            except MetricsInputError as e:
                raise MetricsInputError(f"{meta['arch']}: {e}") from None
            self.cm_names = self.things.names
            self.cm = self.things.matrix()
        else:
            self.cm_names = self.names
            self.cm = ConfusionMatrix(self.num_classes, self.ignore)
        self.pal = palette(self.classes, max(self.num_classes, self.ignore + 1))
        self.gt_images: list[dict[str, Any]] = []
        self.gt_anns: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []
        self.n_images = 0
        self.overlays_written = 0
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        self._det_file = open(out / "detections.json", "w") if self.instances else None
        if self._det_file:
            self._det_file.write("[")

    def add_batch(self, samples: Sequence[dict[str, Any]]) -> None:
        images = [s["image"] for s in samples]
        if self.task == "semantic":
            preds = predict_semantic(self.model, images, self.num_classes)
        insts = predict_instances(self.model, images, self.params) if self.instances else [None] * len(samples)
        for k, (s, inst) in enumerate(zip(samples, insts)):
            self.n_images += 1
            gt = s["semantic"]
            where = f"image {s['image_id']}"
            if inst is not None:
                self._add_coco(s, inst)
            if self.task == "semantic":
                pred = preds[k]
                self.cm.update(gt, pred, where=where)
            else:
                pred = render_instances(inst, gt.shape[0], gt.shape[1], self.ignore)
                self.things.update(self.cm, gt, pred, where=where)
            if self.overlays_written < self.params.num_overlays:
                name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s["image_id"]))
                Image.fromarray(overlay(s["image"], gt, pred, self.pal)).save(
                    self.out / "overlays" / f"{self.overlays_written:03d}_{name}.png")
                self.overlays_written += 1

    def _add_coco(self, sample: dict[str, Any], inst: dict[str, np.ndarray]) -> None:
        image_id = len(self.gt_images) + 1
        h, w = sample["semantic"].shape[:2]
        self.gt_images.append({"id": image_id, "height": int(h), "width": int(w), "file_name": str(sample["image_id"])})
        self.gt_anns.extend(gt_annotations(sample, image_id, len(self.gt_anns) + 1, set(self.thing_ids)))
        dets = detections_to_coco(inst, image_id, set(self.thing_ids))
        for d in dets:
            self._det_file.write(("," if self.detections else "") + "\n" + json.dumps(d))
            self.detections.append(d)

    def finish(self) -> dict[str, Any]:
        """Close the detection file; return the metrics (semantic, and COCO for instance models)."""
        result = compute(self.cm.mat, self.cm_names)
        things = [n for n in self.cm_names if n in {self.names[t] for t in self.thing_ids}]
        if things:
            result["miou_things"] = mean_over(result, "iou", things)
        if self.task == "instance":
            result["semantic_classes"] = "things+background"
        if self._det_file:
            self._det_file.write("\n]\n")
            self._det_file.close()
            from segpipe.metrics.coco import evaluate_coco

            gt = {"images": self.gt_images, "annotations": self.gt_anns,
                  "categories": [{"id": t, "name": self.names[t]} for t in self.thing_ids]}
            for iou_type in ("segm", "bbox"):
                coco = evaluate_coco(gt, self.detections, iou_type, "shard ground truth", "detections")
                result[iou_type] = {**coco[iou_type], "per_class": coco["per_class"]}
        result["images"] = self.n_images
        return result

    def close(self) -> None:
        if self._det_file and not self._det_file.closed:
            self._det_file.close()


def evaluate(model: torch.nn.Module, meta: dict[str, Any], samples: Iterable[dict[str, Any]],
             params: EvaluateParams, out: Path) -> dict[str, Any]:
    """Run ``model`` over ``samples`` in batches; write plots and detections under ``out`` and
    return the metrics (without provenance)."""
    ev = Evaluator(model, meta, params, out)
    try:
        for batch in batches(samples, params.batch_size):
            ev.add_batch(batch)
        result = ev.finish()
    finally:
        ev.close()
    if ev.n_images == 0:
        raise MetricsInputError(f"split {params.split!r} has no images")
    if not ev.instances:
        # every architecture writes the same files, so one dvc.yaml foreach entry fits all
        atomic_write_text(out / "detections.json", "[]\n")
    lines = ["actual,predicted"] + [f"{_csv_field(a)},{_csv_field(p)}" for a, p in confusion_rows(ev.cm.mat, ev.cm_names)]
    atomic_write_text(out / "confusion.csv", "\n".join(lines) + "\n")
    counts = ["actual,predicted,count"] + [
        f"{_csv_field(ev.cm_names[a])},{_csv_field(ev.cm_names[p])},{int(ev.cm.mat[a, p])}"
        for a, p in zip(*np.nonzero(ev.cm.mat))]
    atomic_write_text(out / "confusion_counts.csv", "\n".join(counts) + "\n")
    iou_rows = ["class,iou"] + [f"{_csv_field(n)},{v['iou']:.6f}" for n, v in result["per_class"].items()
                                if v["iou"] is not None]
    atomic_write_text(out / "per_class_iou.csv", "\n".join(iou_rows) + "\n")
    return result


def run(params: EvaluateParams, model_dir: Path, shards: Path, out: Path) -> dict[str, Any]:
    """Evaluate the checkpoint ``model_dir`` on ``params.split`` of ``shards``; write ``out``
    (replaced whole) and return the metrics.json content."""
    from segpipe.checkpoint import check_classes, load_model, weights_sha256
    from segpipe.shards import iter_samples, manifest_hash, read_manifest

    if params.batch_size < 1 or params.num_overlays < 0 or params.max_detections < 1:
        raise ParamsError("evaluate: batch_size and max_detections must be >= 1, num_overlays >= 0")
    model_dir, shards, out = Path(model_dir), Path(shards), Path(out)
    manifest = read_manifest(shards)
    model, meta = load_model(model_dir)
    if "classes" in manifest:
        check_classes(model_dir, meta, manifest["classes"])
    with atomic_dir(out) as tmp:
        result = evaluate(model, meta, iter_samples(shards, split=params.split), params, tmp)
        metrics = {
            "arch": meta["arch"],
            "task": meta.get("task"),
            "checkpoint": {"path": str(model_dir), "sha256": weights_sha256(model_dir)},
            "shards_manifest_sha256": manifest_hash(shards),
            "trained_on_shards_manifest_sha256": meta.get("shards_manifest_sha256"),
            "split": params.split,
            **result,
        }
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--shards", required=True, type=Path, help="shard set directory")
    parser.add_argument("--split", help="split to evaluate (default: evaluate.split in params)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced whole)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "evaluate")
    if args.split:
        import dataclasses

        params = dataclasses.replace(params, split=args.split)
    from segpipe.checkpoint import CheckpointError
    from segpipe.shards import ShardError

    try:
        m = run(params, args.model, args.shards, args.out)
    except (MetricsInputError, CheckpointError, ShardError) as e:
        raise SystemExit(f"segpipe evaluate: error: {e}") from None
    summary = f"miou {m['miou']:.4f}" if m["miou"] is not None else "miou null"
    if "segm" in m:
        summary += f", segm AP {m['segm']['AP']}" if m["segm"]["AP"] is None else f", segm AP {m['segm']['AP']:.4f}"
    print(f"{m['arch']} on {params.split} ({m['images']} images): {summary} -> {args.out}")

