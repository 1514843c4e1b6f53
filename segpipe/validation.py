"""The converter's checks, as pure functions over plain Python/numpy values.

Each ``check_*`` returns None when the item is fine, or a reason string saying what is wrong
and what would be valid. Everything an annotation carries is checked here before any of it
reaches pycocotools' C code, which crashes on some malformed RLEs and polygons.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

# Coordinates beyond this many image sizes outside the image are treated as garbage: a polygon
# may poke slightly past the border (it is clipped on rasterisation), never by kilometres.
ABSURD_FACTOR = 1.0
# Box edges may exceed the image by this many pixels (float rounding in exporters).
BBOX_TOLERANCE = 1.0
# Dimensions larger than this cannot be real images (pycocotools uses 32-bit sizes).
MAX_SIDE = 1 << 20


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Decode a COCO compressed RLE string into run lengths, in pure Python.

    The format stores each run as 5-bit groups in characters ``48..111`` (bit 0x20 = more
    groups follow, bit 0x10 of the last group = sign), and runs after the second as deltas to
    the run two before. Raises ValueError on any character outside the alphabet, an
    unterminated run, or a negative run length.
    """
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("RLE counts are not ASCII") from None
    runs: list[int] = []
    value, shift, more = 0, 0, False
    for pos, ch in enumerate(counts):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"RLE counts contain invalid character {ch!r} at position {pos}")
        value |= (c & 0x1F) << shift
        shift += 5
        more = bool(c & 0x20)
        if more:
            if shift > 40:
                raise ValueError(f"RLE run at position {pos} is longer than any image")
            continue
        if c & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"RLE run {len(runs)} is negative ({value})")
        runs.append(value)
        value, shift = 0, 0
    if more:
        raise ValueError("RLE counts end in the middle of a run")
    return runs


