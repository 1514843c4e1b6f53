"""Turning model outputs into label maps and detections: one place for every caller.

Train validation, ``segpipe evaluate``, ``segpipe predict`` and ``segpipe export``'s parity check
use this module, so the numbers that decide a promotion come from the code that serves
predictions. One policy each:

- padding: an image is padded to the next multiple of 32 by replicating its edges (a band of
  zeros would change predictions near the border) and the outputs are cropped back. Images of a
  batch are grouped by padded size, so a prediction never depends on what it was batched with;
- detection selection (:func:`select_detections`): score >= ``score_threshold``, mask
  probability >= ``mask_threshold``, empty masks dropped, best score first, at most
  ``max_detections``;
- rendering (:func:`render_instances`): each pixel takes the class of the best-scoring detection
  covering it, ``ignore_index`` where none does;
- COCO results (:func:`coco_results`), the palette (:func:`palette`) and the colour legend of
  overlays (:func:`legend`).

Three entry points: whole images (:func:`predict_images`: evaluate, train validation), large
images by sliding window (:func:`predict_tiled`: predict), and work over a dataset
(:func:`map_rows`): in this process, or through Ray Data (``map_batches`` on an actor pool, one
model per actor, GPU actors when the device is ``cuda``, results streamed back as they finish).
Per-pixel class probabilities take :func:`predict_tiled`'s path too (:func:`iter_probabilities`,
:func:`predict_probabilities`: their argmax is its labels), with an image embedding on the side
(:class:`FeaturePool`: the mean of the features the model's classifier reads): ``segpipe audit``,
``select`` and ``drift`` use them.

What a model outputs comes from the registry (``segpipe.models.spec_of(arch).outputs``); every
instance-capable model has ``predict_instances(images, score_threshold, mask_threshold,
max_detections)``, every panoptic-capable one ``mask_classification(images)``. One function per
output kind (:func:`_semantic`, :func:`_instances`, :func:`_panoptic`: Mask2Former's inference,
:class:`PanopticSettings`), one field each of :class:`Prediction`; :func:`fuse` makes a
panoptic result of any semantic prediction with any instance prediction (Panoptic FPN's
heuristic). Thresholds come from the caller's own params section (``evaluate``, ``predict``,
``train.val_detection``, ``fuse``): this module states no default of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segpipe import tiling
from segpipe.params import ENGINES, DetectionParams, FusionParams, MaskFormerPanopticParams
from segpipe.tiling import Instance

if TYPE_CHECKING:
    from segpipe.checkpoint import CheckpointMeta

PAD_MULTIPLE = 32
NO_CLASS_COLOR = (0, 0, 0)  # label values without a class: no detection, ignore
UNCOLOURED_CLASS = (128, 128, 128)  # a class whose table gives no colour

_DETECTION = DetectionParams()  # frozen: safe default arguments
_FUSION = FusionParams()


@dataclass(frozen=True)
class PanopticSettings:
    """How panoptic outputs are made: Mask2Former's inference on MaskFormer's whole-image outputs
    (``maskformer``), and Panoptic FPN's fusion of a semantic map and detections (``fusion``: a
    fused pair, or a large image by tiles). Each caller passes its own params section's values."""

    maskformer: MaskFormerPanopticParams = MaskFormerPanopticParams()
    fusion: FusionParams = _FUSION


