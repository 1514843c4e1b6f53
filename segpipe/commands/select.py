"""``segpipe select``: the unlabelled frames worth labelling, by the model's uncertainty.

    segpipe select --model M --input DIR|URI --k N --out DIR [--strategy diverse|entropy|margin]
                   [--engine local|ray] [--device cpu|cuda] [--registry DIR] [--params FILE] [--set select.KEY=V]

``M`` is a registry alias, a version or a checkpoint folder (sha256-verified) with a semantic
output. Every image of ``--input`` (a folder of images, an image, or a URI of either) goes through
``segpipe.inference.iter_probabilities``: whole within ``select.window.tile`` pixels, larger ones by
sliding window. Per frame, from its pixels' class probabilities (``segpipe.quality``):

- ``entropy``: the mean pixel entropy (normalised by log K, 0..1);
- ``margin``: the mean of 1 - (top-1 minus top-2 probability);
- ``diverse`` (default, ``select.strategy``): entropy, spread by greedy k-center on an embedding of
  each frame (the mean of the features the model's classifier reads, and its mean class
  probabilities, each dimension standardised over the pool): each pick maximises uncertainty x
  min(1, distance to the nearest frame already picked / (``select.near`` x the pool's median
  distance between frames)). Frames farther apart than that compete on uncertainty; a closer one
  is worth the less the closer it is, so 50 near-identical frames of one flight do not fill the
  list, and an exact duplicate is never picked twice (fewer than N come back when the pool has
  fewer distinct frames).

Writes ``OUT/selected.csv`` (``rank,file,score``: score is the frame's uncertainty of the strategy;
``entropy``, ``margin``, ``confidence`` and, for diverse, ``distance`` follow),
``OUT/contact_sheet.png`` (the selection, ranked) and ``OUT/summary.json``. ``--engine ray``
spreads the frames over a Ray Data actor pool (one model per actor).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from segpipe.params import SelectParams, add_params_arguments, from_args
from segpipe.registry import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from segpipe.inference import Predictor
    from segpipe.quality import Pick

THUMB = 160  # contact sheet cell, pixels
SHEET_COLUMNS = 5


class FrameScorer:
    """Runs on ``{"id", "path"}`` (an image file or URI) or ``{"id", "image"}`` (encoded bytes):
    the frame's uncertainty (``segpipe.quality.FrameUncertainty``) and, with ``embed``, its
    embedding. Returns ``{"id", "entropy", "margin", "confidence", "embedding": float32 bytes}``.
    ``segpipe drift`` runs it too, for the model's confidence."""

    def __init__(self, predictor: Predictor, tile: int, overlap: int, batch_size: int, embed: bool) -> None:
        self.predictor, self.window, self.embed = predictor, (tile, overlap, batch_size), embed

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from segpipe.quality import FrameUncertainty

        image = frame_image(row)
        acc = FrameUncertainty()
        pool = self.predictor.feature_pool() if self.embed else None
        with pool if pool is not None else contextlib.nullcontext():
            for strip in self.predictor.probability_strips(image, *self.window, pool=pool):
                acc.add(strip.probs.numpy())
        embedding = b""
        if pool is not None:
            embedding = np.concatenate([pool.embedding(), acc.class_shares]).astype(np.float32).tobytes()
        return {"id": row["id"], "entropy": acc.entropy, "margin": acc.margin, "confidence": acc.confidence,
                "embedding": embedding}


def frame_image(row: dict[str, Any]) -> np.ndarray:
    """The H x W x 3 image of a FrameScorer row (``path``: read by ``segpipe predict``'s reader)."""
    from segpipe.commands.predict import read_image

    if row.get("image") is not None:
        from segpipe.shards import decode_image

        return np.array(decode_image(bytes(row["image"])))
    return read_image(row["path"])


def contact_sheet(images: list[np.ndarray], captions: list[str], columns: int = SHEET_COLUMNS,
                  cell: int = THUMB) -> np.ndarray:
    """The selected frames as one picture: thumbnails of ``cell`` pixels (aspect kept) in a grid
    of ``columns``, each with its caption below."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(images) // columns))
    text_h = 14
    sheet = Image.new("RGB", (columns * (cell + 4) + 4, rows * (cell + text_h + 6) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, text) in enumerate(zip(images, captions)):
        thumb = Image.fromarray(im)
        thumb.thumbnail((cell, cell), Image.Resampling.NEAREST if max(im.shape[:2]) < cell else Image.Resampling.BILINEAR)
        if max(thumb.size) < cell:  # small frames scaled up, nearest neighbour
            factor = cell / max(thumb.size)
            thumb = thumb.resize((max(1, round(thumb.width * factor)), max(1, round(thumb.height * factor))),
                                 Image.Resampling.NEAREST)
        x, y = 4 + (i % columns) * (cell + 4), 4 + (i // columns) * (cell + text_h + 6)
        sheet.paste(thumb, (x, y))
        draw.text((x, y + cell + 2), text, fill=(0, 0, 0))
    return np.asarray(sheet)


def short_name(path: str, width: int = 16) -> str:
    """A file's name for a caption: its end when it is long (frame numbers end names)."""
    name = PurePosixPath(path).name
    return name if len(name) <= width else ".." + name[-(width - 2):]


