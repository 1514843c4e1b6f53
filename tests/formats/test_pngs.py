"""The one label-PNG reader (every mode accepted or refused, the file named) and the one colour
policy for classes without a colour."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.formats.pngs import (
    LabelPngError,
    class_colour,
    label_colormap,
    read_id_png,
    read_label_png,
    read_rgb_png,
)

VALUES = np.array([[0, 1], [2, 255]], np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    Image.fromarray(arr, mode).save(path, **kwargs)
    return path


def _palette(path: Path) -> Path:
    im = Image.fromarray(VALUES, "P")
    im.putpalette([v for c in label_colormap(256) for v in c][::-1])  # colours unrelated to the indices
    im.save(path)
    return path


@pytest.mark.parametrize("make, dtype, expected", [
    (lambda p: _palette(p), np.uint8, VALUES),                                 # indices, never colours
    (lambda p: _save(p, VALUES, "L"), np.uint8, VALUES),
    (lambda p: _save(p, np.array([[0, 1], [1, 0]], bool)), np.uint8, [[0, 1], [1, 0]]),   # mode "1"
    (lambda p: _save(p, np.array([[0, 300], [65535, 7]], np.uint16)), np.uint16, [[0, 300], [65535, 7]]),
    # mode "I", as Pillow opens some 16-bit files: 0..65535 as uint16
    (lambda p: _save(p, np.array([[0, 300], [65535, 7]], np.int32), "I", format="TIFF"), np.uint16,
     [[0, 300], [65535, 7]]),
])
def test_single_channel_modes_give_their_values(tmp_path, make, dtype, expected):
    got = read_label_png(make(tmp_path / "label.png"))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, r"label.png: file not found"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really"), r"label.png: cannot decode"),
    (lambda p: _save(p, np.zeros((2, 2, 3), np.uint8)), r"label.png: PNG mode 'RGB' is not a single-channel label map"),
    (lambda p: _save(p, np.zeros((2, 2, 4), np.uint8)), r"label.png: PNG mode 'RGBA' is not a single-channel label map"),
    (lambda p: _save(p, np.array([[-1, 7]], np.int32), "I", format="TIFF"), r"label.png: label values -1..7 outside 0..65535"),
])
def test_refused_files_are_named(tmp_path, make, message):
    path = tmp_path / "label.png"
    make(path)
    with pytest.raises(LabelPngError, match=message):
        read_label_png(path)


def test_colour_pngs_only_through_a_colour_table_or_as_grey(tmp_path):
    grey = _save(tmp_path / "grey.png", np.repeat(VALUES[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read_label_png(grey, grey_rgb=True), VALUES)
    colours = {c: i for i, c in enumerate(label_colormap(256))}
    voc = _save(tmp_path / "voc.png", np.array(label_colormap(256), np.uint8)[VALUES])
    got = read_label_png(voc, colours)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, VALUES)
    with pytest.raises(LabelPngError, match=r"voc.png: PNG mode 'RGB' holds colours \(R, G, B differ\)"):
        read_label_png(voc, grey_rgb=True)
    with pytest.raises(LabelPngError, match=r"voc.png: 1 colour\(s\) not in the colour table, e.g. \[\(224, 224, 192\)\]"):
        read_label_png(voc, {c: i for c, i in colours.items() if i != 255})
    # A table of large values gives a dtype that holds them.
    assert read_label_png(voc, {c: i + 1000 for c, i in colours.items()}).dtype == np.uint16


def test_rgb_pngs_refuse_single_channel_files_saying_what_they_are(tmp_path):
    rgb = _save(tmp_path / "seg.png", np.array([[[1, 2, 3]]], np.uint8))
    assert read_rgb_png(rgb, "x").tolist() == [[[1, 2, 3]]]
    assert read_id_png(rgb).tolist() == [[1 + 2 * 256 + 3 * 65536]]
    with pytest.raises(LabelPngError, match=r"l.png: mode 'L', an ADE20K _seg.png is RGB"):
        read_rgb_png(_save(tmp_path / "l.png", VALUES, "L"), "an ADE20K _seg.png is RGB")
    with pytest.raises(LabelPngError, match=r"l.png: mode 'L', a panoptic PNG is RGB"):
        read_id_png(tmp_path / "l.png")


def test_class_colour_is_the_voc_colour_map_and_does_not_wrap():
    assert [class_colour(i) for i in range(256)] == list(label_colormap(256))
    assert class_colour(0) == (0, 0, 0) and class_colour(1) == (128, 0, 0) and class_colour(255) == (224, 224, 192)
    assert len({class_colour(i) for i in range(4096)}) == 4096  # no repeat past 255, unlike a 256-entry table
    assert class_colour(256) == (0, 0, 32)
