"""Shared by the format-reader tests: where the real-format samples lie, and a round trip
through ``segpipe convert`` and ``segpipe.shards.iter_samples``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segpipe.formats.base import Record, Source

SAMPLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "formats"


def sample(*parts: str) -> Path:
    """A sample dataset folder; the test is skipped when the shared samples are absent."""
    path = SAMPLES.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"shared format samples not found at {path}")
    return path


def records_by_id(source: Source) -> dict[str, Record]:
    records = list(source.records())
    assert len({r.image_id for r in records}) == len(records), "image ids must be unique"
    return {r.image_id: r for r in records}


def convert(source: Source, out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Convert ``source`` to shards in ``out`` and read them back: (manifest, samples by image id)."""
    convert_stage = pytest.importorskip("segpipe.stages.convert")
    from segpipe import shards
    from segpipe.params import ConvertParams

    manifest = convert_stage.run(ConvertParams(workers=1), source, out, progress=False)
    samples = {s["image_id"]: s for s in shards.iter_samples(out)}
    return manifest, samples


def instance_masks(sample: dict[str, Any]) -> list[tuple[int, int, np.ndarray]]:
    """(category_id, iscrowd, H x W bool mask) of a read-back sample's instances, sorted."""
    from pycocotools import mask as mask_utils  # shard RLE was validated when written

    out = []
    for inst in sample["instances"]:
        rle = dict(inst["segmentation"])
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
        out.append((int(inst["category_id"]), int(inst["iscrowd"]), mask_utils.decode(rle).astype(bool)))
    return sorted(out, key=lambda t: (t[0], t[1], t[2].tobytes()))


def record_masks(record: Record) -> list[tuple[int, int, np.ndarray]]:
    out = [(int(i["category_id"]), int(i["iscrowd"]), np.asarray(i["mask"], dtype=bool)) for i in record.instances]
    return sorted(out, key=lambda t: (t[0], t[1], t[2].tobytes()))


def same_masks(a: list[tuple[int, int, np.ndarray]], b: list[tuple[int, int, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(x[:2] == y[:2] and np.array_equal(x[2], y[2]) for x, y in zip(a, b))