@dataclass(frozen=True)
class Request:
    """What to predict: ``outputs`` (of the model's ``ModelSpec.outputs``), the label space, and
    the detection selection. ``ignore_index`` marks pixels that no detection covers."""

    outputs: frozenset[str]
    num_classes: int
    ignore_index: int
    detection: DetectionParams = _DETECTION
    thing_ids: tuple[int, ...] = ()  # classes segmented per instance (panoptic)
    panoptic: PanopticSettings = PanopticSettings()

    @classmethod
    def for_meta(cls, meta: CheckpointMeta, detection: DetectionParams = _DETECTION,
                 panoptic: PanopticSettings = PanopticSettings(), outputs: Collection[str] | None = None) -> Request:
        """The checkpoint's architecture's outputs (those of them in ``outputs`` when given)."""
        from segpipe.models import spec_of

        has = spec_of(meta.arch).outputs
        chosen = has if outputs is None else has & frozenset(outputs)
        return cls(chosen, meta.num_classes, meta.ignore_index, detection, tuple(meta.thing_ids or ()), panoptic)

    @property
    def label_dtype(self) -> np.dtype:
        """The smallest dtype of label maps holding every class id and ``ignore_index``."""
        top = max(self.num_classes - 1, self.ignore_index)
        return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32)


@dataclass(frozen=True)
class Prediction:
    """One image's outputs, at its own size. ``labels`` (H x W): the argmax of the semantic output,
    or, for models without one, the detections rendered (:func:`render_instances`). ``instances``:
    the selected detections, best first; None when not requested. ``panoptic``: (H x W int32
    segment map, 0 = void, COCO ``segments_info``); None when not requested."""

    labels: np.ndarray
    instances: list[Instance] | None = None
    panoptic: tuple[np.ndarray, list[dict[str, Any]]] | None = None


# --------------------------------------------------------------------------------------
# Pure pieces: padding, selection, rendering, COCO results, colours
# --------------------------------------------------------------------------------------


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The next multiples of PAD_MULTIPLE (strided models need them)."""
    return -(-height // PAD_MULTIPLE) * PAD_MULTIPLE, -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


def pad(x: Tensor, height: int, width: int) -> Tensor:
    """``B x C x h x w`` -> ``B x C x height x width``, bottom and right, edges replicated."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    return F.pad(x, (0, width - w, 0, height - h), mode="replicate")


def select_detections(raw: Mapping[str, Tensor], height: int, width: int,
                      detection: DetectionParams) -> list[Instance]:
    """One image's raw detections (``labels``, ``scores``, ``boxes`` x1 y1 x2 y2, ``masks``
    N x 1 x H' x W' probabilities, on any device) -> the kept ones, cropped to ``height x width``:
    score >= ``score_threshold``, mask pixels >= ``mask_threshold``, non-empty, best score first
    (equal scores in the model's order), at most ``max_detections``; boxes clipped to the image."""
    scores = raw["scores"].detach().float().cpu()
    candidates = [i for i in torch.argsort(-scores, stable=True).tolist()
                  if scores[i] >= detection.score_threshold]
    if not candidates:
        return []
    index = torch.tensor(candidates)
    masks = (raw["masks"].detach()[index.to(raw["masks"].device), 0, :height, :width]
             >= detection.mask_threshold).cpu().numpy()
    boxes = raw["boxes"].detach().float().cpu()[index]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    labels = raw["labels"].detach().cpu()[index].tolist()
    kept: list[Instance] = []
    for k, i in enumerate(candidates):
        inst = tiling.crop_instance(int(labels[k]), float(scores[i]), masks[k], bbox=tuple(boxes[k].tolist()))
        if inst is not None:
            kept.append(inst)
            if len(kept) == detection.max_detections:
                break
    return kept


def render_instances(instances: Sequence[Instance], height: int, width: int, none_value: int,
                     dtype: np.dtype | type = np.int64) -> np.ndarray:
    """A label map of detections: each pixel takes the class of the best-scoring detection
    covering it (of equal scores, the earlier one); ``none_value`` where none does."""
    out = np.full((height, width), none_value, dtype=dtype)
    for _, d in sorted(enumerate(instances), key=lambda p: (p[1].score, -p[0])):  # the winner paints last
        x0, y0, x1, y1 = d.box
        out[y0:y1, x0:x1][d.mask] = d.label
    return out


