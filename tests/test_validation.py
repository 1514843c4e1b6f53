import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe.validation import (
    check_annotation,
    check_bbox,
    check_image_size,
    check_label_map,
    check_polygons,
    check_rle,
    rle_string_counts,
)

RESULTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "formats" / "coco_results"


def runs_to_mask(runs, h, w):
    flat = np.repeat(np.arange(len(runs), dtype=np.uint8) % 2, runs)  # runs alternate 0, 1, 0, ...
    return flat.reshape(w, h).T  # column-major


@pytest.mark.skipif(not RESULTS.is_dir(), reason="../shared/formats/coco_results not present")
def test_real_coco_rles_pass_and_decode_like_pycocotools():
    dets = json.loads((RESULTS / "instances_val2014_fakesegm100_results.json").read_text())
    assert len(dets) == 734
    for k, d in enumerate(dets):
        seg = d["segmentation"]
        h, w = seg["size"]
        assert check_rle(seg, h, w) is None
        runs = rle_string_counts(seg["counts"])
        rle = {"size": [h, w], "counts": seg["counts"].encode()}
        assert sum(runs[1::2]) == mask_utils.area(rle)
        if k % 25 == 0:  # full decodes are slow; every 25th is compared pixel for pixel
            assert (runs_to_mask(runs, h, w) == mask_utils.decode(rle)).all()
    # a real RLE checked against the wrong image size, or cut short, is rejected
    seg = dets[0]["segmentation"]
    h, w = seg["size"]
    assert "differs from the image size" in check_rle(seg, h, w + 1)
    assert "sum to" in check_rle({"size": [h, w], "counts": seg["counts"][:-3]}, h, w)


def test_rle_string_errors():
    with pytest.raises(ValueError, match="invalid character"):
        rle_string_counts("0 1")
    with pytest.raises(ValueError, match="end in the middle"):
        rle_string_counts("0`")  # 0x30 = '0'; '`' (0x60 - 48 = 48) has the continuation bit
    with pytest.raises(ValueError, match="negative"):
        rle_string_counts("0O")  # 'O' - 48 = 31: sign bit set -> -1
    with pytest.raises(ValueError, match="not ASCII"):
        rle_string_counts("é".encode())


def test_rle_checks():
    assert check_rle({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3) is None
    assert "sum to 5" in check_rle({"size": [2, 3], "counts": [1, 2, 2]}, 2, 3)
    assert "non-negative integers" in check_rle({"size": [2, 3], "counts": [1, -2, 7]}, 2, 3)
    assert "non-negative integers" in check_rle({"size": [2, 3], "counts": [1.5, 4.5]}, 2, 3)
    assert "not [height, width]" in check_rle({"size": [2], "counts": [6]}, 2, 3)
    assert "needs 'counts' and 'size'" in check_rle({"counts": [6]}, 2, 3)
    assert "string or a list" in check_rle({"size": [2, 3], "counts": 6}, 2, 3)


def test_polygon_checks():
    assert check_polygons([[0, 0, 4, 0, 4, 4]], 10, 10) is None
    assert "has 4 numbers" in check_polygons([[0, 0, 4, 4]], 10, 10)  # never a box
    assert "has 7 numbers" in check_polygons([[0, 0, 4, 0, 4, 4, 1]], 10, 10)
    assert "non-finite" in check_polygons([[0, 0, 4, 0, math.nan, 4]], 10, 10)
    assert "non-numeric" in check_polygons([[0, 0, 4, 0, "4", 4]], 10, 10)
    assert "absurd" in check_polygons([[0, 0, 4, 0, 4, 1e9]], 10, 10)
    assert "absurd" in check_polygons([[0, 0, 4, 0, -50, 4]], 10, 10)
    assert check_polygons([[0, 0, 10.5, 0, 10.5, 10.5]], 10, 10) is None  # slightly past the border is fine
    assert "empty" in check_polygons([], 10, 10)
    assert "polygon list or an RLE dict" in check_polygons("abc", 10, 10)


def test_bbox_checks():
    assert check_bbox([0, 0, 10, 10], 10, 10) is None
    assert check_bbox([0.0, 0.0, 10.4, 10.0], 10, 10) is None  # rounding slack
    assert "NaN" in check_bbox([0, math.nan, 1, 1], 10, 10)
    assert "negative" in check_bbox([0, 0, 1, -1], 10, 10)
    assert "outside" in check_bbox([5, 0, 7, 1], 10, 10)
    assert "outside" in check_bbox([-3, 0, 1, 1], 10, 10)
    assert "not [x, y, w, h]" in check_bbox([1, 2, 3], 10, 10)


def test_annotation_checks():
    ok = {"id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    assert check_annotation(ok, 10, 10, {1, 2}) is None
    assert "not declared" in check_annotation({**ok, "category_id": 3}, 10, 10, {1, 2})
    assert "not an integer" in check_annotation({**ok, "category_id": "2"}, 10, 10, {1, 2})
    assert "iscrowd" in check_annotation({**ok, "iscrowd": 2}, 10, 10, {1, 2})
    assert "outside" in check_annotation({**ok, "bbox": [8, 8, 5, 5]}, 10, 10, {1, 2})
    mask_ok = {"category_id": 1, "mask": np.zeros((10, 10), bool)}
    assert check_annotation(mask_ok, 10, 10, {1}) is None
    assert "mask is 10 x 9" in check_annotation({**mask_ok, "mask": np.zeros((10, 9), bool)}, 10, 10, {1})


def test_image_size_checks():
    assert check_image_size(100, 50, 10_000) is None
    assert "decompression bomb" in check_image_size(1000, 1000, 10_000)
    assert "declare 99 x 50" in check_image_size(100, 50, 10_000, (50, 99))
    assert "absurd" in check_image_size(0, 5, 10_000)


def test_label_map_checks():
    sem = np.zeros((4, 5), np.uint8)
    sem[0, 0] = 255
    assert check_label_map(sem, 4, 5, {0, 1}, 255) is None
    sem[1, 1] = 9
    assert "label value(s) 9 not in the class table" in check_label_map(sem, 4, 5, {0, 1}, 255)
    assert "the image is 6 x 4" in check_label_map(np.zeros((4, 5), np.uint8), 4, 6, {0}, 255)
    assert "single-channel" in check_label_map(np.zeros((4, 5, 3), np.uint8), 4, 5, {0}, 255)
    assert "non-integer" in check_label_map(np.zeros((4, 5), np.float32), 4, 5, {0}, 255)
    assert check_label_map(np.full((4, 5), 300, np.int32), 4, 5, {300}, 65535) is None
