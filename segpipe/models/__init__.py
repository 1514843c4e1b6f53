"""Segmentation architectures, found by name in a plain dict.

    model = build_model("fcn8s", num_classes=6, backbone="resnet34")
    model.train(); losses = model(normalize(images_uint8), targets)   # dict of scalar losses
    model.eval();  logits = model(normalize(images_uint8))            # B x K x H x W

Each architecture declares its build arguments and their defaults once, as a frozen config
dataclass in its own module (``UNetConfig``, ``FCNConfig``, ...), and its model class takes
``(num_classes, config)``. ``build_model`` turns keyword arguments into that config;
``default_kwargs(name)`` lists its fields with their defaults (checkpoints store them). Nothing is
downloaded: torchvision parts are built with ``weights=None`` and ``backbone_weights`` names a
local file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segpipe.models.transfer import (
    ClassRows,
    KeptClass,
    NamedClass,
    TransferError,
    TransferReport,
    adapt_state_dict,
)

TASKS = ("semantic", "instance")


OUTPUTS = ("semantic", "instances", "panoptic")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture: ``builder(num_classes, config) -> nn.Module`` and ``config``, the frozen
    dataclass of its build arguments with their defaults, both found in ``module`` (a module of
    this package) by their names, ``builder_name`` and ``config_name``; the task of what it returns
    in eval mode, the outputs it can produce (``semantic`` label maps, ``instances`` through
    ``predict_instances(images, score_threshold, mask_threshold, max_detections)``, ``panoptic``
    segments through ``mask_classification(images)``: B x Q x K+1 class logits and B x Q x H x W
    mask logits for ``segpipe.panoptic.maskformer_panoptic``), whether it trains faster in
    ``channels_last`` memory format under mixed precision (measured on CPU with bf16 autocast: see
    docs/benchmarks.md), and ``class_rows``: every state-dict tensor indexed by class id, with its
    layout (``segpipe.models.transfer``; a test checks that no class-sized tensor is left out).

    An architecture's module is imported when its builder or config is first asked for, not with
    the registry: the torchvision ones (``import torchvision`` imports ``torch._dynamo``, about 2 s
    of a process's start-up here) cost nothing to a process that scores, predicts or serves only a
    U-Net. (A training process imports ``torch._dynamo`` anyway: ``torch.optim`` does.)"""

    module: str
    builder_name: str
    config_name: str
    task: str
    outputs: frozenset[str]
    channels_last: bool = False
    class_rows: tuple[ClassRows, ...] = ()

    @property
    def builder(self) -> Callable[[int, Any], nn.Module]:
        return self._attribute(self.builder_name)

    @property
    def config(self) -> type:
        return self._attribute(self.config_name)

    def _attribute(self, name: str) -> Any:
        return getattr(importlib.import_module(f"segpipe.models.{self.module}"), name)


