"""``segpipe stats``: per-class pixel and instance counts per split of a shard set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import atomic_write_json
from segpipe.shards import ShardError, decode_semantic, iter_rows, open_shards
from segpipe.storage import Location

COLUMNS = ["split", "height", "width", "semantic", "semantic_encoding", "instances"]


def count_row(row: dict[str, Any], pixels: np.ndarray, instances: dict[int, list[int]]) -> None:
    """Add one raw row's label pixels (into ``pixels``, indexed by label) and instances."""
    sem = decode_semantic(row["semantic"], row["height"], row["width"], row["semantic_encoding"])
    counts = np.bincount(sem.ravel(), minlength=pixels.size)
    pixels += counts[: pixels.size]
    for inst in row["instances"] or []:
        c = instances.setdefault(int(inst["category_id"]), [0, 0])
        c[1 if inst["iscrowd"] else 0] += 1


def compute(path: Path | str | Location, verify: bool = True) -> dict[str, Any]:
    """{split: {"images", "classes": {name: {id, pixels, instances, crowd}}, "ignore_pixels"}}.

    A shard set without rows is a ShardError: there is nothing to count, and an empty table
    would pass for a result.
    """
    shards = open_shards(path)
    classes, ignore = shards.classes, shards.ignore_index
    size = max([c["id"] for c in classes] + [ignore]) + 1
    acc: dict[str, tuple[np.ndarray, dict[int, list[int]], list[int]]] = {}
    for row in iter_rows(shards, verify=verify, columns=COLUMNS):
        pixels, inst, n = acc.setdefault(row["split"], (np.zeros(size, np.int64), {}, [0]))
        count_row(row, pixels, inst)
        n[0] += 1
    if not acc:
        raise ShardError(f"{path}: the shard set has no rows (manifest splits: {shards.splits or 'none'}); "
                         "convert a dataset with at least one valid image")
    out: dict[str, Any] = {}
    for split in sorted(acc):
        pixels, inst, n = acc[split]
        out[split] = {
            "images": n[0],
            "ignore_pixels": int(pixels[ignore]),
            "classes": {
                c["name"]: {"id": c["id"], "pixels": int(pixels[c["id"]]),
                            "instances": inst.get(c["id"], [0, 0])[0], "crowd": inst.get(c["id"], [0, 0])[1]}
                for c in classes
            },
        }
    return out


def format_table(stats: dict[str, Any]) -> str:
    """A plain-text table per split."""
    lines = []
    for split, s in stats.items():
        total = sum(c["pixels"] for c in s["classes"].values()) + s["ignore_pixels"]
        lines.append(f"{split}: {s['images']} image(s), {total} pixels")
        width = max([len(n) for n in s["classes"]] + [6])
        lines.append(f"  {'id':>5}  {'class':<{width}}  {'pixels':>12}  {'share':>7}  {'instances':>9}  {'crowd':>5}")
        for name, c in s["classes"].items():
            share = c["pixels"] / total if total else 0.0
            lines.append(f"  {c['id']:>5}  {name:<{width}}  {c['pixels']:>12}  {share:>7.2%}  {c['instances']:>9}  {c['crowd']:>5}")
        share = s["ignore_pixels"] / total if total else 0.0
        lines.append(f"  {'':>5}  {'(ignore)':<{width}}  {s['ignore_pixels']:>12}  {share:>7.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe stats", description=__doc__)
    parser.add_argument("shards", help="shard set: a folder (with manifest.json) or a URI (s3://, gs://, file://)")
    parser.add_argument("--json", dest="json_out", nargs="?", const="-", metavar="FILE",
                        help="print JSON instead of a table, or write it to FILE")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of shards")
    args = parser.parse_args(argv)
    from segpipe.storage import resolve

    stats = compute(resolve(args.shards, "shards"), verify=not args.no_verify)
    if args.json_out == "-":
        print(json.dumps(stats, indent=2))
    elif args.json_out:
        atomic_write_json(Path(args.json_out), stats)
        print(format_table(stats))
    else:
        print(format_table(stats))
