"""Sliding-window geometry for images larger than a model's tile, in pure torch.

What runs the model (padding, thresholds, detection selection) is ``segpipe.inference``, which
calls these with functions of a batch of tiles; this module only cuts tiles, blends and merges.

Semantic: tiles overlap by ``overlap`` pixels; each tile's softmax probabilities are weighted
by a window that ramps linearly from ~0 to 1 across every side that has a neighbouring tile
(and stays 1 on sides at the image border), accumulated in float32 and divided by the summed
weights. Adjacent tiles therefore cross-fade over the overlap and no seam is visible.

Memory is bounded by one row of tiles, not by the image: rows are predicted top to bottom and
every pixel row above the next tile row is final, so it is turned into labels (uint8/int64
H x W) and its K x rows x W probabilities are dropped. For a 6000 x 6000 orthophoto with
K = 10 and 512-pixel tiles the buffer is 10 x 512 x 6000 float32 (123 MB) rather than 1.4 GB.

Instances: each tile's detections are moved to image coordinates as (box, score, label, mask
crop); duplicates across tile borders are merged greedily by score with a mask-IoU /
containment test, preferring detections not cut by an inner tile border.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Preprocess = Callable[[np.ndarray], Tensor]  # H x W x 3 uint8 -> 3 x H x W float (normalised)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``tile`` overlapping by >= ``overlap``.

    The last window is aligned to the end, so every window lies inside the image.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def ramp(length: int, overlap: int, before: bool, after: bool) -> Tensor:
    """1-D blending weights: linear ramps of ``overlap`` pixels on the sides with a neighbour."""
    w = torch.ones(length, dtype=torch.float32)
    n = min(overlap, length // 2)
    if n > 0:
        up = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # strictly positive: every pixel gets weight
        if before:
            w[:n] = up
        if after:
            w[length - n:] = up.flip(0)
    return w


@dataclass(frozen=True)
class Window:
    """How an image is cut for a model: square tiles of ``tile`` pixels overlapping by at least
    ``overlap``, ``batch_size`` tiles per model call, on ``device``."""

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    device: str | torch.device = "cpu"

    def starts(self, height: int, width: int) -> tuple[list[int], list[int]]:
        """The first rows and first columns of the tiles covering a ``height x width`` image."""
        return tile_starts(height, self.tile, self.overlap), tile_starts(width, self.tile, self.overlap)


def _probabilities(logits_fn: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    probs = logits_fn(batch).float().softmax(dim=1)
    if probs.shape[-2:] != batch.shape[-2:]:
        raise ValueError(f"logits of {tuple(probs.shape)} for tiles of {tuple(batch.shape)}: expected the tile size")
    return probs


@dataclass(frozen=True)
class Strip:
    """Final class probabilities for image rows ``[y0, y1)``: ``probs`` is K x (y1 - y0) x W."""

    y0: int
    y1: int
    probs: Tensor


@torch.inference_mode()
def iter_semantic_strips(logits_fn: Callable[[Tensor], Tensor], image: np.ndarray, preprocess: Preprocess,
                         window: Window = Window()) -> Iterator[Strip]:
    """Blend sliding-window softmax probabilities over ``image`` (H x W x 3 uint8), yielding final strips.

    ``logits_fn`` maps a B x 3 x h x w batch of tiles (on the window's device) to B x K x h x w logits.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    height, width = image.shape[:2]
    (ys, xs), overlap, batch_size = window.starts(height, width), window.overlap, window.batch_size
    th, tw = min(window.tile, height), min(window.tile, width)
    wx = [ramp(tw, overlap, i > 0, i < len(xs) - 1) for i in range(len(xs))]
    acc: Tensor | None = None  # K x th x W, covering image rows [ys[r], ys[r] + th)
    weight = torch.zeros(th, width)
    carry: tuple[Tensor, Tensor] | None = None  # what the previous row left for rows below it
    for r, y in enumerate(ys):
        wy = ramp(th, overlap, r > 0, r < len(ys) - 1)
        tiles = [preprocess(image[y:y + th, x:x + tw]) for x in xs]
        outputs = []
        for b in range(0, len(tiles), batch_size):
            batch = torch.stack(tiles[b:b + batch_size]).to(window.device)
            outputs.append(_probabilities(logits_fn, batch).cpu())
        probs = torch.cat(outputs)  # len(xs) x K x th x tw
        if acc is None or acc.shape[0] != probs.shape[1]:
            acc = torch.zeros(probs.shape[1], th, width)
        acc.zero_()
        weight.zero_()
        if carry is not None:
            c_acc, c_w = carry
            acc[:, : c_acc.shape[1]] = c_acc
            weight[: c_w.shape[0]] = c_w
        for i, x in enumerate(xs):
            w2 = wy[:, None] * wx[i][None, :]
            acc[:, :, x:x + tw] += probs[i] * w2
            weight[:, x:x + tw] += w2
        last = r == len(ys) - 1
        done = th if last else ys[r + 1] - y  # rows of this buffer no later tile touches
        yield Strip(y, y + done, acc[:, :done] / weight[:done])
        carry = None if last else (acc[:, done:].clone(), weight[done:].clone())


def predict_semantic(logits_fn: Callable[[Tensor], Tensor], image: np.ndarray, preprocess: Preprocess,
                     window: Window = Window(), return_probs: bool = False) -> Tensor:
    """Sliding-window prediction of one image: H x W int64 labels, or K x H x W probabilities.

    Labels need memory for one row of tiles only; ``return_probs`` keeps the whole K x H x W.
    """
    height, width = image.shape[:2]
    labels = torch.empty(height, width, dtype=torch.int64)
    strips = []
    for s in iter_semantic_strips(logits_fn, image, preprocess, window):
        if return_probs:
            strips.append(s.probs)
        else:
            labels[s.y0:s.y1] = s.probs.argmax(0)
    return torch.cat(strips, dim=1) if return_probs else labels


# --------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One detection in image coordinates; ``mask`` is the binary crop at rows y0.., columns x0.."""

    label: int
    score: float
    x0: int
    y0: int
    mask: np.ndarray  # h x w bool
    cut: bool = False  # touches an inner tile border, so it may be a truncated piece
    bbox: tuple[float, float, float, float] | None = None  # the model's box (x1 y1 x2 y2); None: the mask's

    def shifted(self, dx: int, dy: int) -> Instance:
        """The same detection ``dx``, ``dy`` pixels to the right and down."""
        bbox = None if self.bbox is None else (self.bbox[0] + dx, self.bbox[1] + dy, self.bbox[2] + dx, self.bbox[3] + dy)
        return Instance(self.label, self.score, self.x0 + dx, self.y0 + dy, self.mask, self.cut, bbox)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box of the mask, x1 y1 x2 y2 (exclusive)."""
        return self.x0, self.y0, self.x0 + self.mask.shape[1], self.y0 + self.mask.shape[0]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def crop_instance(label: int, score: float, mask: np.ndarray, dx: int = 0, dy: int = 0,
                  bbox: tuple[float, float, float, float] | None = None) -> Instance | None:
    """An Instance from a full-size binary mask, cropped to its tight box and moved by ``dx``,
    ``dy``; None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return Instance(label, score, int(x0), int(y0), mask[y0:y1, x0:x1].copy(), bbox=bbox).shifted(dx, dy)


def overlap_stats(a: Instance, b: Instance) -> tuple[int, float]:
    """(intersection pixels, IoU) of two instance masks."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0, 0.0
    ma = a.mask[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    mb = b.mask[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    inter = int(np.logical_and(ma, mb).sum())
    union = a.area + b.area - inter
    return inter, inter / union if union else 0.0


def merge_instances(instances: list[Instance], iou: float = 0.5, containment: float = 0.8) -> list[Instance]:
    """Greedy cross-tile deduplication of same-class detections.

    Uncut detections come first, then by score; a detection is dropped when its mask IoU with a
    kept one exceeds ``iou`` or when ``containment`` of the smaller mask lies inside it (the
    truncated half of an object seen whole by a neighbouring tile).
    """
    order = sorted(instances, key=lambda d: (d.cut, -d.score))
    kept: list[Instance] = []
    for d in order:
        duplicate = False
        for k in kept:
            if k.label != d.label:
                continue
            inter, j = overlap_stats(d, k)
            if inter and (j > iou or inter / max(1, min(d.area, k.area)) > containment):
                duplicate = True
                break
        if not duplicate:
            kept.append(d)
    return sorted(kept, key=lambda d: -d.score)


@torch.inference_mode()
def predict_instances(detect: Callable[[Tensor], list[list[Instance]]], image: np.ndarray, preprocess: Preprocess,
                      window: Window = Window(), iou: float = 0.5) -> list[Instance]:
    """Sliding-window instance prediction, merged across tiles.

    ``detect`` maps a B x 3 x h x w batch of tiles (on the window's device) to each tile's
    selected detections in tile coordinates. Only binary crops are kept per detection, so memory
    grows with the detected area, not with the image.
    """
    height, width = image.shape[:2]
    ys, xs = window.starts(height, width)
    th, tw = min(window.tile, height), min(window.tile, width)
    found: list[Instance] = []
    positions = [(y, x) for y in ys for x in xs]
    for b in range(0, len(positions), window.batch_size):
        chunk = positions[b:b + window.batch_size]
        batch = torch.stack([preprocess(image[y:y + th, x:x + tw]) for y, x in chunk]).to(window.device)
        for (y, x), tile_found in zip(chunk, detect(batch)):
            for inst in tile_found:
                inst = inst.shifted(x, y)
                x0, y0, x1, y1 = inst.box
                # Cut by a border that is inside the image: another tile sees beyond it.
                inst.cut = (x0 == x and x > 0) or (y0 == y and y > 0) or (x1 == x + tw and x1 < width) or (
                    y1 == y + th and y1 < height)
                found.append(inst)
    return merge_instances(found, iou=iou)


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def window_memory_bytes(num_classes: int, width: int, tile: int) -> int:
    """Bytes of the float32 blending buffer (probabilities + weights) for one row of tiles."""
    return 4 * (num_classes + 1) * tile * width


__all__ = [
    "Instance", "Strip", "Window", "crop_instance", "iter_semantic_strips", "merge_instances", "predict_instances",
    "predict_semantic", "ramp", "tile_count", "tile_starts", "window_memory_bytes",
]
