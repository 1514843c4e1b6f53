"""``segpipe export``: ONNX / TorchScript files that match PyTorch, or a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segpipe.commands import export
from segpipe.params import MaskFormerPanopticParams
from segpipe.registry import register, set_alias


@pytest.fixture
def registry(tmp_path: Path, tiny_checkpoint) -> Path:
    reg = tmp_path / "registry"
    register(reg, tiny_checkpoint("unet", base_channels=4, depth=2))
    set_alias(reg, "champion", "v1", "test")
    return reg


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_champion_matches_pytorch(tmp_path, registry, fmt):
    torch.set_num_threads(1)
    out = tmp_path / f"model.{fmt}"
    report = export.run("champion", fmt, out, registry, tolerance=1e-4)
    assert out.is_file() and report["passed"]
    samples = {r["sample"]: r for r in report["samples"]}
    assert {"batch 1", "batch 3", "batch 1, 64 x 96"} <= set(samples)  # a second batch size and another shape
    assert all(r["max_abs_diff"] < 1e-4 for r in samples.values())
    saved = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert saved["arch"] == "unet" and saved["passed"]


def test_parity_failure_exits_non_zero(tmp_path, registry, capsys):
    out = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as e:
        # An impossible tolerance: even a difference of 0 is not <= -1.
        export.main(["--model", "champion", "--registry", str(registry), "--format", "torchscript",
                     "--out", str(out), "--tolerance", "-1"])
    assert e.value.code == 1
    assert "differs from PyTorch beyond -1.0" in capsys.readouterr().err
    assert not json.loads(out.with_name("model.pt.parity.json").read_text())["passed"]


def test_max_abs_diff():
    import numpy as np

    assert export.max_abs_diff([np.zeros((2, 2))], [np.full((2, 2), 0.5)]) == 0.5
    assert export.max_abs_diff([np.zeros((2, 2))], [np.zeros((1, 2))]) == float("inf")
    assert export.max_abs_diff([np.zeros((0, 4))], [np.zeros((0, 4))]) == 0.0


@pytest.mark.slow
def test_mask_rcnn_torchscript_parity_including_no_detections(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    ck = tiny_checkpoint("mask_rcnn", box_detections_per_img=10)
    report = export.run(ck, "torchscript", tmp_path / "m.pt", tolerance=1e-4)
    blank = next(r for r in report["samples"] if r["sample"] == "blank image")
    assert blank["detections"] == 0 and blank["passed"]
    batch3 = next(r for r in report["samples"] if r["sample"] == "batch 3")
    assert batch3["passed"]


@pytest.mark.slow
def test_mask_rcnn_onnx_parity_image_by_image_including_no_detections(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    ck = tiny_checkpoint("mask_rcnn", box_detections_per_img=10)
    out = tmp_path / "m.onnx"
    report = export.run(ck, "onnx", out, tolerance=1e-4)
    assert out.is_file() and report["passed"] and report["exporter"] == "torchscript"
    samples = {r["sample"]: r for r in report["samples"]}
    assert {"batch 1", "batch 3", "batch 1, 64 x 96", "blank image"} == set(samples)
    assert all(r["passed"] and r["max_abs_diff"] < 1e-4 for r in samples.values())
    assert samples["blank image"]["detections"] == 0
    assert not list(tmp_path.glob("**/check.onnx"))  # the graphs built for the check are not left behind

    import onnxruntime as ort

    # One image per call, at its own size: a 64 x 96 image gives 64 x 96 masks (not rescaled).
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    image = export.sample_images(1, 64, 96, seed=7)[0].numpy()
    boxes, labels, scores, masks = session.run(None, {"image": image})
    assert masks.shape[0] == boxes.shape[0] == 10 and masks.shape[1:] == (1, 64, 96)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_detector_that_detects_nothing_is_compared_at_a_lowered_threshold(tmp_path, tiny_checkpoint, fmt):
    """A weak Mask R-CNN detects nothing at its threshold: parity must not pass on empty outputs."""
    torch.set_num_threads(1)
    ck = tiny_checkpoint("mask_rcnn", box_detections_per_img=5, box_score_thresh=0.99)
    out = tmp_path / f"m.{fmt}"
    report = export.run(ck, fmt, out, tolerance=1e-4)
    samples = {r["sample"]: r for r in report["samples"]}
    for name in ("batch 1", "batch 3", "batch 1, 64 x 96"):
        assert samples[name]["score_threshold"] == export.CHECK_SCORE_THRESH and samples[name]["detections"] > 0
        assert samples[name]["passed"]
    assert samples["blank image"]["detections"] == 0 and "score_threshold" not in samples["blank image"]
    assert report["passed"] and "no detections at the model's score threshold" in report["note"]
    if fmt == "onnx":  # the shipped graph keeps the model's threshold: still nothing on the sample
        import onnxruntime as ort

        boxes = ort.InferenceSession(str(out)).run(["boxes"], {"image": export.sample_images(1, 64, 64, seed=1)[0].numpy()})
        assert boxes[0].shape[0] == 0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_maskformer_export_carries_the_raw_outputs_panoptic_post_processing_reads(tmp_path, tiny_checkpoint, fmt):
    from segpipe.panoptic import maskformer_panoptic

    torch.set_num_threads(1)
    ck = tiny_checkpoint("maskformer", num_queries=6, hidden_dim=32, dec_layers=1, nheads=2, dim_feedforward=32,
                         conv_dim=32, mask_dim=32, thing_ids=[1, 2])
    out = tmp_path / f"maskformer.{fmt}"
    report = export.run(ck, fmt, out, tolerance=1e-3, batch_sizes=(1, 2))
    assert report["passed"], report
    x = export.sample_images(1, 64, 96, seed=5)
    logits, class_logits, mask_logits = export.runner(out, fmt, "semantic")(x)  # all three, parity-checked
    assert class_logits.shape == (1, 6, 4) and mask_logits.shape == (1, 6, 64, 96) and logits.shape == (1, 3, 64, 96)
    from segpipe.checkpoint import load_model

    model, _ = load_model(ck)
    with torch.no_grad():
        ref_cls, ref_masks = model.eval().mask_classification(x)
    served = maskformer_panoptic(ref_cls[0], ref_masks[0], (1, 2), MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0))
    exported = maskformer_panoptic(torch.from_numpy(class_logits[0]), torch.from_numpy(mask_logits[0]), (1, 2), MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0))
    assert (served[0] != exported[0]).mean() < 0.01  # the same segments, up to float ties at boundaries
