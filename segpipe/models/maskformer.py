"""MaskFormer (Cheng, Schwing & Kirillov, 2021): segmentation as mask classification.

A backbone and an FPN pixel decoder give per-pixel embeddings at stride 4; a transformer decoder
turns ``num_queries`` learned queries, attending to the stride-32 features, into per-query class
logits (K + 1, the last is "no object") and mask embeddings; a query's mask logits are the dot
product of its embedding with every pixel embedding. Training matches queries to ground-truth
segments one-to-one (Hungarian, on class + sigmoid BCE + Dice cost) and applies cross-entropy,
BCE and Dice losses after every decoder layer. Ground-truth segments: one per non-crowd thing
instance plus one per stuff class present in the semantic map.

As in Mask2Former, mask costs and losses are evaluated at ``num_points`` random points rather
than on full-resolution masks, which keeps matching cheap at any image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import masks_to_boxes

from segpipe.models.backbones import RESNETS, ResNetBackbone, load_backbone_weights
from segpipe.models.semantic import check_images


@dataclass(frozen=True)
class Segments:
    """Ground-truth segments of one image: ``labels`` (N), ``masks`` (N x H x W float 0/1) and
    ``valid`` (H x W bool, False where the mask losses ignore the pixel)."""

    labels: Tensor
    masks: Tensor
    valid: Tensor


def image_segments(target: dict[str, Tensor], thing_ids: Sequence[int], num_classes: int, ignore_index: int,
                   index: int = 0) -> Segments:
    """One segment per non-crowd thing instance (label in ``thing_ids``) and one per stuff class
    present in ``semantic``. Ignored pixels, crowd regions and thing-class pixels that no kept
    instance covers are marked invalid, so no query is punished there."""
    if "semantic" not in target:
        raise KeyError(f"targets[{index}] has no 'semantic' map (keys: {sorted(target)})")
    sem = torch.as_tensor(target["semantic"]).long()
    device = sem.device
    bad = (sem != ignore_index) & ((sem < 0) | (sem >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"targets[{index}]['semantic'] has labels {torch.unique(sem[bad])[:5].tolist()} outside "
            f"[0, {num_classes}) that are not the ignore index {ignore_index}"
        )
    valid = sem != ignore_index
    things = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if thing_ids:
        things[list(thing_ids)] = True
    labels, masks = [], []
    if thing_ids and "masks" in target and len(target["masks"]):
        inst = torch.as_tensor(target["masks"]).to(device).bool()
        lab = torch.as_tensor(target["labels"]).to(device).long().reshape(-1)
        if inst.ndim != 3 or inst.shape[0] != lab.shape[0] or inst.shape[-2:] != sem.shape:
            raise ValueError(f"targets[{index}]: masks {tuple(inst.shape)} do not fit labels {tuple(lab.shape)} "
                             f"and semantic {tuple(sem.shape)}")
        if bool(((lab < 0) | (lab >= num_classes)).any()):
            raise ValueError(f"targets[{index}]['labels'] has ids outside [0, {num_classes}): {lab.tolist()[:5]}")
        crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(lab)))).to(device).reshape(-1).bool()
        keep = ~crowd & things[lab] & (inst.flatten(1).sum(1) > 0)
        labels.append(lab[keep])
        masks.append(inst[keep])
        covered = inst[keep].any(0)
    else:
        covered = torch.zeros_like(valid)
    valid &= ~(things[sem.clamp(0, num_classes - 1)] & valid & ~covered)
    stuff = [c for c in torch.unique(sem[valid]).tolist() if not things[c]]
    if stuff:
        labels.append(torch.tensor(stuff, dtype=torch.long, device=device))
        masks.append(sem[None] == torch.tensor(stuff, device=device)[:, None, None])
    if labels:
        return Segments(torch.cat(labels), torch.cat(masks).float(), valid)
    return Segments(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, *sem.shape, device=device), valid)


def point_sample(maps: Tensor, points: Tensor, mode: str = "bilinear") -> Tensor:
    """Values of ``maps`` (N x h x w) at ``points`` (P x 2, (x, y) in [0, 1]) -> N x P."""
    grid = (2 * points - 1)[None, None].expand(maps.shape[0], -1, -1, -1)  # N x 1 x P x 2
    return F.grid_sample(maps[:, None], grid.to(maps.dtype), mode=mode, align_corners=False)[:, 0, 0]


def batch_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction (Q x P logits) against every target (N x P) -> Q x N."""
    p = logits.sigmoid()
    num = 2 * p @ targets.T
    return 1 - (num + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None] + 1)


def batch_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE of every prediction (Q x P) against every target (N x P) -> Q x N."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / max(logits.shape[-1], 1)


