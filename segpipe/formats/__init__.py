"""Format readers: a plain dict from ``--format`` name to the function that reads it.

Each reader lives in its own module and is imported only when its format is used. ``coco``
is called as ``read(annotations: list[Path], images: Path, masks: Path | None)``; every
other format as ``read(input_dir: Path)``. All return a ``segpipe.formats.base.Source``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from segpipe.formats.base import Source


def _lazy(module: str) -> Callable[..., Source]:
    def read(*args: Any, **kwargs: Any) -> Source:
        return importlib.import_module(f"segpipe.formats.{module}").read(*args, **kwargs)

    read.__name__ = f"read_{module}"
    read.__doc__ = f"segpipe.formats.{module}.read"
    return read


FORMATS: dict[str, Callable[..., Source]] = {
    "coco": _lazy("coco"),
    "coco-panoptic": _lazy("coco_panoptic"),
    "coco-stuff": _lazy("coco_stuff"),
    "mask-dir": _lazy("mask_dir"),
    "voc": _lazy("voc"),
    "cityscapes": _lazy("cityscapes"),
    "ade20k": _lazy("ade20k"),
}


def get_reader(name: str) -> Callable[..., Source]:
    """The reader of format ``name``; an unknown name raises listing the valid ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[name]
