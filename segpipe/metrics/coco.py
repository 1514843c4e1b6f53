"""COCO detection / instance-segmentation metrics through pycocotools' COCOeval.

Ground truth and detections are validated in Python first (pycocotools' C code reads past
buffers on malformed RLE strings, counts that do not sum to the image area, or polygons that
are really boxes) and every error names the annotation or detection at fault. COCOeval's
printing is silenced. Its ``-1`` ("no ground truth in this category / area range") is reported
as None. See ``docs/metrics.md``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Collection, Iterable, Sequence
from numbers import Real
from typing import Any

import numpy as np

from segpipe.metrics.semantic import MetricsInputError

STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
IOU_TYPES: tuple[str, ...] = ("segm", "bbox")


# --------------------------------------------------------------------------------------
# RLE strings (COCO's compressed run-length encoding), in pure Python for validation
# --------------------------------------------------------------------------------------


def rle_string_to_counts(s: str) -> list[int]:
    """Decode a compressed COCO RLE ``counts`` string into run lengths (pycocotools' rleFrString).

    Raises ValueError on characters outside the alphabet or a truncated final number, the inputs
    on which the C decoder reads past the end of the string.
    """
    counts: list[int] = []
    x = k = 0
    more = False
    for pos, ch in enumerate(s):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {ch!r} at position {pos} is not in the RLE alphabet (chr 48..111)")
        x |= (c & 0x1F) << (5 * k)
        more = bool(c & 0x20)
        k += 1
        if not more:
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
            x = k = 0
    if more:
        raise ValueError("string ends inside a number (continuation bit set on the last character)")
    return counts


def counts_to_rle_string(counts: Sequence[int]) -> str:
    """Encode run lengths as a compressed COCO RLE string (pycocotools' rleToString)."""
    out: list[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _new_id(entry: Any, what: str, seen: Collection[Any], source: str) -> Any:
    """The integer ``id`` of a ground-truth ``images`` / ``categories`` entry, not in ``seen``."""
    eid = entry.get("id") if isinstance(entry, dict) else None
    if not _is_int(eid):
        raise MetricsInputError(f"{source}: {what} {entry!r:.80} has no integer 'id'")
    if eid in seen:
        raise MetricsInputError(f"{source}: duplicate {what} id {eid}")
    return eid


def _check_segmentation(seg: Any, h: int, w: int, where: str) -> None:
    """A polygon list or an RLE dict of an ``h x w`` image, safe for pycocotools."""
    if isinstance(seg, list):
        if not seg:
            raise MetricsInputError(f"{where}: empty polygon list")
        for i, poly in enumerate(seg):
            # frPyObjects takes a flat list of 4 numbers for a box, so a polygon needs >= 3 points
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise MetricsInputError(
                    f"{where}: polygon {i} must be a flat list of an even number (>= 6) of coordinates")
            if not all(_is_number(v) for v in poly):
                raise MetricsInputError(f"{where}: polygon {i} has a non-numeric or non-finite coordinate")
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise MetricsInputError(f"{where}: segmentation must be a polygon list or an RLE dict with 'size' and 'counts'")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise MetricsInputError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
    if list(size) != [h, w]:
        raise MetricsInputError(f"{where}: RLE size {list(size)} != image size [{h}, {w}]")
    counts = seg["counts"]
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        try:
            runs = rle_string_to_counts(counts)
        except ValueError as e:
            raise MetricsInputError(f"{where}: malformed RLE counts string: {e}") from None
    elif isinstance(counts, list):
        if not all(_is_int(v) for v in counts):
            raise MetricsInputError(f"{where}: uncompressed RLE counts must be integers")
        runs = counts
    else:
        raise MetricsInputError(f"{where}: RLE counts must be a string or a list of integers")
    if any(r < 0 for r in runs):
        raise MetricsInputError(f"{where}: RLE has a negative run length")
    if sum(runs) != h * w:
        raise MetricsInputError(f"{where}: RLE run lengths sum to {sum(runs)}, expected {h} x {w} = {h * w}")


def _check_bbox(bbox: Any, where: str) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise MetricsInputError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise MetricsInputError(f"{where}: bbox has a negative width or height: {list(bbox)}")


def validate_ground_truth(gt: Any, iou_type: str, source: str = "ground truth") -> None:
    """Check a COCO instances dict: ids, image sizes, categories, and each annotation's fields."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if not isinstance(gt, dict):
        raise MetricsInputError(f"{source}: expected a COCO object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise MetricsInputError(f"{source}: missing or non-list {key!r}")
    sizes: dict[Any, tuple[int, int]] = {}
    for img in gt["images"]:
        iid = _new_id(img, "image", sizes, source)
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise MetricsInputError(f"{source}: image id {iid}: height/width must be positive integers, got {h!r}/{w!r}")
        sizes[iid] = (int(h), int(w))
    cats: set[Any] = set()
    cat_names: set[str] = set()
    for cat in gt["categories"]:
        cid = _new_id(cat, "category", cats, source)
        if not isinstance(cat.get("name"), str):
            raise MetricsInputError(f"{source}: category id {cid} has no 'name'")
        if cat["name"] in cat_names:
            raise MetricsInputError(f"{source}: category id {cid}: duplicate name {cat['name']!r}")
        cats.add(cid)
        cat_names.add(cat["name"])
    ann_ids: set[Any] = set()
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict):
            raise MetricsInputError(f"{source}: annotation #{i} is not an object")
        aid = ann.get("id")
        where = f"{source}: annotation id {aid}"
        if not _is_int(aid):
            raise MetricsInputError(f"{source}: annotation #{i} has no integer 'id'")
        if aid in ann_ids:
            raise MetricsInputError(f"{where}: duplicate annotation id")
        ann_ids.add(aid)
        if ann.get("image_id") not in sizes:
            raise MetricsInputError(f"{where}: image_id {ann.get('image_id')!r} is not in images")
        if ann.get("category_id") not in cats:
            raise MetricsInputError(f"{where}: category_id {ann.get('category_id')!r} is not in categories")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), float):
            raise MetricsInputError(f"{where}: iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
        area = ann.get("area")
        if not _is_number(area) or area < 0:
            raise MetricsInputError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
        if "bbox" in ann or iou_type == "bbox":
            _check_bbox(ann.get("bbox"), where)
        if iou_type == "segm":
            if "segmentation" not in ann:
                raise MetricsInputError(f"{where}: no 'segmentation' (needed for segm evaluation)")
            _check_segmentation(ann["segmentation"], *sizes[ann["image_id"]], where)


def validate_detections(dets: Any, gt: dict[str, Any], iou_type: str, source: str = "detections") -> None:
    """Check a COCO results list against the (validated) ground truth's images and categories."""
    if not isinstance(dets, list):
        raise MetricsInputError(f"{source}: expected a JSON list of detections")
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    for i, d in enumerate(dets):
        where = f"{source}: detection #{i}"
        if not isinstance(d, dict):
            raise MetricsInputError(f"{where}: not an object")
        iid = d.get("image_id")
        if iid not in sizes:
            raise MetricsInputError(f"{where}: image_id {iid!r} is not in the ground truth images")
        where += f" (image_id {iid})"
        if d.get("category_id") not in cats:
            raise MetricsInputError(f"{where}: category_id {d.get('category_id')!r} is not in the ground truth categories")
        if not _is_number(d.get("score")):
            raise MetricsInputError(f"{where}: 'score' must be a finite number, got {d.get('score')!r}")
        if iou_type == "bbox" or "bbox" in d:
            _check_bbox(d.get("bbox"), where)
        if iou_type == "segm":
            if "segmentation" not in d:
                raise MetricsInputError(f"{where}: no 'segmentation' (needed for segm evaluation)")
            _check_segmentation(d["segmentation"], *sizes[iid], where)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _compressed(seg: Any, h: int, w: int) -> dict[str, Any]:
    """A validated polygon / uncompressed RLE as a compressed RLE (pycocotools' results loader
    only takes compressed RLE)."""
    from pycocotools import mask as mask_util

    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        return seg
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _none_if_undefined(v: float) -> float | None:
    return None if v < 0 else float(v)


def evaluate_coco(
    gt: dict[str, Any],
    dets: list[dict[str, Any]],
    iou_type: str,
    gt_source: str = "ground truth",
    dt_source: str = "detections",
) -> dict[str, Any]:
    """COCOeval of ``dets`` against ``gt``: ``{iou_type: {AP, AP50, ..., ARl}, "per_class": {name: AP}}``.

    Values are fractions in [0, 1]; None where COCOeval reports -1 (no ground truth in that
    category or area range). An empty detection list scores 0 wherever ground truth exists.
    Inputs are validated first and not modified.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    validate_ground_truth(gt, iou_type, gt_source)
    validate_detections(dets, gt, iou_type, dt_source)
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    # loadRes and COCOeval write into the dicts they are given
    dets = copy.deepcopy(dets)
    if iou_type == "segm":
        for d in dets:
            d["segmentation"] = _compressed(d["segmentation"], *sizes[d["image_id"]])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            # loadRes cannot take an empty list; an empty result set evaluates to 0 where gt exists
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: _none_if_undefined(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return {iou_type: stats, "per_class": per_class_ap(ev, gt["categories"])}


def per_class_ap(ev: Any, categories: Iterable[dict[str, Any]]) -> dict[str, float | None]:
    """AP@[.5:.95] per category (area all, maxDets 100) from an accumulated COCOeval, by name."""
    names = {c["id"]: c["name"] for c in categories}
    # precision: T (iou thresholds) x R (recall) x K (categories) x A (areas) x M (max dets)
    precision = ev.eval["precision"]
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[names[cat_id]] = float(p.mean()) if p.size else None
    return out