MODELS: dict[str, ModelSpec] = {
    "fcn32s": ModelSpec(
        "fcn", "fcn32s", "FCNConfig", "semantic", frozenset({"semantic"}), channels_last=True,
        class_rows=(ClassRows(r"score32\.(weight|bias)"), ClassRows(r"up_final\.weight", dims=(0, 1))),
    ),
    "fcn16s": ModelSpec(
        "fcn", "fcn16s", "FCNConfig", "semantic", frozenset({"semantic"}), channels_last=True,
        class_rows=(ClassRows(r"score(32|16)\.(weight|bias)"),
                    ClassRows(r"up(32to16|_final)\.weight", dims=(0, 1))),
    ),
    "fcn8s": ModelSpec(
        "fcn", "fcn8s", "FCNConfig", "semantic", frozenset({"semantic"}), channels_last=True,
        class_rows=(ClassRows(r"score(32|16|8)\.(weight|bias)"),
                    ClassRows(r"up(32to16|16to8|_final)\.weight", dims=(0, 1))),
    ),
    "unet": ModelSpec(
        "unet", "UNet", "UNetConfig", "semantic", frozenset({"semantic"}), channels_last=True,
        class_rows=(ClassRows(r"classifier\.(weight|bias)"),),
    ),
    "deeplabv3": ModelSpec(
        "deeplabv3", "DeepLabV3", "DeepLabV3Config", "semantic", frozenset({"semantic"}),
        class_rows=(ClassRows(r"head\.1\.(weight|bias)"), ClassRows(r"aux_head\.2\.(weight|bias)")),
    ),
    "maskformer": ModelSpec(
        "maskformer", "MaskFormer", "MaskFormerConfig", "semantic",
        frozenset({"semantic", "instances", "panoptic"}), channels_last=True,
        class_rows=(ClassRows(r"class_embed\.(weight|bias)", trail=1),),  # K + 1: the last is "no object"
    ),
    "mask_rcnn": ModelSpec(
        "mask_rcnn", "MaskRCNN", "MaskRCNNConfig", "instance", frozenset({"instances"}), channels_last=True,
        # torchvision's row 0 is the background; segpipe's class id k is its label k + 1
        class_rows=(
            ClassRows(r"detector\.roi_heads\.box_predictor\.cls_score\.(weight|bias)", lead=1),
            ClassRows(r"detector\.roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", lead=4, block=4),
            ClassRows(r"detector\.roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", lead=1),
        ),
    ),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


def task_of(name: str) -> str:
    """``"semantic"`` or ``"instance"``: what the model ``name`` returns in eval mode."""
    return _spec(name).task


def spec_of(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name raises listing the valid names."""
    return _spec(name)


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def _frozen(value: Any) -> Any:
    """A JSON value as a config field holds it: lists (as checkpoints store tuples) become tuples."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def default_kwargs(name: str) -> dict[str, Any]:
    """The fields of ``name``'s config with their defaults, in declaration order (tuples as lists,
    JSON-ready: checkpoints store them)."""
    config = _spec(name).config()
    return {f.name: _jsonable(getattr(config, f.name)) for f in fields(config)}


def model_config(name: str, **kwargs: Any) -> Any:
    """``name``'s config from keyword arguments (defaults for the others; lists become tuples).

    An unknown name raises listing the valid names; an unknown keyword raises TypeError naming it
    and the config's valid keywords.
    """
    spec = _spec(name)
    valid = [f.name for f in fields(spec.config)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"model {name!r} has no argument(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )
    return spec.config(**{k: _frozen(v) for k, v in kwargs.items()})


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` for ``num_classes`` classes from its config's keyword arguments.

    An unknown name raises listing the valid names; an unknown keyword raises naming it and the
    valid keywords; a ``num_classes`` that is not a positive integer raises ValueError.
    """
    config = model_config(name, **kwargs)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _spec(name).builder(num_classes, config)


def normalize(images: Tensor | np.ndarray, layout: str = "bhwc") -> Tensor:
    """Images -> ``B x 3 x H x W`` float32, ImageNet mean/std normalised, on the input's device.

    ``images``: uint8 (0..255) or float (0..1), numpy or torch, ``B x H x W x 3`` (``layout="bhwc"``,
    as shards decode) or ``B x 3 x H x W`` (``layout="bchw"``); a single image without the batch
    dimension is accepted too. Train, evaluate and predict all call this, so they cannot drift.
    """
    if layout not in ("bhwc", "bchw"):
        raise ValueError(f"layout must be 'bhwc' or 'bchw', got {layout!r}")
    if isinstance(images, np.ndarray):
        # decoded images are often read-only views, which torch.from_numpy warns about; copy those
        x = torch.from_numpy(np.array(images) if not images.flags.writeable else np.ascontiguousarray(images))
    else:
        x = images
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if x.ndim == 3:
        x = x[None]
    channel_dim = 3 if layout == "bhwc" else 1
    if x.ndim != 4 or x.shape[channel_dim] != 3:
        raise ValueError(f"images must be {layout.upper()} with 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        # 0..255 floats are a common slip that would silently produce garbage
        if x.numel() and float(x.max()) > 2.0:
            raise ValueError(f"float images must lie in [0, 1], got max {float(x.max()):.1f}; pass uint8 or divide by 255")
    else:
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if layout == "bhwc":
        x = x.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


__all__ = [
    "MODELS", "OUTPUTS", "TASKS", "ClassRows", "KeptClass", "ModelSpec", "NamedClass", "TransferError",
    "TransferReport", "adapt_state_dict", "build_model", "default_kwargs", "model_config", "normalize", "spec_of",
    "task_of",
]
