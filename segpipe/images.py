"""Opening images without decoding a decompression bomb.

Pillow reads only the header on ``Image.open``; decoding happens later (``load``, ``convert``,
``np.asarray``). :func:`open_image` checks width x height from that header against a limit and
refuses the image before anything is decoded, so a few KB of PNG that would inflate to
gigabytes is refused in milliseconds. Pillow's own guard is not enough: it only warns up to
twice ``Image.MAX_IMAGE_PIXELS`` and decodes anyway. Every place segpipe decodes an image file
(convert and validate, and through them the ingest flow; label PNGs of every format; predict;
``segpipe metrics``) opens it here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from segpipe.errors import UserError


class ImageError(UserError, ValueError):
    """An image file is missing, not decodable, or over the pixel limit; names the file."""


class ImageTooLarge(ImageError):
    """width x height from the header exceeds the limit; the image was not decoded."""


def open_image(source: Path | str | bytes, max_pixels: int, name: str | None = None,
               limit_name: str = "max_image_pixels") -> Image.Image:
    """Open ``source`` (a path, or the encoded bytes) reading only its header.

    Raises ImageTooLarge when width x height exceeds ``max_pixels`` and ImageError when the
    header is not an image; messages start with ``name`` (default: the path) when there is one.
    The returned image is not decoded yet; use it in a ``with`` block.
    """
    if name is None and not isinstance(source, bytes):
        name = str(source)
    prefix = f"{name}: " if name else ""
    # Pillow's check must never fire before ours: it would refuse images under our limit (its
    # default is 89 M pixels) or, between 1x and 2x its limit, only warn.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{prefix}{e} (over {limit_name}={max_pixels}; not decoded)") from None
    except FileNotFoundError:
        raise ImageError(f"{prefix}image file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{prefix}not a decodable image: {e}") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageTooLarge(f"{prefix}image is {width} x {height} = {width * height} pixels, over "
                            f"{limit_name}={max_pixels} (decompression bomb?); it was not decoded")
    return im