def rle_counts(inst: Instance, height: int, width: int) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background) of one instance."""
    ys, xs = np.nonzero(inst.mask)
    idx = np.sort((xs + inst.x0).astype(np.int64) * height + (ys + inst.y0))
    if idx.size == 0:
        return [height * width]
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    counts: list[int] = []
    pos = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        counts += [s - pos, e - s]
        pos = e
    counts.append(height * width - pos)
    return counts


def coco_results(instances: Sequence[Instance], image_id: int, height: int, width: int,
                 category_ids: Collection[int] | None = None) -> list[dict[str, Any]]:
    """COCO result entries of one image's detections (only those of ``category_ids`` when given):
    compressed RLE ``segmentation``, ``bbox`` (x y w h) of the model's box (the mask's when it has
    none), ``score`` and ``area`` (mask pixels)."""
    from pycocotools import mask as mask_utils

    out = []
    for d in instances:
        if category_ids is not None and d.label not in category_ids:
            continue
        # counts are built here and always sum to height * width, so pycocotools gets valid input
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": rle_counts(d, height, width)}, height, width)
        x1, y1, x2, y2 = (float(v) for v in (d.bbox if d.bbox is not None else d.box))
        out.append({
            "image_id": image_id, "category_id": int(d.label), "score": round(float(d.score), 5),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": d.area,
        })
    return out


def palette(classes: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``N x 3`` uint8 colours indexed by label value (N >= 256 and above every class id): each
    class's ``color``, NO_CLASS_COLOR for values without a class (no detection, ignore)."""
    pal = np.zeros((max([256, *(int(c["id"]) + 2 for c in classes)]), 3), dtype=np.uint8)
    pal[:] = NO_CLASS_COLOR
    for c in classes:
        pal[int(c["id"])] = c.get("color", UNCOLOURED_CLASS)
    return pal


