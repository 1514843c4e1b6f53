"""One test suite over the whole registry (as smp and timm test every model they list), plus the
pieces that carry MaskFormer: segment targets and the Hungarian matcher."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from segpipe.models import (
    MODELS,
    OUTPUTS,
    build_model,
    default_kwargs,
    model_config,
    normalize,
    spec_of,
    task_of,
)
from segpipe.models.backbones import ResNetBackbone
from segpipe.models.maskformer import batch_bce_cost, batch_dice_cost, hungarian_match, image_segments

NUM_CLASSES = 4  # 0 background (stuff), 1 and 2 things, 3 a stuff band
THINGS = [1, 2]
# Small settings so the file runs in well under two minutes on one core.
FAST = {"maskformer": {"thing_ids": THINGS}, "mask_rcnn": {"min_size": 64, "max_size": 64}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def make_batch(h: int = 64, w: int = 64) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two images with two coloured rectangles (thing instances), a stuff band and ignored pixels."""
    images = torch.full((2, h, w, 3), 60, dtype=torch.uint8)
    targets = []
    for i in range(2):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 5:20, 5 + 3 * i : 25 + 3 * i] = 1
        masks[1, 30:50, 20 + i : 45] = 1
        semantic = torch.zeros(h, w, dtype=torch.int64)
        semantic[masks[0].bool()] = 1
        semantic[masks[1].bool()] = 2
        semantic[:, -8:] = 3
        semantic[0, :4] = 255
        for c, colour in ((1, (200, 40, 40)), (2, (40, 200, 40)), (3, (40, 40, 200))):
            images[i][semantic == c] = torch.tensor(colour, dtype=torch.uint8)
        boxes = torch.tensor([[5 + 3 * i, 5, 25 + 3 * i, 20], [20 + i, 30, 45, 50]], dtype=torch.float32)
        targets.append({"semantic": semantic, "masks": masks, "labels": torch.tensor([1, 2]), "boxes": boxes,
                        "iscrowd": torch.zeros(2, dtype=torch.uint8)})
    return normalize(images), targets


def build(name: str, **kwargs):
    return build_model(name, NUM_CLASSES, **{**FAST.get(name, {}), **kwargs})


def test_registry_names_and_tasks():
    assert set(MODELS) == {"fcn32s", "fcn16s", "fcn8s", "unet", "deeplabv3", "maskformer", "mask_rcnn"}
    assert task_of("mask_rcnn") == "instance"
    assert all(task_of(n) == "semantic" for n in MODELS if n != "mask_rcnn")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'segformer'.*fcn8s.*mask_rcnn"):
        build_model("segformer", 3)
    with pytest.raises(ValueError, match="valid names"):
        task_of("nope")


@pytest.mark.parametrize("name", MODELS)
def test_unknown_kwarg_names_it_and_valid_ones(name):
    with pytest.raises(TypeError, match=r"'widht'.*valid: .*backbone_weights"):
        build_model(name, 3, widht=3)


@pytest.mark.parametrize("name", MODELS)
def test_default_kwargs_round_trip(name):
    kwargs = default_kwargs(name)
    assert kwargs["backbone_weights"] is None and "num_classes" not in kwargs
    assert "ignore_index" in kwargs or name == "mask_rcnn"
    model = build_model(name, NUM_CLASSES, **kwargs)  # what a checkpoint stores rebuilds the model
    assert sum(p.numel() for p in model.parameters()) > 0