def check_size(size: Any, height: int, width: int) -> str | None:
    """An RLE ``size`` must be [h, w] of the image."""
    if not (isinstance(size, Sequence) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"RLE size {size!r} is not [height, width]"
    if list(size) != [height, width]:
        return f"RLE size {list(size)} differs from the image size [{height}, {width}]"
    return None


def check_rle(seg: dict[str, Any], height: int, width: int) -> str | None:
    """A COCO RLE dict (compressed string or uncompressed list counts) for an h x w image."""
    if "counts" not in seg or "size" not in seg:
        return f"RLE needs 'counts' and 'size', got keys {sorted(seg)}"
    if reason := check_size(seg["size"], height, width):
        return reason
    counts = seg["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_counts(counts)
        except ValueError as e:
            return f"compressed RLE is malformed: {e}"
    elif isinstance(counts, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(counts)
        except ValueError:
            arr = np.asarray([], dtype=object)
        if len(counts) and (arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0):
            bad = next((v for v in counts if not _is_int(v) or v < 0), counts)
            return f"uncompressed RLE counts must be non-negative integers, got {bad!r}"
        runs = [int(v) for v in arr] if arr.size < 64 else arr.astype(np.int64)
    else:
        return f"RLE counts must be a string or a list of integers, got {type(counts).__name__}"
    total = int(sum(runs)) if isinstance(runs, list) else int(runs.sum())
    if total != height * width:
        return f"RLE counts sum to {total}, expected height x width = {height} x {width} = {height * width}"
    return None


def check_polygons(seg: Any, height: int, width: int) -> str | None:
    """A COCO polygon list: each polygon has an even count of at least 6 finite, sane numbers.

    A 4-number "polygon" is rejected rather than read as a box (pycocotools would).
    """
    if not isinstance(seg, (list, tuple)):
        return f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}"
    if len(seg) == 0:
        return "segmentation is empty (no polygon, no RLE: a box-only annotation has no mask)"
    for k, poly in enumerate(seg):
        if not isinstance(poly, (list, tuple, np.ndarray)):
            return f"polygon {k} is not a list of numbers"
        n = len(poly)
        if n < 6 or n % 2:
            return f"polygon {k} has {n} numbers; a polygon needs an even count of at least 6 (3 points)"
        # numpy infers a numeric dtype only when every element is a number (strings -> "U",
        # None / nested lists -> object), so one conversion checks types for long polygons.
        try:
            arr = np.asarray(poly)
        except ValueError:
            return f"polygon {k} is not a flat list of numbers"
        if arr.ndim != 1 or arr.dtype.kind not in "iuf":
            return f"polygon {k} has a non-numeric coordinate"
        arr = arr.astype(np.float64, copy=False)
        if not np.isfinite(arr).all():
            return f"polygon {k} has a non-finite coordinate (NaN or infinity)"
        xs, ys = arr[0::2], arr[1::2]
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
        if (x0 < -ABSURD_FACTOR * width or x1 > (1 + ABSURD_FACTOR) * width
                or y0 < -ABSURD_FACTOR * height or y1 > (1 + ABSURD_FACTOR) * height):
            return f"polygon {k} has absurd coordinates (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) for a {width} x {height} image"
    return None


def check_bbox(bbox: Any, height: int, width: int) -> str | None:
    """[x, y, w, h]: four finite numbers, non-negative size, inside the image (1 px tolerance)."""
    if not isinstance(bbox, (Sequence, np.ndarray)) or isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(_is_number(v) for v in bbox):
        return f"bbox {list(bbox)!r} has a non-numeric value"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"bbox {[x, y, w, h]} has a NaN or infinite value"
    if w < 0 or h < 0:
        return f"bbox {[x, y, w, h]} has a negative width or height"
    t = BBOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {[x, y, w, h]} lies outside the {width} x {height} image"
    return None


def check_annotation(ann: dict[str, Any], height: int, width: int, category_ids: Collection[int]) -> str | None:
    """One instance dict of a ``Record`` (see ``segpipe.formats.base``)."""
    cat = ann.get("category_id")
    if not _is_int(cat):
        return f"category_id {cat!r} is not an integer"
    if cat not in category_ids:
        return f"category_id {cat} is not declared (declared: {sorted(category_ids)})"
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float) and not crowd.is_integer():
        return f"iscrowd {crowd!r} must be 0 or 1"
    if ann.get("bbox") is not None and (reason := check_bbox(ann["bbox"], height, width)):
        return reason
    if "mask" in ann and ann["mask"] is not None:
        mask = ann["mask"]
        if not isinstance(mask, np.ndarray) or mask.ndim != 2:
            return "mask must be a 2-D array"
        if mask.shape != (height, width):
            return f"mask is {mask.shape[0]} x {mask.shape[1]}, the image is {height} x {width}"
        return None
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return check_rle(seg, height, width)
    return check_polygons(seg, height, width)


def check_class_names(classes: Iterable[tuple[int, str]]) -> str | None:
    """Class names must be unique (metrics, reports and evaluation look classes up by name):
    the first repeated name, with both ids, or None."""
    first: dict[str, int] = {}
    for cid, name in classes:
        if name in first:
            return (f"class ids {first[name]} and {cid} are both named {name!r}; every class needs its own name "
                    "(rename one, or merge the two into one id)")
        first[name] = cid
    return None


def check_image_size(width: int, height: int, max_pixels: int,
                     declared: tuple[int | None, int | None] = (None, None)) -> str | None:
    """Header size against the pixel budget and against the size the annotations declare.

    ``declared`` is (height, width) as the source states them (None = not stated).
    """
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE:
        return f"image size {width} x {height} is absurd"
    if width * height > max_pixels:
        return (f"image is {width} x {height} = {width * height} pixels, over max_image_pixels={max_pixels} "
                "(decompression bomb?)")
    dh, dw = declared
    if (dh is not None and dh != height) or (dw is not None and dw != width):
        return f"image is {width} x {height} but the annotations declare {dw} x {dh}"
    return None


def check_label_map(semantic: Any, height: int, width: int, class_ids: Collection[int],
                    ignore_index: int) -> str | None:
    """A semantic label map: 2-D, the image's size, integer, every value a class id or ignore."""
    if not isinstance(semantic, np.ndarray) or semantic.ndim != 2:
        shape = getattr(semantic, "shape", None)
        return f"label map must be a single-channel H x W array, got shape {shape}"
    if semantic.shape != (height, width):
        return f"label map is {semantic.shape[1]} x {semantic.shape[0]}, the image is {width} x {height}"
    if semantic.dtype.kind not in "ui":
        return f"label map has non-integer dtype {semantic.dtype}"
    valid = set(class_ids) | {ignore_index}
    if _all_in_ranges(semantic, _ranges(sorted(valid))):
        return None
    values = label_values(semantic)
    bad = [int(v) for v in values if int(v) not in valid]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        return f"label value(s) {shown} not in the class table (valid: {sorted(class_ids)}, ignore {ignore_index})"
    return None


def _ranges(values: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> maximal runs [(lo, hi)] of consecutive values."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _all_in_ranges(semantic: np.ndarray, ranges: list[tuple[int, int]]) -> bool:
    # Class tables are nearly always "0..K plus the ignore index": a few vectorised compares
    # over the map are several times faster than a bincount or a lookup table.
    if len(ranges) > 4:
        return bool(np.isin(semantic, [v for lo, hi in ranges for v in range(lo, hi + 1)]).all())
    ok = np.zeros(semantic.shape, bool)
    for lo, hi in ranges:
        ok |= (semantic >= lo) & (semantic <= hi) if lo != hi else semantic == lo
    return bool(ok.all())


def label_values(semantic: np.ndarray) -> np.ndarray:
    """The distinct values of a label map (bincount for small unsigned types: much faster)."""
    if semantic.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(semantic.ravel()))
    return np.unique(semantic)
