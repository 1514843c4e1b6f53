"""``segpipe metrics``: score predictions made by any system.

    segpipe metrics semantic --gt DIR --pred DIR --num-classes K [--ignore-index 255]
                             [--classes classes.json] [--boundary-ratio 0.02] --out FILE.json
    segpipe metrics coco --gt GT.json --dt DT.json --iou-type segm|bbox [--boundary-ap
                         [--boundary-ratio 0.02]] --out FILE.json
    segpipe metrics panoptic --gt GT.json [--gt-dir DIR] --pred PRED.json [--pred-dir DIR] --out FILE.json

Semantic: single-channel label PNGs (mode L, P or I;16) matched by file name; images are read one
pair at a time into a confusion matrix and Boundary IoU counts. COCO: COCOeval's numbers
(faster-coco-eval's engine) after validation; ``--boundary-ap`` adds Boundary AP to segm. Panoptic:
COCO panoptic JSON + RGB segment PNGs (the PNG folders default to the JSON paths without
``.json``, as in panopticapi), matched by image id and read one pair at a time into a ``PQStat``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import atomic_write_json
from segpipe.formats import pngs
from segpipe.formats.pngs import LabelPngError, read_id_png
from segpipe.metrics import panoptic
from segpipe.metrics.boundary import DEFAULT_RATIO, BoundaryIoU, check_ratio, with_boundary_iou
from segpipe.metrics.semantic import ConfusionMatrix, MetricsInputError, compute


def read_label_png(path: Path) -> np.ndarray:
    """An ``H x W`` integer label map, read by ``segpipe.formats.pngs.read_label_png`` as every
    format reader reads one (palette PNGs give their indices; colour PNGs are refused); its
    errors, naming the file, as MetricsInputError."""
    try:
        return pngs.read_label_png(path)
    except LabelPngError as e:
        raise MetricsInputError(str(e)) from None


def match_files(gt_dir: Path, pred_dir: Path) -> list[str]:
    """Names of the ``*.png`` in ``gt_dir``, which must be exactly those of ``pred_dir``."""
    for d in (gt_dir, pred_dir):
        if not d.is_dir():
            raise MetricsInputError(f"{d}: not a directory")
    gt_names = {p.name for p in gt_dir.glob("*.png")}
    pred_names = {p.name for p in pred_dir.glob("*.png")}
    if not gt_names:
        raise MetricsInputError(f"{gt_dir}: no .png label maps")
    missing = sorted(gt_names - pred_names)
    if missing:
        raise MetricsInputError(f"{pred_dir}: no prediction for {len(missing)} ground-truth file(s), e.g. {missing[0]}")
    extra = sorted(pred_names - gt_names)
    if extra:
        raise MetricsInputError(f"{pred_dir}: {len(extra)} prediction file(s) without ground truth, e.g. {extra[0]}")
    return sorted(gt_names)


def class_names(classes: Any, num_classes: int, source: str) -> list[str]:
    """Names for ids ``0..K-1`` from a classes.json list (``[{"id", "name", ...}]``)."""
    if not isinstance(classes, list):
        raise MetricsInputError(f"{source}: expected a list of {{\"id\", \"name\"}} objects")
    names: dict[int, str] = {}
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise MetricsInputError(f"{source}: entry #{i} needs an integer 'id' and a string 'name'")
        if not 0 <= c["id"] < num_classes:
            raise MetricsInputError(f"{source}: class id {c['id']} ({c['name']!r}) is outside [0, {num_classes})")
        if c["id"] in names:
            raise MetricsInputError(f"{source}: duplicate class id {c['id']}")
        names[c["id"]] = c["name"]
    missing = [i for i in range(num_classes) if i not in names]
    if missing:
        raise MetricsInputError(f"{source}: no entry for class id(s) {missing} of {num_classes}")
    if len(set(names.values())) != num_classes:
        raise MetricsInputError(f"{source}: class names are not unique")
    return [names[i] for i in range(num_classes)]


def read_json(path: Path) -> Any:
    """A JSON document, parsed by orjson (1.26x the standard library's speed on the 14 MB COCO files
    of benchmarks/metrics.py, where building the Python objects is most of the time). What orjson
    refuses and the standard library reads (NaN, Infinity, integers beyond 64 bits) is read by the
    standard library, so that the validation names the field at fault; a document neither reads gets
    the standard library's message, with its line and column."""
    import orjson

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MetricsInputError(f"{path}: file not found") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricsInputError(f"{path}: not valid JSON: {e}") from None


