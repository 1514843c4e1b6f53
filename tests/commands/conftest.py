"""Shared set-ups of the data-quality command tests (audit, select, drift): colour scenes
(``colour_scenes``) and one U-Net trained on them once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from colour_scenes import convert_collection, train_unet, write_collection


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> dict[str, Path]:
    """Clean colour scenes: ``raw`` (a COCO collection of 24) and its ``shards`` (all train)."""
    root = tmp_path_factory.mktemp("colour")
    write_collection(root / "raw", images=24, seed=1)
    return {"raw": root / "raw", "shards": convert_collection(root / "raw", root / "shards")}


@pytest.fixture(scope="session")
def colour_model(colour_data, tmp_path_factory) -> Path:
    """A U-Net trained on ``colour_data`` (a checkpoint folder), once per session."""
    return train_unet(colour_data["shards"], tmp_path_factory.mktemp("colour-model") / "unet")
