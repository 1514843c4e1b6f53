"""U-Net (Ronneberger, Fischer & Brox, 2015): a contracting path of double 3x3 convolutions and
max-pooling, an expanding path that upsamples and concatenates the encoder feature of the same
scale, with BatchNorm (not in the 2015 paper, standard since) and padded convolutions so the
output has the input's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models.backbones import load_backbone_weights
from segpipe.models.semantic import SemanticModel


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetEncoder(nn.Module):
    """The contracting path; returns the features of every scale, finest first, bottleneck last."""

    classifier_prefixes: tuple[str, ...] = ()

    def __init__(self, base_channels: int, depth: int) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.channels = widths
        self.stages = nn.ModuleList([double_conv(3, widths[0])])
        self.stages.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stages[0](x)]
        for stage in self.stages[1:]:
            # ceil_mode keeps a last odd row/column instead of dropping it
            feats.append(stage(F.max_pool2d(feats[-1], 2, ceil_mode=True)))
        return feats


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            cin = cin // 2
        self.conv = double_conv(cin + cskip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.mode == "transpose":
            # 2x exactly; with odd skip sizes (ceil-mode pooling) trim the extra row/column
            x = self.up(x)[..., : skip.shape[-2], : skip.shape[-1]]
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


@dataclass(frozen=True)
class UNetConfig:
    """Build arguments of U-Net: ``depth`` poolings and ``base_channels * 2**i`` channels at level
    ``i`` (64 and 4 in the paper); ``upsample`` ``bilinear`` or ``transpose`` (learned 2x2);
    ``backbone_weights`` loads the encoder (a U-Net encoder's state dict); ``class_weights`` weigh
    the cross-entropy per class."""

    base_channels: int = 16
    depth: int = 4
    upsample: str = "bilinear"
    ignore_index: int = 255
    class_weights: tuple[float, ...] | None = None
    dice_weight: float = 0.0
    backbone_weights: str | None = None


class UNet(SemanticModel):
    """U-Net for ``num_classes`` classes, as ``config`` describes it."""

    def __init__(self, num_classes: int, config: UNetConfig) -> None:
        super().__init__(num_classes, config.ignore_index, aux_weight=0.0, class_weights=config.class_weights,
                         dice_weight=config.dice_weight)
        base_channels, depth, upsample = config.base_channels, config.depth, config.upsample
        if upsample not in ("bilinear", "transpose"):
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be positive, got {depth}, {base_channels}")
        self.backbone = UNetEncoder(base_channels, depth)
        if config.backbone_weights:
            load_backbone_weights(self.backbone, config.backbone_weights)
        w = self.backbone.channels
        self.decoder = nn.ModuleList(UpBlock(w[i + 1], w[i], w[i], upsample) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(w[0], num_classes, 1)

    def compute_logits(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.backbone(images)
        x = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            x = block(x, skip)
        return self.classifier(x), {}

