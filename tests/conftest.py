"""Shared fixtures: tiny synthetic raw data and shards, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe.params import ConvertParams, SynthParams


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    from segpipe.stages import synth

    out = tmp_path_factory.mktemp("raw") / "synth"
    synth.run(SynthParams(images=16, size=(64, 64), seed=3, workers=1), out)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_raw, tmp_path_factory) -> Path:
    from segpipe.formats import get_reader
    from segpipe.stages import convert

    out = tmp_path_factory.mktemp("shards") / "shards"
    source = get_reader("coco")([tiny_raw / "annotations" / "instances.json"], tiny_raw / "images", tiny_raw / "masks")
    convert.run(ConvertParams(val_fraction=0.25, workers=1), source, out, progress=False)
    return out
