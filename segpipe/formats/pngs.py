"""Label PNGs as the datasets store them: palette ("P") PNGs read as indices, not colours; 8- and
16-bit grey; RGB-encoded ids (COCO panoptic, ADE20K); colour-coded masks mapped back to indices.

Every failure raises ``LabelPngError`` naming the file, so a reader can turn it into a
``Record.problems`` entry and go on with the next image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from segpipe.errors import UserError
from segpipe.images import ImageTooLarge, open_image

# A label map this large is a decompression bomb, not a photo (the converter's default
# ``max_image_pixels`` is the same figure).
MAX_LABEL_PIXELS = 200_000_000


class LabelPngError(UserError, ValueError):
    """A label PNG is missing, unreadable, too large or holds values it should not."""


# Modes Pillow opens a colour PNG in; ``read_png`` gives them as H x W x 3 RGB.
COLOUR_MODES = ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB")
# One value per pixel: palette indices, 1/8-bit grey, 16-bit grey as Pillow names its byte
# orders, and "I" (32-bit), in which Pillow opens some 16-bit PNGs.
LABEL_MODES = ("P", "L", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")


def _decode(path: Path) -> tuple[np.ndarray, str, str]:
    """``(array, mode as read_png gives it, mode as stored)``."""
    if not path.is_file():
        raise LabelPngError(f"{path}: file not found")
    try:
        with open_image(path, MAX_LABEL_PIXELS, name="", limit_name="the label-map limit") as im:
            stored = mode = im.mode
            if mode in COLOUR_MODES:
                arr = np.asarray(im.convert("RGB"))
                mode = "RGB"
            elif mode == "1":
                arr = np.asarray(im, dtype=np.uint8)
            elif mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.uint16)
            elif mode in ("P", "L", "I"):
                arr = np.asarray(im)
            else:
                raise LabelPngError(f"{path}: unsupported PNG mode {mode!r} for a label map")
    except LabelPngError:
        raise
    except ImageTooLarge as exc:
        raise LabelPngError(f"{path}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise LabelPngError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from exc
    return arr, mode, stored


def read_png(path: Path) -> tuple[np.ndarray, str]:
    """Decode ``path`` as stored: ``(array, mode)``. "P" gives the palette indices (H x W uint8),
    "L"/"1" H x W uint8, 16-bit grey H x W uint16, "I" H x W int32, colour modes (RGB, RGBA,
    LA, ...) H x W x 3 uint8 with mode "RGB"."""
    arr, mode, _ = _decode(path)
    return arr, mode


def read_label_png(path: Path, colours: Mapping[tuple[int, int, int], int] | None = None, *,
                   grey_rgb: bool = False) -> np.ndarray:
    """A label PNG as the H x W map of the values it stores (class ids, instance ids, indices).

    Single-channel PNGs (``LABEL_MODES``) give their values: palette ("P") PNGs their indices,
    never their colours; "L" and "1" uint8; 16-bit grey, and "I" (as Pillow opens some 16-bit
    PNGs), uint16 (an "I" value outside 0..65535 is an error). A colour PNG is a label map only
    where its format says how: through ``colours`` (colour -> value; any other colour is an
    error), or with ``grey_rgb`` when R == G == B (the grey value); otherwise it is refused.
    Every failure raises ``LabelPngError`` naming the file.
    """
    arr, mode, stored = _decode(path)
    if mode == "RGB":
        if colours is not None:
            indices = colours_to_indices(arr, colours, path)
            return indices.astype(label_dtype(max(colours.values(), default=0)))
        if not grey_rgb:
            raise LabelPngError(
                f"{path}: PNG mode {stored!r} is not a single-channel label map (expected one of "
                f"{', '.join(LABEL_MODES)}; colour PNGs (mode RGB, RGBA, ...) are read only by formats with a colour table)"
            )
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise LabelPngError(f"{path}: PNG mode {stored!r} holds colours (R, G, B differ) where a single-channel "
                                "(palette or grey) label map is expected")
        return np.ascontiguousarray(arr[..., 0])
    if mode == "I":
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise LabelPngError(f"{path}: label values {int(arr.min())}..{int(arr.max())} outside 0..65535")
        return arr.astype(np.uint16)
    return arr


def read_rgb_png(path: Path, what: str) -> np.ndarray:
    """An RGB-encoded label PNG (COCO panoptic segment ids, ADE20K's ``_seg.png``) as H x W x 3
    uint8; any other mode is an error naming the file and saying, as ``what``, what the PNG is."""
    rgb, mode, stored = _decode(path)
    if mode != "RGB":
        raise LabelPngError(f"{path}: mode {stored!r}, {what}")
    return rgb


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic segment ids: ``R + 256 G + 256^2 B`` (H x W x 3 uint8 -> H x W int64)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


MAX_RGB_ID = (1 << 24) - 1


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of ``rgb_to_id``: H x W integer ids in ``[0, 2^24)`` -> H x W x 3 uint8."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > MAX_RGB_ID):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"segment id {bad} cannot be stored as RGB (valid: 0..{MAX_RGB_ID})")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], axis=-1).astype(np.uint8)


def read_id_png(path: Path) -> np.ndarray:
    """Segment ids of an RGB-encoded id PNG (COCO panoptic), H x W int64; 0 is unlabelled."""
    return rgb_to_id(read_rgb_png(path, "a panoptic PNG is RGB (id = R + 256 G + 256^2 B)"))


def colours_to_indices(rgb: np.ndarray, colours: Mapping[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """Map every pixel's colour to its index in ``colours``; any other colour is an error that
    lists (up to five of) the unknown colours."""
    packed = rgb_to_id(rgb)
    uniq, inverse = np.unique(packed, return_inverse=True)
    lut = np.empty(len(uniq), dtype=np.int64)
    unknown = []
    for i, v in enumerate(uniq.tolist()):
        colour = (v & 255, (v >> 8) & 255, v >> 16)
        if colour in colours:
            lut[i] = colours[colour]
        else:
            unknown.append(colour)
    if unknown:
        raise LabelPngError(
            f"{path}: {len(unknown)} colour(s) not in the colour table, e.g. {unknown[:5]}"
        )
    return lut[inverse.reshape(packed.shape)]


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The colour of class ``class_id`` when its source gives it none: the PASCAL VOC colour
    map's entry for the id (the bits of the id spread over R, G, B from the high bit down).

    Why this policy, for every reader: VOC's palette PNGs carry exactly these colours and the VOC
    and mask-dir readers colour their classes with them, so a class id has the same colour in
    every converted dataset, whichever format it came from; it depends on the id alone (no table
    to keep, nothing random); and the map goes on past 255 without repeating (ids below 2^24
    get distinct colours), where indexing a 256-entry table would wrap. Ids are taken modulo 2^24.
    """
    r = g = b = 0
    c = class_id % (1 << 24)
    for shift in range(7, -1, -1):
        r |= (c & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return (r, g, b)


@functools.lru_cache(maxsize=4)
def label_colormap(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The first ``n`` entries of the PASCAL VOC colour map (``class_colour`` of 0..n-1), which
    VOC's palette PNGs carry."""
    return tuple(class_colour(i) for i in range(n))


def label_dtype(max_value: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds class ids up to ``max_value`` (and the ignore index)."""
    return np.uint8 if max_value < 256 else np.uint16 if max_value < 65536 else np.uint32


def _identity(arr: np.ndarray) -> np.ndarray:
    return arr


def loaded(arr: np.ndarray) -> Callable[[], np.ndarray]:
    """A picklable ``Record.semantic`` for a label map the reader has already decoded (and checked)."""
    return functools.partial(_identity, arr)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight ``[x, y, w, h]`` of a non-empty H x W bool mask, in pixel units."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]
