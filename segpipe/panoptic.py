"""Panoptic outputs: post-processing of model outputs into segments, and COCO panoptic writing.

A panoptic result is an H x W int32 segment-id map (0 = void) plus ``segments_info``: one COCO
entry per id, ``{"id", "category_id", "iscrowd", "isthing", "area", "bbox" [x, y, w, h],
"score"}``. ``maskformer_panoptic`` builds one from mask-classification outputs (Mask2Former's
panoptic inference), ``fuse_panoptic`` from a semantic map plus instances (Panoptic FPN's
heuristic). ``encode_png`` stores a map as COCO panoptic's RGB PNG (id = R + 256 G + 256^2 B);
``segpipe.formats.pngs.read_id_png`` reads it back. Everything here is pure (no file I/O).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segpipe.formats.pngs import MAX_RGB_ID, id_to_rgb, mask_bbox
from segpipe.params import FusionParams, MaskFormerPanopticParams

_MASKFORMER = MaskFormerPanopticParams()  # frozen: safe default arguments; the defaults are the params'
_FUSION = FusionParams()

# --------------------------------------------------------------------------------------
# COCO panoptic writing
# --------------------------------------------------------------------------------------


def encode_png(segment_map: np.ndarray | Tensor) -> bytes:
    """An H x W map of segment ids in ``[0, 2^24)`` as the bytes of a COCO panoptic RGB PNG."""
    ids = segment_map.detach().cpu().numpy() if isinstance(segment_map, Tensor) else np.asarray(segment_map)
    if ids.ndim != 2:
        raise ValueError(f"segment map has shape {ids.shape}, expected H x W")
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def segments_info(segment_map: np.ndarray | Tensor, segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO ``segments_info`` of a segment map: each of ``segments`` (``{"id", "category_id"}``,
    optionally ``"iscrowd"`` and any other keys, which are kept) with its ``area`` and tight
    ``bbox`` ``[x, y, w, h]`` measured on the map, in ``segments`` order.

    Raises ValueError when an id of the map has no entry, an entry has no pixels or an id repeats.
    """
    ids = segment_map.detach().cpu().numpy() if isinstance(segment_map, Tensor) else np.asarray(segment_map)
    listed = [int(s["id"]) for s in segments]
    if len(set(listed)) != len(listed):
        dup = sorted({i for i in listed if listed.count(i) > 1})
        raise ValueError(f"segment id(s) {dup} appear more than once in segments")
    if 0 in listed:
        raise ValueError("segment id 0 is void and cannot have an entry")
    present, inverse, area = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(ids.shape)
    position = {int(v): k for k, v in enumerate(present.tolist())}
    unlisted = sorted(set(position) - set(listed) - {0})
    if unlisted:
        raise ValueError(f"segment id(s) {unlisted[:10]} in the map have no entry in segments")
    out = []
    for seg in segments:
        k = position.get(int(seg["id"]))
        if k is None:
            raise ValueError(f"segment id {seg['id']} has no pixels in the map")
        out.append({**seg, "id": int(seg["id"]), "category_id": int(seg["category_id"]),
                    "iscrowd": int(seg.get("iscrowd", 0)), "area": int(area[k]), "bbox": mask_bbox(inverse == k)})
    return out


# --------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------


class _SegmentIds:
    """New segment ids: 1, 2, ... in order, or with ``label_divisor`` ``category * label_divisor
    + n`` where ``n`` counts that category's segments from 1 (so ``id // label_divisor`` is the
    category and no id is 0)."""

    def __init__(self, label_divisor: int | None) -> None:
        if label_divisor is not None and label_divisor < 2:
            raise ValueError(f"label_divisor must be >= 2 or None, got {label_divisor}")
        self.label_divisor = label_divisor
        self.count = 0
        self.per_category: dict[int, int] = {}

    def new(self, category: int) -> int:
        self.count += 1
        if self.label_divisor is None:
            return self.count
        n = self.per_category[category] = self.per_category.get(category, 0) + 1
        if n >= self.label_divisor:
            raise ValueError(f"more than {self.label_divisor - 1} segments of category {category} "
                             f"do not fit label_divisor {self.label_divisor}")
        sid = category * self.label_divisor + n
        if sid > MAX_RGB_ID:
            raise ValueError(f"segment id {sid} (category {category} x label_divisor {self.label_divisor}) "
                             f"exceeds {MAX_RGB_ID}, the largest id a panoptic PNG stores")
        return sid


