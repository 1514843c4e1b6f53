"""Sliding-window geometry (segpipe.tiling): tile positions, blending, cross-tile merging. The
model side (padding, selection) is segpipe.inference's; here the model is a function of tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segpipe.models import normalize
from segpipe.tiling import (
    Instance,
    Window,
    crop_instance,
    iter_semantic_strips,
    merge_instances,
    predict_instances,
    predict_semantic,
    ramp,
    tile_starts,
)


def preprocess(tile: np.ndarray) -> torch.Tensor:
    return normalize(tile)[0]


def site_image(h: int = 700, w: int = 1000, seed: int = 0) -> np.ndarray:
    """A smooth random scene with blocks, so neighbouring pixels correlate like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


class PerPixel(nn.Module):
    """A 1x1-conv model: every pixel's logits depend only on that pixel, so tiling must be exact."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4


def test_tile_starts_cover_the_image():
    assert tile_starts(700, 256, 64) == [0, 192, 384, 444]
    assert tile_starts(256, 256, 64) == [0] and tile_starts(100, 256, 64) == [0]
    for length in (257, 511, 1000, 6000):
        s = tile_starts(length, 512, 64)
        assert s[0] == 0 and s[-1] + 512 == max(length, 512) or length <= 512
        assert all(b - a <= 512 - 64 for a, b in zip(s, s[1:]))  # overlap at least 64
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(100, 64, 64)


def test_ramp_is_positive_and_one_at_image_borders():
    w = ramp(256, 64, before=False, after=True)
    assert w[0] == 1 and w[-1] > 0 and w[-1] < 0.01 and torch.all(w > 0)
    both = ramp(256, 64, True, True)
    assert torch.allclose(both[:64] + both[:64].flip(0), torch.ones(64))  # cross-fade sums to 1


def test_per_pixel_model_tiled_equals_whole_image_exactly():
    model = PerPixel().eval()
    image = site_image()  # 700 x 1000: larger than a 256 tile in both directions
    tiled = predict_semantic(model, image, preprocess, Window(256, 64, batch_size=3))
    whole = predict_semantic(model, image, preprocess, Window(1024, 0))
    assert tiled.shape == (700, 1000)
    assert torch.equal(tiled, whole)
    probs_t = predict_semantic(model, image, preprocess, Window(256, 64), return_probs=True)
    probs_w = predict_semantic(model, image, preprocess, Window(1024, 0), return_probs=True)
    assert (probs_t - probs_w).abs().max() < 1e-5


def test_strips_bound_memory_and_cover_every_row():
    model = PerPixel().eval()
    image = site_image(1100, 300)
    strips = list(iter_semantic_strips(model, image, preprocess, Window(256, 64)))
    assert strips[0].y0 == 0 and strips[-1].y1 == 1100
    assert all(a.y1 == b.y0 for a, b in zip(strips, strips[1:]))
    assert max(s.probs.shape[1] for s in strips) <= 256  # never more than one row of tiles
    assert all(torch.allclose(s.probs.sum(0), torch.ones(s.y1 - s.y0, 300)) for s in strips)


def bright_regions(batch: torch.Tensor) -> list[list[Instance]]:
    """Each connected bright region of a tile as one selected class-1 detection (for tests)."""
    from scipy import ndimage

    out = []
    for img in batch:
        regions, n = ndimage.label((img.mean(0) > 1.0).numpy())
        scores = np.linspace(0.9, 0.8, n)
        out.append([crop_instance(1, float(scores[i]), regions == i + 1) for i in range(n)])
    return out


def test_instances_across_tile_borders_are_merged():
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    image[100:140, 180:240] = 255  # crosses the right border of the first tile column (0..200)
    image[250:280, 20:60] = 255  # inside one tile column, seen by two overlapping tile rows
    found = predict_instances(bright_regions, image, preprocess, Window(200, 80, batch_size=3))
    assert sorted(d.box for d in found) == [(20, 250, 60, 280), (180, 100, 240, 140)]
    assert all(d.mask.all() for d in found)


def test_merge_keeps_distinct_objects_and_classes():
    m = np.ones((10, 10), dtype=bool)
    a = Instance(1, 0.9, 0, 0, m)
    b = Instance(1, 0.8, 3, 0, m)  # IoU 7/13: duplicate
    c = Instance(2, 0.7, 0, 0, m)  # same pixels, other class: kept
    d = Instance(1, 0.6, 50, 50, m)
    cut = Instance(1, 0.95, 0, 0, m[:, :4], cut=True)  # truncated piece inside a: dropped despite its score
    kept = merge_instances([a, b, c, d, cut])
    assert [(k.label, k.score) for k in kept] == [(1, 0.9), (2, 0.7), (1, 0.6)]


def test_crop_instance_keeps_the_tight_mask_and_moves_the_model_box():
    full = np.zeros((20, 30), dtype=bool)
    full[5:9, 10:14] = True
    inst = crop_instance(2, 0.5, full, dx=100, dy=200, bbox=(9.5, 4.5, 14.5, 9.0))
    assert inst.box == (110, 205, 114, 209) and inst.mask.shape == (4, 4) and inst.area == 16
    assert inst.bbox == (109.5, 204.5, 114.5, 209.0)
    assert crop_instance(2, 0.5, np.zeros((4, 4), dtype=bool)) is None
