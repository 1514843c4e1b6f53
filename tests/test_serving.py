"""``segpipe.serving``: the request checks, the model a replica follows, and the answers, without a server
(``tests/commands/test_serve.py`` runs them behind Ray Serve)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.commands import predict
from segpipe.params import DetectionParams, PredictParams
from segpipe.registry import RegistryError, register, set_alias
from segpipe.serving import (
    Follower,
    RequestError,
    check_length,
    decode,
    load,
    locate,
    media_type,
    model_json,
    panoptic_json,
    response_format,
    route,
    segment_json,
)

PARAMS = PredictParams(tile=128, overlap=32, detection=DetectionParams(score_threshold=0.0))


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random scene (neighbouring pixels correlate, as in a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def encoded(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def status(fn, *args) -> int:
    with pytest.raises(RequestError) as e:
        fn(*args)
    assert json.loads(json.dumps(e.value.body()))["status"] == e.value.status
    return e.value.status


# --------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------


def test_routes_methods_and_formats():
    assert route("POST", "/v1/segment") == "/v1/segment" and route("get", "/healthz/") == "/healthz"
    assert status(route, "GET", "/v1/segment") == 405
    assert status(route, "POST", "/v1/model") == 405
    assert status(route, "GET", "/v2/segment") == 404
    assert response_format({}) == "png" and response_format({"format": "json"}) == "json"
    assert response_format({"format": "panoptic"}) == "panoptic"
    assert status(response_format, {"format": "jpeg"}) == 400
    assert status(response_format, {"fromat": "json"}) == 400


def test_content_type_and_length():
    assert media_type("image/png") == "image/png" and media_type("Image/JPEG; q=1") == "image/jpeg"
    assert media_type("image/tiff") == "image/tiff"
    for bad in (None, "", "application/octet-stream", "image/gif", "text/plain"):
        assert status(media_type, bad) == 415
    check_length(None, 10)
    check_length("10", 10)
    assert status(check_length, "11", 10) == 413
    assert status(check_length, "ten", 10) == 400


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("JPEG", {"quality": 90}), ("TIFF", {})])
def test_decode_is_predicts_decoding(tmp_path, fmt, kwargs):
    image = scene(40, 56)
    data = encoded(image, fmt, **kwargs)
    (tmp_path / "im").write_bytes(data)
    decoded = decode(data, 10_000)
    assert decoded.shape == (40, 56, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, predict.read_image(tmp_path / "im"))
    if fmt != "JPEG":
        assert np.array_equal(decoded, image)


def test_decode_refuses_bad_bodies_with_their_status():
    png = encoded(scene(40, 56), "PNG")
    assert status(decode, b"", 10_000) == 400
    assert status(decode, b"not an image at all", 10_000) == 400
    assert status(decode, png[: len(png) // 2], 10_000) == 400  # truncated: the header reads, the pixels do not
    jpeg = encoded(scene(40, 56), "JPEG")
    assert status(decode, jpeg[: len(jpeg) // 2], 10_000) == 400
    assert status(decode, encoded(scene(40, 56), "GIF"), 10_000) == 415
    assert status(decode, png, 40 * 56 - 1) == 413


def test_decode_refuses_a_decompression_bomb_from_its_header():
    bomb = encoded(np.zeros((6000, 6000), dtype=np.uint8), "PNG")  # 36 M pixels in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(RequestError, match=r"6000 x 6000 .*serve.max_image_pixels=1000000") as e:
        decode(bomb, 1_000_000)
    assert e.value.status == 413


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path, tiny_checkpoint):
    """v1 and v2: two UNets; champion -> v1."""
    reg = tmp_path / "registry"
    for seed in (0, 1):
        register(reg, tiny_checkpoint("unet", out=tmp_path / f"unet{seed}", seed=seed, base_channels=4, depth=2))
    set_alias(reg, "champion", "v1", "test")
    return reg


def test_locate_an_alias_a_version_and_a_folder(registry, tmp_path):
    champion = locate("champion", registry)
    assert (champion.version, champion.directory) == ("v1", registry / "v1") and champion.files
    v2 = locate("v2", registry)
    assert v2.version == "v2" and v2.sha256 != champion.sha256 and v2.key == ("v2", v2.sha256)
    folder = locate(tmp_path / "unet1", registry)
    assert folder.version == "path" and folder.sha256 == v2.sha256 and folder.files is None
    with pytest.raises(RegistryError, match="no 'challenger' yet"):
        locate("challenger", registry)
    with pytest.raises(RegistryError, match="unknown version 'v9'"):
        locate("v9", registry)


def test_follower_switches_when_the_alias_moves_and_keeps_a_model_that_fails_its_checksum(registry, tmp_path,
                                                                                         tiny_checkpoint):
    loads = []

    def loader(source):
        loads.append(source.version)
        return load(source, PARAMS)

    follower = Follower("champion", registry, loader)
    assert follower.follows and follower.current.source.version == "v1"
    assert follower.poll() is False and loads == ["v1"]  # nothing moved: nothing loaded
    held = follower.current  # what a request running now holds
    set_alias(registry, "champion", "v2", "test")
    assert follower.poll() is True and follower.current.source.version == "v2" and follower.problem is None
    assert held.source.version == "v1"  # ... finishes on the old model
    # v3 is tampered with after registration: never loaded, v2 serves on, and it is said why
    register(registry, tiny_checkpoint("unet", out=tmp_path / "unet2", seed=2, base_channels=4, depth=2))
    weights = registry / "v3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    set_alias(registry, "champion", "v3", "test")
    assert follower.poll() is False and follower.current.source.version == "v2"
    assert follower.problem["version"] == "v3" and "does not match the registry" in follower.problem["error"]
    assert follower.poll() is False and loads == ["v1", "v2", "v3"]  # not retried while the alias stays
    set_alias(registry, "champion", "v1", "rollback")
    assert follower.poll() is True and follower.current.source.version == "v1" and follower.problem is None
    set_alias(registry, "champion", None, "removed")
    assert follower.poll() is False and follower.current.source.version == "v1" and "champion" in follower.problem["error"]


def test_a_fixed_version_or_folder_is_not_followed(registry, tmp_path):
    assert not Follower("v1", registry, lambda s: load(s, PARAMS)).follows
    shutil.copytree(tmp_path / "unet0", tmp_path / "copy")
    assert Follower(tmp_path / "copy", registry, lambda s: load(s, PARAMS)).current.source.version == "path"


def test_batched_predictions_are_those_of_predict_one_image_at_a_time(tmp_path, tiny_checkpoint):
    """What @serve.batch gives a replica (several images at once, some larger than a tile) is
    what `segpipe predict` writes for each image alone."""
    torch.set_num_threads(1)
    ck = tiny_checkpoint("mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5, detects_things=True)
    images = [scene(64, 80, seed=0), scene(64, 80, seed=1), scene(100, 120, seed=2), scene(150, 140, seed=3)]
    (tmp_path / "in").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "in" / f"im{i}.png")
    predict.run(PARAMS, ck, tmp_path / "in", tmp_path / "out", progress=False)
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    model = load(locate(ck, tmp_path), PARAMS)
    assert model.panoptic is None and model.has_instances
    preds = model.predict(images, [False] * len(images))
    for i, pred in enumerate(preds):
        assert predict.label_png(pred.labels) == (tmp_path / "out" / "labels" / f"im{i}.png").read_bytes()
        doc = segment_json(model, pred)
        expected = [d for d in detections if d["image_id"] == i + 1]
        assert [(d["class_id"], d["score"], d["bbox"], d["segmentation"]) for d in doc["instances"]] == \
            [(d["category_id"], d["score"], d["bbox"], d["segmentation"]) for d in expected]
        assert sum(doc["pixels_per_class"].values()) + doc["unlabelled_pixels"] == doc["height"] * doc["width"]
    assert any(preds[i].instances for i in range(len(images)))
    with pytest.raises(RequestError, match="no panoptic output") as e:
        panoptic_json(model, preds[0])
    assert e.value.status == 400


def test_maskformer_serves_labels_and_panoptic_from_one_network(tmp_path, tiny_checkpoint, tiny_maskformer):
    torch.set_num_threads(1)
    ck = tiny_checkpoint("maskformer", **tiny_maskformer)
    image = scene(64, 80)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    predict.run(PARAMS, ck, tmp_path / "in", tmp_path / "out", progress=False, panoptic=True)
    model = load(locate(ck, tmp_path), PARAMS)
    assert model.panoptic is not None and model.panoptic.predictor.model is model.predictor.predictor.model
    plain, with_panoptic = model.predict([image, image], [False, True])
    assert plain.panoptic is None and with_panoptic.panoptic is not None
    assert predict.label_png(plain.labels) == predict.label_png(with_panoptic.labels) == \
        (tmp_path / "out" / "labels" / "a.png").read_bytes()
    doc = panoptic_json(model, with_panoptic)
    import base64

    assert base64.b64decode(doc["png_base64"]) == (tmp_path / "out" / "panoptic" / "a.png").read_bytes()
    written = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert doc["segments_info"] == written["annotations"][0]["segments_info"]
    assert doc["categories"] == written["categories"]
    info = model_json(model, follows_ref=False)
    assert info["outputs"] == ["png", "json", "panoptic"] and info["architecture"] == "maskformer"
    assert [c["color"] for c in info["classes"]] == [list(c["color"]) for c in model.plan.meta.classes]
