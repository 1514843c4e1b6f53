"""``segpipe audit``: annotations a trained model disagrees with, most suspicious first.

    segpipe audit --model M --shards DIR|URI [--split train|val|all] --out DIR [--top K]
                  [--engine local|ray] [--device cpu|cuda] [--registry DIR] [--params FILE] [--set audit.KEY=V]

``M`` is a registry alias (``champion``), a version (``v3``) or a checkpoint folder, sha256-verified
before use; it needs a semantic output (class probabilities per pixel). Every labelled region of
the shards is scored: each instance annotation, and each 8-connected region of one class in the
label map outside every annotation (stuff). Its score (``audit.method``, see
``segpipe.quality.audit_scores``) says how strongly the model disagrees with its label::

    OUT/suspects.csv    rank,image_id,annotation_id,class,predicted_class,score,area,bbox,collection
    OUT/suspects/       one PNG per suspect of the top K (--top, default audit.top): image, label and
                        prediction side by side, the region outlined (replaced whole by each run)
    OUT/summary.json    counts, the method, the model

``image_id`` and ``annotation_id`` are the source dataset's own (its annotation file's ids; a shard
set of several collections also names the ``collection``), so a labeller can find the annotation.
A stuff region has no ``annotation_id``: its class and ``bbox`` (x y w h, in the source image's
pixels) identify it. An annotation cut into tiles by ``convert.tile_size`` is scored once, over
all its pieces. The model runs through ``segpipe.inference`` (images larger than
``audit.window.tile`` by sliding window), on this process or, with ``--engine ray``, on a Ray Data
actor pool. The shards' encoded rows are held in memory while the model runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.files import atomic_dir, atomic_write_json, atomic_write_text
from segpipe.params import AuditParams, add_params_arguments, from_args
from segpipe.registry import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from segpipe.inference import Predictor
    from segpipe.quality import Region
    from segpipe.shards import ShardSet

COLUMNS = ("rank", "image_id", "annotation_id", "class", "predicted_class", "score", "area", "bbox", "collection")
SPLITS = ("train", "val", "all")
OUTLINE = (255, 255, 255)
HALO = (0, 0, 0)


# --------------------------------------------------------------------------------------
# Rows: a shard row, flat (what map_rows carries to a Ray actor), and back
# --------------------------------------------------------------------------------------


def flat_row(key: int, row: dict[str, Any]) -> dict[str, Any]:
    """A raw shard row with its instances as JSON and a ``key`` (its position in the audit)."""
    fields = ("image_id", "split", "height", "width", "image", "semantic", "semantic_encoding", "source_image_id",
              "tile_x", "tile_y", "collection")
    return {"key": key, **{f: row.get(f) for f in fields}, "instances": json.dumps(list(row["instances"] or []))}


def sample_of(row: dict[str, Any]) -> dict[str, Any]:
    from segpipe.shards import decode_row

    return decode_row({**row, "instances": json.loads(row["instances"])})


def source_ids(sample: dict[str, Any]) -> tuple[str, str]:
    """(the source dataset's image id, the collection): a set of several collections prefixes its
    image ids with ``<collection>/``, which is not the annotation file's id."""
    image_id, collection = sample["source_image_id"], sample["collection"]
    prefix = f"{collection}/"
    return (image_id[len(prefix):] if image_id.startswith(prefix) else image_id), collection


def region_entry(region: Region, sample: dict[str, Any], pixels: int) -> dict[str, Any]:
    """A region as the scorer returns it (``pixels``: those its score is taken over); an annotation
    of a tile also carries its mask (COCO RLE counts of its box), so that its pieces' union gives
    its area."""
    from pycocotools import mask as mask_utils

    x, y, w, h = region.bbox
    entry = {"annotation_id": region.annotation_id, "class_id": region.class_id, "area": region.area,
             "pixels": pixels, "bbox": [x + sample["tile_x"], y + sample["tile_y"], w, h], "tile_bbox": [x, y, w, h]}
    if region.annotation_id is not None and sample["source_image_id"] != sample["image_id"]:
        crop = np.asfortranarray(region.mask[y:y + h, x:x + w].astype(np.uint8))
        entry["crop"] = mask_utils.encode(crop)["counts"].decode("ascii")
    return entry


def union_area(pieces: list[dict[str, Any]]) -> int:
    """Pixels of the union of an annotation's tile pieces (``bbox`` in the source image, ``crop``):
    tiles overlap, so their areas do not add up."""
    from pycocotools import mask as mask_utils

    x0, y0 = min(p["bbox"][0] for p in pieces), min(p["bbox"][1] for p in pieces)
    x1 = max(p["bbox"][0] + p["bbox"][2] for p in pieces)
    y1 = max(p["bbox"][1] + p["bbox"][3] for p in pieces)
    canvas = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for p in pieces:
        x, y, w, h = p["bbox"]
        crop = mask_utils.decode({"size": [h, w], "counts": p["crop"].encode("ascii")}).astype(bool)
        canvas[y - y0:y - y0 + h, x - x0:x - x0 + w] |= crop
    return int(canvas.sum())


class RegionScorer:
    """Runs on each flat shard row: the model's class probabilities (``segpipe.inference``), the
    row's regions (``segpipe.quality.label_regions``) and each region's probability sums over its
    interior. Returns ``{"key", "regions": JSON}``."""

    def __init__(self, predictor: Predictor, tile: int, overlap: int, batch_size: int, min_area: int,
                 border: int) -> None:
        self.predictor, self.window = predictor, (tile, overlap, batch_size)
        self.min_area, self.border = min_area, border

    def regions(self, sample: dict[str, Any]) -> list[Region]:
        from segpipe.quality import label_regions

        return label_regions(sample["semantic"], sample["instances"], self.predictor.meta.ignore_index,
                             self.min_area, self.border)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from segpipe.quality import region_probability_sums

        sample = sample_of(row)
        probs = self.predictor.probabilities(sample["image"], *self.window).probs
        regions = self.regions(sample)
        cores = [r.interior(self.border, self.min_area) for r in regions]
        sums = region_probability_sums(probs, cores)
        found = [{**region_entry(r, sample, int(c.sum())), "prob_sum": s.tolist()}
                 for r, c, s in zip(regions, cores, sums)]
        return {"key": row["key"], "regions": json.dumps(found)}


# --------------------------------------------------------------------------------------
# Suspects: regions merged across tiles, scored and ranked
# --------------------------------------------------------------------------------------


@dataclass
class Suspect:
    """One scored region. ``prob_sum``/``pixels``: its pixels' summed class probabilities (over
    all its tile pieces); ``key``/``tile_bbox`` locate its largest piece for the overlay."""

    image_id: str
    collection: str
    annotation_id: int | None
    class_id: int
    area: int
    bbox: list[int]
    prob_sum: np.ndarray
    pixels: int
    key: int
    tile_bbox: list[int]
    piece_area: int
    pieces: list[dict[str, Any]]
    score: float = float("nan")
    predicted: int = -1


def merge_regions(pieces: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Suspect]:
    """``(row info, region entry)`` pairs -> one Suspect per annotation (its tile pieces' sums
    added, boxes joined, area their union) and one per stuff region, in input order."""
    merged: dict[tuple[Any, ...], Suspect] = {}
    for info, r in pieces:
        ident = ((info["collection"], info["image_id"], r["annotation_id"]) if r["annotation_id"] is not None
                 else (info["key"], len(merged)))
        s = merged.get(ident)
        if s is None:
            merged[ident] = Suspect(info["image_id"], info["collection"], r["annotation_id"], r["class_id"], r["area"],
                                    list(r["bbox"]), np.asarray(r["prob_sum"], dtype=np.float64), r["pixels"],
                                    info["key"], list(r["tile_bbox"]), r["area"], [r])
            continue
        x0, y0 = min(s.bbox[0], r["bbox"][0]), min(s.bbox[1], r["bbox"][1])
        x1 = max(s.bbox[0] + s.bbox[2], r["bbox"][0] + r["bbox"][2])
        y1 = max(s.bbox[1] + s.bbox[3], r["bbox"][1] + r["bbox"][3])
        s.bbox, s.prob_sum, s.pixels = [x0, y0, x1 - x0, y1 - y0], s.prob_sum + r["prob_sum"], s.pixels + r["pixels"]
        s.pieces.append(r)
        s.area = union_area(s.pieces)
        if r["area"] > s.piece_area:
            s.key, s.tile_bbox, s.piece_area = info["key"], list(r["tile_bbox"]), r["area"]
    return list(merged.values())


def rank_suspects(suspects: list[Suspect], method: str) -> list[Suspect]:
    """Score every suspect (``segpipe.quality.audit_scores``) and sort, most suspicious first."""
    from segpipe.quality import audit_scores, rank_order

    if not suspects:
        return []
    mean = np.stack([s.prob_sum / max(1, s.pixels) for s in suspects])
    scored = audit_scores(mean, np.array([s.class_id for s in suspects]), method)
    for s, score, pred in zip(suspects, scored.score, scored.predicted):
        s.score, s.predicted = float(score), int(pred)
    keys = [(s.collection, s.image_id, s.annotation_id if s.annotation_id is not None else -1, s.bbox) for s in suspects]
    return [suspects[i] for i in rank_order(np.array([s.score for s in suspects]), keys)]


def suspects_csv(ranked: list[Suspect], names: dict[int, str]) -> str:
    """suspects.csv: COLUMNS, one row per region, most suspicious first (bbox: ``x y w h``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rank, s in enumerate(ranked, start=1):
        writer.writerow([rank, s.image_id, "" if s.annotation_id is None else s.annotation_id,
                         names.get(s.class_id, str(s.class_id)), names.get(s.predicted, str(s.predicted)),
                         f"{s.score:.4f}", s.area, " ".join(str(v) for v in s.bbox), s.collection])
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------


def outline_mask(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(a ring of ``width`` pixels just outside ``mask``, a 1-pixel ring outside that)."""
    from scipy import ndimage

    inner = ndimage.binary_dilation(mask, iterations=width) & ~mask
    outer = ndimage.binary_dilation(mask, iterations=width + 1) & ~mask & ~inner
    return inner, outer


def overlay_panels(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, mask: np.ndarray,
                   pal: np.ndarray, caption: str, min_side: int = 256,
                   classes: Sequence[Mapping[str, Any]] = ()) -> np.ndarray:
    """One suspect's picture: image, label and prediction side by side (class colours blended
    over the image), ``mask`` outlined on each, ``caption`` above, a colour legend of the classes
    shown below; small images scaled up (nearest neighbour) to at least ``min_side`` pixels on
    their longer side."""
    from PIL import Image, ImageDraw

    from segpipe.commands.predict import blend
    from segpipe.inference import legend

    scale = max(1, -(-min_side // max(image.shape[:2])))

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)

    inner, outer = outline_mask(up(mask), max(1, scale // 2))
    panels = []
    for picture in (image, blend(image, label, pal), blend(image, prediction, pal)):
        p = up(picture).copy()
        p[inner], p[outer] = OUTLINE, HALO
        panels.append(p)
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    body = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    head = Image.new("RGB", (body.shape[1], 30), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    draw.text((4, 2), caption, fill=(0, 0, 0))
    third = (body.shape[1] + 8) // 3
    for i, title in enumerate(("image", "label", "prediction")):
        draw.text((4 + i * third, 16), title, fill=(90, 90, 90))
    shown = sorted(set(np.unique(label).tolist()) | set(np.unique(prediction).tolist()))
    return np.concatenate([np.asarray(head), body, legend(shown, classes, pal, body.shape[1])], axis=0)


class OverlayRenderer(RegionScorer):
    """Runs on a flat shard row with one suspect (``rank``, ``annotation_id``, ``class_id``,
    ``tile_bbox``, ``caption``): the overlay PNG. The region is found again by its annotation id,
    or (stuff) as the region of its class with its box."""

    def __init__(self, predictor: Predictor, tile: int, overlap: int, batch_size: int, min_area: int,
                 border: int) -> None:
        from segpipe.inference import palette

        super().__init__(predictor, tile, overlap, batch_size, min_area, border)
        self.pal = palette(list(predictor.meta.classes))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from segpipe.commands.predict import png_bytes

        sample = sample_of(row)
        probs = self.predictor.probabilities(sample["image"], *self.window).probs
        regions = self.regions(sample)
        ann, box = row["annotation_id"], json.loads(row["tile_bbox"])
        region = next((r for r in regions if (r.annotation_id == ann if ann >= 0 else
                                              r.annotation_id is None and r.class_id == row["class_id"]
                                              and list(r.bbox) == box)), None)
        if region is None:  # not reached when the shards are unchanged since the scoring pass
            raise ValueError(f"image {sample['image_id']}: region of suspect #{row['rank']} not found again")
        picture = overlay_panels(sample["image"], sample["semantic"], probs.argmax(0), region.mask, self.pal,
                                 row["caption"], classes=list(self.predictor.meta.classes))
        return {"rank": row["rank"], "png": png_bytes(picture)}


def overlay_name(rank: int, s: Suspect, names: dict[int, str]) -> str:
    import re

    what = f"ann{s.annotation_id}" if s.annotation_id is not None else names.get(s.class_id, str(s.class_id))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{rank:04d}_{s.image_id}_{what}") + ".png"


def caption(rank: int, s: Suspect, names: dict[int, str]) -> str:
    what = f"annotation {s.annotation_id}" if s.annotation_id is not None else f"region at {' '.join(map(str, s.bbox))}"
    return (f"#{rank}  image {s.image_id}  {what}: labelled {names.get(s.class_id, s.class_id)}, "
            f"model says {names.get(s.predicted, s.predicted)} (score {s.score:.2f})")


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def read_rows(shards: ShardSet, split: str) -> list[dict[str, Any]]:
    from segpipe.shards import iter_rows

    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: valid: {', '.join(SPLITS)}")
    return [flat_row(i, r) for i, r in enumerate(iter_rows(shards, split=None if split == "all" else split))]


def run(params: AuditParams, model_ref: str | Path, shards: str | Path, out: Path, split: str = "all",
        top: int | None = None, registry: Path | str = DEFAULT_REGISTRY, device: str = "cpu",
        engine: str = "local", progress: bool = True) -> dict[str, Any]:
    """Score every region of ``shards`` (``split``) with the model; write suspects.csv, the top
    overlays and summary.json into ``out``; return the summary."""
    from tqdm import tqdm

    from segpipe.checkpoint import check_classes
    from segpipe.inference import map_rows
    from segpipe.quality import probability_model
    from segpipe.shards import ShardError, open_shards

    directory, meta = probability_model(model_ref, registry)
    shard_set = open_shards(shards)
    check_classes(directory, meta, list(shard_set.classes))
    rows = read_rows(shard_set, split)
    if not rows:
        raise ShardError(f"{shards}: no rows in split {split!r} (splits: {shard_set.splits})")
    worker = {"tile": params.window.tile, "overlap": params.window.overlap, "batch_size": params.window.batch_size,
              "min_area": params.min_area, "border": params.border}
    infos = {r["key"]: r for r in rows}
    pieces = []
    for result in tqdm(map_rows(rows, directory, RegionScorer, worker, engine=engine, device=device,
                                outputs={"semantic"}), total=len(rows), desc="audit", unit="image", disable=not progress):
        info = infos[result["key"]]
        image_id, collection = source_ids({"source_image_id": info["source_image_id"] or info["image_id"],
                                           "collection": info["collection"]})
        pieces += [({"key": info["key"], "image_id": image_id, "collection": collection}, r)
                   for r in json.loads(result["regions"])]
    pieces.sort(key=lambda p: p[0]["key"])  # the engine's order is not fixed: merge in the shards' order
    ranked = rank_suspects(merge_regions(pieces), params.method)
    names = {int(c["id"]): str(c["name"]) for c in meta.classes}
    out = Path(out)
    atomic_write_text(out / "suspects.csv", suspects_csv(ranked, names))

    k = min(params.top if top is None else top, len(ranked))
    jobs = [{**infos[s.key], "rank": rank, "annotation_id": -1 if s.annotation_id is None else s.annotation_id,
             "class_id": s.class_id, "tile_bbox": json.dumps(s.tile_bbox), "caption": caption(rank, s, names)}
            for rank, s in enumerate(ranked[:k], start=1)]
    with atomic_dir(out / "suspects") as folder:  # this run's overlays only, never a previous run's
        for result in tqdm(map_rows(jobs, directory, OverlayRenderer, worker, engine=engine, device=device,
                                    outputs={"semantic"}), total=len(jobs), desc="overlays", unit="image",
                           disable=not progress):
            rank = result["rank"]
            (folder / overlay_name(rank, ranked[rank - 1], names)).write_bytes(result["png"])
    summary = {"model": str(model_ref), "arch": meta.arch, "shards": str(shards), "split": split,
               "images": len(rows), "regions": len(ranked),
               "annotations": sum(1 for s in ranked if s.annotation_id is not None), "method": params.method,
               "min_area": params.min_area, "border": params.border, "overlays": k, "engine": engine}
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    import torch

    from segpipe.params import ENGINES

    parser = argparse.ArgumentParser(prog="segpipe audit", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="champion | challenger | vN | CHECKPOINT_DIR")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--shards", required=True, help="shard set (folder or URI)")
    parser.add_argument("--split", choices=SPLITS, default="all", help="split to audit (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--top", type=int, help="overlays for the K most suspicious (default: params audit.top)")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process; ray: a Ray Data actor pool (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "audit")
    if args.top is not None and args.top < 0:
        parser.error("--top must be >= 0")
    from segpipe.storage import require_local

    summary = run(params, args.model, args.shards, require_local(args.out, "--out"), args.split, args.top,
                  args.registry, args.device, args.engine, progress=not args.no_progress)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
