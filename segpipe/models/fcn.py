"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015): FCN-32s, FCN-16s, FCN-8s.

Class scores (1x1 convolutions) on the stride-32 features, and for the 16s/8s variants on the
stride-16 and stride-8 features too, fused by summation after learned 2x upsampling; the fused
map is upsampled to input size by a last learned deconvolution. Every deconvolution starts as
bilinear interpolation and the skip score layers start at zero, as in the paper, so training
begins from FCN-32s' output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models.backbones import build_backbone, load_backbone_weights
from segpipe.models.semantic import SemanticModel


def bilinear_kernel(channels: int, size: int) -> Tensor:
    """``channels x channels x size x size`` weights of a per-channel bilinear upsampling deconvolution."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = filt1d[:, None] * filt1d[None, :]
    return weight


def learned_upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Deconvolution that upsamples by ``factor`` exactly (``n -> n * factor``), initialised bilinear.

    kernel 2f, stride f, padding f/2 places input pixel j at output ``j*f + f/2 - 1/2``, the
    same pixel-centre convention as ``F.interpolate(align_corners=False)``.
    """
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


@dataclass(frozen=True)
class FCNConfig:
    """Build arguments of FCN-32s/16s/8s (the variant is the architecture, not an argument).

    ``backbone``: a torchvision ResNet or ``vgg16`` (the paper's); ``head_channels``: width of the
    paper's fc6/fc7 turned convolutional (4096 there; 0 = no head); ``class_weights`` weigh the
    cross-entropy per class; ``backbone_weights`` names a local weights file for the backbone.
    """

    backbone: str = "resnet18"
    head_channels: int = 256
    dropout: float = 0.1
    ignore_index: int = 255
    class_weights: tuple[float, ...] | None = None
    dice_weight: float = 0.0
    backbone_weights: str | None = None


class FCN(SemanticModel):
    """FCN on a torchvision backbone; ``skips`` is 0 (32s), 1 (16s) or 2 (8s)."""

    def __init__(self, num_classes: int, config: FCNConfig, skips: int) -> None:
        super().__init__(num_classes, config.ignore_index, aux_weight=0.0, class_weights=config.class_weights,
                         dice_weight=config.dice_weight)
        if skips not in (0, 1, 2):
            raise ValueError(f"skips must be 0, 1 or 2, got {skips}")
        self.skips = skips
        self.backbone = build_backbone(config.backbone)
        if config.backbone_weights:
            load_backbone_weights(self.backbone, config.backbone_weights, self.backbone.classifier_prefixes)
        c = self.backbone.channels
        # The paper's fc6/fc7 turned convolutional, narrowed to head_channels (4096 in the paper).
        if config.head_channels > 0:
            self.head = nn.Sequential(
                nn.Conv2d(c["c5"], config.head_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(config.head_channels),
                nn.ReLU(inplace=True),
                nn.Dropout2d(config.dropout),
            )
            top = config.head_channels
        else:
            self.head = nn.Identity()
            top = c["c5"]
        self.score32 = nn.Conv2d(top, num_classes, 1)
        if skips >= 1:
            self.score16 = nn.Conv2d(c["c4"], num_classes, 1)
            self.up32to16 = learned_upsample(num_classes, 2)
            nn.init.zeros_(self.score16.weight)
            nn.init.zeros_(self.score16.bias)
        if skips == 2:
            self.score8 = nn.Conv2d(c["c3"], num_classes, 1)
            self.up16to8 = learned_upsample(num_classes, 2)
            nn.init.zeros_(self.score8.weight)
            nn.init.zeros_(self.score8.bias)
        self.final_stride = (32, 16, 8)[skips]
        self.up_final = learned_upsample(num_classes, self.final_stride)

    def compute_logits(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h, w = images.shape[-2:]
        # Pad to a multiple of 32 so every stride divides the size exactly and the score maps
        # align without the paper's pad-100-and-crop (zero is the mean of normalised images).
        ph, pw = -h % 32, -w % 32
        x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
        f = self.backbone(x)
        score = self.score32(self.head(f["c5"]))
        if self.skips >= 1:
            score = self.up32to16(score) + self.score16(f["c4"])
        if self.skips == 2:
            score = self.up16to8(score) + self.score8(f["c3"])
        return self.up_final(score)[..., :h, :w], {}


def fcn32s(num_classes: int, config: FCNConfig) -> FCN:
    """FCN-32s: scores on the stride-32 features, one 32x learned upsampling."""
    return FCN(num_classes, config, skips=0)


def fcn16s(num_classes: int, config: FCNConfig) -> FCN:
    """FCN-16s: FCN-32s fused with scores on the stride-16 features, then 16x upsampling."""
    return FCN(num_classes, config, skips=1)


def fcn8s(num_classes: int, config: FCNConfig) -> FCN:
    """FCN-8s: FCN-16s fused again with scores on the stride-8 features, then 8x upsampling."""
    return FCN(num_classes, config, skips=2)
