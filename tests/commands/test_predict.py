"""``segpipe predict``: full-size outputs, errors naming the file, COCO results, both engines, URIs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.commands import predict
from segpipe.params import DetectionParams, PredictParams


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
    # the blended image, above a legend naming the colour of each class it shows
    assert ov.shape[1:] == (1000, 3) and 700 < ov.shape[0] < 800
    assert np.all(ov[700:] == 255, axis=2).mean() > 0.8
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
    params = PredictParams(tile=128, overlap=32, batch_size=4, detection=DetectionParams(score_threshold=0.0))
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


# --------------------------------------------------------------------------------------
# --panoptic: COCO panoptic PNGs whose ids are exactly the JSON's segments
# --------------------------------------------------------------------------------------

TINY_MASKFORMER = {"num_queries": 8, "hidden_dim": 32, "dec_layers": 1, "nheads": 2, "dim_feedforward": 32,
                   "conv_dim": 32, "mask_dim": 32, "thing_ids": [1, 2]}


def _check_panoptic(out, names, classes) -> dict:
    from segpipe.formats.pngs import read_id_png

    doc = json.loads((out / "panoptic.json").read_text())
    assert [a["file_name"] for a in doc["annotations"]] == [f"{n}.png" for n in names]
    assert doc["categories"] == [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"]), "color": list(c["color"])}
                                 for c in classes]
    assert [i["id"] for i in doc["images"]] == [a["image_id"] for a in doc["annotations"]]
    for ann, img in zip(doc["annotations"], doc["images"]):
        ids = read_id_png(out / "panoptic" / ann["file_name"])
        assert ids.shape == (img["height"], img["width"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum()) and {"category_id", "iscrowd", "bbox"} <= set(s)
    return doc


def test_predict_panoptic_with_maskformer_natively_and_by_tiles(tmp_path, tiny_checkpoint):
    from segpipe.checkpoint import load_meta
    from segpipe.params import MaskFormerPanopticParams

    torch.set_num_threads(1)
    ck = tiny_checkpoint("maskformer", **TINY_MASKFORMER)
    (tmp_path / "in").mkdir()
    Image.fromarray(site_image(200, 150)).save(tmp_path / "in" / "large.png")  # 4 tiles: fused
    Image.fromarray(site_image(90, 120, seed=1)).save(tmp_path / "in" / "small.png")  # one tile: Mask2Former's
    loose = MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0)
    summary = predict.run(PredictParams(tile=128, overlap=32, detection=DetectionParams(score_threshold=0.0),
                                        panoptic=loose), ck, tmp_path / "in", tmp_path / "out", progress=False,
                          panoptic=True)
    assert summary["panoptic"] is True
    doc = _check_panoptic(tmp_path / "out", ["large", "small"], load_meta(ck).classes)
    assert any(a["segments_info"] for a in doc["annotations"])
    plain = predict.run(PredictParams(tile=128, overlap=32), ck, tmp_path / "in", tmp_path / "plain", progress=False)
    assert plain["panoptic"] is False and not (tmp_path / "plain" / "panoptic.json").exists()


def test_predict_panoptic_refuses_a_model_without_a_panoptic_output(tmp_path, tiny_checkpoint):
    ck = tiny_checkpoint("unet", base_channels=4, depth=2)
    Image.fromarray(site_image(40, 40)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"--panoptic: model .* \(unet\) has no panoptic output"):
        predict.run(PredictParams(), ck, tmp_path / "a.png", tmp_path / "out", progress=False, panoptic=True)


def test_predict_a_fused_bundle_runs_both_models(tmp_path, tiny_checkpoint, fused_result):
    from segpipe.checkpoint import load_meta
    from segpipe.params import FusionParams, as_dict
    from segpipe.registry import add_bundle_version, point_alias, transaction

    torch.set_num_threads(1)
    sem = tiny_checkpoint("unet", base_channels=4, depth=2)
    inst = tiny_checkpoint("mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5, detects_things=True)
    reg = tmp_path / "registry"
    fusion = as_dict(FusionParams(score_threshold=0.0, stuff_min_area=0))
    with transaction(reg) as index:
        entry, _ = add_bundle_version(reg, index, fused_result(sem, inst, fusion))
        point_alias(index, "panoptic-champion", entry["version"], "test")
    Image.fromarray(site_image(200, 150)).save(tmp_path / "site.png")
    summary = predict.run(PredictParams(tile=128, overlap=32, detection=DetectionParams(score_threshold=0.0)), "panoptic-champion",
                          tmp_path / "site.png", tmp_path / "out", registry=reg, progress=False)
    assert summary["arch"] == "fused" and summary["panoptic"] is True
    doc = _check_panoptic(tmp_path / "out", ["site"], load_meta(sem).classes)
    assert doc["annotations"][0]["segments_info"]  # stuff_min_area 0: the semantic map's stuff at least
    assert (tmp_path / "out" / "detections.json").is_file()


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(tmp_path, tiny_checkpoint, ray_session, two_torch_threads):
    """Mask R-CNN's labels, overlays and COCO results, and MaskFormer's panoptic PNGs and JSON."""
    from segpipe.checkpoint import load_meta
    from segpipe.params import MaskFormerPanopticParams

    rcnn = tiny_checkpoint("mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5)
    former = tiny_checkpoint("maskformer", **TINY_MASKFORMER)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(site_image(150 + 30 * i, 140, seed=i)).save(tmp_path / "in" / f"site{i}.png")
    Image.fromarray(site_image(90, 120, seed=1)).save(tmp_path / "in" / "site3.png")  # one tile: Mask2Former's own
    params = PredictParams(tile=128, overlap=32, batch_size=2, detection=DetectionParams(score_threshold=0.0))
    loose = MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0)
    runs = {"rcnn": (rcnn, params, {}), "panoptic": (former, dataclasses.replace(params, panoptic=loose), {"panoptic": True})}
    local = {k: predict.run(p, ck, tmp_path / "in", tmp_path / "local" / k, progress=False, **kw)
             for k, (ck, p, kw) in runs.items()}
    on_ray = {k: predict.run(p, ck, tmp_path / "in", tmp_path / "ray" / k, progress=False, engine="ray", **kw)
              for k, (ck, p, kw) in runs.items()}
    assert local["rcnn"]["instances"] > 0 and local["panoptic"]["panoptic"] is True
    for k in runs:
        assert {**on_ray[k], "engine": "local"} == local[k], k
    written = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert any(p.parts[:2] == ("panoptic", "panoptic") for p in written)  # the PNGs are among the files compared
    for name in written:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    doc = _check_panoptic(tmp_path / "ray" / "panoptic", [f"site{i}" for i in range(4)], load_meta(former).classes)
    assert any(a["segments_info"] for a in doc["annotations"])
