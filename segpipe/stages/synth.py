"""``segpipe synth``: write N procedural construction-site scenes in the raw COCO layout.

::

    OUT/images/site_000000.jpg
    OUT/masks/site_000000.png          uint8 class ids, 255 = ignore
    OUT/annotations/instances.json     COCO instances (things), categories for every class
    OUT/classes.json                   [{"id", "name", "isthing", "color"}]

Image ``i`` depends only on ``(seed, i)`` and the params, so the output is byte-identical
for the same arguments whatever the number of workers. Images stream through a process pool
and annotations through JSON-lines spill files: memory stays flat as N grows. The whole
directory is built beside OUT and swapped in at the end, so a rerun leaves no stale files.

A second site's drop: the site params (``palette``, ``lighting``, ``warmth``, ``haze``,
``density``) change the ground, the light and the crowding but never the class table, so the
drops of two sites convert and train together. ``--site NAME`` applies a preset of
``segpipe.synth.sites.SITES`` (``default`` is the default pipeline's site, ``site2`` a desert site
in warm hazy light with 1.5 times the objects); ``--set synth.KEY=VALUE`` still wins over it::

    segpipe synth --out drops/site2 --site site2 --seed 1 --images 400
    segpipe synth --out drops/dusk --set synth.palette=arid --set synth.lighting=0.7

Give a drop its own ``--seed`` too: the same seed lays out the same scenes at every site.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segpipe.files import atomic_dir, atomic_path, atomic_write_text
from segpipe.lifetime import pool_context
from segpipe.params import SynthParams, add_params_arguments, from_args, parse_override
from segpipe.progress import Progress
from segpipe.synth.classes import classes_table, coco_categories
from segpipe.synth.coco import annotate
from segpipe.synth.render import render
from segpipe.synth.scene import make_scene
from segpipe.synth.sites import GROUNDS, SITE_KEYS, SITES, site_preset


def image_name(index: int) -> str:
    return f"site_{index:06d}"


def generate(index: int, p: SynthParams) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Image ``index`` of the dataset: (H x W x 3 photo, H x W label map, COCO annotations
    without ids). Pure: depends only on ``(p.seed, index)`` and the params."""
    rng = np.random.default_rng([p.seed, index])
    h, w = p.size
    scene = make_scene(
        rng,
        h,
        w,
        p.crowd_fraction,
        ground=GROUNDS[p.palette],
        lighting=p.lighting,
        warmth=p.warmth,
        haze=p.haze,
        density=p.density,
    )
    out = render(scene, rng)
    anns = annotate(scene, out.semantic, out.instances, rng, p.rle_fraction, p.ignore_band)
    return out.image, out.semantic, anns


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # fixed quality, 4:2:0 subsampling and no optimisation pass: the same bytes every run
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def encode_png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels, "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _write_one(task: tuple[int, SynthParams, str]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Pool worker: generate image ``index`` and write its JPEG and PNG under ``root``
    (a temporary directory swapped in whole at the end, so plain writes are safe there)."""
    index, p, root = task
    image, semantic, anns = generate(index, p)
    name = image_name(index)
    Path(root, "images", f"{name}.jpg").write_bytes(encode_jpeg(image, p.jpeg_quality))
    Path(root, "masks", f"{name}.png").write_bytes(encode_png(semantic))
    entry = {"id": index + 1, "file_name": f"{name}.jpg", "height": p.size[0], "width": p.size[1]}
    return index, entry, anns


@contextlib.contextmanager
def _imap(p: SynthParams) -> Iterator[Callable[[Iterable[Any]], Iterator[Any]]]:
    """An ordered, lazy map over ``_write_one``: in-process for one worker, else a pool.

    The pool starts before any other thread of the command (the progress line's), so that it can
    fork (``lifetime.pool_context``)."""
    workers = min(p.workers or os.cpu_count() or 1, p.images)
    if workers == 1:
        yield lambda tasks: map(_write_one, tasks)
        return
    chunk = max(1, min(8, p.images // (workers * 8)))
    with pool_context().Pool(workers) as pool:
        yield lambda tasks: pool.imap(_write_one, tasks, chunksize=chunk)


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_array(lines: Path) -> Iterator[str]:
    """A JSON array, one element per line, from a JSON-lines file (streamed)."""
    with open(lines) as f:
        first = True
        for line in f:
            yield ("[\n" if first else ",\n") + line.rstrip("\n")
            first = False
    yield "[]" if first else "\n]"


def write_instances(path: Path, images_jsonl: Path, anns_jsonl: Path) -> None:
    """Assemble ``instances.json`` from the two spill files without loading them."""
    with atomic_path(path) as tmp, open(tmp, "w") as out:
        # keys in sorted order, like every other object in the file
        out.write('{"annotations":')
        out.writelines(_json_array(anns_jsonl))
        out.write(',\n"categories":' + _dump(coco_categories()))
        out.write(',\n"images":')
        out.writelines(_json_array(images_jsonl))
        out.write(',\n"info":' + _dump({"description": "segpipe synthetic construction sites"}))
        out.write(',\n"licenses":[]}\n')


def run(params: SynthParams, out: Path) -> dict[str, int]:
    """Generate ``params.images`` scenes into ``out`` (replaced whole); returns counts."""
    out = Path(out)
    n_anns = n_crowd = 0
    with atomic_dir(out) as root:
        for sub in ("images", "masks", "annotations"):
            (root / sub).mkdir()
        images_jsonl, anns_jsonl = root / ".images.jsonl", root / ".annotations.jsonl"
        with open(images_jsonl, "w") as fi, open(anns_jsonl, "w") as fa:
            tasks = ((i, params, str(root)) for i in range(params.images))
            with (
                _imap(params) as imap,
                Progress("synth", total=params.images) as bar,
            ):
                for index, entry, anns in imap(tasks):
                    fi.write(_dump(entry) + "\n")
                    for ann in anns:
                        n_anns += 1
                        n_crowd += ann["iscrowd"]
                        fa.write(_dump({"id": n_anns, "image_id": index + 1, **ann}) + "\n")
                    bar.advance()
        write_instances(root / "annotations" / "instances.json", images_jsonl, anns_jsonl)
        images_jsonl.unlink()
        anns_jsonl.unlink()
        atomic_write_text(root / "classes.json", json.dumps(classes_table(), indent=2, sort_keys=True) + "\n")
    return {"images": params.images, "annotations": n_anns, "crowd": n_crowd}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced whole)")
    parser.add_argument("--images", type=int, help="number of images (overrides synth.images)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image height and width")
    parser.add_argument("--seed", type=int, help="base seed; image i uses (seed, i)")
    parser.add_argument("--workers", type=int, help="processes; 0 = all cores")
    parser.add_argument(
        "--site",
        choices=list(SITES),
        help=f"site preset ({', '.join(SITES)}): sets {', '.join(SITE_KEYS)}; --set synth.KEY wins",
    )
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "synth")
    flags: dict[str, Any] = {"images": args.images, "seed": args.seed, "workers": args.workers}
    flags["size"] = tuple(args.size) if args.size else None
    if args.site:
        explicit = {parts[1] for parts, _ in map(parse_override, args.overrides) if parts[0] == "synth"}
        flags.update({k: v for k, v in site_preset(args.site).items() if k not in explicit})
    params = dataclasses.replace(params, **{k: v for k, v in flags.items() if v is not None})
    counts = run(params, args.out)
    print(
        f"segpipe synth: {counts['images']} images, {counts['annotations']} annotations "
        f"({counts['crowd']} crowd) -> {args.out}"
    )
