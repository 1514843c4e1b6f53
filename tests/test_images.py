"""A decompression bomb is refused from its header, before any decoding, wherever an image is opened."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.images import ImageError, ImageTooLarge, open_image

# 21000 x 21000 = 441 M pixels: over predict's 400 M limit but under twice it, where Pillow only
# warns and decodes (the issue measured 5.8 GB and 90 s before it was stopped).
BOMB = (21_000, 21_000)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR of the given size, a tiny IDAT and IEND: a few dozen bytes
    that claim width x height pixels (nothing that size is ever allocated here)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused_quickly(call) -> Exception:
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge) as e:
        call()
    assert time.perf_counter() - start < 0.5, "the header alone decides; nothing may be decoded"
    return e.value


def test_open_image_refuses_a_441_megapixel_header_in_milliseconds(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(*BOMB))
    err = refused_quickly(lambda: open_image(path, 400_000_000))
    assert str(path) in str(err) and "21000 x 21000 = 441000000 pixels" in str(err)
    err = refused_quickly(lambda: open_image(path.read_bytes(), 400_000_000, name="upload.png"))
    assert str(err).startswith("upload.png: ")


def test_open_image_opens_without_decoding_under_the_limit(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), 9, np.uint8)).save(buf, "PNG")
    with open_image(buf.getvalue(), 48) as im:
        assert im.size == (8, 6) and np.asarray(im.convert("RGB"))[0, 0, 0] == 9
    with pytest.raises(ImageTooLarge, match="over max_image_pixels=47"):
        open_image(buf.getvalue(), 47)
    with pytest.raises(ImageError, match="not a decodable image"):
        open_image(b"not an image", 48)
    with pytest.raises(ImageError, match="missing.png: image file not found"):
        open_image(Path(tmp_path / "missing.png"), 48)


def test_predict_refuses_the_441_megapixel_png(tmp_path):
    predict = pytest.importorskip("segpipe.commands.predict")
    path = tmp_path / "site.png"
    path.write_bytes(png_header(*BOMB))
    err = refused_quickly(lambda: predict.read_image(path))
    assert str(err).startswith(f"{path}: ") and "over the predict limit=400000000" in str(err)


def test_label_pngs_are_refused_from_the_header(tmp_path):
    from segpipe.formats.pngs import MAX_LABEL_PIXELS, LabelPngError, read_png

    path = tmp_path / "mask.png"
    path.write_bytes(png_header(20_000, MAX_LABEL_PIXELS // 20_000 + 1))
    start = time.perf_counter()
    with pytest.raises(LabelPngError, match="mask.png: .* over the label-map limit"):
        read_png(path)
    assert time.perf_counter() - start < 0.5