def selected_csv(picks: list[Pick], files: list[str], scores: list[dict[str, Any]], strategy: str) -> str:
    """selected.csv: ``rank,file,score`` then each frame's entropy, margin, confidence (and distance)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "file", "score", "entropy", "margin", "confidence"] + ["distance"] * (strategy == "diverse"))
    for rank, p in enumerate(picks, start=1):
        s = scores[p.index]
        row = [rank, files[p.index], f"{p.uncertainty:.5f}", f"{s['entropy']:.5f}", f"{s['margin']:.5f}",
               f"{s['confidence']:.5f}"]
        if strategy == "diverse":
            row.append("" if p.distance is None else f"{p.distance:.4f}")
        writer.writerow(row)
    return buf.getvalue()


def run(params: SelectParams, model_ref: str | Path, inputs: str | Path, k: int, out: Path,
        registry: Path | str = DEFAULT_REGISTRY, device: str = "cpu", engine: str = "local",
        strategy: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score every frame of ``inputs``, select ``k`` by ``strategy`` (default ``params.strategy``),
    write selected.csv, contact_sheet.png and summary.json into ``out``; return the summary."""
    from tqdm import tqdm

    from segpipe.commands.predict import list_images
    from segpipe.inference import map_rows
    from segpipe.quality import probability_model, select_frames, uncertainty_of

    strategy = strategy or params.strategy
    if k < 1:
        raise ValueError(f"--k {k}: must be >= 1")
    uncertainty_of(0.0, 0.0, strategy)  # an unknown strategy fails before any work
    directory, meta = probability_model(model_ref, registry)
    files = list_images(inputs)
    rows = [{"id": i, "path": f} for i, f in enumerate(files)]
    worker = {"tile": params.window.tile, "overlap": params.window.overlap, "batch_size": params.window.batch_size,
              "embed": strategy == "diverse"}
    scores: list[dict[str, Any]] = [{}] * len(files)
    for r in tqdm(map_rows(rows, directory, FrameScorer, worker, engine=engine, device=device, outputs={"semantic"}),
                  total=len(rows), desc="select", unit="image", disable=not progress):
        scores[r["id"]] = r
    u = np.array([uncertainty_of(s["entropy"], s["margin"], strategy) for s in scores])
    embeddings = np.stack([np.frombuffer(s["embedding"], np.float32) for s in scores]) if strategy == "diverse" else None
    picks = select_frames(u, k, strategy, embeddings, params.near)
    out = Path(out)
    atomic_write_text(out / "selected.csv", selected_csv(picks, files, scores, strategy))
    from segpipe.commands.predict import png_bytes, read_image

    sheet = contact_sheet([read_image(files[p.index]) for p in picks],
                          [f"#{rank} {p.uncertainty:.3f} {short_name(files[p.index])}" for rank, p in enumerate(picks, start=1)])
    atomic_write_bytes(out / "contact_sheet.png", png_bytes(sheet))
    summary = {"model": str(model_ref), "arch": meta.arch, "input": str(inputs), "frames": len(files), "k": k,
               "selected": len(picks), "strategy": strategy, "engine": engine}
    if len(picks) < min(k, len(files)):
        summary["note"] = (f"{len(picks)} distinct frames: the {len(files) - len(picks)} others duplicate "
                           "selected ones exactly (in the embedding)")
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    import torch

    from segpipe.params import ENGINES, SELECT_STRATEGIES

    parser = argparse.ArgumentParser(prog="segpipe select", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="champion | challenger | vN | CHECKPOINT_DIR")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--input", required=True, help="a folder of images, an image, or a URI of either")
    parser.add_argument("--k", type=int, required=True, help="frames to select")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--strategy", choices=SELECT_STRATEGIES, help="default: params select.strategy")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process; ray: a Ray Data actor pool (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "select")
    if args.k < 1:
        parser.error(f"--k {args.k}: must be >= 1")
    from segpipe.storage import require_local

    summary = run(params, args.model, args.input, args.k, require_local(args.out, "--out"), args.registry,
                  args.device, args.engine, args.strategy, progress=not args.no_progress)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