def _tensor(x: Any, name: str, ndim: int) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _result(panoptic: Tensor, segments: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    seg_map = panoptic.cpu().numpy().astype(np.int32)
    return seg_map, segments_info(seg_map, segments)


@torch.no_grad()
def maskformer_panoptic(
    class_logits: Tensor | np.ndarray,
    mask_logits: Tensor | np.ndarray,
    thing_ids: Sequence[int],
    params: MaskFormerPanopticParams = _MASKFORMER,
    *,
    label_divisor: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic segments of one image from mask classification (Mask2Former's panoptic inference).

    ``class_logits``: Q x (K + 1), the last class is "no object"; ``mask_logits``: Q x H x W at
    output resolution. A query is kept when its most probable class is not "no object" and that
    probability exceeds ``params.object_mask_threshold``. Each pixel goes to the kept query with the
    highest ``score x sigmoid(mask)``, and stays void unless that query's mask probability is
    >= 0.5 there. A query is dropped (its pixels stay void) when it wins no pixel, its mask has
    no pixel >= 0.5, or the pixels it wins are fewer than ``params.overlap_threshold`` x its mask area
    (mask probability >= 0.5). Queries of one stuff class merge into one segment; each thing
    query is its own segment. Segment ids are 1, 2, ... in query order; with ``label_divisor``
    they are ``class * label_divisor + n``, ``n`` numbering each class's segments from 1.
    Returns (H x W int32 map, ``segments_info``); a merged stuff segment's ``score`` is the best
    of its queries'.
    """
    cls = _tensor(class_logits, "class_logits", 2).float()
    masks = _tensor(mask_logits, "mask_logits", 3).float().to(cls.device)
    if cls.shape[0] != masks.shape[0]:
        raise ValueError(f"{cls.shape[0]} queries in class_logits but {masks.shape[0]} in mask_logits")
    num_classes = cls.shape[1] - 1
    if num_classes < 1:
        raise ValueError("class_logits needs at least one class plus 'no object'")
    things = {int(t) for t in thing_ids}
    h, w = masks.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    scores, labels = cls.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > params.object_mask_threshold)
    if not keep.any():
        return _result(panoptic, [])
    scores, labels, probs = scores[keep], labels[keep], masks[keep].sigmoid()
    winner = (scores[:, None, None] * probs).argmax(0)  # H x W: index among kept queries
    ids = _SegmentIds(label_divisor)
    segments: list[dict[str, Any]] = []
    stuff: dict[int, dict[str, Any]] = {}
    for q in range(len(labels)):
        label, score = int(labels[q]), float(scores[q])
        won = winner == q
        mask_area = int(won.sum())
        own = probs[q] >= 0.5
        original_area = int(own.sum())
        mask = won & own
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < params.overlap_threshold:
            continue
        if label not in things and label in stuff:
            panoptic[mask] = stuff[label]["id"]
            stuff[label]["score"] = max(stuff[label]["score"], score)
            continue
        seg = {"id": ids.new(label), "category_id": label, "iscrowd": 0, "isthing": label in things, "score": score}
        if label not in things:
            stuff[label] = seg
        panoptic[mask] = seg["id"]
        segments.append(seg)
    return _result(panoptic, segments)


@torch.no_grad()
def fuse_panoptic(
    semantic_labels: Tensor | np.ndarray,
    instance_labels: Tensor | np.ndarray | Sequence[int],
    instance_scores: Tensor | np.ndarray | Sequence[float],
    instance_masks: Tensor | np.ndarray,
    thing_ids: Sequence[int],
    fusion: FusionParams = _FUSION,
    *,
    label_divisor: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic segments of one image from a semantic map and instances (Panoptic FPN's heuristic).

    ``semantic_labels``: H x W class ids; ``instance_labels`` (N), ``instance_scores`` (N),
    ``instance_masks``: N x H x W bool. Things first: instances with score >= ``fusion.score_threshold``
    by descending score (ties in input order), each taking only pixels no earlier instance took;
    an instance is dropped when those free pixels are fewer than ``fusion.overlap_threshold`` x its mask
    area, or its mask is empty. Instances labelled with a stuff class are dropped. Then each stuff
    class of the semantic map fills the pixels no instance took, as one segment, unless that
    region is smaller than ``fusion.stuff_min_area`` (it stays void); thing-class pixels of the semantic
    map that no instance covers stay void. Segment ids as in ``maskformer_panoptic``. Returns
    (H x W int32 map, ``segments_info``; stuff segments have ``score`` None).
    """
    semantic = _tensor(semantic_labels, "semantic_labels", 2)
    if semantic.is_floating_point() or bool((semantic < 0).any()):
        raise ValueError("semantic_labels must hold non-negative integer class ids")
    masks = _tensor(instance_masks, "instance_masks", 3).to(semantic.device)
    if masks.dtype != torch.bool:
        if masks.is_floating_point():
            raise ValueError("instance_masks must be binary (bool); threshold mask probabilities first")
        masks = masks != 0
    labels = torch.as_tensor(instance_labels).reshape(-1)
    scores = torch.as_tensor(instance_scores, dtype=torch.float64).reshape(-1)
    if not len(labels) == len(scores) == masks.shape[0]:
        raise ValueError(f"{len(labels)} instance labels, {len(scores)} scores and {masks.shape[0]} masks")
    if masks.shape[0] and masks.shape[1:] != semantic.shape:
        raise ValueError(f"instance masks are {tuple(masks.shape[1:])} but the semantic map is {tuple(semantic.shape)}")
    things = {int(t) for t in thing_ids}
    panoptic = torch.zeros(semantic.shape, dtype=torch.int32, device=semantic.device)
    ids = _SegmentIds(label_divisor)
    segments: list[dict[str, Any]] = []
    for i in torch.argsort(-scores, stable=True).tolist():
        label, score = int(labels[i]), float(scores[i])
        if score < fusion.score_threshold or label not in things:
            continue
        mask = masks[i]
        area = int(mask.sum())
        if area == 0:
            continue
        free = mask & (panoptic == 0)
        if int(free.sum()) < fusion.overlap_threshold * area:
            continue
        seg = {"id": ids.new(label), "category_id": label, "iscrowd": 0, "isthing": True, "score": score}
        panoptic[free] = seg["id"]
        segments.append(seg)
    for label in torch.unique(semantic).tolist():
        if label in things:
            continue
        region = (semantic == label) & (panoptic == 0)
        if int(region.sum()) < max(fusion.stuff_min_area, 1):
            continue
        seg = {"id": ids.new(label), "category_id": label, "iscrowd": 0, "isthing": False, "score": None}
        panoptic[region] = seg["id"]
        segments.append(seg)
    return _result(panoptic, segments)


# --------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------


def ground_truth(
    semantic: np.ndarray,
    instance_masks: Sequence[np.ndarray] | np.ndarray,
    instance_labels: Sequence[int],
    instance_crowd: Sequence[int | bool],
    thing_ids: Sequence[int],
    ignore_index: int,
    where: str = "",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic ground truth of one image from its semantic map (H x W class ids) and instances
    (H x W bool masks with their classes and crowd flags).

    Each instance is its own segment (``iscrowd`` 1 for crowd regions), a later instance taking
    the pixels it shares with an earlier one (as training's instance maps do); an instance left
    with no pixel is dropped. Each stuff class of the semantic map becomes one segment of the
    pixels no instance holds. Void (0): ``ignore_index`` pixels, even under an instance, and
    thing-class pixels that no instance covers. Segment ids are 1, 2, ...: instances in input
    order, then stuff classes by id. Raises ValueError (prefixed with ``where``) when an instance
    is not of a thing class or its mask does not fit the map.
    """
    at = f"{where}: " if where else ""
    sem = np.asarray(semantic)
    if sem.ndim != 2:
        raise ValueError(f"{at}semantic map has shape {sem.shape}, expected H x W")
    if not len(instance_masks) == len(instance_labels) == len(instance_crowd):
        raise ValueError(f"{at}{len(instance_masks)} instance masks, {len(instance_labels)} labels and "
                         f"{len(instance_crowd)} crowd flags")
    things = {int(t) for t in thing_ids}
    valid = sem != ignore_index
    owner = np.full(sem.shape, -1, dtype=np.int64)  # index of the instance holding each pixel
    for k, (mask, label) in enumerate(zip(instance_masks, instance_labels)):
        m = np.asarray(mask, dtype=bool)
        if m.shape != sem.shape:
            raise ValueError(f"{at}instance #{k} has a {m.shape} mask, the semantic map is {sem.shape}")
        if int(label) not in things:
            raise ValueError(f"{at}instance #{k} has category {int(label)}, not a thing class ({sorted(things)})")
        owner[m & valid] = k
    seg_map = np.zeros(sem.shape, dtype=np.int32)
    ids = _SegmentIds(None)
    segments: list[dict[str, Any]] = []
    for k in range(len(instance_labels)):
        held = owner == k
        if not held.any():
            continue
        label = int(instance_labels[k])
        seg = {"id": ids.new(label), "category_id": label, "iscrowd": int(bool(instance_crowd[k])), "isthing": True}
        seg_map[held] = seg["id"]
        segments.append(seg)
    free = valid & (owner < 0)
    for label in np.unique(sem[free]).tolist():
        if int(label) in things:
            continue
        seg = {"id": ids.new(int(label)), "category_id": int(label), "iscrowd": 0, "isthing": False}
        seg_map[free & (sem == label)] = seg["id"]
        segments.append(seg)
    return seg_map, segments_info(seg_map, segments)


def sample_ground_truth(sample: Mapping[str, Any], thing_ids: Sequence[int],
                        ignore_index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """:func:`ground_truth` of a decoded shard sample (``segpipe.shards``: ``semantic`` and
    ``instances`` with COCO RLE ``segmentation``)."""
    from pycocotools import mask as mask_utils  # RLEs in shards were validated by the converter

    insts = list(sample.get("instances") or [])
    masks = [mask_utils.decode(i["segmentation"]).astype(bool) for i in insts]
    return ground_truth(sample["semantic"], masks, [int(i["category_id"]) for i in insts],
                        [int(i.get("iscrowd", 0)) for i in insts], thing_ids, ignore_index,
                        where=f"image {sample.get('image_id')}")
