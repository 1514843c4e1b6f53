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


def read_png(path: Path) -> tuple[np.ndarray, str]:
    """Decode ``path`` as stored: ``(array, mode)``. "P" gives the palette indices (H x W uint8),
    "L"/"1" H x W uint8, 16-bit grey H x W uint16, "I" H x W int32, RGB(A) H x W x 3 uint8."""
    if not path.is_file():
        raise LabelPngError(f"{path}: file not found")
    try:
        with open_image(path, MAX_LABEL_PIXELS, name="", limit_name="the label-map limit") as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
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
    return arr, mode


def read_index_png(path: Path) -> np.ndarray:
    """An H x W map of integer values: palette indices, grey values, or 16/32-bit values.
    RGB files are accepted only when they are grey (R == G == B)."""
    arr, mode = read_png(path)
    if mode == "RGB":
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise LabelPngError(f"{path}: RGB label map where an index (palette or grey) PNG is expected")
        return np.ascontiguousarray(arr[..., 0])
    return arr


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
    rgb, mode = read_png(path)
    if mode != "RGB":
        raise LabelPngError(f"{path}: mode {mode!r}, a panoptic PNG is RGB (id = R + 256 G + 256^2 B)")
    return rgb_to_id(rgb)


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


@functools.lru_cache(maxsize=4)
def label_colormap(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (bits of the index spread over R, G, B from the high bit down),
    which VOC's palette PNGs carry and which also colours classes that bring no colour."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


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
