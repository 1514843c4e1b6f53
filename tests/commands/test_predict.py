"""``segpipe predict``: full-size outputs, errors naming the file, COCO results, both engines, URIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.commands import predict
from segpipe.params import PredictParams


def site_image(h: int = 700, w: int = 1000, seed: int = 0) -> np.ndarray:
    """A smooth random scene with blocks, so neighbouring pixels correlate like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def test_predict_run_writes_full_size_labels_and_overlays(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    ck = tiny_checkpoint("unet", base_channels=4, depth=3)
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
    from segpipe.inference import Predictor

    expected = Predictor.load(ck).tiled(image, tile=256, overlap=64, batch_size=4).labels
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


def test_predict_mask_rcnn_writes_coco_results(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    ck = tiny_checkpoint("mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5)
    img = tmp_path / "site.png"
    Image.fromarray(site_image(200, 150)).save(img)
    out = tmp_path / "out"
    params = PredictParams(tile=128, overlap=32, batch_size=4, score_threshold=0.0)
    predict.run(params, ck, img, out, progress=False)
    results = json.loads((out / "detections.json").read_text())
    assert 0 < len(results) <= 4 * 5  # 4 tiles of at most 5 detections, minus merged duplicates
    labels = np.asarray(Image.open(out / "labels" / "site.png"))
    assert labels.shape == (200, 150) and set(np.unique(labels)) <= {0, 1, 2, 255}  # 255: no detection
    from pycocotools import mask as mask_utils

    for r in results:
        assert r["image_id"] == 1 and 0 <= r["category_id"] < 3
        m = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        assert m.shape == (200, 150) and m.sum() == r["area"]


def test_predict_reads_a_uri_like_a_path(tmp_path, tiny_checkpoint):
    ck = tiny_checkpoint("unet", base_channels=4, depth=2)
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.fromarray(site_image(60, 70, seed=i)).save(tmp_path / "in" / f"site{i}.png")
    assert predict.list_images(f"file://{tmp_path / 'in'}") == [str(tmp_path / "in" / f"site{i}.png") for i in range(2)]
    params = PredictParams(tile=128, overlap=32)
    predict.run(params, ck, f"file://{tmp_path / 'in'}", tmp_path / "uri", progress=False)
    predict.run(params, ck, tmp_path / "in", tmp_path / "path", progress=False)
    for name in ("labels/site0.png", "labels/site1.png", "overlays/site1.png", "images.json"):
        assert (tmp_path / "uri" / name).read_bytes() == (tmp_path / "path" / name).read_bytes(), name


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(tmp_path, tiny_checkpoint):
    import ray

    ck = tiny_checkpoint("mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(site_image(150 + 30 * i, 140, seed=i)).save(tmp_path / "in" / f"site{i}.png")
    params = PredictParams(tile=128, overlap=32, batch_size=2, score_threshold=0.0)
    local = predict.run(params, ck, tmp_path / "in", tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        on_ray = predict.run(params, ck, tmp_path / "in", tmp_path / "ray", progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert {**on_ray, "engine": "local"} == local and local["instances"] > 0
    written = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    for name in written:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
