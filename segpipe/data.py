"""Training data: decoding and augmentation of shard rows, and the Ray Data pipeline around it.

The pure functions (``augment``, ``center_crop``, ``encode_targets``, ``collate_targets``) carry
the logic and are unit-tested; ``build_train_dataset`` is the thin Ray Data edge used by the train
stage: verified shard tables -> ``map_batches(prepare_arrow_batch)`` streams decoded, augmented,
fixed-size batches to the training workers. ``validation_batches`` prepares a worker's share of
the (small, unaugmented) val split once. Every shard is checked against the manifest's size and
sha256 before a row of it is used (``segpipe.shards.read_shard``).

A prepared batch is a dict of numpy arrays, all pixel-aligned so that every geometric
augmentation applies to image and labels alike:

    image           B x S x S x 3 uint8
    semantic        B x S x S uint8 (ignore_index where unlabelled or padded)
    instance_map    B x S x S int16 (0 = no instance, i + 1 = instance i of that image)
    instance_label  B x MAX_INSTANCES int32 (class id, -1 = padding)
    instance_crowd  B x MAX_INSTANCES uint8
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from segpipe.shards import ShardSet

MAX_INSTANCES = 64  # per image after cropping; more are dropped, largest kept
MIN_INSTANCE_PIXELS = 4  # instances cropped below this are dropped from targets


@dataclass(frozen=True)
class AugmentConfig:
    size: int
    scale_range: tuple[float, float] = (0.75, 1.25)
    hflip: bool = True
    photometric: float = 0.2
    ignore_index: int = 255
    instances: bool = True  # decode instance masks (models that train on semantic maps only do not)


def _resize(arr: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    if arr.shape[0] == h and arr.shape[1] == w:
        return arr
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((w, h), resample=resample))


def instance_map_from_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """H x W int16 map: pixel = index + 1 of the last instance covering it (later ones occlude)."""
    out = np.zeros(shape, dtype=np.int16)
    for i, m in enumerate(masks[: np.iinfo(np.int16).max - 1]):
        out[m.astype(bool)] = i + 1
    return out


def encode_targets(sample: dict[str, Any], instances: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(semantic uint8, instance_map int16, labels int32, crowd uint8) from a decoded shard sample;
    without ``instances`` the map is empty and no mask is decoded."""
    from pycocotools import mask as mask_utils  # RLEs in shards were validated by the converter

    h, w = sample["semantic"].shape
    sem = sample["semantic"]
    if sem.dtype != np.uint8:
        if sem.max(initial=0) > 255:
            raise ValueError(f"image {sample['image_id']}: label ids above 255 are not supported for training")
        sem = sem.astype(np.uint8)
    insts = (sample.get("instances") or []) if instances else []
    masks = [mask_utils.decode(inst["segmentation"]) for inst in insts]
    labels = np.array([int(i["category_id"]) for i in insts], dtype=np.int32)
    crowd = np.array([int(bool(i.get("iscrowd", 0))) for i in insts], dtype=np.uint8)
    return sem, instance_map_from_masks(masks, (h, w)), labels, crowd


def _pad_to(image: np.ndarray, sem: np.ndarray, inst: np.ndarray, size: int, ignore: int) -> tuple[np.ndarray, ...]:
    """Pad bottom/right up to size x size: image black, labels ignore, no instance."""
    h, w = sem.shape
    ph, pw = max(size, h), max(size, w)
    if (ph, pw) == (h, w):
        return image, sem, inst
    return (np.pad(image, ((0, ph - h), (0, pw - w), (0, 0))),
            np.pad(sem, ((0, ph - h), (0, pw - w)), constant_values=ignore),
            np.pad(inst, ((0, ph - h), (0, pw - w))))


def center_crop(image: np.ndarray, sem: np.ndarray, inst: np.ndarray, size: int, ignore: int = 255) -> tuple[np.ndarray, ...]:
    """Deterministic size x size window at native scale (validation during training)."""
    image, sem, inst = _pad_to(image, sem, inst, size, ignore)
    h, w = sem.shape
    y, x = (h - size) // 2, (w - size) // 2
    return image[y : y + size, x : x + size], sem[y : y + size, x : x + size], inst[y : y + size, x : x + size]