# What default_kwargs returned before the configs existed (the inspect-based version): checkpoints
# store these dicts, so they must not change.
SEMANTIC_TAIL = {"ignore_index": 255, "class_weights": None, "dice_weight": 0.0, "backbone_weights": None}
FCN_DEFAULTS = {"backbone": "resnet18", "head_channels": 256, "dropout": 0.1, **SEMANTIC_TAIL}
PINNED_DEFAULTS = {
    "fcn32s": FCN_DEFAULTS,
    "fcn16s": FCN_DEFAULTS,
    "fcn8s": FCN_DEFAULTS,
    "unet": {"base_channels": 16, "depth": 4, "upsample": "bilinear", **SEMANTIC_TAIL},
    "deeplabv3": {"backbone": "resnet18", "output_stride": 16, "atrous_rates": [6, 12, 18], "aspp_channels": 128,
                  "aux_loss": False, "aux_weight": 0.4, **SEMANTIC_TAIL},
    "maskformer": {"backbone": "resnet18", "num_queries": 32, "hidden_dim": 128, "dec_layers": 3, "nheads": 4,
                   "dim_feedforward": 512, "dropout": 0.0, "conv_dim": 128, "mask_dim": 128, "thing_ids": [],
                   "no_object_weight": 0.1, "class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0,
                   "num_points": 4096, "ignore_index": 255, "backbone_weights": None},
    "mask_rcnn": {"backbone": "resnet18", "trainable_layers": 5, "frozen_bn": False, "min_size": 128, "max_size": 512,
                  "anchor_sizes": [16, 32, 64, 128, 256], "fpn_channels": 64, "box_head_dim": 256,
                  "mask_head_channels": 32, "rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 300,
                  "box_batch_size_per_image": 32, "box_detections_per_img": 100, "box_score_thresh": 0.05,
                  "native_scale": True, "backbone_weights": None},
}
# (tensors, elements, sha256 of the "key:shape" lines) of each default model with 4 classes, as
# they were before the configs existed: a checkpoint's state dict must still load.
PINNED_STATE = {
    "fcn32s": (129, 12433369, "79b8d74d18e69591"),
    "fcn16s": (132, 12385501, "fa00c8d46b765b49"),
    "fcn8s": (135, 12373985, "8bd5e116879420f2"),
    "unet": (110, 1967110, "b42a8d7a798fb0be"),
    "deeplabv3": (160, 13319774, "406edfa20aa1fe8f"),
    "maskformer": (209, 12961881, "b413039dc556083b"),
    "mask_rcnn": (162, 12359233, "503fde136bd4b16b"),
}


@pytest.mark.parametrize("name", MODELS)
def test_default_kwargs_are_pinned(name):
    kwargs = default_kwargs(name)
    assert kwargs == PINNED_DEFAULTS[name]
    assert list(kwargs) == list(PINNED_DEFAULTS[name])  # the order of the "valid:" lists too


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_and_shapes_are_pinned(name):
    state = build_model(name, NUM_CLASSES).state_dict()
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    assert (len(state), sum(v.numel() for v in state.values()), digest) == PINNED_STATE[name]


@pytest.mark.parametrize("name", MODELS)
def test_config_is_the_one_source_of_defaults(name):
    """build_model's keywords are the config's fields; what is not given is the config's default,
    and the model is the builder's output for that config (same seed, same weights)."""
    spec = spec_of(name)
    config = spec.config()
    assert dataclasses.is_dataclass(config) and spec.config.__dataclass_params__.frozen
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backbone_weights = "x"
    assert model_config(name) == config
    torch.manual_seed(3)
    built = build_model(name, 3).state_dict()
    torch.manual_seed(3)
    direct = spec.builder(3, config).state_dict()
    assert built.keys() == direct.keys() and all(torch.equal(built[k], direct[k]) for k in built)


def test_a_u_net_process_imports_neither_torchvision_nor_torch_dynamo():
    """The registry imports an architecture's module when it is built, and the backbones import
    torchvision when one is built: a process scoring, predicting or serving a U-Net is spared
    torchvision's import (and the torch._dynamo it pulls in, about 2 s of start-up here)."""
    import subprocess
    import sys

    code = ("import sys; from segpipe.models import build_model, default_kwargs, spec_of; "
            "import segpipe.stages.train, segpipe.stages.evaluate, segpipe.inference, segpipe.serving; "
            "build_model('unet', 3); default_kwargs('unet'); spec_of('mask_rcnn').task; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "torchvision" in subprocess.run([sys.executable, "-c", code.replace("'unet', 3", "'fcn8s', 3")],
                                           capture_output=True, text=True, check=True).stdout


