"""``segpipe predict``: run a registered model (or a checkpoint directory) on images of any size.

    segpipe predict [--model champion] --input IMAGE|DIR|URI --out DIR [--tile N] [--overlap N]
                    [--engine local|ray] [--device cpu|cuda] [--panoptic]

Writes, per input image ``NAME.ext``::

    OUT/labels/NAME.png     class ids (uint8; uint16 when there are more than 255 classes); for
                            instance-only models the detections rendered, ignore_index (255) elsewhere
    OUT/overlays/NAME.png   the image blended with the class colours, above a legend naming them
    OUT/detections.json     instance-capable models: COCO results, instances merged across tiles
    OUT/images.json         [{"id", "file_name", "width", "height"}]: the image_id of each result
    OUT/panoptic/NAME.png   with --panoptic: COCO panoptic PNG, segment id = R + 256 G + 256^2 B
    OUT/panoptic.json       with --panoptic: COCO panoptic ``annotations`` (file_name, image_id,
                            segments_info), ``categories`` (with isthing) and ``images``

``--panoptic`` needs a model with a panoptic output (MaskFormer) or a fused registry bundle
(``--model panoptic-champion`` when promote chose a fused pair; both of its models run, fused
with the bundle's own fusion params). MaskFormer gives Mask2Former's panoptic inference on an
image within one tile; on larger images, its tiled semantic map and tiled detections fused by
Panoptic FPN's heuristic (segments cut by tile borders merge reliably only as detections do).
Thresholds: the ``predict`` section's (``detection``, ``panoptic``, ``fusion``); a bundle's fusion its own.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segpipe.files import atomic_write_bytes, atomic_write_json
from segpipe.images import ImageError, ImageTooLarge, open_image
from segpipe.params import FusionParams, PredictParams, add_params_arguments, from_args
from segpipe.registry import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from segpipe.checkpoint import CheckpointMeta
    from segpipe.inference import Prediction, Predictor

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


def rgb_array(im: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 of an opened image: how every input of predict (and of ``segpipe serve``) is decoded."""
    return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays


