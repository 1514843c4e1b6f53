"""``segpipe predict``: run a registered model (or a checkpoint directory) on images of any size.

Writes, per input image ``NAME.ext``::

    OUT/labels/NAME.png     class ids (uint8; uint16 when there are more than 255 classes)
    OUT/overlays/NAME.png   the image blended with the class colours
    OUT/detections.json     instance-capable models: COCO results, instances merged across tiles
    OUT/images.json         [{"id", "file_name", "width", "height"}]: the image_id of each result

Images larger than ``tile`` are predicted by sliding window (``segpipe.tiling``) with memory
bounded by one row of tiles. Mask R-CNN is fed tiles at their own resolution (its internal
resize is disabled), so object scale matches what it saw in training at ``image_size``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segpipe.files import atomic_write_bytes, atomic_write_json
from segpipe.images import ImageError, ImageTooLarge, open_image
from segpipe.params import PredictParams, add_params_arguments, from_args
from segpipe.registry import DEFAULT_REGISTRY, load
from segpipe.tiling import Instance, paint_instances, predict_instances, predict_semantic, rle_counts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
OVERLAY_ALPHA = 0.5
MAX_IMAGE_PIXELS = 400_000_000  # a 20000 x 20000 orthophoto; larger is refused as a decompression bomb


def list_images(path: Path) -> list[Path]:
    """The image itself, or the images directly inside a directory (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return images
    raise FileNotFoundError(f"{path}: no such image or directory")


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8. Unreadable files, and images over MAX_IMAGE_PIXELS (checked from the
    header, before anything is decoded), raise ImageError naming the file."""
    try:
        with open_image(path, MAX_IMAGE_PIXELS, name="", limit_name="the predict limit") as im:
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
    except ImageTooLarge as e:
        raise ImageTooLarge(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image: {e}") from None


def palette(classes: list[dict[str, Any]]) -> np.ndarray:
    """(max id + 1) x 3 uint8 colours indexed by class id; ids without a class are grey."""
    size = max((int(c["id"]) for c in classes), default=0) + 1
    pal = np.full((max(size, 256), 3), 128, dtype=np.uint8)
    for c in classes:
        pal[int(c["id"])] = c.get("color", (128, 128, 128))
    return pal


def overlay(image: np.ndarray, labels: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    colours = pal[np.clip(labels, 0, len(pal) - 1)]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png(labels: np.ndarray, num_classes: int) -> bytes:
    dtype = np.uint8 if num_classes <= 255 else np.uint16
    return png_bytes(labels.astype(dtype))


def coco_results(instances: list[Instance], image_id: int, height: int, width: int) -> list[dict[str, Any]]:
    """COCO result entries (compressed RLE) for one image's merged instances."""
    from pycocotools import mask as mask_utils

    out = []
    for d in instances:
        counts = rle_counts(d, height, width)
        # counts are built here and always sum to height * width, so pycocotools gets valid input.
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        x0, y0, x1, y1 = d.box
        out.append({
            "image_id": image_id, "category_id": d.label, "score": round(d.score, 5),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": d.area,
        })
    return out


class Predictor:
    """A loaded model plus what predicting with it needs (classes, preprocessing, device)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], params: PredictParams, device: str = "cpu") -> None:
        from segpipe.models import normalize

        self.model, self.meta, self.params, self.device = model.to(device).eval(), meta, params, device
        self.classes = meta["classes"]
        self.num_classes = int(meta["num_classes"])
        self.task = meta.get("task", "semantic")
        self.instances = self.task == "instance" or hasattr(model, "predict_instances")
        self.preprocess = lambda tile: normalize(tile)[0]

    def detect(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if hasattr(self.model, "predict_instances"):
            return self.model.predict_instances(batch, score_threshold=self.params.score_threshold)
        return self.model(batch)

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, list[Instance]]:
        """(H x W label map, merged instances) of one H x W x 3 uint8 image."""
        p = self.params
        h, w = image.shape[:2]
        if self.task == "instance":
            found = predict_instances(self.detect, image, self.preprocess, p.tile, p.overlap, p.batch_size,
                                      self.device, p.score_threshold)
            return paint_instances(found, h, w, background=0), found
        labels = predict_semantic(self.model, image, self.preprocess, p.tile, p.overlap, p.batch_size, self.device)
        found = []
        if self.instances:
            found = predict_instances(self.detect, image, self.preprocess, p.tile, p.overlap, p.batch_size,
                                      self.device, p.score_threshold)
        return labels.numpy(), found


def run(
    params: PredictParams,
    model_ref: str | Path,
    inputs: Path,
    out: Path,
    registry: Path = DEFAULT_REGISTRY,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image under ``inputs`` into ``out``; returns a summary dict."""
    from tqdm import tqdm

    model, meta = load(model_ref, registry=registry, map_location=device)
    predictor = Predictor(model, meta, params, device)
    pal = palette(predictor.classes)
    images = list_images(Path(inputs))
    results: list[dict[str, Any]] = []
    table = []
    names: dict[str, Path] = {}
    for image_id, path in enumerate(tqdm(images, desc="predict", unit="image", disable=not progress), start=1):
        if path.stem in names:
            raise ValueError(f"{path}: same output name as {names[path.stem]}; rename one of them")
        names[path.stem] = path
        image = read_image(path)
        h, w = image.shape[:2]
        labels, found = predictor.predict(image)
        atomic_write_bytes(out / "labels" / f"{path.stem}.png", label_png(labels, predictor.num_classes))
        atomic_write_bytes(out / "overlays" / f"{path.stem}.png", png_bytes(overlay(image, labels, pal)))
        table.append({"id": image_id, "file_name": path.name, "width": w, "height": h})
        results += coco_results(found, image_id, h, w)
    if predictor.instances:
        atomic_write_json(out / "detections.json", results)
    atomic_write_json(out / "images.json", table)
    return {"model": str(model_ref), "arch": meta["arch"], "images": len(images), "instances": len(results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="champion", help="champion | challenger | vN | CHECKPOINT_DIR (default: champion)")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--input", type=Path, required=True, help="an image or a directory of images")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--tile", type=int, help="tile size in pixels (default: params predict.tile)")
    parser.add_argument("--overlap", type=int, help="tile overlap in pixels (default: params predict.overlap)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "predict")
    overrides = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    if overrides:
        from dataclasses import replace

        params = replace(params, **overrides)
    summary = run(params, args.model, args.input, args.out, args.registry, args.device)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
