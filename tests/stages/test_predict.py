"""Sliding-window prediction (segpipe.tiling) and ``segpipe predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segpipe.checkpoint import save_checkpoint
from segpipe.models import build_model, normalize
from segpipe.params import PredictParams
from segpipe.stages import predict
from segpipe.tiling import (
    Instance,
    crop_instance,
    iter_semantic_strips,
    merge_instances,
    predict_instances,
    predict_semantic,
    ramp,
    rle_counts,
    tile_starts,
)

CLASSES = [
    {"id": 0, "name": "ground", "isthing": False, "color": [40, 40, 40]},
    {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 0]},
    {"id": 2, "name": "excavator", "isthing": True, "color": [0, 255, 0]},
]


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
    tiled = predict_semantic(model, image, preprocess, tile=256, overlap=64, batch_size=3)
    whole = predict_semantic(model, image, preprocess, tile=1024, overlap=0)
    assert tiled.shape == (700, 1000)
    assert torch.equal(tiled, whole)
    probs_t = predict_semantic(model, image, preprocess, tile=256, overlap=64, return_probs=True)
    probs_w = predict_semantic(model, image, preprocess, tile=1024, overlap=0, return_probs=True)
    assert (probs_t - probs_w).abs().max() < 1e-5


def test_strips_bound_memory_and_cover_every_row():
    model = PerPixel().eval()
    image = site_image(1100, 300)
    strips = list(iter_semantic_strips(model, image, preprocess, tile=256, overlap=64))
    assert strips[0].y0 == 0 and strips[-1].y1 == 1100
    assert all(a.y1 == b.y0 for a, b in zip(strips, strips[1:]))
    assert max(s.probs.shape[1] for s in strips) <= 256  # never more than one row of tiles
    assert all(torch.allclose(s.probs.sum(0), torch.ones(s.y1 - s.y0, 300)) for s in strips)


def test_unet_tiled_agrees_with_whole_image():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("unet", 3, base_channels=4, depth=3).eval()
    image = site_image()
    tiled = predict_semantic(model, image, preprocess, tile=256, overlap=64, batch_size=4, return_probs=True)
    whole = predict_semantic(model, image, preprocess, tile=1024, overlap=0, return_probs=True)
    agree = (tiled.argmax(0) == whole.argmax(0)).float().mean().item()
    assert tiled.shape == (3, 700, 1000)
    assert agree > 0.98, agree
    # No seams: the error along tile borders is no larger than elsewhere.
    err = (tiled - whole).abs().amax(0)
    cols = torch.tensor([192, 256, 384, 448, 576, 640, 744])
    border = err[:, cols].mean()
    assert border < 3 * err.mean() + 1e-3, (border, err.mean())


def test_small_image_is_padded_not_resized():
    model = PerPixel().eval()
    image = site_image(50, 77)  # not a multiple of 32, smaller than the tile
    labels = predict_semantic(model, image, preprocess, tile=256, overlap=64)
    direct = model(preprocess(image)[None]).argmax(1)[0]
    assert torch.equal(labels, direct)


# --------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------


def bright_box_detector(batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Detects each connected bright region of a tile as one instance of class 1 (for tests)."""
    from scipy import ndimage

    out = []
    for img in batch:
        bright = (img.mean(0) > 1.0).numpy()
        regions, n = ndimage.label(bright)
        masks = torch.stack([torch.from_numpy(regions == i + 1) for i in range(n)]).float()[:, None] if n else \
            torch.zeros(0, 1, *bright.shape)
        out.append({"labels": torch.ones(n, dtype=torch.int64), "scores": torch.linspace(0.9, 0.8, n),
                    "masks": masks, "boxes": torch.zeros(n, 4)})
    return out


def test_instances_across_tile_borders_are_merged():
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    image[100:140, 180:240] = 255  # crosses the right border of the first tile column (0..200)
    image[250:280, 20:60] = 255  # inside one tile column, seen by two overlapping tile rows
    found = predict_instances(bright_box_detector, image, preprocess, tile=200, overlap=80, batch_size=3)
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


def test_rle_counts_match_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    full = np.zeros((37, 53), dtype=np.uint8)
    full[5:30, 10:40] = rng.random((25, 30)) > 0.4
    inst = crop_instance(1, 1.0, full.astype(bool), 0, 0)
    rle = mask_utils.frPyObjects({"size": [37, 53], "counts": rle_counts(inst, 37, 53)}, 37, 53)
    assert np.array_equal(mask_utils.decode(rle), full)
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"]


# --------------------------------------------------------------------------------------
# segpipe predict
# --------------------------------------------------------------------------------------


def checkpoint(tmp_path: Path, arch: str, **kwargs) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), **kwargs)
    return save_checkpoint(tmp_path / arch, model, {
        "arch": arch, "task": "instance" if arch == "mask_rcnn" else "semantic", "num_classes": len(CLASSES),
        "model_kwargs": kwargs, "classes": CLASSES, "ignore_index": 255, "params": {}, "epoch": 1,
        "shards_manifest_sha256": "x", "metrics": {}, "image_size": 128,
    })


def test_predict_run_writes_full_size_labels_and_overlays(tmp_path):
    torch.set_num_threads(1)
    ck = checkpoint(tmp_path, "unet", base_channels=4, depth=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = site_image()
    Image.fromarray(image).save(inputs / "site.png")
    Image.fromarray(site_image(90, 120, seed=1)).save(inputs / "small.jpg")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = predict.run(PredictParams(tile=256, overlap=64, batch_size=4), ck, inputs, out, progress=False)
    assert summary["images"] == 2
    labels = np.asarray(Image.open(out / "labels" / "site.png"))
    assert labels.shape == (700, 1000) and labels.dtype == np.uint8 and labels.max() < 3
    from segpipe.checkpoint import load_model

    model, _ = load_model(ck)
    expected = predict_semantic(model, image, preprocess, tile=256, overlap=64).numpy()
    assert np.array_equal(labels, expected)
    ov = np.asarray(Image.open(out / "overlays" / "site.png"))
    assert ov.shape == (700, 1000, 3)
    assert json.loads((out / "images.json").read_text())[0] == {"id": 1, "file_name": "site.png", "width": 1000, "height": 700}
    assert not (out / "detections.json").exists()  # unet is not instance-capable


def test_predict_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read image"):
        predict.read_image(bad)
    with pytest.raises(FileNotFoundError, match="no such image"):
        predict.list_images(tmp_path / "missing")


def test_predict_mask_rcnn_writes_coco_results(tmp_path):
    torch.set_num_threads(1)
    ck = checkpoint(tmp_path, "mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5)
    img = tmp_path / "site.png"
    Image.fromarray(site_image(200, 150)).save(img)
    out = tmp_path / "out"
    params = PredictParams(tile=128, overlap=32, batch_size=4, score_threshold=0.0)
    predict.run(params, ck, img, out, progress=False)
    results = json.loads((out / "detections.json").read_text())
    assert 0 < len(results) <= 4 * 5  # 4 tiles of at most 5 detections, minus merged duplicates
    labels = np.asarray(Image.open(out / "labels" / "site.png"))
    assert labels.shape == (200, 150)
    from pycocotools import mask as mask_utils

    for r in results:
        assert r["image_id"] == 1 and 0 <= r["category_id"] < 3
        m = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        assert m.shape == (200, 150) and m.sum() == r["area"]
