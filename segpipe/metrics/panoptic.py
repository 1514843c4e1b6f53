"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019) as COCO's ``panopticapi`` computes it.

``PQStat`` accumulates, per category, the summed IoU of matched segments and the TP / FP / FN
counts in plain arrays that add across images and workers (like ``ConfusionMatrix``);
``compute`` turns any such arrays into PQ, SQ and RQ overall, for things and for stuff, and per
class. Per image, a ground-truth and a predicted segment of the same category match when their
IoU exceeds 0.5 (which makes the match unique); the IoU leaves out the predicted pixels whose
ground truth is void (id 0). Crowd ground truth is never matched, and an unmatched predicted
segment that lies more than half in void or in crowd regions of its category is not a false
positive. Divergences from panopticapi are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from segpipe.files import escape_reason
from segpipe.formats.coco_files import parse_categories as coco_categories
from segpipe.metrics.semantic import MetricsInputError, _to_numpy

VOID = 0

# Above this many (gt segment, pred segment) cells the per-image intersection table is built
# sparsely (np.unique) instead of with one bincount; COCO images have ~100 x ~100 cells.
_DENSE_LIMIT = 1 << 22


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class PQStat:
    """Per-category ``iou_sum`` (float64) and ``tp``, ``fp``, ``fn`` (int64) arrays, one entry per
    id of ``category_ids`` (in that order).

    ``update`` adds one image; ``merge`` / ``+`` add another accumulator over the same
    categories, so workers can accumulate separately; ``images`` counts the updates.
    """

    def __init__(self, category_ids: Sequence[int]) -> None:
        ids = [int(c) for c in category_ids]
        if not ids:
            raise ValueError("PQStat needs at least one category id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids are not unique: {ids}")
        self.category_ids = ids
        self._row = {c: i for i, c in enumerate(ids)}
        k = len(ids)
        self.iou_sum = np.zeros(k, dtype=np.float64)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.images = 0

    def update(
        self,
        gt_seg_map: Any,
        gt_segments: Iterable[Mapping[str, Any]],
        pred_seg_map: Any,
        pred_segments: Iterable[Mapping[str, Any]],
        where: str = "",
    ) -> None:
        """Add one image.

        ``*_seg_map``: H x W integer segment ids (numpy or torch; 0 = void). ``*_segments``: the
        COCO ``segments_info`` entries, ``{"id", "category_id", "iscrowd" (gt only, default 0)}``.
        ``where`` (an image id or file) prefixes errors. Raises MetricsInputError when the maps
        differ in size, a map holds an id that no entry lists, an entry's id has no pixels, an id
        repeats or is 0, or a category is not one of ``category_ids``.
        """
        at = f"{where}: " if where else ""
        gt = _to_numpy(gt_seg_map, f"{at}ground-truth segment map")
        pred = _to_numpy(pred_seg_map, f"{at}predicted segment map")
        if gt.ndim != 2:
            raise MetricsInputError(f"{at}ground-truth segment map has shape {gt.shape}, expected H x W")
        if gt.shape != pred.shape:
            raise MetricsInputError(
                f"{at}predicted segment map is {pred.shape[1]} x {pred.shape[0]} (W x H) but the ground truth "
                f"is {gt.shape[1]} x {gt.shape[0]}")
        g_ids, g_cat, g_crowd = self._segments(gt_segments, f"{at}ground truth", crowd=True)
        p_ids, p_cat, _ = self._segments(pred_segments, f"{at}prediction", crowd=False)
        g_idx = _index(gt, g_ids, f"{at}ground truth")
        p_idx = _index(pred, p_ids, f"{at}prediction")
        self._add(*_intersections(g_idx, len(g_ids), p_idx, len(p_ids)), g_ids, g_cat, g_crowd, p_ids, p_cat, at)
        self.images += 1

    def _segments(
        self, segments: Iterable[Mapping[str, Any]], what: str, crowd: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted ids with VOID prepended, and their category rows (-1 for VOID) and crowd flags."""
        if isinstance(segments, (str, bytes, Mapping)) or not isinstance(segments, Iterable):
            raise MetricsInputError(f"{what}: segments_info must be a list of segment objects")
        rows: dict[int, tuple[int, bool]] = {}
        for i, seg in enumerate(segments):
            if not isinstance(seg, Mapping) or not _is_int(seg.get("id")) or not _is_int(seg.get("category_id")):
                raise MetricsInputError(f"{what}: segments_info[{i}] needs integer 'id' and 'category_id', got {seg!r:.200}")
            sid, cid = int(seg["id"]), int(seg["category_id"])
            if sid <= VOID:
                raise MetricsInputError(f"{what}: segment id {sid} in segments_info (ids are positive; 0 is void)")
            if sid in rows:
                raise MetricsInputError(f"{what}: segment id {sid} appears twice in segments_info")
            if cid not in self._row:
                raise MetricsInputError(
                    f"{what}: segment id {sid} has unknown category_id {cid} (known: {self.category_ids[:20]}"
                    f"{' ...' if len(self.category_ids) > 20 else ''})")
            is_crowd = seg.get("iscrowd", 0) if crowd else 0
            if is_crowd not in (0, 1):  # True/False compare equal to 1/0
                raise MetricsInputError(f"{what}: segment id {sid} has iscrowd={is_crowd!r}, expected 0 or 1")
            rows[sid] = (self._row[cid], bool(is_crowd))
        ids = sorted(rows)
        return (np.array([VOID, *ids], dtype=np.int64),
                np.array([-1, *(rows[s][0] for s in ids)], dtype=np.int64),
                np.array([False, *(rows[s][1] for s in ids)], dtype=bool))

    def _add(
        self, g: np.ndarray, p: np.ndarray, inter: np.ndarray,
        g_ids: np.ndarray, g_cat: np.ndarray, g_crowd: np.ndarray, p_ids: np.ndarray, p_cat: np.ndarray, at: str,
    ) -> None:
        # g, p, inter: one entry per (gt segment index, pred segment index) pair that shares pixels;
        # index 0 on either side is VOID.
        g_area = np.bincount(g, weights=inter, minlength=len(g_ids)).astype(np.int64)
        p_area = np.bincount(p, weights=inter, minlength=len(p_ids)).astype(np.int64)
        for area, ids, what in ((g_area, g_ids, "ground truth"), (p_area, p_ids, "prediction")):
            empty = ids[1:][area[1:] == 0]
            if empty.size:
                raise MetricsInputError(
                    f"{at}{what}: segments_info id(s) {empty[:10].tolist()} have no pixels in the segment map")
        on_void = g == VOID
        p_void = np.zeros(len(p_ids), dtype=np.int64)  # predicted pixels whose ground truth is void
        p_void[p[on_void]] = inter[on_void]

        same = (g_cat[g] == p_cat[p]) & (p != VOID)  # VOID rows have category -1, never equal
        cand = same & ~on_void & ~g_crowd[g]
        union = p_area[p] + g_area[g] - inter - p_void[p]
        match = cand & (2 * inter > union)  # IoU > 0.5, in integers
        cat = g_cat[g[match]]
        np.add.at(self.tp, cat, 1)
        np.add.at(self.iou_sum, cat, inter[match] / union[match])

        g_matched = np.zeros(len(g_ids), dtype=bool)
        g_matched[g[match]] = True
        missed = ~g_matched & ~g_crowd
        missed[VOID] = False
        np.add.at(self.fn, g_cat[missed], 1)

        # An unmatched prediction lying more than half in void or in crowd of its own category
        # is not counted against it.
        ignored = p_void.copy()
        in_crowd = same & g_crowd[g]
        np.add.at(ignored, p[in_crowd], inter[in_crowd])
        p_matched = np.zeros(len(p_ids), dtype=bool)
        p_matched[p[match]] = True
        false_pos = ~p_matched & (2 * ignored <= p_area)
        false_pos[VOID] = False
        np.add.at(self.fp, p_cat[false_pos], 1)

    def merge(self, other: PQStat) -> PQStat:
        """Add ``other``'s counts into this accumulator (in place); returns self."""
        self._check_compatible(other)
        self.iou_sum += other.iou_sum
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.images += other.images
        return self

    def __add__(self, other: PQStat) -> PQStat:
        self._check_compatible(other)
        return PQStat(self.category_ids).merge(self).merge(other)

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, PQStat):
            raise TypeError(f"cannot combine PQStat with {type(other).__name__}")
        if other.category_ids != self.category_ids:
            raise ValueError(f"cannot combine PQStat over categories {self.category_ids} and {other.category_ids}")

    def to_json(self) -> dict[str, Any]:
        """The accumulators as JSON values, to carry a worker's counts to where they are summed."""
        return {"category_ids": list(self.category_ids), "iou_sum": self.iou_sum.tolist(), "tp": self.tp.tolist(),
                "fp": self.fp.tolist(), "fn": self.fn.tolist(), "images": self.images}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PQStat:
        """The inverse of :meth:`to_json`."""
        stat = cls(data["category_ids"])
        stat.iou_sum[:] = np.asarray(data["iou_sum"], dtype=np.float64)
        for k in ("tp", "fp", "fn"):
            getattr(stat, k)[:] = np.asarray(data[k], dtype=np.int64)
        stat.images = int(data["images"])
        return stat

    def compute(self, names: Sequence[str], isthing: Sequence[bool]) -> dict[str, Any]:
        """``compute(self.iou_sum, self.tp, self.fp, self.fn, names, isthing)``."""
        return compute(self.iou_sum, self.tp, self.fp, self.fn, names, isthing)

    def __repr__(self) -> str:
        return (f"PQStat(categories={len(self.category_ids)}, images={self.images}, tp={int(self.tp.sum())}, "
                f"fp={int(self.fp.sum())}, fn={int(self.fn.sum())})")


