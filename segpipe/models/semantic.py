"""The forward contract of per-pixel (semantic) models, shared by FCN, U-Net and DeepLabV3.

A subclass implements ``compute_logits(images) -> (logits, aux)``; ``forward`` then returns the
logits at input size in eval mode and a dict of scalar losses in train mode. The losses are
computed inside ``forward`` so that DDP's wrapper sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def semantic_targets(
    targets: Sequence[dict[str, Tensor]], num_classes: int, ignore_index: int, device: torch.device
) -> Tensor:
    """Stack the per-image ``semantic`` maps into ``B x H x W`` int64, checking every label.

    A label outside ``[0, num_classes)`` that is not ``ignore_index`` raises, naming the image's
    position in the batch (cross-entropy would otherwise fail obscurely, or assert on a GPU).
    """
    maps = []
    for i, t in enumerate(targets):
        if "semantic" not in t:
            raise KeyError(f"targets[{i}] has no 'semantic' map (keys: {sorted(t)})")
        sem = torch.as_tensor(t["semantic"]).to(device=device, dtype=torch.int64)
        bad = (sem != ignore_index) & ((sem < 0) | (sem >= num_classes))
        if bool(bad.any()):
            values = torch.unique(sem[bad])[:5].tolist()
            raise ValueError(
                f"targets[{i}]['semantic'] has labels {values} outside [0, {num_classes}) "
                f"that are not the ignore index {ignore_index}"
            )
        maps.append(sem)
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"targets' semantic maps differ in size within the batch: {sorted(shapes)}")
    return torch.stack(maps)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy in fp32 over the non-ignored pixels, averaged as ``F.cross_entropy`` does
    (by the summed class weights of those pixels); 0 with a gradient path if all are ignored.

    ``F.cross_entropy``'s mean is 0/0 = NaN on an all-ignored batch, which a random crop can make.
    Logits are upcast so that the loss stays fp32 under bf16/fp16 autocast.
    """
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if weight is None:
        count = valid.sum()
    else:
        count = weight[target[valid]].sum()
    return total / count.clamp(min=1e-6 if weight is not None else 1)


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """1 - mean soft Dice (in fp32) over the classes present in the batch's non-ignored pixels,
    as nnU-Net adds to the cross-entropy: it weighs a small class's overlap like a large one's.

    Per-class sums come from ``index_add`` over the target labels, never a one-hot tensor."""
    k = logits.shape[1]
    valid = target != ignore_index
    prob = logits.float().softmax(1)
    label = target.clamp(0, k - 1)
    p_true = prob.gather(1, label[:, None])[:, 0][valid]  # probability of each valid pixel's own class
    inter = prob.new_zeros(k).index_add_(0, label[valid], p_true)
    count = torch.bincount(label[valid], minlength=k).to(prob.dtype)
    prob_sum = (prob * valid[:, None]).sum((0, 2, 3))
    present = count > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return 1.0 - ((2 * inter + 1) / (prob_sum + count + 1))[present].mean()


def check_images(images: Tensor) -> None:
    """Images must be a ``B x 3 x H x W`` float tensor (the output of ``segpipe.models.normalize``)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float B x 3 x H x W tensor (see segpipe.models.normalize), got {shape}")


class SemanticModel(nn.Module):
    """Base class: per-pixel logits at input size in eval mode, cross-entropy losses in train mode.

    ``class_weights`` weigh the cross-entropy per class, ``dice_weight`` adds that times the soft
    Dice loss, and ``aux`` logits returned by ``compute_logits`` (any size; they are upsampled) add
    ``aux_weight x`` their cross-entropy as ``loss_<name>``.
    """

    def __init__(self, num_classes: int, ignore_index: int, aux_weight: float,
                 class_weights: Sequence[float] | None, dice_weight: float) -> None:
        super().__init__()
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.dice_weight = dice_weight
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        weights = None
        if class_weights is not None:
            if len(class_weights) != num_classes or any(not w >= 0 for w in class_weights):
                raise ValueError(f"class_weights must be {num_classes} non-negative numbers, got {list(class_weights)}")
            weights = torch.tensor([float(w) for w in class_weights])
        # Not persistent: the weights are a build argument (stored with the checkpoint's kwargs).
        self.register_buffer("class_weights", weights, persistent=False)

    def compute_logits(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B x K x H x W logits at input size, {name: aux logits})``."""
        raise NotImplementedError

    def forward(self, images: Tensor, targets: Sequence[dict[str, Tensor]] | None = None) -> Tensor | dict[str, Tensor]:
        check_images(images)
        logits, aux = self.compute_logits(images)
        if not self.training:
            return logits
        if targets is None:
            raise ValueError(f"{type(self).__name__} in train mode needs targets; call .eval() to predict")
        target = semantic_targets(targets, self.num_classes, self.ignore_index, images.device)
        if target.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"semantic targets are {tuple(target.shape[-2:])} but images are {tuple(logits.shape[-2:])}")
        w = self.class_weights
        losses = {"loss_ce": cross_entropy(logits, target, self.ignore_index, w)}
        if self.dice_weight:
            losses["loss_dice"] = self.dice_weight * soft_dice_loss(logits, target, self.ignore_index)
        for name, a in aux.items():
            a = F.interpolate(a, size=target.shape[-2:], mode="bilinear", align_corners=False)
            losses[f"loss_{name}"] = self.aux_weight * cross_entropy(a, target, self.ignore_index, w)
        return losses