def test_model_config_takes_json_values():
    """Checkpoints store tuples as lists; the config holds them as tuples again."""
    config = model_config("deeplabv3", atrous_rates=[12, 24, 36], class_weights=[1, 2, 3])
    assert config.atrous_rates == (12, 24, 36) and config.class_weights == (1, 2, 3)
    assert model_config("deeplabv3", **default_kwargs("deeplabv3")) == spec_of("deeplabv3").config()
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        build_model("unet", 0)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got True"):
        build_model("unet", True)


@pytest.mark.parametrize("name", MODELS)
def test_eval_output_shapes_odd_size(name):
    model = build(name).eval()
    images = normalize(torch.randint(0, 256, (2, 100, 132, 3), dtype=torch.uint8))
    with torch.no_grad():
        out = model(images)
    if task_of(name) == "semantic":
        assert out.shape == (2, NUM_CLASSES, 100, 132)
        assert torch.isfinite(out).all()
    else:
        assert len(out) == 2
        for d in out:
            n = len(d["scores"])
            assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,)
            assert d["masks"].shape == (n, 1, 100, 132)
            if n:
                assert 0 <= int(d["labels"].min()) and int(d["labels"].max()) < NUM_CLASSES


@pytest.mark.parametrize("name", MODELS)
def test_train_step_losses_and_gradients(name):
    model = build(name).train()
    images, targets = make_batch()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    # DDP (find_unused_parameters=False) needs every trainable parameter to get a gradient
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_on_a_fixed_batch(name):
    model = build(name).train()
    images, targets = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = np.mean(history[:3]), np.mean(history[-3:])
    assert last < 0.6 * first, history


@pytest.mark.parametrize("name", ["fcn8s", "unet", "maskformer"])
def test_all_ignored_batch_gives_finite_loss(name):
    model = build(name).train()
    images, targets = make_batch()
    for t in targets:
        t["semantic"][:] = 255
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_semantic_label_out_of_range_names_the_image():
    model = build("fcn32s").train()
    images, targets = make_batch()
    targets[1]["semantic"][3, 3] = 7
    with pytest.raises(ValueError, match=r"targets\[1\]\['semantic'\] has labels \[7\]"):
        model(images, targets)


def test_train_mode_without_targets_is_an_error():
    images, _ = make_batch()
    with pytest.raises(ValueError, match="needs targets"):
        build("unet").train()(images)


def test_mask_rcnn_handles_class_zero_things_crowd_and_empty_images():
    model = build("mask_rcnn").train()
    images, targets = make_batch()
    targets[0]["labels"] = torch.tensor([0, 2])  # a thing with id 0 (shifted inside)
    targets[0]["iscrowd"] = torch.tensor([0, 1], dtype=torch.uint8)
    for key, empty in (("masks", torch.zeros(0, 64, 64, dtype=torch.uint8)), ("labels", torch.zeros(0, dtype=torch.int64)),
                       ("boxes", torch.zeros(0, 4)), ("iscrowd", torch.zeros(0, dtype=torch.uint8))):
        targets[1][key] = empty
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    targets[0]["labels"] = torch.tensor([0, NUM_CLASSES])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] has ids \[4\]"):
        model(images, targets)