def colorize(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """``H x W`` labels -> ``H x W x 3`` colours (values beyond the palette have no class)."""
    return pal[np.clip(labels.astype(np.int64, copy=False), 0, len(pal) - 1)]


NO_CLASS_NAME = "no class"  # the legend's name of NO_CLASS_COLOR: ignore, no detection


def legend_entries(values: Collection[int], classes: Sequence[Mapping[str, Any]],
                   pal: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    """``[(name, colour)]`` of the label ``values`` shown in an image, by class id; values without
    a class (ignore, no detection) are one ``no class`` entry, last."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in classes}
    present = sorted({int(v) for v in values})
    entries = [(names[v], tuple(int(x) for x in pal[v])) for v in present if v in names]
    if any(v not in names for v in present):
        entries.append((NO_CLASS_NAME, NO_CLASS_COLOR))
    return entries  # type: ignore[return-value]


def legend(values: Collection[int], classes: Sequence[Mapping[str, Any]], pal: np.ndarray, width: int) -> np.ndarray:
    """A white strip ``h x width x 3`` (uint8) naming the colour of each label value in
    ``values`` (:func:`legend_entries`): a swatch and the class name, in rows that wrap at
    ``width``. Drawn below an overlay, so that a colour says its class."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(min(max(width / 60, 10), 18))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    pad, box = max(size // 3, 3), size
    rows: list[list[tuple[int, str, tuple[int, int, int]]]] = [[]]
    x = pad
    for name, colour in legend_entries(values, classes, pal):
        w = box + pad + int(font.getlength(name)) + 2 * pad
        if rows[-1] and x + w > width:
            rows.append([])
            x = pad
        rows[-1].append((x, name, colour))
        x += w
    line = box + pad
    strip = Image.new("RGB", (max(width, 1), pad + line * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = pad + r * line
        for x0, name, colour in row:
            draw.rectangle([x0, y, x0 + box - 1, y + box - 1], fill=colour, outline=(64, 64, 64))
            draw.text((x0 + box + pad, y + box // 2), name, fill=(32, 32, 32), font=font, anchor="lm")
    return np.asarray(strip)


# --------------------------------------------------------------------------------------
# One function per output kind, on a padded batch
# --------------------------------------------------------------------------------------


def _semantic(model: torch.nn.Module, x: Tensor, sizes: Sequence[tuple[int, int]], num_classes: int) -> list[Tensor]:
    """Per image ``K x h x w`` logits, cropped to each image's size."""
    logits = model(x)  # B x K x Hp x Wp
    if logits.ndim != 4 or logits.shape[1] != num_classes or logits.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected B x {num_classes} x "
                         f"{x.shape[-2]} x {x.shape[-1]}")
    return [logits[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]


def _instances(model: torch.nn.Module, x: Tensor, sizes: Sequence[tuple[int, int]],
               detection: DetectionParams) -> list[list[Instance]]:
    """Per image the selected detections, cropped to each image's size."""
    raw = model.predict_instances(x, detection.score_threshold, detection.mask_threshold, detection.max_detections)
    return [select_detections(d, h, w, detection) for d, (h, w) in zip(raw, sizes)]


def _panoptic(model: torch.nn.Module, x: Tensor, sizes: Sequence[tuple[int, int]],
              request: Request) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Per image the segment map and ``segments_info`` of Mask2Former's panoptic inference on the
    model's ``mask_classification`` outputs, cropped to each image's size."""
    from segpipe.panoptic import maskformer_panoptic

    class_logits, mask_logits = model.mask_classification(x)  # B x Q x K+1, B x Q x Hp x Wp
    return [maskformer_panoptic(class_logits[i], mask_logits[i, :, :h, :w], request.thing_ids, request.panoptic.maskformer)
            for i, (h, w) in enumerate(sizes)]


def panoptic_labels(panoptic: tuple[np.ndarray, Sequence[Mapping[str, Any]]], none_value: int,
                    dtype: np.dtype | type = np.int64) -> np.ndarray:
    """The class map of a panoptic result: each segment's category, ``none_value`` on void."""
    seg_map, segments = panoptic
    lut = np.full(max([0, *(int(s["id"]) for s in segments)]) + 1, none_value, dtype=np.int64)
    for s in segments:
        lut[int(s["id"])] = int(s["category_id"])
    return lut[seg_map].astype(dtype)


def instance_masks(instances: Sequence[Instance], height: int, width: int) -> np.ndarray:
    """``N x H x W`` bool full-size masks of detections."""
    out = np.zeros((len(instances), height, width), dtype=bool)
    for i, d in enumerate(instances):
        x0, y0, x1, y1 = d.box
        out[i, y0:y1, x0:x1] = d.mask
    return out


def fuse(semantic: Prediction, instances: Prediction, thing_ids: Sequence[int],
         fusion: FusionParams = _FUSION) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic segments of one image from a semantic model's prediction (its ``labels``) and an
    instance model's (its ``instances``), by Panoptic FPN's heuristic
    (``segpipe.panoptic.fuse_panoptic`` with ``fusion``'s thresholds)."""
    from segpipe.panoptic import fuse_panoptic

    if instances.instances is None:
        raise ValueError("the instance prediction has no detections (was 'instances' requested?)")
    h, w = semantic.labels.shape
    found = instances.instances
    return fuse_panoptic(semantic.labels.astype(np.int64), [d.label for d in found], [d.score for d in found],
                         instance_masks(found, h, w), thing_ids, fusion)


def _predict(model: torch.nn.Module, x: Tensor, sizes: Sequence[tuple[int, int]], request: Request) -> list[Prediction]:
    labels: list[np.ndarray | None] = [None] * len(sizes)
    found: list[list[Instance] | None] = [None] * len(sizes)
    pans: list[tuple[np.ndarray, list[dict[str, Any]]] | None] = [None] * len(sizes)
    if "semantic" in request.outputs:
        labels = [lg.argmax(0).cpu().numpy().astype(request.label_dtype)
                  for lg in _semantic(model, x, sizes, request.num_classes)]
    if "instances" in request.outputs:
        found = _instances(model, x, sizes, request.detection)
        if "semantic" not in request.outputs:
            labels = [render_instances(f, h, w, request.ignore_index, request.label_dtype) for f, (h, w) in zip(found, sizes)]
    if "panoptic" in request.outputs:
        pans = _panoptic(model, x, sizes, request)
        labels = [lab if lab is not None else panoptic_labels(p, request.ignore_index, request.label_dtype)
                  for lab, p in zip(labels, pans)]
    return [Prediction(lab, f, p) for lab, f, p in zip(labels, found, pans)]


def _tile_tensor(tile: np.ndarray) -> Tensor:
    from segpipe.models import normalize

    return normalize(tile)[0]


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Sequence[np.ndarray], request: Request,
                   device: str | torch.device = "cpu") -> list[Prediction]:
    """Whole images of any sizes (``H x W x 3`` uint8) through ``model`` (in eval mode, fp32 on
    ``device``), one Prediction each at its own size."""
    from segpipe.models import normalize

    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"images[{i}] must be H x W x 3, got shape {im.shape}")
        groups.setdefault(padded_size(*im.shape[:2]), []).append(i)
    out: list[Prediction] = [None] * len(images)  # type: ignore[list-item]
    for (hp, wp), idx in groups.items():
        x = torch.cat([pad(normalize(images[i]), hp, wp) for i in idx]).to(device)
        for i, p in zip(idx, _predict(model, x, [images[i].shape[:2] for i in idx], request)):
            out[i] = p
    return out


@torch.no_grad()
def predict_tiled(model: torch.nn.Module, image: np.ndarray, request: Request, tile: int, overlap: int,
                  batch_size: int, device: str | torch.device = "cpu") -> Prediction:
    """One image of any size by sliding window (``segpipe.tiling``): tiles of ``tile`` pixels
    overlapping by ``overlap``, ``batch_size`` tiles per forward; softmax probabilities blended
    across tiles, detections merged across them. An image within one tile is predicted whole,
    exactly as :func:`predict_images` does. A panoptic output of a larger image is the tiled
    semantic map and tiled detections fused (:func:`fuse`, ``request.panoptic.fusion``), not
    Mask2Former's inference per tile."""
    height, width = image.shape[:2]
    if height <= tile and width <= tile:
        return predict_images(model, [image], request, device)[0]

    def logits(t: Tensor) -> Tensor:
        return torch.stack(_semantic(model, pad(t, *padded_size(*t.shape[-2:])), [t.shape[-2:]] * len(t),
                                     request.num_classes))

    def detect(t: Tensor) -> list[list[Instance]]:
        return _instances(model, pad(t, *padded_size(*t.shape[-2:])), [t.shape[-2:]] * len(t), request.detection)

    # A panoptic output by tiles fuses the tiled semantic map with the tiled detections
    # (request.panoptic.fusion): segments cut by tile borders cannot be merged as reliably as detections.
    panoptic = "panoptic" in request.outputs
    window, labels, found, pan = tiling.Window(tile, overlap, batch_size, device), None, None, None
    if "semantic" in request.outputs or panoptic:
        labels = tiling.predict_semantic(logits, image, _tile_tensor, window).numpy().astype(request.label_dtype)
    if "instances" in request.outputs or panoptic:
        found = tiling.predict_instances(detect, image, _tile_tensor, window)
        if labels is None:
            labels = render_instances(found, height, width, request.ignore_index, request.label_dtype)
    if panoptic:
        pan = fuse(Prediction(labels), Prediction(labels, found), request.thing_ids, request.panoptic.fusion)
        found = found if "instances" in request.outputs else None
    return Prediction(labels, found, pan)


class Predictor:
    """A checkpoint's model ready to predict: eval mode, fp32, on ``device``, in ``channels_last``
    memory format when the registry says its convolutions run fastest so (same label maps)."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta,
                 detection: DetectionParams = _DETECTION, device: str | torch.device = "cpu", *,
                 panoptic: PanopticSettings = PanopticSettings(), outputs: Collection[str] | None = None) -> None:
        """``outputs``: the model's outputs to produce (default: all it has)."""
        from segpipe.models import spec_of

        model = model.to(device).float().eval()
        if spec_of(meta.arch).channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.meta, self.device = model, meta, torch.device(device)
        self.request = Request.for_meta(meta, detection, panoptic, outputs)

    @classmethod
    def load(cls, checkpoint: Path | str, detection: DetectionParams = _DETECTION,
             device: str | torch.device = "cpu", *, panoptic: PanopticSettings = PanopticSettings(),
             outputs: Collection[str] | None = None) -> Predictor:
        from segpipe.checkpoint import load_model

        model, meta = load_model(checkpoint, map_location=device)
        return cls(model, meta, detection, device, panoptic=panoptic, outputs=outputs)

    def images(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """See :func:`predict_images`."""
        return predict_images(self.model, images, self.request, self.device)

    def tiled(self, image: np.ndarray, tile: int, overlap: int, batch_size: int) -> Prediction:
        """See :func:`predict_tiled`."""
        return predict_tiled(self.model, image, self.request, tile, overlap, batch_size, self.device)

    def probabilities(self, image: np.ndarray, tile: int, overlap: int, batch_size: int,
                      embed: bool = False) -> Probabilities:
        """See :func:`predict_probabilities`."""
        return predict_probabilities(self.model, self.meta.arch, image, self.request, tile, overlap, batch_size,
                                     self.device, embed)

    def probability_strips(self, image: np.ndarray, tile: int, overlap: int, batch_size: int,
                           pool: FeaturePool | None = None) -> Iterator[tiling.Strip]:
        """See :func:`iter_probabilities`."""
        return iter_probabilities(self.model, image, self.request, tile, overlap, batch_size, self.device, pool)

    def feature_pool(self) -> FeaturePool:
        """A :class:`FeaturePool` on this model's classifier (open it around one image's forwards)."""
        return FeaturePool(classifier_module(self.model, self.meta.arch))


# --------------------------------------------------------------------------------------
# Class probabilities and an image embedding (segpipe audit, select, drift)
# --------------------------------------------------------------------------------------


def classifier_module(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """The module that turns features into class scores: the owner of the first state-dict tensor
    that the registry indexes by class (``ModelSpec.class_rows[0]``: U-Net's ``classifier``, FCN's
    ``score32``, DeepLabV3's last head convolution, MaskFormer's ``class_embed``)."""
    from segpipe.models import spec_of

    rows = spec_of(arch).class_rows
    for name, module in model.named_modules():
        own = {n for n, _ in module.named_parameters(recurse=False)}
        if rows and "weight" in own and rows[0].matches(f"{name}.weight"):
            return module
    raise ValueError(f"model {arch}: no module holds a tensor matching {rows[0].pattern if rows else '(none)'}")


class FeaturePool:
    """An image embedding on the side of a forward pass: the features ``module`` reads (see
    :func:`classifier_module`), averaged over the image's pixels (over queries for a module that
    reads ``B x Q x D``). Feature maps are cropped to the image's share of the padded input, and
    tiles are weighted by their pixels. Use as a context manager around the forwards of one image
    (it hooks ``module`` while open)::

        with FeaturePool(classifier_module(model, arch)) as pool:
            for strip in iter_probabilities(model, image, request, ..., pool=pool): ...
        pool.embedding()   # D float32
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._inputs: Tensor | None = None
        self._sum: Tensor | None = None
        self._weight = 0.0
        self._handle: Any = None

    def __enter__(self) -> FeaturePool:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._inputs = args[0].detach()  # the last call wins (MaskFormer: the last decoder layer)

    def add(self, padded: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> None:
        """Pool the features of the forward just run: a batch of images of ``sizes`` padded to ``padded``."""
        feats, (hp, wp) = self._inputs, padded
        if feats is None or len(feats) != len(sizes):
            raise ValueError(f"{type(self.module).__name__} saw no batch of {len(sizes)} in the last forward")
        for f, (h, w) in zip(feats, sizes):
            f = f.float()
            if f.ndim == 3:  # C x h' x w' of the padded input: its part that covers the image
                fh, fw = f.shape[-2:]
                f = f[:, : max(1, -(-h * fh // hp)), : max(1, -(-w * fw // wp))].mean(dim=(1, 2))
            elif f.ndim == 2:  # Q x D queries
                f = f.mean(dim=0)
            pixels = float(h * w)
            self._sum = f.cpu() * pixels if self._sum is None else self._sum + f.cpu() * pixels
            self._weight += pixels
        self._inputs = None

    def embedding(self) -> np.ndarray:
        """The pixel-weighted mean of every pooled image or tile, ``D`` float32."""
        if self._sum is None:
            raise ValueError("no forward was pooled")
        return (self._sum / self._weight).numpy().astype(np.float32)


@dataclass(frozen=True)
class Probabilities:
    """One image's per-pixel class probabilities (``K x H x W`` float32 softmax, blended across
    tiles as :func:`predict_tiled` blends them: their argmax is its labels) and, when asked for,
    its embedding (:class:`FeaturePool`)."""

    probs: np.ndarray
    embedding: np.ndarray | None = None


@torch.no_grad()
def iter_probabilities(model: torch.nn.Module, image: np.ndarray, request: Request, tile: int, overlap: int,
                       batch_size: int, device: str | torch.device = "cpu",
                       pool: FeaturePool | None = None) -> Iterator[tiling.Strip]:
    """Softmax probabilities of one image's semantic output, top to bottom in strips (``K x rows
    x W``), by :func:`predict_tiled`'s path: an image within one tile whole and padded as
    :func:`predict_images` pads it (one strip), a larger one by sliding window with memory bounded
    by one row of tiles. ``pool`` (open) pools the classifier's input of every forward."""
    if "semantic" not in request.outputs:
        raise ValueError(f"class probabilities need a semantic output; the request has {sorted(request.outputs)}")
    height, width = image.shape[:2]

    def logits(t: Tensor) -> Tensor:
        hp, wp = padded_size(*t.shape[-2:])
        out = torch.stack(_semantic(model, pad(t, hp, wp), [tuple(t.shape[-2:])] * len(t), request.num_classes))
        if pool is not None:
            pool.add((hp, wp), [tuple(t.shape[-2:])] * len(t))
        return out

    if height <= tile and width <= tile:
        from segpipe.models import normalize

        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
        yield tiling.Strip(0, height, logits(normalize(image).to(device))[0].float().softmax(0).cpu())
        return
    yield from tiling.iter_semantic_strips(logits, image, _tile_tensor, tiling.Window(tile, overlap, batch_size, device))


def predict_probabilities(model: torch.nn.Module, arch: str, image: np.ndarray, request: Request, tile: int,
                          overlap: int, batch_size: int, device: str | torch.device = "cpu",
                          embed: bool = False) -> Probabilities:
    """The whole ``K x H x W`` of :func:`iter_probabilities` (memory: K floats per pixel), with
    the embedding of ``model`` (of architecture ``arch``) when ``embed``."""
    pool = FeaturePool(classifier_module(model, arch)) if embed else None
    with pool if pool is not None else contextlib.nullcontext():
        strips = [s.probs for s in iter_probabilities(model, image, request, tile, overlap, batch_size, device, pool)]
    return Probabilities(torch.cat(strips, dim=1).numpy(), pool.embedding() if pool is not None else None)


# --------------------------------------------------------------------------------------
# Work over a dataset: in this process, or on a Ray Data actor pool
# --------------------------------------------------------------------------------------

Row = dict[str, Any]  # flat: str, bytes, int, float and bool values (Ray Data columns)
WorkerFactory = Callable[..., Callable[[Row], Row]]


def map_rows(rows: Sequence[Row], checkpoint: Path | str, make_worker: WorkerFactory,
             worker_kwargs: Mapping[str, Any] | None = None, *, engine: str = "local",
             detection: DetectionParams = _DETECTION, device: str = "cpu",
             panoptic: PanopticSettings = PanopticSettings(), outputs: Collection[str] | None = None) -> Iterator[Row]:
    """``make_worker(predictor, **worker_kwargs)(row)`` for every row, the predictor loaded from
    ``checkpoint`` (with ``detection``, ``panoptic``, ``outputs`` as :class:`Predictor` takes
    them); the engines differ only in where that runs:

    - ``local``: in this process, one model, results in the order of ``rows``;
    - ``ray``: Ray Data ``map_batches`` over the rows on an actor pool, each actor loading the
      model once. Results stream back as rows finish, in no fixed order: a row should say where
      its result belongs. Connects to ``RAY_ADDRESS`` or starts a local Ray (stopped at the end).

    Every model runs with this process's torch thread count (``torch.get_num_threads()``, e.g.
    from ``OMP_NUM_THREADS``), in both engines: some CPU kernels (Mask R-CNN's) sum in an order
    that depends on it, and the engines must give the same numbers. So each actor holds that
    many CPUs, and the pool has one actor per that many CPUs of the cluster (capped by the
    largest node), or one per GPU when ``device`` is ``cuda``.

    ``make_worker`` must be importable (a module-level class or function), since Ray ships it
    to the actors by name.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "ray":
        loading = {"detection": detection, "panoptic": panoptic, "outputs": None if outputs is None else sorted(outputs)}
        return _map_on_ray(rows, str(checkpoint), make_worker, dict(worker_kwargs or {}), loading, device)
    work = make_worker(Predictor.load(checkpoint, detection, device, panoptic=panoptic, outputs=outputs),
                       **(worker_kwargs or {}))
    return (work(dict(row)) for row in rows)


class ModelActor:
    """A Ray Data actor: loads the checkpoint once, then runs the worker on each batch of rows."""

    def __init__(self, checkpoint: str, make_worker: WorkerFactory, worker_kwargs: dict[str, Any],
                 loading: dict[str, Any], device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.work = make_worker(Predictor.load(checkpoint, device=device, **loading), **worker_kwargs)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist([self.work(row) for row in batch.to_pylist()])


def _map_on_ray(rows: Sequence[Row], checkpoint: str, make_worker: WorkerFactory, worker_kwargs: dict[str, Any],
                loading: dict[str, Any], device: str) -> Iterator[Row]:
    if not rows:
        return
    from segpipe.cluster import connect

    with connect():
        import ray  # after connect: it sets the auth mode that Ray reads when it initialises
        import ray.data

        gpu = torch.device(device).type == "cuda"
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        if gpu and not gpus:
            raise ValueError(f"--device {device}: the Ray cluster has no GPU")
        largest_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
        threads = max(1, min(torch.get_num_threads(), largest_node, cpus // gpus if gpu else cpus))
        pool = gpus if gpu else cpus // threads
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        dataset = ray.data.from_items([dict(r) for r in rows], override_num_blocks=len(rows)).map_batches(
            ModelActor, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(len(rows), pool))),
            num_cpus=threads, num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"checkpoint": checkpoint, "make_worker": make_worker, "worker_kwargs": worker_kwargs,
                                   "loading": loading, "device": device, "threads": threads})
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()


__all__ = [
    "ENGINES", "FeaturePool", "Instance", "PanopticSettings", "Probabilities", "classifier_module",
    "iter_probabilities", "predict_probabilities", "ModelActor", "PAD_MULTIPLE", "Prediction", "Predictor", "Request",
    "coco_results", "colorize", "fuse", "instance_masks", "map_rows", "pad", "padded_size", "palette",
    "panoptic_labels", "predict_images", "predict_tiled", "render_instances", "rle_counts", "select_detections",
]
