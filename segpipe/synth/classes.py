"""The synthetic dataset's class table (ids are fixed: the converter and models rely on them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SynthClass:
    id: int
    name: str
    isthing: bool
    supercategory: str
    color: tuple[int, int, int]  # display colour for overlays, not the rendered colour


CLASSES: tuple[SynthClass, ...] = (
    # stuff; id 0 must stay stuff because Mask R-CNN reserves label 0 for background
    SynthClass(0, "soil", False, "ground", (140, 100, 60)),
    SynthClass(1, "gravel_road", False, "ground", (128, 128, 128)),
    SynthClass(2, "vegetation", False, "nature", (60, 160, 60)),
    SynthClass(3, "water", False, "nature", (40, 90, 200)),
    SynthClass(4, "concrete_slab", False, "ground", (210, 210, 200)),
    # things
    SynthClass(5, "solar_panel_row", True, "solar", (30, 40, 120)),
    SynthClass(6, "pipe_segment", True, "pipeline", (240, 130, 20)),
    SynthClass(7, "trench", True, "earthworks", (90, 50, 20)),
    SynthClass(8, "excavator", True, "vehicle", (250, 200, 0)),
    SynthClass(9, "truck", True, "vehicle", (220, 30, 30)),
    SynthClass(10, "worker", True, "person", (255, 0, 255)),
    SynthClass(11, "material_stack", True, "material", (0, 200, 200)),
)

BY_NAME: dict[str, SynthClass] = {c.name: c for c in CLASSES}
THING_IDS: frozenset[int] = frozenset(c.id for c in CLASSES if c.isthing)


def class_id(name: str) -> int:
    """The id of class ``name``; unknown names raise listing the valid ones."""
    try:
        return BY_NAME[name].id
    except KeyError:
        raise KeyError(f"unknown synth class {name!r}; valid: {', '.join(BY_NAME)}") from None


def classes_table() -> list[dict[str, Any]]:
    """Rows of ``classes.json``: ``{"id", "name", "isthing", "color"}``, by id."""
    return [{"id": c.id, "name": c.name, "isthing": c.isthing, "color": list(c.color)} for c in CLASSES]


def coco_categories() -> list[dict[str, Any]]:
    """COCO ``categories`` for every class (stuff too); a thing's category_id is its class id."""
    return [
        {"id": c.id, "name": c.name, "supercategory": c.supercategory, "isthing": int(c.isthing)}
        for c in CLASSES
    ]