def read_image(path: str | Path) -> np.ndarray:
    """H x W x 3 uint8 of a local path or object-store URI. Unreadable files, and images over
    MAX_IMAGE_PIXELS (checked from the header, before anything is decoded), raise ImageError
    naming the file."""
    from segpipe import storage

    try:
        location = storage.resolve(path, "--input")
        source = location.local_path() if location.local else storage.read_bytes(location)
        with open_image(source, MAX_IMAGE_PIXELS, name="", limit_name="the predict limit") as im:
            return rgb_array(im)
    except ImageTooLarge as e:
        raise ImageTooLarge(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image: {e}") from None


def blend(image: np.ndarray, labels: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image blended with the class colours of ``labels`` (same size as the image)."""
    from segpipe.inference import colorize

    colours = colorize(labels, pal)
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA,
            classes: Sequence[Mapping[str, Any]] = ()) -> np.ndarray:
    """:func:`blend`, above a legend naming the colour of each class it shows (``classes``: the
    class table; ``segpipe.inference.legend``)."""
    from segpipe.inference import legend

    blended = blend(image, labels, pal, alpha)
    return np.concatenate([blended, legend(np.unique(labels).tolist(), classes, pal, blended.shape[1])], axis=0)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png(labels: np.ndarray) -> bytes:
    """The label PNG of a label map: 8-bit, or 16-bit when a class id or ignore_index needs it."""
    return png_bytes(labels if labels.dtype.itemsize <= 2 else labels.astype(np.uint16))


def output_name(path: str) -> str:
    """``labels/NAME.png`` is named after the input's file name without its extension."""
    return PurePosixPath(path).stem


class ImagePredictor:
    """Predicts images with one predictor: what a Ray actor, this process or a ``segpipe serve``
    replica runs. :meth:`predict` gives the predictions; called on a row, it gives a flat row:
    ``id``, ``file_name``, ``width``, ``height``, the ``labels`` and ``overlay`` PNGs,
    ``detections`` (JSON: COCO results; ``[]`` for semantic-only models), and ``panoptic`` (the
    COCO panoptic PNG, empty without a panoptic output) with ``segments_info`` (JSON). With
    ``instance_checkpoint`` (a fused bundle's instance member, loaded once beside the predictor),
    the panoptic output is the fusion of both models' tiled predictions."""

    def __init__(self, predictor: Predictor, tile: int, overlap: int, batch_size: int,
                 instance_checkpoint: str | None = None, fusion: FusionParams | None = None) -> None:
        from segpipe.inference import Predictor, palette

        self.predictor, self.tile, self.overlap, self.batch_size = predictor, tile, overlap, batch_size
        self.pal = palette(list(predictor.meta.classes))
        self.instance = None if instance_checkpoint is None else Predictor.load(
            instance_checkpoint, predictor.request.detection, predictor.device, outputs={"instances"})
        self.fusion = fusion

    def within_one_tile(self, image: np.ndarray) -> bool:
        """Whether ``image`` is predicted whole (else by sliding window)."""
        return image.shape[0] <= self.tile and image.shape[1] <= self.tile

    def _run(self, predictor: Predictor, images: Sequence[np.ndarray]) -> list[Prediction]:
        # Images within one tile go through the model together (predict_images groups them by
        # padded size, so none depends on what it ran with), exactly as predict_tiled predicts
        # one alone; larger ones by sliding window, one at a time.
        whole = [i for i, im in enumerate(images) if self.within_one_tile(im)]
        out: list[Prediction] = [None] * len(images)  # type: ignore[list-item]
        for i, pred in zip(whole, predictor.images([images[i] for i in whole]) if whole else []):
            out[i] = pred
        for i, im in enumerate(images):
            if out[i] is None:
                out[i] = predictor.tiled(im, self.tile, self.overlap, self.batch_size)
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """One prediction per image (labels, instances, panoptic), a fused bundle's fused."""
        from segpipe.inference import Prediction, fuse

        preds = self._run(self.predictor, images)
        if self.instance is None:
            return preds
        found = self._run(self.instance, images)
        return [Prediction(p.labels, f.instances, fuse(p, Prediction(p.labels, f.instances),
                                                       self.predictor.request.thing_ids, self.fusion))
                for p, f in zip(preds, found)]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from segpipe.inference import coco_results
        from segpipe.panoptic import encode_png

        image = read_image(row["path"])
        h, w = image.shape[:2]
        pred = self.predict([image])[0]
        found = coco_results(pred.instances, row["id"], h, w) if pred.instances is not None else []
        return {"id": row["id"], "file_name": PurePosixPath(str(row["path"])).name, "width": w, "height": h,
                "labels": label_png(pred.labels), "overlay": png_bytes(overlay(image, pred.labels, self.pal,
                                                                classes=self.predictor.meta.classes)),
                "detections": json.dumps(found),
                "panoptic": encode_png(pred.panoptic[0]) if pred.panoptic is not None else b"",
                "segments_info": json.dumps(pred.panoptic[1] if pred.panoptic is not None else [])}


@dataclass(frozen=True)
class ModelPlan:
    """How a resolved model is run: the checkpoint a Predictor loads (a fused bundle's semantic
    member), its meta, the Predictor's ``loading`` kwargs (``detection``, ``panoptic``,
    ``outputs``) and the ImagePredictor's ``worker`` kwargs. ``bundle``: a fused registry
    bundle (always panoptic); ``panoptic``: panoptic outputs are made."""

    checkpoint: Path
    meta: CheckpointMeta
    loading: dict[str, Any]
    worker: dict[str, Any]
    bundle: bool
    panoptic: bool

    @property
    def arch(self) -> str:
        return "fused" if self.bundle else self.meta.arch


def model_plan(params: PredictParams, directory: Path, panoptic: bool = False, model_ref: str | Path = "") -> ModelPlan:
    """The plan of the (verified) model folder ``directory``: a checkpoint or a fused bundle.
    ``panoptic`` asks for panoptic outputs (ValueError for a model without one)."""
    from segpipe.checkpoint import load_meta
    from segpipe.inference import PanopticSettings
    from segpipe.models import spec_of
    from segpipe.params import build
    from segpipe.registry import read_bundle

    bundle = read_bundle(directory)
    worker: dict[str, Any] = {"tile": params.tile, "overlap": params.overlap, "batch_size": params.batch_size}
    if bundle is not None:
        panoptic = True
        worker["instance_checkpoint"] = str(directory / bundle["members"]["instance"])
        worker["fusion"] = build(FusionParams, bundle["fusion"], f"{directory / 'bundle.json'}: fusion")
        directory = directory / bundle["members"]["semantic"]
    meta = load_meta(directory)
    if panoptic and bundle is None and "panoptic" not in spec_of(meta.arch).outputs:
        raise ValueError(f"--panoptic: model {model_ref or directory} ({meta.arch}) has no panoptic output; use a model "
                         f"with one (maskformer) or a fused registry bundle (e.g. --model panoptic-champion)")
    outputs = {"semantic", "instances"} | ({"panoptic"} if panoptic and bundle is None else set())
    loading = {"detection": params.detection, "panoptic": PanopticSettings(params.panoptic, params.fusion),
               "outputs": outputs}
    return ModelPlan(directory, meta, loading, worker, bundle is not None, panoptic)


def panoptic_categories(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO panoptic ``categories`` of a checkpoint's class table."""
    return [{"id": int(c["id"]), "name": str(c["name"]), "isthing": int(bool(c.get("isthing"))),
             **({"color": list(c["color"])} if c.get("color") is not None else {})} for c in classes]


def run(
    params: PredictParams,
    model_ref: str | Path,
    inputs: str | Path,
    out: Path,
    registry: Path = DEFAULT_REGISTRY,
    device: str = "cpu",
    progress: bool = True,
    engine: str = "local",
    panoptic: bool = False,
) -> dict[str, Any]:
    """Predict every image of ``inputs`` into ``out`` with ``engine``; returns a summary dict.
    ``panoptic``: also write COCO panoptic output (always for a fused bundle). Thresholds are
    ``params``' (``detection``, ``panoptic``, ``fusion``)."""
    from tqdm import tqdm

    from segpipe.inference import map_rows
    from segpipe.models import spec_of
    from segpipe.registry import checkpoint_dir

    # a bundle's files (both models) are verified by checkpoint_dir
    plan = model_plan(params, checkpoint_dir(model_ref, registry), panoptic, model_ref)
    panoptic, meta = plan.panoptic, plan.meta
    images = list_images(inputs)
    names: dict[str, str] = {}
    for path in images:
        if output_name(path) in names:
            raise ValueError(f"{path}: same output name as {names[output_name(path)]}; rename one of them")
        names[output_name(path)] = path
    rows = [{"id": i, "path": path} for i, path in enumerate(images, start=1)]
    results = map_rows(rows, plan.checkpoint, ImagePredictor, plan.worker, engine=engine, device=device, **plan.loading)
    out = Path(out)
    table, detections, annotations = [], [], []
    for r in tqdm(results, total=len(rows), desc="predict", unit="image", disable=not progress):
        name = output_name(images[r["id"] - 1])
        atomic_write_bytes(out / "labels" / f"{name}.png", r["labels"])
        atomic_write_bytes(out / "overlays" / f"{name}.png", r["overlay"])
        table.append({"id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
        detections.append((r["id"], json.loads(r["detections"])))
        if panoptic:
            atomic_write_bytes(out / "panoptic" / f"{name}.png", r["panoptic"])
            annotations.append({"image_id": r["id"], "file_name": f"{name}.png",
                                "segments_info": json.loads(r["segments_info"])})
    detections.sort(key=lambda d: d[0])
    results_list = [d for _, found in detections for d in found]
    if "instances" in spec_of(meta.arch).outputs or plan.bundle:
        atomic_write_json(out / "detections.json", results_list)
    table.sort(key=lambda t: t["id"])
    atomic_write_json(out / "images.json", table)
    if panoptic:
        atomic_write_json(out / "panoptic.json", {"images": table, "annotations": sorted(annotations, key=lambda a: a["image_id"]),
                                                  "categories": panoptic_categories(list(meta.classes))})
    return {"model": str(model_ref), "arch": plan.arch, "images": len(images),
            "instances": len(results_list), "engine": engine, "panoptic": panoptic}


def main(argv: list[str] | None = None) -> None:
    import torch

    from segpipe.params import ENGINES

    parser = argparse.ArgumentParser(prog="segpipe predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="champion", help="champion | challenger | vN | CHECKPOINT_DIR (default: champion)")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--input", required=True, help="an image, a directory of images, or a URI of either")
    parser.add_argument("--out", required=True, help="output directory (local)")
    parser.add_argument("--tile", type=int, help="tile size in pixels (default: params predict.tile)")
    parser.add_argument("--overlap", type=int, help="tile overlap in pixels (default: params predict.overlap)")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process; ray: a Ray Data actor pool, for many images (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--panoptic", action="store_true",
                        help="also write COCO panoptic PNGs and panoptic.json (maskformer, or a fused registry bundle "
                             "such as panoptic-champion); thresholds: predict.panoptic, predict.fusion")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "predict")
    overrides = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    if overrides:
        from dataclasses import replace

        params = replace(params, **overrides)
    from segpipe.storage import require_local

    summary = run(params, args.model, args.input, require_local(args.out, "--out"), args.registry, args.device,
                  engine=args.engine, panoptic=args.panoptic)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
