"""What every format reader yields: one ``Record`` per image, in the source's own terms.

Readers (one module per format) only parse the source layout; validation, rasterisation,
split assignment and encoding happen once, in the converter (``segpipe.stages.convert``), so
every format gets the same checks. A reader never decodes more than one image at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ClassInfo:
    """One row of the class table recorded in the manifest."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]


@dataclass
class Record:
    """One image and its annotations, not yet validated.

    ``image_id`` is unique within a conversion. ``source`` names the file(s) it came from, for
    error messages. ``semantic`` is a callable that loads the H x W label map (class ids of the
    class table, ``ignore_index`` where unlabelled) lazily, or None when the source has none (the
    converter then rasterises it from the instances). ``instances`` are COCO-style dicts:
    ``{"id", "category_id", "iscrowd", "segmentation" (polygon list, RLE dict with str or list
    counts) or "mask" (H x W bool ndarray), "bbox" (optional [x, y, w, h])}``.
    """

    image_id: str
    source: str
    image_path: Path | None = None
    image_bytes: bytes | None = None
    split: str | None = None
    height: int | None = None  # as declared by the source, checked against the decoded image
    width: int | None = None
    semantic: Callable[[], np.ndarray] | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # reader-level problems -> quarantine
    semantic_source: str | None = None  # optional: the label-map file, named in error messages
    # optional: (annotation id, reason) for annotations the reader already dropped (e.g. a
    # duplicate id); they are quarantined and the image is kept.
    annotation_problems: list[tuple[Any, str]] = field(default_factory=list)
    # optional: things worth knowing that do not make the image wrong (e.g. derived data that
    # disagrees with its source of truth); listed in the manifest's "warnings", image kept.
    warnings: list[str] = field(default_factory=list)
    # optional: the source collection (data/raw/<name>) when a reader reads several; else the
    # converter names every record after the input folder (Source.collection)
    collection: str | None = None


@dataclass
class Source:
    """A parsed dataset: its class table, ignore index, a description for hashing, and records."""

    name: str
    classes: list[ClassInfo]
    ignore_index: int
    records: Callable[[], Iterator[Record]]
    files: list[Path]  # every source file, hashed into the manifest's source hash
    problems: list[str] = field(default_factory=list)  # dataset-level problems (e.g. duplicate ids)
    count: int | None = None  # optional: number of records, for the progress bar
    collection: str = ""  # the records' source collection when they do not name one ("" = the input folder's name)


class Reader(Protocol):
    def __call__(self, **kwargs: Any) -> Source: ...
