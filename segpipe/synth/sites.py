"""What makes one generated construction site look unlike another: ground palettes and site presets.

Plain data, no numpy: ``segpipe.synth.scene`` draws from these, ``segpipe synth --site NAME``
applies a preset. The class table never depends on a site (``segpipe.synth.classes``), so the
collections of two sites convert and train together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Color = tuple[float, float, float]


@dataclass(frozen=True)
class Ground:
    """A site's ground: anchor colours of the stuff classes (a paint is an anchor jittered per
    image, see ``scene.pick``) and how much vegetation and water a scene has."""

    soil: tuple[Color, ...]
    road: tuple[Color, ...]
    veg: tuple[Color, ...]
    water: tuple[Color, ...]
    slab: tuple[Color, ...]
    veg_patches: tuple[int, int]  # a scene has lo..hi-1 vegetation patches (numpy ``integers(lo, hi)``)
    water_chance: float  # probability that a scene has a pond

    def anchors(self) -> dict[str, tuple[Color, ...]]:
        """The palettes this ground sets, by the names ``scene.pick`` uses."""
        return {"soil": self.soil, "road": self.road, "veg": self.veg, "water": self.water, "slab": self.slab}


# Named ground palettes (synth.palette). The colours deliberately overlap between classes within a
# ground (dry vegetation looks like soil, murky water like vegetation), see segpipe.synth.scene.
GROUNDS: dict[str, Ground] = {
    # temperate site: brown soil, grey gravel, green and dry vegetation, frequent ponds
    "default": Ground(
        soil=((134, 100, 70), (160, 128, 92), (112, 90, 68), (150, 136, 116), (125, 112, 90)),
        road=((140, 132, 120), (120, 116, 110), (158, 142, 118), (132, 118, 98)),
        veg=((82, 110, 56), (110, 118, 72), (150, 138, 92), (62, 86, 52), (128, 120, 84)),
        water=((70, 90, 102), (96, 102, 80), (116, 102, 82), (52, 66, 86), (84, 110, 92)),
        slab=((176, 172, 164), (150, 148, 142), (186, 176, 156), (140, 134, 124)),
        veg_patches=(1, 5),
        water_chance=0.6,
    ),
    # desert site: pale sand, caliche gravel, sparse grey-olive scrub, rare silty ponds
    "arid": Ground(
        soil=((204, 176, 132), (218, 192, 148), (190, 158, 114), (226, 206, 168), (182, 150, 108)),
        road=((206, 196, 176), (190, 182, 166), (220, 204, 178), (178, 166, 146)),
        veg=((132, 128, 84), (150, 140, 96), (112, 114, 76), (168, 152, 106)),
        water=((118, 146, 136), (150, 140, 108), (104, 132, 140)),
        slab=((212, 208, 200), (196, 192, 184), (224, 214, 196)),
        veg_patches=(0, 3),
        water_chance=0.25,
    ),
}

# The synth params that describe a site, and what each means at its neutral value.
SITE_KEYS = ("palette", "lighting", "warmth", "haze", "density")

# Named sites for `segpipe synth --site NAME`: values of SITE_KEYS. "default" is the site the
# default pipeline generates (tests pin it to SynthParams' defaults); "site2" is a second site
# for the retraining loop: a desert site in a warm, hazy late-afternoon light, more crowded.
SITES: dict[str, dict[str, Any]] = {
    "default": {"palette": "default", "lighting": 1.0, "warmth": 0.0, "haze": 0.0, "density": 1.0},
    "site2": {"palette": "arid", "lighting": 0.85, "warmth": 0.12, "haze": 0.15, "density": 1.5},
}


def site_preset(name: str) -> dict[str, Any]:
    """The synth params of site ``name``; an unknown name raises listing the valid ones."""
    try:
        return dict(SITES[name])
    except KeyError:
        raise KeyError(f"unknown site {name!r}; valid: {', '.join(SITES)}") from None