def augment(
    image: np.ndarray, sem: np.ndarray, inst: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random scale around the native resolution, random crop (padding with ignore), horizontal
    flip and photometric jitter. Scales stay near 1 so that evaluation and prediction at native
    resolution see objects at the sizes the model trained on.

    Scaling by ``s`` then cropping ``size`` pixels is done as cropping a ``size / s`` window and
    scaling only that window: the same result for a fraction of the resizing work.
    """
    s = rng.uniform(*cfg.scale_range)
    size = cfg.size
    win = max(1, round(size / s))
    image, sem, inst = _pad_to(image, sem, inst, win, cfg.ignore_index)
    ph, pw = sem.shape
    y = int(rng.integers(0, ph - win + 1))
    x = int(rng.integers(0, pw - win + 1))
    image, sem, inst = image[y : y + win, x : x + win], sem[y : y + win, x : x + win], inst[y : y + win, x : x + win]
    image, sem = _resize(image, size, size, False), _resize(sem, size, size, True)
    inst = _resize(inst, size, size, True) if inst.any() else np.zeros((size, size), dtype=inst.dtype)
    if cfg.hflip and rng.random() < 0.5:
        image, sem, inst = image[:, ::-1], sem[:, ::-1], inst[:, ::-1]
    if cfg.photometric > 0:
        image = photometric(image, cfg.photometric, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(sem), np.ascontiguousarray(inst)


def photometric(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of up to +/- ``strength``."""
    img = image.astype(np.float32)
    b, c, s = (1.0 + rng.uniform(-strength, strength, size=3)).tolist()
    img *= b
    mean = img.mean()
    img = (img - mean) * c + mean
    gray = img.mean(axis=2, keepdims=True)
    img = (img - gray) * s + gray
    return np.clip(img, 0, 255).astype(np.uint8)


def pack_instances(labels: np.ndarray, crowd: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad per-image instance arrays to MAX_INSTANCES, renumbering the map if some are dropped."""
    out_labels = np.full(MAX_INSTANCES, -1, dtype=np.int32)
    out_crowd = np.zeros(MAX_INSTANCES, dtype=np.uint8)
    n = len(labels)
    if n > MAX_INSTANCES:  # keep the largest visible instances
        areas = np.bincount(inst.ravel().astype(np.int64), minlength=n + 1)[1:]
        keep = np.sort(np.argsort(-areas, kind="stable")[:MAX_INSTANCES])
        lut = np.zeros(n + 1, dtype=np.int16)
        lut[keep + 1] = np.arange(1, len(keep) + 1, dtype=np.int16)
        inst = lut[inst]
        labels, crowd, n = labels[keep], crowd[keep], len(keep)
    out_labels[:n] = labels
    out_crowd[:n] = crowd
    return out_labels, out_crowd, inst


def prepare_rows(rows: list[dict[str, Any]], cfg: AugmentConfig, train: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Decode raw shard rows and turn them into one fixed-size batch (see the module docstring)."""
    from segpipe.shards import decode_row

    out: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "semantic", "instance_map", "instance_label", "instance_crowd")}
    for row in rows:
        sample = decode_row(row)
        sem, inst, labels, crowd = encode_targets(sample, cfg.instances)
        image = sample["image"]
        if train:
            image, sem, inst = augment(image, sem, inst, cfg, rng)
        else:
            image, sem, inst = center_crop(image, sem, inst, cfg.size, cfg.ignore_index)
        labels, crowd, inst = pack_instances(labels, crowd, inst)
        # PIL resizes int16 maps as int32: fix the dtype, or Ray Data cannot concatenate batches
        # that were resized with batches that were not.
        inst = inst.astype(np.int16, copy=False)
        for k, v in zip(out, (image, sem, inst, labels, crowd)):
            out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}


