import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe.synth.coco import (
    annotate,
    inner_band,
    polygon_segmentation,
    rle_compressed,
    rle_uncompressed,
    trace_polygons,
)
from segpipe.synth.render import render
from segpipe.synth.scene import make_scene


def decode_polygons(polys, h, w):
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def test_trace_rectangle_has_four_corner_vertices():
    m = np.zeros((10, 12), bool)
    m[3:9, 2:7] = True
    assert trace_polygons(m) == [[2, 3, 7, 3, 7, 9, 2, 9]]


def test_trace_is_exact_on_random_hole_free_masks():
    rng = np.random.default_rng(0)
    exact = holes = 0
    for _ in range(200):
        m = rng.random((11, 13)) < rng.uniform(0.2, 0.7)
        polys = trace_polygons(m)
        if polys is None:
            holes += 1
            continue
        if not m.any():
            assert polys == []
            continue
        assert np.array_equal(decode_polygons(polys, 11, 13), m)
        exact += 1
    assert exact > 100 and holes > 0


def test_diagonal_pixels_become_separate_polygons():
    m = np.zeros((4, 4), bool)
    m[1, 1] = m[2, 2] = True
    polys = trace_polygons(m)
    assert sorted(polys) == [[1, 1, 2, 1, 2, 2, 1, 2], [2, 2, 3, 2, 3, 3, 2, 3]]


def test_mask_with_hole_is_not_a_polygon():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False
    assert trace_polygons(m) is None
    assert polygon_segmentation(m, 0, 0, (7, 7)) is None


def test_polygon_segmentation_offsets_into_the_full_image():
    crop = np.ones((3, 4), bool)
    polys = polygon_segmentation(crop, 5, 2, (10, 12))
    full = np.zeros((10, 12), bool)
    full[2:5, 5:9] = True
    assert np.array_equal(decode_polygons(polys, 10, 12), full)


@pytest.mark.parametrize("first", [False, True])
def test_rle_round_trips(first):
    rng = np.random.default_rng(1)
    m = rng.random((9, 7)) < 0.4
    m[0, 0] = first
    for rle in (rle_uncompressed(m), rle_compressed(m)):
        assert rle["size"] == [9, 7]
        obj = mask_utils.frPyObjects(rle, 9, 7) if isinstance(rle["counts"], list) else rle
        assert np.array_equal(mask_utils.decode(obj).astype(bool), m)
    counts = rle_uncompressed(m)["counts"]
    assert sum(counts) == m.size and (counts[0] == 0) == first


def test_inner_band_ignores_image_border():
    m = np.zeros((8, 8), bool)
    m[:, :5] = True
    band = inner_band(m, 1)
    assert band[:, 4].all() and not band[:, :4].any()  # only the column facing the background
    assert inner_band(m, 2)[:, 3:5].all()


def test_annotations_match_the_instance_map():
    for i in range(6):
        rng = np.random.default_rng([3, i])
        scene = make_scene(rng, 128, 128, crowd_fraction=1.0)
        out = render(scene, rng)
        before = out.semantic.copy()
        anns = annotate(scene, out.semantic, out.instances, rng, rle_fraction=0.5, ignore_band=1)
        changed = before != out.semantic
        assert (out.semantic[changed] == 255).all()  # annotate only ever writes ignore
        assert sum(a["iscrowd"] for a in anns) == 1
        for a in anns:
            seg = a["segmentation"]
            if isinstance(seg, list):
                m = decode_polygons(seg, 128, 128)
            else:
                obj = mask_utils.frPyObjects(seg, 128, 128) if isinstance(seg["counts"], list) else seg
                m = mask_utils.decode(obj).astype(bool)
            assert a["area"] == m.sum()
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            labels = before[m]
            assert (labels == a["category_id"]).all()
