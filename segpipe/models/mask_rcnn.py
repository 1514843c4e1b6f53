"""Mask R-CNN (He et al., 2017): torchvision's ``MaskRCNN`` on a ResNet-FPN backbone, sized for
small images and small objects, behind segpipe's forward contract.

torchvision reserves label 0 for background while segpipe's class ids start at 0 (and a thing
class may have id 0), so labels are shifted by +1 inside and back on output: the detector has
``num_classes + 1`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from segpipe.models.backbones import RESNETS, load_backbone_weights
from segpipe.models.native_scale import NativeScaleTransform
from segpipe.models.semantic import check_images


def resnet_fpn(name: str, norm_layer: type[nn.Module], trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    """torchvision's ResNet-FPN (as ``resnet_fpn_backbone`` builds it, five levels, strides 4..64)
    with ``fpn_channels`` instead of its fixed 256: at 128 the FPN and the heads cost half."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    body = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable_layers + (trainable_layers == 5)]
    for pname, p in body.named_parameters():
        if not pname.startswith(tuple(train)):
            p.requires_grad_(False)
    c = body.inplanes // 8  # layer1's output channels
    return BackboneWithFPN(
        body, {f"layer{i + 1}": str(i) for i in range(4)}, [c, 2 * c, 4 * c, 8 * c], fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def detection_targets(targets: Sequence[dict[str, Tensor]], num_classes: int, device: torch.device) -> list[dict[str, Tensor]]:
    """segpipe targets -> torchvision's: non-crowd instances with a non-empty mask and a box of
    positive size (a crop can leave slivers), labels shifted by +1."""
    out = []
    for i, t in enumerate(targets):
        for key in ("masks", "labels", "boxes"):
            if key not in t:
                raise KeyError(f"targets[{i}] has no {key!r} (keys: {sorted(t)})")
        masks = torch.as_tensor(t["masks"]).to(device=device, dtype=torch.uint8)
        labels = torch.as_tensor(t["labels"]).to(device=device, dtype=torch.int64)
        boxes = torch.as_tensor(t["boxes"]).to(device=device, dtype=torch.float32).reshape(-1, 4)
        n = labels.shape[0]
        if masks.shape[0] != n or boxes.shape[0] != n or masks.ndim != 3:
            raise ValueError(
                f"targets[{i}]: masks {tuple(masks.shape)}, labels {tuple(labels.shape)} and boxes "
                f"{tuple(boxes.shape)} must describe the same N instances (masks N x H x W)"
            )
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"targets[{i}]['labels'] has ids {labels[bad].tolist()[:5]} outside [0, {num_classes})")
        crowd = torch.as_tensor(t.get("iscrowd", torch.zeros(n))).to(device=device).reshape(-1).bool()
        keep = ~crowd & (masks.flatten(1).sum(1) > 0 if n else torch.zeros(0, dtype=torch.bool, device=device))
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.append({"boxes": boxes[keep], "labels": labels[keep] + 1, "masks": masks[keep]})
    return out


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Build arguments of Mask R-CNN with a ResNet-FPN backbone, with light heads by default (64 FPN
    channels, 200 proposals and 32 sampled RoIs per training image): from scratch on a 2-core CPU
    these learn about twice the steps of 128-channel heads in the same time and reach higher AP in
    it (docs/benchmarks.md). torchvision's sizes: ``fpn_channels=256, box_head_dim=1024,
    mask_head_channels=256``, ``rpn_post_nms_top_n_train=2000, box_batch_size_per_image=512``,
    anchors 32..512, ``min_size=800, max_size=1333`` (with ``native_scale=False``; by default
    images are used at the scale they arrive). Fine-tuning pretrained weights: ``frozen_bn=True,
    trainable_layers=3``."""

    backbone: str = "resnet18"
    trainable_layers: int = 5
    frozen_bn: bool = False
    min_size: int = 128
    max_size: int = 512
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    fpn_channels: int = 64
    box_head_dim: int = 256
    mask_head_channels: int = 32
    rpn_post_nms_top_n_train: int = 200
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 32
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    native_scale: bool = True
    backbone_weights: str | None = None


class MaskRCNN(nn.Module):
    """torchvision's Mask R-CNN; ``self.detector`` holds it, ``self.backbone`` is its ResNet body."""

    def __init__(self, num_classes: int, config: MaskRCNNConfig) -> None:
        super().__init__()
        # segpipe feeds images at the scale it trains on (crops in training, whole images in
        # evaluation and tiles in prediction), so by default torchvision's transform must not
        # rescale them; min_size/max_size apply only with native_scale=False.
        c = config
        self.native_scale = c.native_scale
        if c.backbone not in RESNETS:
            raise ValueError(f"mask_rcnn backbone must be one of {', '.join(RESNETS)}, got {c.backbone!r}")
        if len(c.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {list(c.anchor_sizes)}")
        self.num_classes = num_classes
        # From scratch, FrozenBatchNorm2d would be the identity (no normalisation at all), so
        # plain BatchNorm is the default; freeze it when fine-tuning pretrained weights.
        norm = FrozenBatchNorm2d if c.frozen_bn else nn.BatchNorm2d
        fpn = resnet_fpn(c.backbone, norm, c.trainable_layers, c.fpn_channels)
        if c.backbone_weights:
            load_backbone_weights(fpn.body, c.backbone_weights, ignore_prefixes=("fc.",))
        anchors = AnchorGenerator(tuple((int(s),) for s in c.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        resolution = 7  # MultiScaleRoIAlign output size of the box branch
        self.detector = TorchvisionMaskRCNN(
            fpn,
            min_size=c.min_size,
            max_size=c.max_size,
            # images arrive normalised by segpipe.models.normalize; do not normalise twice
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=1000,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
            box_head=TwoMLPHead(c.fpn_channels * resolution**2, c.box_head_dim),
            box_predictor=FastRCNNPredictor(c.box_head_dim, num_classes + 1),
            box_batch_size_per_image=c.box_batch_size_per_image,
            box_detections_per_img=c.box_detections_per_img,
            box_score_thresh=c.box_score_thresh,
            mask_head=MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels, num_classes + 1),
        )
        if c.native_scale:
            t = self.detector.transform
            self.detector.transform = NativeScaleTransform(
                t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible)

    @property
    def backbone(self) -> nn.Module:
        """The ResNet body (torchvision's key names, no ``fc``); what ``backbone_weights`` loads."""
        return self.detector.backbone.body

    def forward(
        self, images: Tensor, targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: torchvision's loss dict. Eval mode: one dict per image with ``boxes``
        (x1 y1 x2 y2), ``labels`` (segpipe class ids), ``scores``, ``masks`` (N x 1 x H x W probabilities)."""
        check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("MaskRCNN in train mode needs targets; call .eval() to predict")
            if len(targets) != images.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
            return self.detector(list(images), detection_targets(targets, self.num_classes, images.device))
        detections = self.detector(list(images))
        for d in detections:
            d["labels"] = d["labels"] - 1
        return detections

    @torch.no_grad()
    def predict_instances(self, images: Tensor, score_threshold: float, mask_threshold: float,
                          max_detections: int) -> list[dict[str, Tensor]]:
        """Detections (as in eval mode) with ``scores >= score_threshold``, best first, at most
        ``max_detections``, whatever the mode. Masks stay probabilities: ``mask_threshold`` is
        applied where detections are selected (``segpipe.inference``); it is taken so that every
        instance-capable model has this one signature."""
        was_training = self.training
        self.eval()
        try:
            detections = self(images)
        finally:
            self.train(was_training)
        out = []
        for d in detections:
            keep = torch.nonzero(d["scores"] >= score_threshold).flatten()
            keep = keep[d["scores"][keep].argsort(descending=True, stable=True)][:max_detections]
            out.append({k: v[keep] for k, v in d.items()})
        return out