def semantic_counts(gt_dir: Path, pred_dir: Path, num_classes: int, ignore_index: int | None,
                    boundary_ratio: float = DEFAULT_RATIO) -> tuple[ConfusionMatrix, BoundaryIoU]:
    """The confusion matrix and Boundary IoU counts over all label PNG pairs, read one pair at a time."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    boundary = BoundaryIoU(num_classes, ignore_index, boundary_ratio)
    for name in match_files(gt_dir, pred_dir):
        gt = read_label_png(gt_dir / name)
        pred = read_label_png(pred_dir / name)
        if gt.shape != pred.shape:
            raise MetricsInputError(
                f"{pred_dir / name}: size {pred.shape[1]}x{pred.shape[0]} != ground truth {gt.shape[1]}x{gt.shape[0]}")
        where = str(pred_dir / name) + " (with " + str(gt_dir / name) + ")"
        cm.update(gt, pred, where=where)
        boundary.update(gt, pred, where=where)
    return cm, boundary


def run_semantic(
    gt_dir: Path, pred_dir: Path, num_classes: int, out: Path,
    ignore_index: int | None = 255, classes: Path | None = None, boundary_ratio: float = DEFAULT_RATIO,
) -> dict[str, Any]:
    """Score label PNGs; write and return ``{pixel_acc, mean_acc, miou, boundary_iou, fwiou, mdice,
    pixels, per_class}`` (``per_class[name]``: ``iou, dice, acc, boundary_iou``)."""
    names = class_names(read_json(classes), num_classes, str(classes)) if classes else None
    cm, boundary = semantic_counts(Path(gt_dir), Path(pred_dir), num_classes, ignore_index, boundary_ratio)
    result = with_boundary_iou(compute(cm.mat, names), boundary.compute(names))
    atomic_write_json(out, result)
    return result


def run_coco(gt: Path, dt: Path, iou_type: str, out: Path, boundary_ratio: float | None = None) -> dict[str, Any]:
    """Score a COCO results file; write and return ``{iou_type: {AP, ...}, "per_class": {name: AP}}``
    (segm with ``boundary_AP`` too when ``boundary_ratio`` is given)."""
    from segpipe.metrics.coco import collector_paused, evaluate_coco

    with collector_paused():
        result = evaluate_coco(read_json(gt), read_json(dt), iou_type, gt_source=str(gt), dt_source=str(dt),
                               boundary_ratio=boundary_ratio)
    atomic_write_json(out, result)
    return result


def _read_segments_png(path: Path) -> np.ndarray:
    try:
        return read_id_png(path)
    except LabelPngError as e:
        raise MetricsInputError(str(e)) from None


def panoptic_stat(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> tuple[panoptic.PQStat, list[str], list[bool]]:
    """The ``PQStat`` over all images of a COCO panoptic ground truth and prediction (read one
    PNG pair at a time), with the ground truth's category names and isthing flags."""
    gt_doc, pred_doc = read_json(gt_json), read_json(pred_json)
    ids, names, isthing = panoptic.parse_categories(gt_doc, str(gt_json))
    pairs = panoptic.match_images(panoptic.annotations_by_image(gt_doc, str(gt_json)),
                                  panoptic.annotations_by_image(pred_doc, str(pred_json)), str(gt_json), str(pred_json))
    for d in (gt_dir, pred_dir):
        if not Path(d).is_dir():
            raise MetricsInputError(f"{d}: not a directory")
    sizes = panoptic.declared_sizes(gt_doc)
    stat = panoptic.PQStat(ids)
    for iid, gt_ann, pred_ann in pairs:
        gt_png, pred_png = Path(gt_dir) / gt_ann["file_name"], Path(pred_dir) / pred_ann["file_name"]
        gt_map = _read_segments_png(gt_png)
        if iid in sizes and sizes[iid] != gt_map.shape:
            h, w = sizes[iid]
            raise MetricsInputError(f"{gt_png}: PNG is {gt_map.shape[1]} x {gt_map.shape[0]} but image id {iid!r} "
                                    f"is declared {w} x {h} in {gt_json}")
        pred_map = _read_segments_png(pred_png)
        if pred_map.shape != gt_map.shape:
            raise MetricsInputError(f"{pred_png}: image id {iid!r}: PNG is {pred_map.shape[1]} x {pred_map.shape[0]} "
                                    f"but the ground truth {gt_png} is {gt_map.shape[1]} x {gt_map.shape[0]}")
        stat.update(gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"],
                    where=f"image id {iid!r} ({gt_png} vs {pred_png})")
    return stat, names, isthing


