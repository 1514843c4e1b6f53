"""Feature extractors shared by the architectures: torchvision ResNets and VGG-16 built with
``weights=None``, tapped at strides 4/8/16/32, with optional atrous (dilated) ResNets and
loading of backbone weights from a local file.

A backbone's ``state_dict`` keys are exactly torchvision's (minus the classifier), so a
file saved from ``torchvision.models.resnet18().state_dict()`` loads as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision is imported where a backbone is built: its import pulls in torch._dynamo (about 2 s
# of start-up here), which a process scoring or serving a U-Net without a backbone never needs.

LEVELS = ("c2", "c3", "c4", "c5")  # nominal strides 4, 8, 16, 32

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "vgg16")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns ``{c2..c5: B x C x h x w}``.

    ``output_stride`` 16 or 8 replaces the strides of layer4 (and layer3) by dilation, for
    BasicBlock ResNets too (torchvision only supports that for Bottleneck ones).
    """

    classifier_prefixes = ("fc.",)

    def __init__(self, name: str, output_stride: int = 32) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet backbone {name!r}; valid: {', '.join(RESNETS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        wide = name in ("resnet50", "resnet101")
        c = [256, 512, 1024, 2048] if wide else [64, 128, 256, 512]
        self.channels = dict(zip(LEVELS, c))
        self.strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
        if output_stride <= 16:
            _dilate(self.layer4, previous=1 if output_stride == 16 else 2, dilation=2 if output_stride == 16 else 4)
            self.strides["c5"] = 16
        if output_stride == 8:
            _dilate(self.layer3, previous=1, dilation=2)
            self.strides["c4"] = self.strides["c5"] = 8

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def _dilate(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a strided ResNet stage into an atrous one in place (the parameters do not change).

    Like torchvision's ``replace_stride_with_dilation``, the first block keeps the previous
    stage's dilation and the others use ``dilation``.
    """
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class VGGBackbone(nn.Module):
    """torchvision's VGG-16 ``features`` (no BatchNorm, as in the FCN paper), tapped after pool2..pool5."""

    classifier_prefixes = ("classifier.",)
    _taps = {9: "c2", 16: "c3", 23: "c4", 30: "c5"}  # indices of the max-pool layers

    def __init__(self) -> None:
        import torchvision

        super().__init__()
        self.features = torchvision.models.vgg16(weights=None).features
        self.channels = {"c2": 128, "c3": 256, "c4": 512, "c5": 512}
        self.strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                out[self._taps[i]] = x
        return out


def build_backbone(name: str, output_stride: int = 32) -> ResNetBackbone | VGGBackbone:
    """A backbone by name (``resnet18`` ... ``vgg16``); an unknown name lists the valid ones."""
    if name == "vgg16":
        if output_stride != 32:
            raise ValueError("vgg16 supports only output_stride 32")
        return VGGBackbone()
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return ResNetBackbone(name, output_stride)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local weights file: ``.safetensors``, or a ``torch.save``d state dict read
    with ``weights_only=True`` (so nothing is unpickled). ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects, a truncated file, not a torch file at all
        raise ValueError(f"backbone_weights {path}: not a state dict loadable with weights_only=True ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"backbone_weights {path}: expected a mapping of parameter names to tensors")
    return obj


def load_backbone_weights(
    module: nn.Module, path: str | Path, ignore_prefixes: Iterable[str] = (), strip_prefixes: Iterable[str] = ()
) -> None:
    """Load a local weights file into ``module`` strictly, naming the file and the keys at fault.

    Keys under ``ignore_prefixes`` (a classifier the backbone does not have) are dropped, and
    ``strip_prefixes`` (e.g. ``"module."`` from DDP, ``"backbone."``) are removed first.
    """
    state = read_state_dict(path)
    strip = ("module.", *strip_prefixes)
    cleaned = {}
    for key, value in state.items():
        for p in strip:
            if key.startswith(p):
                key = key[len(p):]
        if not key.startswith(tuple(ignore_prefixes)):
            cleaned[key] = value
    own = module.state_dict()
    # BatchNorm's step counter is absent from FrozenBatchNorm2d (Mask R-CNN) and plays no part in
    # the forward pass, so its presence is not a mismatch either way.
    counter = "num_batches_tracked"
    cleaned = {k: v for k, v in cleaned.items() if k in own or not k.endswith(counter)}
    missing = sorted(k for k in set(own) - set(cleaned) if not k.endswith(counter))
    unexpected = sorted(set(cleaned) - set(own))
    wrong = sorted(k for k in set(own) & set(cleaned) if own[k].shape != cleaned[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(cleaned[k].shape)} vs {tuple(own[k].shape)})")
        raise ValueError(
            f"backbone_weights {path} does not fit the {type(module).__name__}: {'; '.join(parts)}"
        )
    module.load_state_dict(cleaned, strict=False)  # strictness checked above, BN counters aside