def _index(seg_map: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Each pixel's position in ``ids`` (sorted, VOID first); an id not in ``ids`` is an error."""
    flat = seg_map.reshape(-1)
    idx = np.searchsorted(ids, flat)
    np.minimum(idx, len(ids) - 1, out=idx)
    unknown = ids[idx] != flat
    if unknown.any():
        bad = np.unique(flat[unknown])
        raise MetricsInputError(f"{what}: segment id(s) {bad[:10].tolist()} in the segment map have no segments_info entry")
    return idx


def _intersections(g_idx: np.ndarray, n_gt: int, p_idx: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt index, pred index, pixel count) of every pair of segments that share pixels."""
    code = g_idx * n_pred + p_idx
    if n_gt * n_pred <= _DENSE_LIMIT:
        counts = np.bincount(code, minlength=n_gt * n_pred)
        cells = np.flatnonzero(counts)
        inter = counts[cells]
    else:
        cells, inter = np.unique(code, return_counts=True)
    g, p = np.divmod(cells, n_pred)
    return g, p, inter.astype(np.int64)


def _class_values(iou: float, tp: int, fp: int, fn: int) -> tuple[float | None, float | None, float | None]:
    if tp + fp + fn == 0:
        return None, None, None
    denom = tp + 0.5 * fp + 0.5 * fn
    return iou / denom, (iou / tp if tp else None), tp / denom


def _averages(rows: list[tuple[float | None, float | None, float | None]]) -> tuple[float | None, ...]:
    """Means over the scored classes; a scored class without a TP counts SQ 0 (as panopticapi)."""
    scored = [r for r in rows if r[0] is not None]
    if not scored:
        return None, None, None
    n = len(scored)
    return (sum(r[0] for r in scored) / n, sum(r[1] or 0.0 for r in scored) / n, sum(r[2] for r in scored) / n)


def compute(
    iou_sum: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
    names: Sequence[str], isthing: Sequence[bool],
) -> dict[str, Any]:
    """PQ, SQ, RQ of per-category accumulators (one entry per category, in ``names`` order).

    Per class: ``pq = iou_sum / (tp + fp/2 + fn/2)``, ``sq = iou_sum / tp``, ``rq = tp / (tp +
    fp/2 + fn/2)``; all None when ``tp + fp + fn = 0``, and ``sq`` None when ``tp = 0``.
    ``pq``, ``sq``, ``rq`` (and ``*_things``, ``*_stuff`` over the classes with that
    ``isthing``) are means over the classes with ``tp + fp + fn > 0``, None when there are none;
    as in panopticapi, a class with no TP adds 0 to the SQ mean. Also returns ``per_class``
    ``{name: {pq, sq, rq, tp, fp, fn}}``.
    """
    arrays = [np.asarray(a) for a in (iou_sum, tp, fp, fn)]
    k = len(names)
    if any(a.shape != (k,) for a in arrays) or len(isthing) != k:
        raise ValueError(f"{k} class names but accumulators of shapes {[a.shape for a in arrays]} "
                         f"and {len(isthing)} isthing flags")
    if len(set(names)) != k:
        dup = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"class names are not unique: {dup}")
    iou_sum, tp, fp, fn = arrays
    rows = [_class_values(float(iou_sum[c]), int(tp[c]), int(fp[c]), int(fn[c])) for c in range(k)]
    result: dict[str, Any] = {}
    for suffix, keep in (("", lambda c: True), ("_things", lambda c: bool(isthing[c])),
                         ("_stuff", lambda c: not isthing[c])):
        pq, sq, rq = _averages([rows[c] for c in range(k) if keep(c)])
        result.update({f"pq{suffix}": pq, f"sq{suffix}": sq, f"rq{suffix}": rq})
    result["per_class"] = {
        names[c]: {"pq": rows[c][0], "sq": rows[c][1], "rq": rows[c][2],
                   "tp": int(tp[c]), "fp": int(fp[c]), "fn": int(fn[c])}
        for c in range(k)
    }
    return result


# --------------------------------------------------------------------------------------
# COCO panoptic JSON files
# --------------------------------------------------------------------------------------


def parse_categories(doc: Any, source: str) -> tuple[list[int], list[str], list[bool]]:
    """(ids, names, isthing) of a COCO panoptic ground truth's ``categories``, in file order.

    Parsed as every COCO reader parses categories (``segpipe.formats.coco_files.parse_categories``),
    with ``isthing`` required (the thing / stuff split depends on it): every category needs an
    integer ``id``, a string ``name`` and ``isthing`` 0/1; ids and names must be unique. The
    first problem raises MetricsInputError naming ``source``.
    """
    cats = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(cats, list) or not cats:
        raise MetricsInputError(f"{source}: 'categories' missing, empty or not a list")
    classes, problems = coco_categories(cats, source, default_isthing=None)
    if problems:
        raise MetricsInputError(problems[0])
    return [c.id for c in classes], [c.name for c in classes], [c.isthing for c in classes]


def annotations_by_image(doc: Any, source: str) -> dict[Any, dict[str, Any]]:
    """A panoptic JSON's ``annotations`` by image id; each needs ``segments_info`` and a
    ``file_name`` that stays inside the PNG folder (no absolute path, no ``..`` above it)."""
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise MetricsInputError(f"{source}: 'annotations' missing or not a list")
    out: dict[Any, dict[str, Any]] = {}
    for i, ann in enumerate(anns):
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if not (_is_int(iid) or isinstance(iid, str)):
            raise MetricsInputError(f"{source}: annotations[{i}] has no integer or string 'image_id'")
        if iid in out:
            raise MetricsInputError(f"{source}: image id {iid!r} has two entries in 'annotations'")
        if not isinstance(ann.get("file_name"), str) or not ann["file_name"]:
            raise MetricsInputError(f"{source}: image id {iid!r} has no PNG 'file_name'")
        if (reason := escape_reason(ann["file_name"])) is not None:
            raise MetricsInputError(f"{source}: image id {iid!r}: file_name {ann['file_name']!r} {reason}; "
                                    "a PNG inside the PNG folder is expected")
        if not isinstance(ann.get("segments_info"), list):
            raise MetricsInputError(f"{source}: image id {iid!r}: 'segments_info' missing or not a list")
        out[iid] = ann
    return out


def match_images(
    gt: dict[Any, dict[str, Any]], pred: dict[Any, dict[str, Any]], gt_source: str, pred_source: str
) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    """``(image id, gt annotation, pred annotation)`` in ground-truth order; every ground-truth
    image needs a prediction and every prediction a ground-truth image."""
    missing = [iid for iid in gt if iid not in pred]
    if missing:
        raise MetricsInputError(
            f"{pred_source}: no prediction for {len(missing)} ground-truth image id(s), e.g. {missing[0]!r}")
    extra = [iid for iid in pred if iid not in gt]
    if extra:
        raise MetricsInputError(
            f"{pred_source}: prediction(s) for {len(extra)} image id(s) not in {gt_source}, e.g. {extra[0]!r}")
    return [(iid, ann, pred[iid]) for iid, ann in gt.items()]


def declared_sizes(doc: Any) -> dict[Any, tuple[int, int]]:
    """``{image id: (height, width)}`` from a JSON's ``images``, where given (optional in panoptic)."""
    images = doc.get("images") if isinstance(doc, dict) else None
    out = {}
    for img in images if isinstance(images, list) else []:
        if isinstance(img, dict) and _is_int(img.get("height")) and _is_int(img.get("width")):
            out[img.get("id")] = (int(img["height"]), int(img["width"]))
    return out