def prepare_arrow_batch(table: Any, cfg: AugmentConfig, train: bool) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: a pyarrow batch of shard rows in, a prepared batch out.

    Augmentation draws fresh randomness per batch, so every epoch sees new crops.
    """
    return prepare_rows(table.to_pylist(), cfg, train, np.random.default_rng())


def synthetic_batch(batch_size: int, size: int, num_classes: int, thing_ids: list[int], ignore_index: int = 255,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A prepared batch (see the module docstring) of random pixels and labels, for timing a
    training step: every class appears in the label maps and each image has one square instance
    of a thing class, so instance models run their mask heads as on real data."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    semantic = rng.integers(0, num_classes, (batch_size, size, size)).astype(np.uint8)
    semantic[:, :2] = ignore_index
    instance_map = np.zeros((batch_size, size, size), np.int16)
    labels = np.full((batch_size, MAX_INSTANCES), -1, np.int32)
    things = thing_ids or [0]
    for b in range(batch_size):
        y, x = (int(v) for v in rng.integers(0, size // 2, 2))
        instance_map[b, y : y + size // 2, x : x + size // 2] = 1
        labels[b, 0] = things[b % len(things)]
    return {"image": image, "semantic": semantic, "instance_map": instance_map, "instance_label": labels,
            "instance_crowd": np.zeros((batch_size, MAX_INSTANCES), np.uint8)}


def collate_targets(batch: dict[str, Any], device: Any = "cpu", non_blocking: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Model inputs from a prepared batch: normalised images and per-image target dicts.

    Targets follow docs/architecture.md: ``semantic``, ``masks``, ``labels``, ``boxes``,
    ``iscrowd``; instances cropped away (fewer than MIN_INSTANCE_PIXELS pixels) are dropped.
    """
    import torch

    from segpipe.models import normalize

    def t(x: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return x.to(device, non_blocking=non_blocking)

    images = normalize(t(batch["image"]))
    sem = t(batch["semantic"]).long()
    inst_map = t(batch["instance_map"]).long()
    labels = t(batch["instance_label"]).long()
    crowd = t(batch["instance_crowd"])
    targets = []
    for b in range(images.shape[0]):
        valid = torch.nonzero(labels[b] >= 0).flatten()
        ids = valid + 1
        masks = inst_map[b][None] == ids[:, None, None]  # N x H x W
        area = masks.flatten(1).sum(1)
        keep = area >= MIN_INSTANCE_PIXELS
        masks, lab, cr = masks[keep], labels[b][valid][keep], crowd[b][valid][keep]
        targets.append({"semantic": sem[b], "masks": masks.to(torch.uint8), "labels": lab,
                        "boxes": masks_to_boxes(masks), "iscrowd": cr.to(torch.uint8)})
    return images, targets


def masks_to_boxes(masks: Any) -> Any:
    """N x H x W bool -> N x 4 float (x1, y1, x2, y2), pixel-edge convention (x2 = last column + 1)."""
    import torch

    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows = masks.any(2)
    cols = masks.any(1)
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).min(1).values
    y2 = torch.where(rows, ar_h, -1).max(1).values + 1
    x1 = torch.where(cols, ar_w, w).min(1).values
    x2 = torch.where(cols, ar_w, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def build_train_dataset(shards: ShardSet, cfg: AugmentConfig, batch_size: int, read_cpus: float = 0.5,
                        cache: bool = True, tables: list[Any] | None = None) -> Any:
    """The Ray Data pipeline over the train split: verified shards, then decode and augment per epoch.

    With ``cache`` the driver reads and verifies each train shard once and puts its encoded rows in
    Ray's object store (spilled to disk when full; reachable from every node, so workers need no
    shared disk), and only decoding and augmentation run again each epoch. Without it, read tasks
    verify and read the shards again every epoch: for train splits far larger than the object store.
    Shards may lie on an object store (``shards.root`` a URI): read tasks, and the workers'
    validation reads, then reach it with their own node's credentials (``AWS_*``). With ``cache``,
    ``tables`` are the train shards the caller already read (``segpipe.shards.read_shard``, which
    verifies them), so that they are not read and hashed twice.
    """
    import ray
    import ray.data

    from segpipe.shards import read_shard

    files = shards.files_of("train") if shards.rows("train") else []
    if not files:
        raise ValueError(f"{shards.root}: no train shards (splits in manifest: {shards.splits})")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress line per epoch comes from the train loop
    # Ray Train's local mode iterates in the driver: Ray Data's per-epoch INFO lines (and the note
    # that progress bars are off) would land between the train loop's lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if cache:
        tables = tables if tables is not None else [read_shard(shards, f) for f in files]
        # from_blocks puts the tables and takes their metadata here; from_arrow_refs would wait for
        # a remote task per table (about a second of start-up on 2 cores)
        rows = ray.data.from_blocks(tables)
    else:
        rows = ray.data.from_items([{"index": i} for i in range(len(files))]).map_batches(
            _read_shards, fn_kwargs={"shards": shards.to_dict()}, batch_size=1, batch_format="pyarrow",
            num_cpus=read_cpus)
    return rows.map_batches(
        prepare_arrow_batch,
        fn_kwargs={"cfg": cfg, "train": True},
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=read_cpus,
    )


def warm_up_decoders(read_cpus: float = 0.5, count: int = 1) -> list[Any]:
    """Start ``count`` Ray worker processes that import what decoding needs, without waiting.

    Ray Data's map tasks reuse idle workers of the job, so the first epoch's first batch then
    skips a worker's start and imports (seconds on 2 cores), which overlap the trainer's own start.
    Returns the task refs (the caller may drop them).
    """
    import ray

    return [ray.remote(num_cpus=read_cpus)(_import_decoders).remote() for _ in range(count)]


def _import_decoders() -> None:
    import pyarrow  # noqa: F401
    import pycocotools.mask  # noqa: F401

    import segpipe.data  # noqa: F401
    import segpipe.shards  # noqa: F401


def _read_shards(batch: Any, shards: dict[str, Any]) -> Any:
    """Ray Data read task: the verified shards whose indices ``batch`` holds, as one table."""
    import pyarrow as pa

    from segpipe.shards import ShardSet, read_shard

    s = ShardSet.from_dict(shards)
    files = s.files_of("train")
    return pa.concat_tables([read_shard(s, files[int(i)]) for i in batch.column("index").to_pylist()])


def validation_batches(shards: ShardSet, cfg: AugmentConfig, batch_size: int, rank: int = 0,
                       world: int = 1) -> list[dict[str, np.ndarray]]:
    """This worker's share (every ``world``-th row) of the val split, verified and prepared once.

    Validation sets are small and unaugmented, so each worker decodes its share a single time
    and reuses it every epoch instead of re-running a Ray Data pipeline per epoch; confusion
    matrices are then summed across workers.
    """
    from segpipe.shards import read_shard

    if not shards.rows("val"):
        return []
    rows = [r for f in shards.files_of("val") for r in read_shard(shards, f).to_pylist()][rank::world]
    rng = np.random.default_rng(0)  # unused by validation; prepare_rows takes one
    return [prepare_rows(rows[i : i + batch_size], cfg, False, rng) for i in range(0, len(rows), batch_size)]
