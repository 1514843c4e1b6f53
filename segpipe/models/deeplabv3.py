"""DeepLabV3 (Chen et al., 2017): atrous spatial pyramid pooling on a dilated ResNet.

ASPP = a 1x1 convolution, three 3x3 atrous convolutions at ``atrous_rates`` and an image-level
pooling branch, concatenated and projected; then a 3x3 convolution and the classifier, and
bilinear upsampling to input size. ``output_stride`` 16 dilates layer4, 8 dilates layer3 too
(the paper doubles the rates for 8: pass ``atrous_rates=(12, 24, 36)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models.backbones import RESNETS, ResNetBackbone, load_backbone_weights
from segpipe.models.semantic import SemanticModel


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)])
        self.branches.extend(conv_bn_relu(cin, cout, 3, r) for r in rates)
        # The pooled branch has one value per channel and image: BatchNorm there fails for a
        # batch of one (a last partial batch, one image per GPU), so it has a bias, no norm.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


@dataclass(frozen=True)
class DeepLabV3Config:
    """Build arguments of DeepLabV3: a dilated ResNet ``backbone`` (``resnet18`` ... ``resnet101``)
    at ``output_stride`` 16 or 8, ASPP at three ``atrous_rates`` with ``aspp_channels`` (256 in the
    paper); ``aux_loss`` adds torchvision's auxiliary FCN head on layer3, weighted ``aux_weight``,
    to the training loss; ``class_weights`` weigh the cross-entropy per class."""

    backbone: str = "resnet18"
    output_stride: int = 16
    atrous_rates: tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 128
    aux_loss: bool = False
    aux_weight: float = 0.4
    ignore_index: int = 255
    class_weights: tuple[float, ...] | None = None
    dice_weight: float = 0.0
    backbone_weights: str | None = None


class DeepLabV3(SemanticModel):
    """DeepLabV3 for ``num_classes`` classes, as ``config`` describes it."""

    def __init__(self, num_classes: int, config: DeepLabV3Config) -> None:
        super().__init__(num_classes, config.ignore_index, config.aux_weight if config.aux_loss else 0.0,
                         class_weights=config.class_weights, dice_weight=config.dice_weight)
        backbone, output_stride, atrous_rates = config.backbone, config.output_stride, config.atrous_rates
        aspp_channels = config.aspp_channels
        if backbone not in RESNETS:
            raise ValueError(f"deeplabv3 backbone must be one of {', '.join(RESNETS)}, got {backbone!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if len(atrous_rates) != 3:
            raise ValueError(f"atrous_rates must be three rates, got {list(atrous_rates)}")
        self.backbone = ResNetBackbone(backbone, output_stride)
        if config.backbone_weights:
            load_backbone_weights(self.backbone, config.backbone_weights, self.backbone.classifier_prefixes)
        c = self.backbone.channels
        self.aspp = ASPP(c["c5"], aspp_channels, [int(r) for r in atrous_rates])
        self.head = nn.Sequential(conv_bn_relu(aspp_channels, aspp_channels, 3), nn.Conv2d(aspp_channels, num_classes, 1))
        # torchvision's auxiliary FCN head on layer3, used for the loss only
        self.aux_head = (
            nn.Sequential(conv_bn_relu(c["c4"], c["c4"] // 4, 3), nn.Dropout(0.1), nn.Conv2d(c["c4"] // 4, num_classes, 1))
            if config.aux_loss
            else None
        )

    def compute_logits(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.backbone(images)
        logits = self.head(self.aspp(f["c5"]))
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        aux = {"aux": self.aux_head(f["c4"])} if self.aux_head is not None and self.training else {}
        return logits, aux