@pytest.mark.parametrize("name", ["maskformer", "mask_rcnn"])
def test_predict_instances(name):
    model = build(name)
    images, targets = make_batch()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.predict_instances(images, score_threshold=0.0, mask_threshold=0.5, max_detections=100)
    assert model.training  # the mode is restored
    assert len(out) == 2
    for d in out:
        n = len(d["scores"])
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,) and d["masks"].shape == (n, 1, 64, 64)
        assert ((d["masks"] >= 0) & (d["masks"] <= 1)).all()
        assert (d["boxes"][:, 2] >= d["boxes"][:, 0]).all() and (d["boxes"][:, 3] >= d["boxes"][:, 1]).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        if name == "maskformer":
            assert set(d["labels"].tolist()) <= set(THINGS) and n > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_instance_outputs_come_from_one_predict_instances_signature(name):
    """What a model outputs is in the registry; every instance-capable model is called the same way
    (segpipe.inference never probes a model for its methods or arguments)."""
    spec = MODELS[name]
    assert spec.outputs and spec.outputs <= set(OUTPUTS)
    if spec.task == "instance":
        assert spec.outputs == {"instances"}  # its label maps are its detections, rendered
    method = getattr(build(name), "predict_instances", None)
    if "instances" not in spec.outputs:
        assert method is None
        return
    params = inspect.signature(method).parameters
    assert list(params) == ["images", "score_threshold", "mask_threshold", "max_detections"]
    assert all(p.default is inspect.Parameter.empty for p in params.values())  # the defaults are evaluate's params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_panoptic_outputs_come_from_mask_classification(name):
    """A model with a panoptic output gives its raw class and mask logits at input resolution."""
    method = getattr(build(name), "mask_classification", None)
    if "panoptic" not in MODELS[name].outputs:
        assert method is None
        return
    model = build(name).eval()
    images, _ = make_batch()
    class_logits, mask_logits = model.mask_classification(images)
    b, _, h, w = images.shape
    q = model.query_embed.num_embeddings
    assert class_logits.shape == (b, q, model.num_classes + 1) and mask_logits.shape == (b, q, h, w)
    assert not model.training
    with torch.no_grad():  # the semantic output is the same logits mixed
        np.testing.assert_allclose(model(images).numpy(), torch.einsum(
            "bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid()).numpy(), atol=1e-5)


def test_maskformer_semantic_scores_are_probability_mixtures():
    model = build("maskformer").eval()
    images, _ = make_batch()
    with torch.no_grad():
        scores = model(images)
    # each is sum_q p_q(k) sigmoid(m_q) with sum_k p_q(k) <= 1, so the class sum is at most Q
    assert (scores >= 0).all() and (scores.sum(1) <= model.query_embed.num_embeddings + 1e-4).all()


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3_output_stride_on_basicblock_resnet(output_stride):
    model = build("deeplabv3", output_stride=output_stride).eval()
    images = normalize(torch.randint(0, 256, (1, 64, 96, 3), dtype=torch.uint8))
    with torch.no_grad():
        feats = model.backbone(images)
        assert feats["c5"].shape[-2:] == (64 // output_stride, 96 // output_stride)
        assert model(images).shape == (1, NUM_CLASSES, 64, 96)


def test_dilation_keeps_resnet_parameters():
    plain, dilated = ResNetBackbone("resnet18", 32), ResNetBackbone("resnet18", 8)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dilated.state_dict().items()}


def test_fcn_on_vgg16_and_bilinear_start():
    model = build("fcn8s", backbone="vgg16", head_channels=64).eval()
    images = normalize(torch.randint(0, 256, (1, 100, 132, 3), dtype=torch.uint8))
    with torch.no_grad():
        assert model(images).shape == (1, NUM_CLASSES, 100, 132)
    # a fresh deconvolution is bilinear interpolation: a constant map stays constant inside
    up = model.up_final
    with torch.no_grad():
        y = up(torch.ones(1, NUM_CLASSES, 4, 4))
    assert torch.allclose(y[..., 8:-8, 8:-8], torch.ones(1), atol=1e-6)


def test_unet_transposed_upsampling_odd_size():
    model = build("unet", upsample="transpose", base_channels=8).eval()
    images = normalize(torch.randint(0, 256, (1, 101, 67, 3), dtype=torch.uint8))
    with torch.no_grad():
        assert model(images).shape == (1, NUM_CLASSES, 101, 67)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_backbone_weights_load_from_local_file(name, fmt, tmp_path):
    source = build(name)
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = build(name, backbone_weights=str(path))
    got = loaded.backbone.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    fresh = build(name)
    assert not all(torch.equal(fresh.backbone.state_dict()[k], state[k]) for k in state)


def test_backbone_weights_accept_torchvision_checkpoints_and_name_bad_files(tmp_path):
    reference = torchvision.models.resnet18(weights=None).state_dict()  # includes fc.*
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference}, path)
    model = build("deeplabv3", backbone_weights=str(path))
    assert torch.equal(model.backbone.state_dict()["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match=r"resnet18.pth does not fit the ResNetBackbone: 80 missing \(e.g. layer1.2"):
        build("fcn8s", backbone="resnet34", backbone_weights=str(path))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build("unet", backbone_weights=str(tmp_path / "nope.pt"))
    torch.save({"net": torch.nn.Identity()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt.*weights_only"):
        build("fcn8s", backbone_weights=str(tmp_path / "pickled.pt"))


def test_normalize_layouts_and_errors():
    rgb = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    x = normalize(rgb)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor((1 - 0.485) / 0.229))
    assert torch.allclose(x[:, 1], torch.tensor(-0.456 / 0.224))
    chw = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(normalize(chw, layout="bchw"), x)
    assert normalize(rgb[0]).shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        normalize(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        normalize(np.zeros((1, 4, 5, 4), dtype=np.uint8))


def test_image_segments_things_stuff_crowd_and_ignore():
    _, targets = make_batch()
    t = dict(targets[0])
    t["iscrowd"] = torch.tensor([0, 1], dtype=torch.uint8)  # the class-2 instance is a crowd region
    segs = image_segments(t, THINGS, NUM_CLASSES, 255)
    assert segs.labels.tolist() == [1, 0, 3]  # instance of class 1, then stuff classes 0 and 3
    assert torch.equal(segs.masks[0].bool(), t["masks"][0].bool())
    assert torch.equal(segs.masks[2].bool(), t["semantic"] == 3)
    assert not segs.valid[t["masks"][1].bool()].any()  # crowd pixels are ignored
    assert not segs.valid[0, :4].any() and segs.valid[t["masks"][0].bool()].all()
    all_stuff = image_segments(targets[0], (), NUM_CLASSES, 255)  # no thing ids: classes as segments
    assert sorted(all_stuff.labels.tolist()) == [0, 1, 2, 3]


def test_hungarian_match_beats_greedy_on_class_cost():
    # greedy takes q0 -> A (0.50) leaving q1 -> B (0.01); optimal is q0 -> B, q1 -> A (0.45 + 0.40)
    probs = torch.tensor([[0.50, 0.45, 0.05], [0.40, 0.01, 0.59], [0.05, 0.05, 0.90]])
    labels = torch.tensor([0, 1])  # target A has class 0, target B class 1
    masks = torch.zeros(2, 8)
    q, t = hungarian_match(probs.log(), torch.zeros(3, 8), labels, masks, 1.0, 0.0, 0.0)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}


def test_hungarian_match_on_mask_cost():
    targets = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    # query 0 draws target 2, query 2 target 0, query 3 target 1; query 1 draws nothing
    mask_logits = torch.full((4, 8), -10.0)
    mask_logits[0, 6:] = mask_logits[2, :4] = mask_logits[3, 4:6] = 10.0
    q, t = hungarian_match(torch.zeros(4, 3), mask_logits, torch.tensor([0, 1, 1]), targets, 0.0, 5.0, 5.0)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 2, 2: 0, 3: 1}
    # the batched costs agree with the losses of single pairs
    bce = torch.nn.functional.binary_cross_entropy_with_logits(mask_logits[1], targets[2])
    assert torch.isclose(batch_bce_cost(mask_logits, targets)[1, 2], bce)
    p = mask_logits[1].sigmoid()
    dice = 1 - (2 * (p * targets[2]).sum() + 1) / (p.sum() + targets[2].sum() + 1)
    assert torch.isclose(batch_dice_cost(mask_logits, targets)[1, 2], dice)
    empty_q, empty_t = hungarian_match(torch.zeros(4, 3), mask_logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 8),
                                          2.0, 5.0, 5.0)
    assert len(empty_q) == len(empty_t) == 0


def test_mask_rcnn_keeps_native_scale_and_scripts():
    """By default torchvision's transform must not resize (crops, whole images and tiles are all
    at native resolution); with native_scale=False it resizes to min_size as torchvision does."""
    x = [torch.rand(3, 40, 72)]
    native = build_model("mask_rcnn", 4).eval()
    assert native.detector.transform(x)[0].image_sizes == [(40, 72)]
    torch.jit.script(native.detector)  # the transform survives scripting (export, deployment)
    resized = build_model("mask_rcnn", 4, native_scale=False, min_size=80, max_size=400).eval()
    assert resized.detector.transform(x)[0].image_sizes == [(80, 144)]
