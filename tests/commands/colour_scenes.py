"""Colour scenes: a generated dataset whose classes a small model learns in seconds (each class
has its own colour), and the training of that small model (the data-quality command tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Two stuff classes and three things, each with its own colour: what the model must learn is the colour.
COLOUR_CLASSES = (
    {"id": 0, "name": "ground", "isthing": False, "color": [150, 110, 70]},
    {"id": 1, "name": "road", "isthing": False, "color": [120, 120, 120]},
    {"id": 2, "name": "truck", "isthing": True, "color": [220, 40, 40]},
    {"id": 3, "name": "worker", "isthing": True, "color": [40, 60, 220]},
    {"id": 4, "name": "stack", "isthing": True, "color": [40, 200, 60]},
)
THINGS = (2, 3, 4)


def colour_scene(rng: np.random.Generator, size: int, objects: int) -> tuple[np.ndarray, list[tuple[int, tuple]]]:
    """A label map (ground with a road band) and ``objects`` non-overlapping boxes of random things."""
    label = np.zeros((size, size), np.uint8)
    a, width = int(rng.integers(0, size - 12)), int(rng.integers(8, 16))
    if rng.random() < 0.5:
        label[a:a + width] = 1
    else:
        label[:, a:a + width] = 1
    boxes: list[tuple[int, tuple]] = []
    for _ in range(200):
        if len(boxes) == objects:
            break
        h, w = (int(v) for v in rng.integers(7, 15, 2))
        y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        if all(y + h + 1 < by or by + bh + 1 < y or x + w + 1 < bx or bx + bw + 1 < x for _, (by, bx, bh, bw) in boxes):
            boxes.append((int(rng.choice(THINGS)), (y, x, h, w)))
    for cls, (y, x, h, w) in boxes:
        label[y:y + h, x:x + w] = cls
    return label, boxes


def paint(label: np.ndarray, rng: np.random.Generator, gain: float = 1.0) -> np.ndarray:
    """The photo of a label map: each class's colour, times ``gain`` (lighting), plus noise."""
    colours = np.array([c["color"] for c in COLOUR_CLASSES], np.float64)
    image = colours[label] * gain + rng.normal(0, 10, label.shape + (3,))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def write_collection(out: Path, images: int, seed: int, size: int = 64, objects: int = 3,
                     swap: dict[int, int] | None = None, gain: float = 1.0) -> dict[str, list[int]]:
    """A COCO collection (images/, masks/, annotations/instances.json, classes.json) of colour
    scenes. ``swap``: annotation id -> the class it is given instead (the label map repainted to
    match, as a labelling tool exporting both would). Returns {"annotation_ids": ...}."""
    rng = np.random.default_rng(seed)
    for d in ("images", "masks", "annotations"):
        (out / d).mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in COLOUR_CLASSES]}
    ann_id = 1
    for i in range(images):
        label, boxes = colour_scene(rng, size, objects)
        photo = paint(label, rng, gain)
        name = f"scene_{i:04d}"
        for cls, (y, x, h, w) in boxes:
            cls_out = (swap or {}).get(ann_id, cls)
            label[y:y + h, x:x + w] = cls_out
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            coco["annotations"].append({"id": ann_id, "image_id": 100 + i, "category_id": cls_out, "iscrowd": 0,
                                        "segmentation": [[float(v) for v in poly]], "bbox": [x, y, w, h],
                                        "area": w * h})
            ann_id += 1
        Image.fromarray(photo).save(out / "images" / f"{name}.png")
        Image.fromarray(label).save(out / "masks" / f"{name}.png")
        coco["images"].append({"id": 100 + i, "file_name": f"{name}.png", "height": size, "width": size})
    (out / "annotations" / "instances.json").write_text(json.dumps(coco))
    (out / "classes.json").write_text(json.dumps(list(COLOUR_CLASSES)))
    return {"annotation_ids": [a["id"] for a in coco["annotations"]]}


def convert_collection(raw: Path, out: Path, val_fraction: float = 0.0) -> Path:
    from segpipe.formats.coco import read_collection
    from segpipe.params import ConvertParams
    from segpipe.stages import convert

    convert.run(ConvertParams(workers=1, val_fraction=val_fraction), read_collection(raw), out, progress=False)
    return out


def train_unet(shards: Path, out: Path, steps: int = 80, seed: int = 0) -> Path:
    """A U-Net (8 channels, depth 2) trained with plain PyTorch for ``steps`` steps of 8 random
    32-pixel crops of the train split: enough to tell the colour classes apart."""
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs, normalize
    from segpipe.shards import iter_samples, open_shards

    s = open_shards(shards)
    samples = list(iter_samples(s))
    images = np.stack([x["image"] for x in samples])
    labels = torch.from_numpy(np.stack([x["semantic"] for x in samples]).astype(np.int64))
    torch.manual_seed(seed)
    pixels = np.bincount(labels[labels != s.ignore_index].numpy().ravel(), minlength=s.num_classes) + 1.0
    weights = (pixels.sum() / pixels / s.num_classes) ** 0.5  # rare things weigh more, as train's sqrt_inverse
    kwargs = {"base_channels": 8, "depth": 2, "class_weights": [float(w) for w in weights]}
    model = build_model("unet", s.num_classes, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    x_all = normalize(images)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on a shared few
    try:
        for _ in range(steps):
            idx = rng.integers(0, len(samples), 8)
            y0, x0 = (int(v) for v in rng.integers(0, images.shape[1] - 32, 2))
            x = x_all[idx, :, y0:y0 + 32, x0:x0 + 32]
            y = labels[idx, y0:y0 + 32, x0:x0 + 32]
            loss = sum(model(x, [{"semantic": t} for t in y]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    meta = CheckpointMeta(arch="unet", num_classes=s.num_classes, classes=tuple(s.classes),
                          model_kwargs={**default_kwargs("unet"), **kwargs}, ignore_index=s.ignore_index,
                          image_size=32, epoch=1, shards_manifest_sha256=s.manifest_sha256)
    return save_checkpoint(out, model.eval(), meta)