def run_panoptic(gt_json: Path, pred_json: Path, out: Path, gt_dir: Path | None = None,
                 pred_dir: Path | None = None) -> dict[str, Any]:
    """Score COCO panoptic predictions; write and return ``{pq, sq, rq, pq_things, ..., rq_stuff,
    images, per_class}``. Raises MetricsInputError when nothing could be scored."""
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_dir = Path(gt_dir) if gt_dir is not None else gt_json.with_suffix("")
    pred_dir = Path(pred_dir) if pred_dir is not None else pred_json.with_suffix("")
    stat, names, isthing = panoptic_stat(gt_json, gt_dir, pred_json, pred_dir)
    if stat.images == 0:
        raise MetricsInputError(f"{gt_json}: no images in 'annotations', nothing to score")
    result = stat.compute(names, isthing)
    if result["pq"] is None:
        raise MetricsInputError(
            f"{gt_json} vs {pred_json}: nothing to score in {stat.images} image(s): no ground-truth or "
            "predicted segment outside void and crowd regions")
    result = {**{k: v for k, v in result.items() if k != "per_class"}, "images": stat.images,
              "per_class": result["per_class"]}
    atomic_write_json(out, result)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segpipe metrics", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("semantic", help="mIoU and friends of label PNGs")
    s.add_argument("--gt", type=Path, required=True, help="directory of ground-truth label PNGs")
    s.add_argument("--pred", type=Path, required=True, help="directory of predicted label PNGs (same names)")
    s.add_argument("--num-classes", type=int, required=True)
    s.add_argument("--ignore-index", type=int, default=255, help="ground-truth value to skip (default 255; -1: none)")
    s.add_argument("--classes", type=Path, help='classes.json ([{"id", "name", ...}]) to name the classes')
    s.add_argument("--boundary-ratio", type=float, default=DEFAULT_RATIO,
                   help=f"Boundary IoU width as a fraction of the image diagonal (default {DEFAULT_RATIO})")
    s.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("coco", help="COCOeval of a results JSON")
    c.add_argument("--gt", type=Path, required=True, help="COCO instances JSON")
    c.add_argument("--dt", type=Path, required=True, help="COCO results JSON (list of detections)")
    c.add_argument("--iou-type", choices=["segm", "bbox"], required=True)
    c.add_argument("--boundary-ap", action="store_true",
                   help="segm: add boundary_AP (matching on min(mask IoU, boundary IoU)); several times slower")
    c.add_argument("--boundary-ratio", type=float,
                   help=f"boundary width of --boundary-ap (implied), a fraction of the image diagonal "
                        f"(default {DEFAULT_RATIO})")
    c.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("panoptic", help="PQ, SQ, RQ of COCO panoptic PNGs + JSON")
    p.add_argument("--gt", type=Path, required=True, help="COCO panoptic ground-truth JSON (with categories)")
    p.add_argument("--gt-dir", type=Path, help="folder of ground-truth PNGs (default: the --gt path without .json)")
    p.add_argument("--pred", type=Path, required=True, help="COCO panoptic prediction JSON")
    p.add_argument("--pred-dir", type=Path, help="folder of predicted PNGs (default: the --pred path without .json)")
    p.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.kind == "semantic":
            if args.num_classes < 1:
                raise MetricsInputError(f"--num-classes must be >= 1, got {args.num_classes}")
            ignore = None if args.ignore_index == -1 else args.ignore_index
            if ignore is not None and 0 <= ignore < args.num_classes:
                raise MetricsInputError(f"--ignore-index {ignore} is a class id (< --num-classes {args.num_classes})")
            ratio = _ratio_arg(args.boundary_ratio)
            result = run_semantic(args.gt, args.pred, args.num_classes, args.out, ignore, args.classes, ratio)
            print(f"miou {_fmt(result['miou'])}  boundary_iou {_fmt(result['boundary_iou'])}  "
                  f"pixel_acc {_fmt(result['pixel_acc'])}  -> {args.out}")
        elif args.kind == "panoptic":
            result = run_panoptic(args.gt, args.pred, args.out, args.gt_dir, args.pred_dir)
            print(f"pq {_fmt(result['pq'])}  sq {_fmt(result['sq'])}  rq {_fmt(result['rq'])}  "
                  f"({result['images']} images) -> {args.out}")
        else:
            ratio = None
            if args.boundary_ap or args.boundary_ratio is not None:
                if args.iou_type != "segm":
                    raise MetricsInputError("--boundary-ap / --boundary-ratio need --iou-type segm")
                ratio = _ratio_arg(DEFAULT_RATIO if args.boundary_ratio is None else args.boundary_ratio)
            result = run_coco(args.gt, args.dt, args.iou_type, args.out, ratio)
            extra = f"  boundary_AP {_fmt(result['segm']['boundary_AP'])}" if "boundary_AP" in result[args.iou_type] else ""
            print(f"{args.iou_type} AP {_fmt(result[args.iou_type]['AP'])}{extra}  -> {args.out}")
    except MetricsInputError as e:
        print(f"segpipe metrics: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _ratio_arg(ratio: float) -> float:
    try:
        return check_ratio(ratio, "--boundary-ratio")
    except ValueError as e:
        raise MetricsInputError(str(e)) from None


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.4f}"
