"""``segpipe predict``: run a registered model (or a checkpoint directory) on images of any size.

    segpipe predict [--model champion] --input IMAGE|DIR|URI --out DIR [--tile N] [--overlap N]
                    [--engine local|ray] [--device cpu|cuda]

Writes, per input image ``NAME.ext``::

    OUT/labels/NAME.png     class ids (uint8; uint16 when there are more than 255 classes); for
                            instance-only models the detections rendered, ignore_index (255) elsewhere
    OUT/overlays/NAME.png   the image blended with the class colours
    OUT/detections.json     instance-capable models: COCO results, instances merged across tiles
    OUT/images.json         [{"id", "file_name", "width", "height"}]: the image_id of each result

Every image goes through ``segpipe.inference.predict_tiled``, the code ``segpipe evaluate`` scores
with: an image within one tile is predicted whole, exactly as evaluate predicts it; larger ones by
sliding window with memory bounded by one row of tiles. Mask R-CNN is fed tiles at their own
resolution (its internal resize is disabled), so object scale matches what it saw in training.

``--input`` is an image, a directory of images, or a URI of either (``s3://bucket/site/``,
``gs://...``, ``file:///...``: see ``segpipe.storage``). ``--engine ray`` spreads the images
over a Ray Data actor pool (one model per actor; one GPU each with ``--device cuda``) that reads
them and returns PNGs, written here as they arrive; ``local`` (the default) runs in this process.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segpipe.files import atomic_write_bytes, atomic_write_json
from segpipe.images import ImageError, ImageTooLarge, open_image
from segpipe.params import PredictParams, add_params_arguments, from_args
from segpipe.registry import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from segpipe.inference import Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
OVERLAY_ALPHA = 0.5
MAX_IMAGE_PIXELS = 400_000_000  # a 20000 x 20000 orthophoto; larger is refused as a decompression bomb


def list_images(path: str | Path) -> list[str]:
    """The image itself, or the images directly inside a folder (sorted): local paths, or URIs on
    an object store (read through ``segpipe.storage``)."""
    from pyarrow.fs import FileType

    from segpipe import storage

    location = storage.resolve(path, "--input")
    kind = storage.info(location).type
    if kind == FileType.File:
        return [location.uri]
    if kind == FileType.Directory:
        images = [location.child(name).uri for name in storage.list_files(location)
                  if "/" not in name and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return images
    raise FileNotFoundError(f"{path}: no such image or directory")


def read_image(path: str | Path) -> np.ndarray:
    """H x W x 3 uint8 of a local path or object-store URI. Unreadable files, and images over
    MAX_IMAGE_PIXELS (checked from the header, before anything is decoded), raise ImageError
    naming the file."""
    from segpipe import storage

    try:
        location = storage.resolve(path, "--input")
        source = location.local_path() if location.local else storage.read_bytes(location)
        with open_image(source, MAX_IMAGE_PIXELS, name="", limit_name="the predict limit") as im:
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
    except ImageTooLarge as e:
        raise ImageTooLarge(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image: {e}") from None


def overlay(image: np.ndarray, labels: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    from segpipe.inference import colorize

    colours = colorize(labels, pal)
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def output_name(path: str) -> str:
    """``labels/NAME.png`` is named after the input's file name without its extension."""
    return PurePosixPath(path).stem


class ImagePredictor:
    """Predicts images one at a time with one predictor: what a Ray actor or this process runs.
    A result is a flat row: ``id``, ``file_name``, ``width``, ``height``, the ``labels`` and
    ``overlay`` PNGs, and ``detections`` (JSON: COCO results; ``[]`` for semantic-only models)."""

    def __init__(self, predictor: Predictor, tile: int, overlap: int, batch_size: int) -> None:
        from segpipe.inference import palette

        self.predictor, self.tile, self.overlap, self.batch_size = predictor, tile, overlap, batch_size
        self.pal = palette(list(predictor.meta.classes))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from segpipe.inference import coco_results

        image = read_image(row["path"])
        h, w = image.shape[:2]
        pred = self.predictor.tiled(image, self.tile, self.overlap, self.batch_size)
        labels = pred.labels if pred.labels.dtype.itemsize <= 2 else pred.labels.astype(np.uint16)
        found = coco_results(pred.instances, row["id"], h, w) if pred.instances is not None else []
        return {"id": row["id"], "file_name": PurePosixPath(str(row["path"])).name, "width": w, "height": h,
                "labels": png_bytes(labels), "overlay": png_bytes(overlay(image, pred.labels, self.pal)),
                "detections": json.dumps(found)}


def run(
    params: PredictParams,
    model_ref: str | Path,
    inputs: str | Path,
    out: Path,
    registry: Path = DEFAULT_REGISTRY,
    device: str = "cpu",
    progress: bool = True,
    engine: str = "local",
) -> dict[str, Any]:
    """Predict every image of ``inputs`` into ``out`` with ``engine``; returns a summary dict."""
    from tqdm import tqdm

    from segpipe.checkpoint import load_meta
    from segpipe.inference import DetectionSettings, map_rows
    from segpipe.models import spec_of
    from segpipe.registry import checkpoint_dir

    directory = checkpoint_dir(model_ref, registry)
    meta = load_meta(directory)
    images = list_images(inputs)
    names: dict[str, str] = {}
    for path in images:
        if output_name(path) in names:
            raise ValueError(f"{path}: same output name as {names[output_name(path)]}; rename one of them")
        names[output_name(path)] = path
    rows = [{"id": i, "path": path} for i, path in enumerate(images, start=1)]
    worker = {"tile": params.tile, "overlap": params.overlap, "batch_size": params.batch_size}
    results = map_rows(rows, directory, ImagePredictor, worker, engine=engine,
                       detection=DetectionSettings(score_threshold=params.score_threshold), device=device)
    out = Path(out)
    table, detections = [], []
    for r in tqdm(results, total=len(rows), desc="predict", unit="image", disable=not progress):
        name = output_name(images[r["id"] - 1])
        atomic_write_bytes(out / "labels" / f"{name}.png", r["labels"])
        atomic_write_bytes(out / "overlays" / f"{name}.png", r["overlay"])
        table.append({"id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
        detections.append((r["id"], json.loads(r["detections"])))
    detections.sort(key=lambda d: d[0])
    results_list = [d for _, found in detections for d in found]
    if "instances" in spec_of(meta.arch).outputs:
        atomic_write_json(out / "detections.json", results_list)
    atomic_write_json(out / "images.json", sorted(table, key=lambda t: t["id"]))
    return {"model": str(model_ref), "arch": meta.arch, "images": len(images), "instances": len(results_list),
            "engine": engine}


def main(argv: list[str] | None = None) -> None:
    import torch

    from segpipe.params import ENGINES

    parser = argparse.ArgumentParser(prog="segpipe predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="champion", help="champion | challenger | vN | CHECKPOINT_DIR (default: champion)")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--input", required=True, help="an image, a directory of images, or a URI of either")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--tile", type=int, help="tile size in pixels (default: params predict.tile)")
    parser.add_argument("--overlap", type=int, help="tile overlap in pixels (default: params predict.overlap)")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process; ray: a Ray Data actor pool, for many images (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "predict")
    overrides = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    if overrides:
        from dataclasses import replace

        params = replace(params, **overrides)
    summary = run(params, args.model, args.input, args.out, args.registry, args.device, engine=args.engine)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
