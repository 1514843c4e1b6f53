"""COCO detection / instance-segmentation metrics, equal to pycocotools' COCOeval, computed by
faster-coco-eval (its C++ per-image matching and accumulation, ``COCOeval_faster``).

Ground truth and detections are validated first (the C code reads past buffers on malformed RLE
strings, counts that do not sum to the image area, or polygons that are really boxes) and every
error names the annotation or detection at fault. COCOeval's ``-1`` ("no ground truth in this
category / area range") is reported as None. ``segm`` results also carry ``boundary_AP``: AP with
detections matched on min(mask IoU, boundary IoU) (Cheng et al., *Boundary IoU*, 2021). The tests
hold the numbers equal to pycocotools' COCOeval. See ``docs/metrics.md``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from numbers import Real
from typing import Any

import numpy as np

from segpipe.metrics.boundary import DEFAULT_RATIO, check_ratio
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
    try:
        if type(v) is float or type(v) is int:  # JSON's numbers, without the slower ABC check
            return math.isfinite(v)
        return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))
    except OverflowError:  # an int beyond float range
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _new_id(entry: Any, what: str, seen: Any, source: str) -> Any:
    """The integer ``id`` of a ground-truth ``images`` / ``categories`` entry, not in ``seen``."""
    eid = entry.get("id") if isinstance(entry, dict) else None
    if not _is_int(eid):
        raise MetricsInputError(f"{source}: {what} {entry!r:.80} has no integer 'id'")
    if eid in seen:
        raise MetricsInputError(f"{source}: duplicate {what} id {eid}")
    return eid


# Numbers of more than this many 5-bit groups (>= 2^40) are left to the pure-Python decoder, so
# that the vectorised one never overflows int64.
_MAX_GROUPS = 8
_CHUNK_CHARS = 1 << 16


def first_bad_rle_string(strings: Sequence[str], areas: Sequence[int]) -> int | None:
    """Index of the first compressed RLE ``counts`` string that is not well formed (a character
    outside the alphabet, a truncated last number), has a negative run or whose runs do not sum
    to ``areas[i]``; None when every string is fine.

    One vectorised pass over all strings (what :func:`rle_string_to_counts` does one character
    at a time). It may flag a valid string holding a number of more than 40 bits, which only the
    pure-Python decoder reads; it never passes an invalid one.
    """
    n = len(strings)
    if n == 0:
        return None
    lens = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    joined = "".join(strings)
    try:
        codes = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:  # flagged below as outside the alphabet
        codes = np.minimum(np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32), 255).astype(np.uint8)
    c = codes - np.uint8(48)  # wraps: every character outside "0".."o" becomes > 63
    char_end = np.cumsum(lens)  # one past each string's last character

    def string_of(pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(char_end, pos, side="right")

    bad = np.zeros(n, dtype=bool)
    outside = np.flatnonzero(c > 63)
    bad[string_of(outside)] = True
    is_end = (c & np.uint8(0x20)) == 0
    last = (char_end - 1)[lens > 0]
    bad[string_of(last[~is_end[last]])] = True  # the string ends inside a number
    is_end[last] = True  # numbers never run across strings
    ends = np.flatnonzero(is_end)
    m = ends.size
    # a number is 5-bit groups, lowest first, the last one's bit 0x10 the sign: most numbers are
    # one character (-16..15), the few longer ones are assembled below
    v = c & np.uint8(0x1F)
    top5 = v[ends].view(np.int8)
    vals = ((top5 ^ np.int8(16)) - np.int8(16)).astype(np.int64)  # 5-bit two's complement
    multi = np.flatnonzero(ends[1:] - ends[:-1] > 1) + 1
    if m and ends[0] > 0:
        multi = np.concatenate([[0], multi])
    if multi.size:
        starts = np.where(multi > 0, ends[multi - 1] + 1, 0)
        groups = ends[multi] - starts + 1
        bad[string_of(ends[multi[groups > _MAX_GROUPS]])] = True
        g = np.minimum(groups, _MAX_GROUPS)
        top = vals[multi] << (5 * (g - 1))
        for k in range(int(g.max()) - 1):
            low = np.flatnonzero(g - 1 > k)
            top[low] += v[starts[low] + k].astype(np.int64) << (5 * k)
        vals[multi] = top
    # runs after the second are deltas to the run two before: within a string, cumulative sums
    # over its odd and its even (>= 2) positions. One cumulative sum per parity of the global
    # number index, less its value before the string (int64 sums may wrap, but exactly, so the
    # differences are right for every string not already flagged).
    per_string = np.diff(np.searchsorted(ends, char_end), prepend=0)
    first = np.cumsum(per_string) - per_string
    has = per_string > 0
    y = vals.copy()
    y[first[has]] = 0
    runs = np.empty_like(vals)
    for parity in (0, 1):
        chain = np.cumsum(y[parity::2])
        upto = (first + 1 - parity) // 2  # this parity's numbers before each string
        before = np.where(upto > 0, chain[np.maximum(upto - 1, 0)], 0) if chain.size else np.zeros(n, np.int64)
        runs[parity::2] = chain - np.repeat(before, (first + per_string + 1 - parity) // 2 - upto)
    runs[first[has]] = vals[first[has]]
    if m and runs.min() < 0:
        bad[np.searchsorted(first + per_string, np.flatnonzero(runs < 0), side="right")] = True
    totals = np.zeros(n, np.int64)
    if m:
        totals[has] = np.add.reduceat(runs, first[has])
    bad |= totals != np.asarray(areas, dtype=np.int64)
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


class _Segmentations:
    """Checks segmentations one by one, except the compressed RLE strings, which are decoded at
    the end, all at once (:meth:`check_strings`). ``describe(key)`` names the annotation or
    detection ``key`` in errors (built only for an error)."""

    def __init__(self, describe: Callable[[Any], str]) -> None:
        self.describe = describe
        self.strings: list[str] = []
        self.areas: list[int] = []
        self.pending: list[tuple[Any, int, int, Any]] = []

    def add_all(self, segs: list[Any], shapes: list[tuple[int, int]]) -> None:
        """``add(segs[i], *shapes[i], i)`` for every ``i``; at once when all are compressed RLE
        dicts of the right size, as in a results file."""
        if all(type(seg) is dict and type(seg.get("counts")) is str and type(size := seg.get("size")) is list
               and len(size) == 2 and type(size[0]) is int and type(size[1]) is int and size[0] == h and size[1] == w
               for seg, (h, w) in zip(segs, shapes)):
            self.strings += [seg["counts"] for seg in segs]
            self.areas += [h * w for h, w in shapes]
            self.pending += [(seg, h, w, i) for i, (seg, (h, w)) in enumerate(zip(segs, shapes))]
            return
        for i, (seg, (h, w)) in enumerate(zip(segs, shapes)):
            self.add(seg, h, w, i)

    def add(self, seg: Any, h: int, w: int, key: Any) -> None:
        """A polygon list or an RLE dict of an ``h x w`` image, safe for the COCO C code."""
        if type(seg) is dict:  # the common case first: a JSON compressed RLE of the right size
            counts, size = seg.get("counts"), seg.get("size")
            if (type(counts) is str and type(size) is list and len(size) == 2
                    and type(size[0]) is int and type(size[1]) is int and size[0] == h and size[1] == w):
                self.strings.append(counts)
                self.areas.append(h * w)
                self.pending.append((seg, h, w, key))
                return
        where = self.describe(key)
        if isinstance(seg, list):
            if not seg:
                raise MetricsInputError(f"{where}: empty polygon list")
            for i, poly in enumerate(seg):
                # frPyObjects takes a flat list of 4 numbers for a box, so a polygon needs >= 3 points
                if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                    raise MetricsInputError(
                        f"{where}: polygon {i} must be a flat list of an even number (>= 6) of coordinates")
                if not _all_numbers(poly):
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
            self.strings.append(counts)
            self.areas.append(h * w)
            self.pending.append((seg, h, w, key))
            return
        if isinstance(counts, list):
            if not all(_is_int(v) for v in counts):
                raise MetricsInputError(f"{where}: uncompressed RLE counts must be integers")
            _check_runs(counts, h, w, where)
            return
        raise MetricsInputError(f"{where}: RLE counts must be a string or a list of integers")

    def check_strings(self) -> None:
        """Decode every compressed string added; raise for the first bad one."""
        start, n = 0, len(self.strings)
        while start < n:
            # a few hundred thousand characters at a time: the int64 temporaries stay in cache
            stop, chars = start, 0
            while stop < n and chars < _CHUNK_CHARS:
                chars += len(self.strings[stop])
                stop += 1
            i = first_bad_rle_string(self.strings[start:stop], self.areas[start:stop])
            if i is None:
                start = stop
                continue
            seg, h, w, key = self.pending[start + i]
            _check_rle_string(seg["counts"], h, w, self.describe(key))  # raises, except on > 40-bit numbers
            start += i + 1


def _check_rle_string(counts: str | bytes, h: int, w: int, where: str) -> None:
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii", errors="replace")
    try:
        runs = rle_string_to_counts(counts)
    except ValueError as e:
        raise MetricsInputError(f"{where}: malformed RLE counts string: {e}") from None
    _check_runs(runs, h, w, where)


def _check_runs(runs: Sequence[int], h: int, w: int, where: str) -> None:
    if any(r < 0 for r in runs):
        raise MetricsInputError(f"{where}: RLE has a negative run length")
    if sum(runs) != h * w:
        raise MetricsInputError(f"{where}: RLE run lengths sum to {sum(runs)}, expected {h} x {w} = {h * w}")


def _check_bbox(bbox: Any, where: str) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise MetricsInputError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise MetricsInputError(f"{where}: bbox has a negative width or height: {list(bbox)}")


# The bulk checks below accept a list only when the item-by-item checks would accept every item
# (they may refuse more, e.g. numpy integers); then the item-by-item checks run and name the
# first item at fault. They exist for speed: a results file has ~100 detections per image.


def _all_numbers(values: list[Any]) -> bool:
    """Whether every value is a finite JSON number (an int or a float, not a bool)."""
    if not all(type(v) is float or type(v) is int for v in values):
        return all(_is_number(v) for v in values)
    try:
        return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
    except OverflowError:  # an int beyond float range
        return False


def _boxes_look_valid(boxes: list[Any]) -> bool:
    if not all(type(b) is list and len(b) == 4 for b in boxes):
        return False
    if not all(type(v) is float or type(v) is int for b in boxes for v in b):
        return False
    try:
        arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    except OverflowError:  # an int beyond float range
        return False
    return bool(np.isfinite(arr).all() and (arr[:, 2:] >= 0).all())


def _annotations_look_valid(anns: list[Any], sizes: dict[Any, Any], cats: set[Any], iou_type: str) -> bool:
    try:
        if not all(type(a) is dict for a in anns):
            return False
        ids = [a.get("id") for a in anns]
        if not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
            return False
        if not ({a.get("image_id") for a in anns} <= sizes.keys() and {a.get("category_id") for a in anns} <= cats):
            return False
        if not all(type(c) is int and (c == 0 or c == 1) for c in (a.get("iscrowd", 0) for a in anns)):
            return False
        areas = [a.get("area") for a in anns]
        if not (all(type(v) is float or type(v) is int for v in areas) and _all_numbers(areas)
                and all(v >= 0 for v in areas)):
            return False
        boxes = [a["bbox"] for a in anns if "bbox" in a]
        if iou_type == "bbox" and len(boxes) != len(anns):
            return False
        return _boxes_look_valid(boxes) and (iou_type != "segm" or all("segmentation" in a for a in anns))
    except TypeError:  # e.g. an unhashable id: the item-by-item check names it
        return False


def _check_annotation(i: int, ann: Any, ann_ids: set[Any], sizes: dict[Any, Any], cats: set[Any],
                      iou_type: str, source: str) -> None:
    if not isinstance(ann, dict):
        raise MetricsInputError(f"{source}: annotation #{i} is not an object")
    aid = ann.get("id")
    where = f"{source}: annotation id {aid}"
    if not _is_int(aid):
        raise MetricsInputError(f"{source}: annotation #{i} has no integer 'id'")
    if aid in ann_ids:
        raise MetricsInputError(f"{where}: duplicate annotation id")
    ann_ids.add(aid)
    if not _hashable(ann.get("image_id")) or ann.get("image_id") not in sizes:
        raise MetricsInputError(f"{where}: image_id {ann.get('image_id')!r} is not in images")
    if not _hashable(ann.get("category_id")) or ann.get("category_id") not in cats:
        raise MetricsInputError(f"{where}: category_id {ann.get('category_id')!r} is not in categories")
    crowd = ann.get("iscrowd", 0)
    if not _hashable(crowd) or crowd not in (0, 1) or isinstance(crowd, float):
        raise MetricsInputError(f"{where}: iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
    area = ann.get("area")
    if not _is_number(area) or area < 0:
        raise MetricsInputError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
    if "bbox" in ann or iou_type == "bbox":
        _check_bbox(ann.get("bbox"), where)
    if iou_type == "segm" and "segmentation" not in ann:
        raise MetricsInputError(f"{where}: no 'segmentation' (needed for segm evaluation)")


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


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
    anns = gt["annotations"]
    if not _annotations_look_valid(anns, sizes, cats, iou_type):
        ann_ids: set[Any] = set()
        for i, ann in enumerate(anns):
            _check_annotation(i, ann, ann_ids, sizes, cats, iou_type, source)
    if iou_type == "segm":
        segs = _Segmentations(lambda i: f"{source}: annotation id {anns[i].get('id')}")
        segs.add_all([a["segmentation"] for a in anns], [sizes[a["image_id"]] for a in anns])
        segs.check_strings()


def _detections_look_valid(dets: list[Any], sizes: dict[Any, Any], cats: set[Any], iou_type: str, boxed: bool) -> bool:
    try:
        if not all(type(d) is dict for d in dets):
            return False
        if not ({d.get("image_id") for d in dets} <= sizes.keys() and {d.get("category_id") for d in dets} <= cats):
            return False
        if not _all_numbers([d.get("score") for d in dets]):
            return False
        boxes = [d["bbox"] for d in dets if "bbox" in d]
        if len(boxes) != (len(dets) if iou_type == "bbox" or boxed else 0):
            return False
        return _boxes_look_valid(boxes) and (iou_type != "segm" or all("segmentation" in d for d in dets))
    except TypeError:  # e.g. an unhashable image_id: the item-by-item check names it
        return False


def _check_detection(i: int, d: Any, sizes: dict[Any, Any], cats: set[Any], iou_type: str, boxed: bool,
                     source: str) -> None:
    where = f"{source}: detection #{i}"
    if not isinstance(d, dict):
        raise MetricsInputError(f"{where}: not an object")
    iid = d.get("image_id")
    if not _hashable(iid) or iid not in sizes:
        raise MetricsInputError(f"{where}: image_id {iid!r} is not in the ground truth images")
    where += f" (image_id {iid})"
    if not _hashable(d.get("category_id")) or d.get("category_id") not in cats:
        raise MetricsInputError(f"{where}: category_id {d.get('category_id')!r} is not in the ground truth categories")
    if not _is_number(d.get("score")):
        raise MetricsInputError(f"{where}: 'score' must be a finite number, got {d.get('score')!r}")
    if iou_type == "bbox" or "bbox" in d:
        _check_bbox(d.get("bbox"), where)
    if iou_type == "segm":
        if "segmentation" not in d:
            raise MetricsInputError(f"{where}: no 'segmentation' (needed for segm evaluation)")
        if ("bbox" in d) != boxed:
            # COCO's results loader takes every detection's area from its box when the first
            # one has a box (and fails on a later one without)
            raise MetricsInputError(f"{where}: {'no' if boxed else 'a'} 'bbox' where detection #0 has "
                                    f"{'one' if boxed else 'none'}: give every detection a box, or none")


def validate_detections(dets: Any, gt: dict[str, Any], iou_type: str, source: str = "detections") -> None:
    """Check a COCO results list against the (validated) ground truth's images and categories."""
    if not isinstance(dets, list):
        raise MetricsInputError(f"{source}: expected a JSON list of detections")
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    boxed = bool(dets) and isinstance(dets[0], dict) and "bbox" in dets[0]
    if not _detections_look_valid(dets, sizes, cats, iou_type, boxed):
        for i, d in enumerate(dets):
            _check_detection(i, d, sizes, cats, iou_type, boxed, source)
    if iou_type == "segm":
        segs = _Segmentations(lambda i: f"{source}: detection #{i} (image_id {dets[i]['image_id']})")
        segs.add_all([d["segmentation"] for d in dets], [sizes[d["image_id"]] for d in dets])
        segs.check_strings()


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _compressed(seg: Any, h: int, w: int) -> dict[str, Any]:
    """A validated polygon / uncompressed RLE as a compressed RLE (COCO's results loader only
    takes compressed RLE)."""
    from faster_coco_eval.core import mask as mask_util

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


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def run_cocoeval(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str,
                 boundary_ratio: float = DEFAULT_RATIO) -> Any:
    """faster-coco-eval's ``COCOeval_faster`` evaluated, accumulated and summarised on validated
    input (``iou_type`` ``segm``, ``bbox`` or ``boundary``); ``gt`` and ``dets`` are not modified.

    The engine writes into the annotation dicts it is given (ids, areas, its RLEs), so it gets
    shallow copies. Ground-truth annotations are numbered 1..N in their order: COCOeval keeps the
    matched annotation's id as its match marker, where 0 means "unmatched", so pycocotools scores
    an annotation whose id is 0 as never matched.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(print_function=_quiet)
    coco_gt.dataset = {"images": [dict(img) for img in gt["images"]],
                       "categories": [dict(c) for c in gt["categories"]],
                       "annotations": [{**a, "id": n} for n, a in enumerate(gt["annotations"], 1)]}
    coco_gt.createIndex()
    results = [dict(d) for d in dets]
    if iou_type != "bbox":
        sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
        for d in results:
            seg = d["segmentation"]
            if type(seg) is not dict or type(seg["counts"]) is not str:
                d["segmentation"] = _compressed(seg, *sizes[d["image_id"]])
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_quiet, boundary_dilation_ratio=boundary_ratio)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: parsing and scoring a results file
    makes millions of dicts, lists and floats, and the collector's repeated passes over them cost
    more than the work itself (a third of ``segpipe metrics coco``'s time on 50 000 detections).
    Nothing here makes reference cycles; whatever does is collected once it is back on. For
    callers that parse or hold large COCO documents; the evaluation does not pause it itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def evaluate_coco(
    gt: dict[str, Any],
    dets: list[dict[str, Any]],
    iou_type: str,
    gt_source: str = "ground truth",
    dt_source: str = "detections",
    boundary_ratio: float | None = DEFAULT_RATIO,
) -> dict[str, Any]:
    """COCO metrics of ``dets`` against ``gt``: ``{iou_type: {AP, AP50, ..., ARl}, "per_class": {name: AP}}``.

    Equal to pycocotools' COCOeval ``stats`` (tested to 1e-6, see ``docs/metrics.md``). Values are
    fractions in [0, 1]; None where COCOeval reports -1 (no ground truth in that category or area
    range). An empty detection list scores 0 wherever ground truth exists. For ``segm``, the block
    also has ``boundary_AP``: AP@[.5:.95] (all areas, 100 detections) matching on min(mask IoU,
    boundary IoU) with boundaries ``boundary_ratio`` x the image diagonal wide (crowd regions on
    mask IoU alone); ``boundary_ratio=None`` leaves it out (it costs several times the mask
    evaluation). Inputs are validated first and not modified.
    """
    validate_ground_truth(gt, iou_type, gt_source)
    validate_detections(dets, gt, iou_type, dt_source)
    if boundary_ratio is not None:
        boundary_ratio = check_ratio(boundary_ratio, "boundary_ratio")
    ev = run_cocoeval(gt, dets, iou_type)
    stats: dict[str, float | None] = {name: _none_if_undefined(v) for name, v in zip(STAT_NAMES, ev.stats)}
    if iou_type == "segm" and boundary_ratio is not None:
        stats["boundary_AP"] = _none_if_undefined(run_cocoeval(gt, dets, "boundary", boundary_ratio).stats[0])
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