@torch.no_grad()
def hungarian_match(
    class_logits: Tensor, mask_logits: Tensor, labels: Tensor, target_masks: Tensor,
    class_weight: float, mask_weight: float, dice_weight: float,
) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one assignment of queries to targets for one image.

    ``class_logits`` Q x (K+1), ``mask_logits`` Q x P, ``labels`` N, ``target_masks`` N x P (0/1 at
    the same P points). Returns ``(query_indices, target_indices)``, each of length min(Q, N).
    Cost = -class_weight * p(label) + mask_weight * BCE + dice_weight * Dice.
    """
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=class_logits.device)
        return empty, empty
    prob = class_logits.float().softmax(-1)[:, labels]  # Q x N
    logits, tgt = mask_logits.float(), target_masks.float()
    cost = -class_weight * prob + mask_weight * batch_bce_cost(logits, tgt) + dice_weight * batch_dice_cost(logits, tgt)
    q, t = linear_sum_assignment(cost.cpu().numpy())
    device = class_logits.device
    return torch.as_tensor(q, dtype=torch.long, device=device), torch.as_tensor(t, dtype=torch.long, device=device)


def sine_position_encoding(x: Tensor, temperature: float = 10000.0) -> Tensor:
    """DETR's 2-D sine encoding of a ``B x C x h x w`` map's positions, ``B x C x h x w`` (C even)."""
    b, c, h, w = x.shape
    npf = c // 2
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w) / h * 2 * math.pi
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w) / w * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(npf, device=x.device) // 2) / npf)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos[None].expand(b, -1, -1, -1).to(x.dtype)


class PixelDecoder(nn.Module):
    """FPN top-down path over c2..c5 -> ``B x mask_dim x H/4 x W/4`` per-pixel embeddings."""

    def __init__(self, channels: dict[str, int], conv_dim: int, mask_dim: int) -> None:
        super().__init__()
        groups = math.gcd(32, conv_dim)
        self.levels = ("c5", "c4", "c3", "c2")
        self.lateral = nn.ModuleDict({k: nn.Conv2d(channels[k], conv_dim, 1) for k in self.levels})
        self.output = nn.ModuleDict({
            k: nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), nn.GroupNorm(groups, conv_dim),
                             nn.ReLU(inplace=True))
            for k in self.levels
        })
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        y = None
        for k in self.levels:
            lat = self.lateral[k](feats[k])
            y = lat if y is None else lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest")
            y = self.output[k](y)
        return self.mask_features(y)


@dataclass(frozen=True)
class MaskFormerConfig:
    """Build arguments of MaskFormer with a ResNet ``backbone``. The paper's size: ``num_queries=100,
    hidden_dim=256, dec_layers=6, nheads=8, dim_feedforward=2048, conv_dim=256, mask_dim=256``.
    ``thing_ids`` are the class ids segmented per instance (the others are stuff); empty means all
    stuff. ``no_object_weight`` weighs the "no object" class in the cross-entropy; ``class_weight``,
    ``mask_weight`` and ``dice_weight`` weigh both the matching costs and the losses; mask costs
    and losses are evaluated at ``num_points`` sampled pixels."""

    backbone: str = "resnet18"
    num_queries: int = 32
    hidden_dim: int = 128
    dec_layers: int = 3
    nheads: int = 4
    dim_feedforward: int = 512
    dropout: float = 0.0
    conv_dim: int = 128
    mask_dim: int = 128
    thing_ids: tuple[int, ...] = ()
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 4096
    ignore_index: int = 255
    backbone_weights: str | None = None


class MaskFormer(nn.Module):
    """MaskFormer; eval-mode output is ``B x K x H x W`` semantic scores (class probabilities times
    mask probabilities, summed over queries); ``predict_instances`` gives thing instances."""

    def __init__(self, num_classes: int, config: MaskFormerConfig) -> None:
        super().__init__()
        c = config
        if c.backbone not in RESNETS:
            raise ValueError(f"maskformer backbone must be one of {', '.join(RESNETS)}, got {c.backbone!r}")
        bad = [t for t in c.thing_ids if not 0 <= int(t) < num_classes]
        if bad:
            raise ValueError(f"thing_ids {bad} are not class ids in [0, {num_classes})")
        if c.hidden_dim % 2 or c.hidden_dim % c.nheads:
            raise ValueError(f"hidden_dim ({c.hidden_dim}) must be even and divisible by nheads ({c.nheads})")
        self.num_classes = num_classes
        self.thing_ids = tuple(sorted({int(t) for t in c.thing_ids}))
        self.ignore_index = c.ignore_index
        self.weights = {"class": c.class_weight, "mask": c.mask_weight, "dice": c.dice_weight}
        self.num_points = c.num_points
        self.backbone = ResNetBackbone(c.backbone)
        if c.backbone_weights:
            load_backbone_weights(self.backbone, c.backbone_weights, self.backbone.classifier_prefixes)
        self.pixel_decoder = PixelDecoder(self.backbone.channels, c.conv_dim, c.mask_dim)
        self.input_proj = nn.Conv2d(self.backbone.channels["c5"], c.hidden_dim, 1)
        layer = nn.TransformerDecoderLayer(c.hidden_dim, c.nheads, c.dim_feedforward, c.dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.dec_layers, norm=nn.LayerNorm(c.hidden_dim))
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.class_embed = nn.Linear(c.hidden_dim, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(c.hidden_dim, c.hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(c.hidden_dim, c.hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(c.hidden_dim, c.mask_dim),
        )
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = c.no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def predictions(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per decoder layer, ``(B x Q x K+1 class logits, B x Q x H/4 x W/4 mask logits)``; last = final.

        In eval mode without gradients the result for the last input tensor is kept: the semantic
        scores, the instances and the panoptic segments of one batch (``segpipe.inference`` asks
        for all three) then cost one forward pass, not three. The kept result is dropped when the
        same tensor has been modified in place, and whenever the model goes back to train mode.
        """
        # Inference-mode tensors have no version counter, so an in-place change could not be seen: not kept.
        reuse = not (self.training or torch.is_grad_enabled() or images.is_inference() or torch.jit.is_tracing()
                     or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())
        last = self.__dict__.get("_last_predictions")
        if reuse and last is not None and last[0] is images and last[1] == images._version:
            return last[2]
        out = self._predictions(images)
        self.__dict__["_last_predictions"] = (images, images._version, out) if reuse else None
        return out

    def train(self, mode: bool = True) -> MaskFormer:
        if mode:
            self.__dict__["_last_predictions"] = None
        return super().train(mode)

    def _predictions(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        feats = self.backbone(images)
        pixel = self.pixel_decoder(feats)  # B x D x H/4 x W/4
        src = self.input_proj(feats["c5"])
        # Positions enter through the memory (keys and values), and the learned queries are the
        # decoder's initial input: nn.TransformerDecoderLayer has no separate positional inputs.
        memory = (src + sine_position_encoding(src)).flatten(2).transpose(1, 2)  # B x hw x C
        x = self.query_embed.weight[None].expand(images.shape[0], -1, -1)
        out = []
        for layer in self.decoder.layers:
            x = layer(x, memory)
            h = self.decoder.norm(x)
            out.append((self.class_embed(h), torch.einsum("bqc,bchw->bqhw", self.mask_embed(h), pixel)))
        return out

    def forward(self, images: Tensor, targets: Sequence[dict[str, Tensor]] | None = None) -> Tensor | dict[str, Tensor]:
        """Train mode: ``loss_ce``, ``loss_mask``, ``loss_dice`` (final layer) and their ``_aux``
        sums over earlier layers. Eval mode: ``B x K x H x W`` semantic scores at input size."""
        check_images(images)
        preds = self.predictions(images)
        if not self.training:
            return self.semantic_scores(*preds[-1], images.shape[-2:])
        if targets is None:
            raise ValueError("MaskFormer in train mode needs targets; call .eval() to predict")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        return self.criterion(preds, targets)

    def criterion(self, preds: list[tuple[Tensor, Tensor]], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Hungarian-matched losses for every decoder layer (called inside ``forward`` for DDP)."""
        device = preds[-1][0].device
        keys = ("semantic", "masks", "labels", "iscrowd")
        segs = [image_segments({k: torch.as_tensor(t[k]).to(device) for k in keys if k in t}, self.thing_ids,
                               self.num_classes, self.ignore_index, i) for i, t in enumerate(targets)]
        # The same points serve every layer: sample the targets once. Only valid pixels are drawn.
        sampled = []
        for s in segs:
            h, w = s.valid.shape
            ys, xs = torch.nonzero(s.valid, as_tuple=True)
            if ys.numel() > self.num_points:
                pick = torch.randint(ys.numel(), (self.num_points,), device=device)
                ys, xs = ys[pick], xs[pick]
            points = torch.stack(((xs.float() + 0.5) / w, (ys.float() + 0.5) / h), dim=1)  # P x 2, pixel centres
            sampled.append((points, s.masks[:, ys, xs]))
        num_masks = max(sum(len(s.labels) for s in segs), 1)
        losses: dict[str, Tensor] = {}
        for depth, (class_logits, mask_logits) in enumerate(preds):
            layer = self.layer_loss(class_logits, mask_logits, segs, sampled, num_masks)
            suffix = "" if depth == len(preds) - 1 else "_aux"
            for k, v in layer.items():
                losses[k + suffix] = losses.get(k + suffix, 0) + v
        return losses

    def layer_loss(self, class_logits: Tensor, mask_logits: Tensor, segs: list[Segments],
                   sampled: list[tuple[Tensor, Tensor]], num_masks: int) -> dict[str, Tensor]:
        # losses in fp32 whatever the autocast precision of the forward pass
        class_logits, mask_logits = class_logits.float(), mask_logits.float()
        b, q, _ = class_logits.shape
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=class_logits.device)
        # 0 x the mask logits keeps every parameter in the graph when nothing matches (DDP needs that)
        bce = dice = mask_logits.sum() * 0.0
        for i, (s, (points, tgt)) in enumerate(zip(segs, sampled)):
            if not len(s.labels) or not len(points):
                continue
            pred = point_sample(mask_logits[i], points)  # Q x P
            qi, ti = hungarian_match(class_logits[i], pred, s.labels, tgt, class_weight=self.weights["class"],
                                     mask_weight=self.weights["mask"], dice_weight=self.weights["dice"])
            target_classes[i, qi] = s.labels[ti]
            p, t = pred[qi], tgt[ti]
            bce = bce + F.binary_cross_entropy_with_logits(p, t, reduction="none").mean(1).sum()
            prob = p.sigmoid()
            dice = dice + (1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)).sum()
        ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {
            "loss_ce": self.weights["class"] * ce,
            "loss_mask": self.weights["mask"] * bce / num_masks,
            "loss_dice": self.weights["dice"] * dice / num_masks,
        }

    @staticmethod
    def semantic_scores(class_logits: Tensor, mask_logits: Tensor, size: Sequence[int]) -> Tensor:
        """``sum_q p_q(k) * sigmoid(m_q)`` upsampled to ``size`` -> B x K x H x W (no-object dropped)."""
        probs = class_logits.softmax(-1)[..., :-1]
        masks = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False).sigmoid()
        return torch.einsum("bqk,bqhw->bkhw", probs, masks)

    def _final_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The final decoder layer's (class logits, low-resolution mask logits), in eval mode."""
        check_images(images)
        was_training = self.training
        self.eval()
        try:
            return self.predictions(images)[-1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def mask_classification(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The final layer's raw outputs at input resolution: ``B x Q x K+1`` class logits (the
        last is "no object") and ``B x Q x H x W`` mask logits (bilinearly upsampled), what
        ``segpipe.panoptic.maskformer_panoptic`` turns into segments."""
        class_logits, mask_logits = self._final_outputs(images)
        masks = F.interpolate(mask_logits, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return class_logits, masks

    @torch.no_grad()
    def predict_instances(
        self, images: Tensor, score_threshold: float, mask_threshold: float, max_detections: int
    ) -> list[dict[str, Tensor]]:
        """Thing instances per image, like Mask R-CNN's eval output: ``boxes`` (x1 y1 x2 y2),
        ``labels``, ``scores``, ``masks`` (N x 1 x H x W probabilities), best first.

        As in Mask2Former, candidates are the top (query, thing class) pairs by class
        probability; score = class probability x mean mask probability inside the mask (the
        pixels at or above ``mask_threshold``, as ``segpipe.inference`` binarises masks).
        """
        class_logits, mask_logits = self._final_outputs(images)
        h, w = images.shape[-2:]
        out = []
        things = torch.tensor(self.thing_ids, dtype=torch.long, device=images.device)
        for cl, ml in zip(class_logits, mask_logits):
            if not len(things):
                out.append(_empty_instances(h, w, images.device))
                continue
            probs = cl.softmax(-1)[:, things]  # Q x T
            k = min(max_detections, probs.numel())
            top, idx = probs.flatten().topk(k)
            query, label = idx // len(things), things[idx % len(things)]
            masks = F.interpolate(ml[query][:, None], size=(h, w), mode="bilinear", align_corners=False).sigmoid()
            binary = masks[:, 0] >= mask_threshold
            area = binary.flatten(1).sum(1)
            mask_score = (masks[:, 0] * binary).flatten(1).sum(1) / area.clamp(min=1)
            scores = top * mask_score
            keep = (area > 0) & (scores >= score_threshold)
            order = scores[keep].argsort(descending=True)
            binary, masks = binary[keep][order], masks[keep][order]
            out.append({
                "boxes": masks_to_boxes(binary) if len(binary) else torch.zeros(0, 4, device=images.device),
                "labels": label[keep][order],
                "scores": scores[keep][order],
                "masks": masks,
            })
        return out


def _empty_instances(h: int, w: int, device: torch.device) -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.long, device=device),
            "scores": torch.zeros(0, device=device), "masks": torch.zeros(0, 1, h, w, device=device)}

