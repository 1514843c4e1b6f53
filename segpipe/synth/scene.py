"""Random scene layout: stuff regions, things made of coloured parts, lighting.

A scene is pure geometry and colour choices; ``render`` turns it into pixels. Colours are
drawn from class palettes (the ground's from the site's ``Ground``, ``segpipe.synth.sites``)
that deliberately overlap (dry vegetation looks like soil, murky water like vegetation or soil,
trench floors are darkened soil, loaded truck beds carry soil, solar panels look like dark
water), so colour alone cannot separate the classes: shape (elongated trenches and pipes,
parallel panel rows), texture (gravel grain, vegetation clumps, smooth water, slab joints) and
context (trucks on roads, pipes beside trenches, workers near machines) have to.

Coordinates are (x, y) in pixels, polygons are ``K x 2`` float arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from segpipe.synth.classes import class_id
from segpipe.synth.sites import GROUNDS, Color, Ground

SOIL, ROAD, VEG, WATER, SLAB = (
    class_id(n) for n in ("soil", "gravel_road", "vegetation", "water", "concrete_slab")
)
PANEL, PIPE, TRENCH, EXCAVATOR, TRUCK, WORKER, MATERIAL = (
    class_id(n)
    for n in ("solar_panel_row", "pipe_segment", "trench", "excavator", "truck", "worker", "material_stack")
)


@dataclass(frozen=True)
class Paint:
    """How one drawn region is coloured: a base colour, a second colour mixed in by a noise
    field (``mix`` 0..1), and luminance noise amplitudes at three scales."""

    color: Color
    alt: Color
    mix: float
    fine: float
    medium: float
    coarse: float


@dataclass
class Region:
    """A stuff region: polygons filled with one class and one paint."""

    class_id: int
    polygons: list[np.ndarray]
    paint: int


@dataclass
class Thing:
    """One object instance: parts drawn in order (polygon, paint); ``height`` sets its shadow
    length in pixels; ``group`` >= 0 makes it a member of an iscrowd region."""

    class_id: int
    parts: list[tuple[np.ndarray, int]]
    height: float
    group: int = -1


@dataclass
class Scene:
    height: int
    width: int
    paints: list[Paint] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    things: list[Thing] = field(default_factory=list)  # in drawing order: later occludes earlier
    sun: tuple[float, float] = (1.0, 1.0)  # unit vector the shadows point along
    shadow: float = 0.6  # brightness multiplier inside shadows
    gain: float = 1.0  # global exposure
    tint: Color = (1.0, 1.0, 1.0)  # per-channel white balance
    haze: float = 0.0  # share of each pixel replaced by the haze colour (0 = clear air)

    def add_paint(self, paint: Paint) -> int:
        if len(self.paints) >= 255:
            raise ValueError("scene uses more than 255 paints")  # a layout bug, not user input
        self.paints.append(paint)
        return len(self.paints) - 1


# --------------------------------------------------------------------------------------
# Palettes: anchor colours per class; a paint is an anchor jittered per image/instance.
# --------------------------------------------------------------------------------------

# the things' palettes; the ground's (soil, road, veg, water, slab) come from the site's Ground
PALETTES: dict[str, tuple[Color, ...]] = {
    "panel": ((42, 52, 78), (58, 62, 72), (72, 88, 112), (52, 70, 90)),
    "panel_frame": ((168, 170, 172), (130, 132, 136)),
    "pipe": ((36, 36, 40), (150, 150, 152), (200, 112, 44), (62, 100, 158), (92, 118, 72), (170, 160, 140)),
    "machine": ((216, 170, 42), (210, 122, 34), (150, 150, 150), (196, 180, 70)),
    "dark": ((48, 48, 50), (62, 60, 58), (40, 44, 52)),
    "glass": ((58, 70, 82), (80, 92, 100)),
    "truck_cab": ((204, 204, 200), (172, 44, 38), (212, 172, 44), (62, 82, 142), (120, 124, 126)),
    "truck_bed": ((122, 122, 120), (190, 190, 186), (150, 140, 126)),
    "vest": ((242, 122, 34), (204, 222, 64), (232, 176, 40), (70, 72, 92)),
    "helmet": ((240, 240, 236), (232, 204, 44), (226, 110, 30)),
    "material": ((172, 132, 82), (142, 142, 140), (122, 74, 52), (182, 172, 150), (98, 106, 80)),
}

# (fine, medium, coarse, mix) texture per kind: gravel is grainy, vegetation clumpy, water
# smooth, slabs flat; these carry information that the mean colour does not.
TEXTURES: dict[str, tuple[float, float, float, float]] = {
    "soil": (0.06, 0.08, 0.10, 0.6),
    "spoil": (0.09, 0.12, 0.06, 0.5),
    "road": (0.16, 0.04, 0.05, 0.3),
    "track": (0.10, 0.04, 0.04, 0.2),
    "veg": (0.07, 0.22, 0.08, 0.8),
    "water": (0.012, 0.025, 0.07, 0.4),
    "slab": (0.03, 0.03, 0.04, 0.2),
    "joint": (0.03, 0.0, 0.0, 0.0),
    "panel": (0.02, 0.02, 0.05, 0.3),
    "smooth": (0.03, 0.02, 0.02, 0.0),
    "trench": (0.06, 0.07, 0.04, 0.4),
    "material": (0.08, 0.06, 0.02, 0.3),
}


def jitter(rng: np.random.Generator, color: Color, scale: float = 0.12, shift: float = 10.0) -> Color:
    """``color`` with a random brightness change and a small per-channel shift."""
    g = 1.0 + rng.uniform(-scale, scale)
    out = np.clip(np.asarray(color) * g + rng.uniform(-shift, shift, 3), 0, 255)
    return (float(out[0]), float(out[1]), float(out[2]))


def pick(rng: np.random.Generator, anchors: tuple[Color, ...]) -> Color:
    """One of ``anchors``, jittered."""
    return jitter(rng, anchors[int(rng.integers(len(anchors)))])


def make_paint(rng: np.random.Generator, color: Color, alt: Color, texture: str) -> Paint:
    fine, medium, coarse, mix = TEXTURES[texture]
    return Paint(color, alt, mix * rng.uniform(0.5, 1.0), fine, medium, coarse)


def scaled(color: Color, factor: float) -> Color:
    return tuple(float(min(255.0, c * factor)) for c in color)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def rect(cx: float, cy: float, length: float, width: float, theta: float) -> np.ndarray:
    """A ``length`` x ``width`` rectangle centred at (cx, cy), its length along angle ``theta``."""
    c, s = math.cos(theta), math.sin(theta)
    ux, uy = c * length / 2, s * length / 2
    vx, vy = -s * width / 2, c * width / 2
    return np.array(
        [
            [cx - ux - vx, cy - uy - vy],
            [cx + ux - vx, cy + uy - vy],
            [cx + ux + vx, cy + uy + vy],
            [cx - ux + vx, cy - uy + vy],
        ]
    )


def ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0, n: int = 12) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ct, st = math.cos(theta), math.sin(theta)
    return np.stack([cx + x * ct - y * st, cy + x * st + y * ct], axis=1)


def blob(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, rough: float = 0.3, n: int = 20
) -> np.ndarray:
    """An irregular closed shape: an ellipse whose radius wobbles by a few low harmonics."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += rough / k * rng.uniform(0.3, 1.0) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    theta = rng.uniform(0, math.pi)
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    ct, st = math.cos(theta), math.sin(theta)
    return np.stack([cx + x * ct - y * st, cy + x * st + y * ct], axis=1)


def band(points: np.ndarray, width: float, offset: float = 0.0) -> list[np.ndarray]:
    """Polygons covering a thick polyline (one quad per segment, a disc at each inner joint).

    ``offset`` shifts the band sideways (left of the direction of travel is positive).
    """
    polys = []
    for a, b in zip(points[:-1], points[1:]):
        d = b - a
        length = float(np.hypot(*d))
        if length < 1e-6:
            continue
        mid = (a + b) / 2 + np.array([-d[1], d[0]]) / length * offset
        polys.append(rect(mid[0], mid[1], length, width, math.atan2(d[1], d[0])))
    if offset == 0.0:
        polys += [ellipse(p[0], p[1], width / 2, width / 2, n=10) for p in points[1:-1]]
    return polys


def polyline(
    rng: np.random.Generator, start: np.ndarray, theta: float, length: float, bends: int, wiggle: float
) -> np.ndarray:
    """A polyline of ``bends + 1`` segments from ``start``, turning by up to ``wiggle`` rad."""
    pts = [start]
    seg = length / (bends + 1)
    for _ in range(bends + 1):
        pts.append(pts[-1] + seg * np.array([math.cos(theta), math.sin(theta)]))
        theta += rng.uniform(-wiggle, wiggle)
    return np.array(pts)


def along(points: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    """The point at fraction ``t`` of a polyline's length and the direction there."""
    seg = np.diff(points, axis=0)
    lens = np.hypot(seg[:, 0], seg[:, 1])
    target = t * lens.sum()
    i = int(np.searchsorted(np.cumsum(lens), target).clip(0, len(lens) - 1))
    before = lens[:i].sum()
    f = (target - before) / max(lens[i], 1e-6)
    return points[i] + f * seg[i], math.atan2(seg[i, 1], seg[i, 0])


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------

SITE_KINDS: dict[str, dict[int, float]] = {
    "solar": {PANEL: 0.45, TRUCK: 0.12, WORKER: 0.2, MATERIAL: 0.15, PIPE: 0.05, EXCAVATOR: 0.03},
    "pipeline": {TRENCH: 0.22, PIPE: 0.3, EXCAVATOR: 0.14, TRUCK: 0.1, WORKER: 0.16, MATERIAL: 0.08},
    "earthworks": {EXCAVATOR: 0.24, TRUCK: 0.24, TRENCH: 0.14, WORKER: 0.2, MATERIAL: 0.14, PIPE: 0.04},
    "mixed": {
        PANEL: 0.15,
        PIPE: 0.15,
        TRENCH: 0.12,
        EXCAVATOR: 0.12,
        TRUCK: 0.14,
        WORKER: 0.16,
        MATERIAL: 0.16,
    },
}
# drawing layer: ground-level first, people last (jittered so the order sometimes flips)
LAYER = {TRENCH: 0.0, PIPE: 1.0, PANEL: 1.2, MATERIAL: 2.0, EXCAVATOR: 3.0, TRUCK: 3.0, WORKER: 4.0}
# build order: things that others are placed relative to come first
BUILD_ORDER = (TRENCH, PIPE, PANEL, EXCAVATOR, TRUCK, MATERIAL, WORKER)


class _Layout:
    """Mutable state while one scene is laid out."""

    def __init__(
        self,
        rng: np.random.Generator,
        height: int,
        width: int,
        crowd_fraction: float,
        ground: Ground,
        density: float,
    ):
        self.rng = rng
        self.ground = ground
        self.palettes = {**PALETTES, **ground.anchors()}
        self.density = density
        self.h, self.w = height, width
        # drone altitude: objects grow sub-linearly with the image so big images get more context
        self.s = (min(height, width) / 256) ** 0.6 * rng.uniform(0.7, 1.4)
        self.crowd_fraction = crowd_fraction
        self.scene = Scene(height, width)
        self.roads: list[tuple[np.ndarray, float]] = []
        self.trenches: list[tuple[np.ndarray, float]] = []
        self.anchors: list[np.ndarray] = []  # machines and trenches that workers gather around
        self.soil: Color = self.pick("soil")
        self.groups = 0

    def pick(self, palette: str) -> Color:
        return pick(self.rng, self.palettes[palette])

    def point(self, margin: float = 0.0) -> np.ndarray:
        return np.array(
            [self.rng.uniform(-margin, self.w + margin), self.rng.uniform(-margin, self.h + margin)]
        )

    def paint(self, color: Color, alt: Color, texture: str) -> int:
        return self.scene.add_paint(make_paint(self.rng, color, alt, texture))

    def dim(self, lo: float, hi: float, floor: float = 1.0) -> float:
        """A size in pixels drawn from [lo, hi] at the scene scale, never below ``floor``."""
        return max(floor, self.rng.uniform(lo, hi) * self.s)

    # ----------------------------------------------------------------- stuff
    def stuff(self) -> None:
        rng, sc = self.rng, self.scene
        soil = self.paint(self.soil, self.pick("soil"), "soil")
        sc.regions.append(
            Region(SOIL, [np.array([[0, 0], [self.w, 0], [self.w, self.h], [0, self.h]], float)], soil)
        )
        for _ in range(rng.integers(*self.ground.veg_patches)):
            c = self.point()
            r = self.dim(14, 50, 4)
            veg = self.paint(self.pick("veg"), self.pick("veg"), "veg")
            sc.regions.append(Region(VEG, [blob(rng, c[0], c[1], r, r * rng.uniform(0.5, 1.0), 0.35)], veg))
        if rng.random() < self.ground.water_chance:
            c = self.point()
            r = self.dim(15, 45, 5)
            water = self.paint(self.pick("water"), self.pick("water"), "water")
            sc.regions.append(
                Region(WATER, [blob(rng, c[0], c[1], r, r * rng.uniform(0.4, 1.0), 0.25)], water)
            )
        if rng.random() < 0.75:
            for _ in range(rng.integers(1, 3)):
                self.road()
        for _ in range(rng.integers(0, 3)):
            self.slab()

    def road(self) -> None:
        rng = self.rng
        edge = rng.integers(4)
        t = rng.uniform(0.1, 0.9)
        start, theta = [
            (np.array([t * self.w, -5.0]), math.pi / 2),
            (np.array([self.w + 5.0, t * self.h]), math.pi),
            (np.array([t * self.w, self.h + 5.0]), -math.pi / 2),
            (np.array([-5.0, t * self.h]), 0.0),
        ][edge]
        pts = polyline(
            rng,
            start,
            theta + rng.uniform(-0.5, 0.5),
            1.4 * max(self.h, self.w),
            int(rng.integers(0, 3)),
            0.6,
        )
        width = self.dim(14, 32, 5)
        color = self.pick("road")
        paint = self.paint(color, self.pick("road"), "road")
        self.scene.regions.append(Region(ROAD, band(pts, width), paint))
        if rng.random() < 0.6:  # tyre tracks: darker, compacted lanes along the road
            track = self.paint(scaled(color, rng.uniform(0.8, 0.92)), color, "track")
            for side in (-0.25, 0.25):
                self.scene.regions.append(Region(ROAD, band(pts, max(1.0, width * 0.1), side * width), track))
        self.roads.append((pts, width))

    def slab(self) -> None:
        rng = self.rng
        c = self.point()
        length, width, theta = self.dim(30, 90, 8), self.dim(24, 70, 8), rng.uniform(0, math.pi)
        color = self.pick("slab")
        self.scene.regions.append(
            Region(
                SLAB, [rect(c[0], c[1], length, width, theta)], self.paint(color, self.pick("slab"), "slab")
            )
        )
        # expansion joints: a grid of thin darker lines
        joint = self.paint(scaled(color, rng.uniform(0.6, 0.8)), color, "joint")
        step = self.dim(10, 18, 4)
        u = np.array([math.cos(theta), math.sin(theta)])
        v = np.array([-math.sin(theta), math.cos(theta)])
        lines = []
        for k in np.arange(-length / 2 + step, length / 2 - step / 2, step):
            p = c + k * u
            lines.append(rect(p[0], p[1], width, 1.0, theta + math.pi / 2))
        for k in np.arange(-width / 2 + step, width / 2 - step / 2, step):
            p = c + k * v
            lines.append(rect(p[0], p[1], length, 1.0, theta))
        if lines:
            self.scene.regions.append(Region(SLAB, lines, joint))

    # ----------------------------------------------------------------- things
    def trench(self) -> list[Thing]:
        rng, sc = self.rng, self.scene
        pts = polyline(
            rng,
            self.point(),
            rng.uniform(0, 2 * math.pi),
            self.dim(60, 200, 20),
            int(rng.integers(0, 3)),
            0.5,
        )
        width = self.dim(6, 14, 3)
        floor = self.paint(scaled(self.soil, rng.uniform(0.72, 0.9)), self.soil, "trench")
        wall = self.paint(scaled(self.soil, rng.uniform(0.4, 0.55)), self.soil, "trench")
        d = pts[-1] - pts[0]
        normal = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6)
        # the wall nearest the sun shades the floor beside it; the spoil heap lies on the other side
        side = 1.0 if float(normal @ np.array(sc.sun)) < 0 else -1.0
        parts = [(p, floor) for p in band(pts, width)]
        parts += [(p, wall) for p in band(pts, width * 0.35, side * width * 0.33)]
        spoil = self.paint(scaled(self.soil, rng.uniform(1.05, 1.2)), self.pick("soil"), "spoil")
        sc.regions.append(Region(SOIL, band(pts, width * rng.uniform(0.6, 1.0), -side * width * 1.2), spoil))
        self.trenches.append((pts, width))
        self.anchors.append(pts[len(pts) // 2])
        return [Thing(TRENCH, parts, 0.0)]

    def pipe(self) -> list[Thing]:
        rng = self.rng
        width = self.dim(3, 7, 2)
        length = self.dim(25, 80, 8)
        if self.trenches and rng.random() < 0.75:
            pts, tw = self.trenches[int(rng.integers(len(self.trenches)))]
            p, theta = along(pts, rng.uniform(0.15, 0.85))
            inside = rng.random() < 0.4
            off = 0.0 if inside else rng.choice([-1, 1]) * (tw / 2 + width * rng.uniform(0.8, 2.0))
            c = p + off * np.array([-math.sin(theta), math.cos(theta)])
            theta += rng.uniform(-0.08, 0.08)
        else:
            c, theta = self.point(), rng.uniform(0, math.pi)
        color = self.pick("pipe")
        body = self.paint(color, color, "smooth")
        # a highlight along the side of the cylinder that faces the sun (dark plastic: grey sheen)
        shine = self.paint(scaled(color, 1.35) if sum(color) > 150 else (80.0, 80.0, 84.0), color, "smooth")
        normal = np.array([-math.sin(theta), math.cos(theta)])
        toward_sun = -1.0 if float(normal @ np.array(self.scene.sun)) > 0 else 1.0
        hc = c + toward_sun * width * 0.2 * normal
        parts = [
            (rect(c[0], c[1], length, width, theta), body),
            (rect(hc[0], hc[1], length * 0.96, max(1.0, width * 0.25), theta), shine),
        ]
        return [Thing(PIPE, parts, width * 0.6)]

    def panels(self, count: int) -> list[Thing]:
        rng = self.rng
        c0, theta = self.point(), rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.5, 0.5)
        length, width = self.dim(60, 160, 16), self.dim(8, 14, 4)
        pitch = width + self.dim(5, 12, 2)
        cell = self.dim(6, 10, 3)
        color = self.pick("panel")
        face = self.paint(color, self.pick("panel"), "panel")
        frame = self.paint(self.pick("panel_frame"), color, "smooth")
        u = np.array([math.cos(theta), math.sin(theta)])
        v = np.array([-math.sin(theta), math.cos(theta)])
        rows = []
        for k in range(count):
            c = c0 + (k - count / 2) * pitch * v + rng.uniform(-1, 1) * u * self.s
            parts = [(rect(c[0], c[1], length, width, theta), face)]
            for t in np.arange(-length / 2 + cell, length / 2 - cell / 2, cell):
                p = c + t * u
                parts.append((rect(p[0], p[1], 1.0, width, theta), frame))
            rows.append(Thing(PANEL, parts, width * 0.35))
        return rows

    def excavator(self) -> list[Thing]:
        rng = self.rng
        if self.trenches and rng.random() < 0.7:
            pts, tw = self.trenches[int(rng.integers(len(self.trenches)))]
            p, theta = along(pts, rng.choice([0.0, 1.0]) if rng.random() < 0.5 else rng.uniform(0, 1))
            side = float(rng.choice([-1.0, 1.0]))
            c = p + side * (tw + self.dim(8, 16)) * np.array([-math.sin(theta), math.cos(theta)])
        else:
            c = self.point()
        size = self.dim(18, 28, 8)
        heading, house = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        body_c = self.pick("machine")
        body, dark, glass = (
            self.paint(body_c, body_c, "smooth"),
            self.paint(self.pick("dark"), self.pick("dark"), "smooth"),
            self.paint(self.pick("glass"), body_c, "smooth"),
        )
        v = np.array([-math.sin(heading), math.cos(heading)])
        parts = [(rect(*(c + k * size * 0.36 * v), size * 1.05, size * 0.24, heading), dark) for k in (-1, 1)]
        hu = np.array([math.cos(house), math.sin(house)])
        hv = np.array([-math.sin(house), math.cos(house)])
        parts.append((rect(c[0], c[1], size * 0.8, size * 0.72, house), body))
        cab = c + size * 0.18 * hu + size * 0.18 * hv
        parts.append((rect(cab[0], cab[1], size * 0.3, size * 0.26, house), glass))
        rear = c - size * 0.34 * hu
        parts.append((rect(rear[0], rear[1], size * 0.14, size * 0.7, house), dark))
        # boom then stick: two narrow segments bending at the elbow, bucket at the tip
        boom_len, stick_len = size * rng.uniform(0.8, 1.1), size * rng.uniform(0.55, 0.8)
        start = c + size * 0.3 * hu - size * 0.1 * hv
        elbow = start + boom_len * hu
        bend = house + rng.uniform(-0.6, 0.6)
        tip = elbow + stick_len * np.array([math.cos(bend), math.sin(bend)])
        parts += [(p, body) for p in band(np.array([start, elbow]), size * 0.16)]
        parts += [(p, body) for p in band(np.array([elbow, tip]), size * 0.12)]
        parts.append((rect(tip[0], tip[1], size * 0.2, size * 0.3, bend), dark))
        self.anchors.append(c)
        return [Thing(EXCAVATOR, parts, size * 0.45)]

    def truck(self) -> list[Thing]:
        rng = self.rng
        if self.roads and rng.random() < 0.7:
            pts, rw = self.roads[int(rng.integers(len(self.roads)))]
            p, theta = along(pts, rng.uniform(0.05, 0.95))
            c = p + rng.uniform(-0.25, 0.25) * rw * np.array([-math.sin(theta), math.cos(theta)])
            theta += rng.choice([0.0, math.pi]) + rng.uniform(-0.1, 0.1)
        else:
            c, theta = self.point(), rng.uniform(0, 2 * math.pi)
        length, width = self.dim(24, 36, 8), self.dim(10, 13, 4)
        u = np.array([math.cos(theta), math.sin(theta)])
        cab_c = self.pick("truck_cab")
        cab = self.paint(cab_c, cab_c, "smooth")
        load = rng.random()
        if load < 0.35:  # a load of soil: the bed looks like the ground it came from
            bed = self.paint(scaled(self.soil, rng.uniform(0.95, 1.15)), self.pick("soil"), "spoil")
        else:
            bc = self.pick("truck_bed")
            bed = self.paint(bc, bc, "smooth")
        front = c + u * length * 0.37
        back = c - u * length * 0.12
        parts = [
            (rect(front[0], front[1], length * 0.26, width * 0.92, theta), cab),
            (rect(back[0], back[1], length * 0.76, width, theta), bed),
        ]
        glass_c = front + u * length * 0.08
        parts.append(
            (
                rect(glass_c[0], glass_c[1], length * 0.07, width * 0.75, theta),
                self.paint(self.pick("glass"), cab_c, "smooth"),
            )
        )
        self.anchors.append(c)
        return [Thing(TRUCK, parts, width * 0.5)]

    def worker(self, at: np.ndarray | None = None, group: int = -1) -> list[Thing]:
        rng = self.rng
        if at is None:
            if self.anchors and rng.random() < 0.7:
                at = self.anchors[int(rng.integers(len(self.anchors)))] + rng.normal(0, 14 * self.s, 2)
            else:
                at = self.point()
        r = self.dim(2.2, 3.4, 2.0)
        theta = rng.uniform(0, math.pi)
        vest = self.paint(self.pick("vest"), self.pick("vest"), "smooth")
        helmet = self.paint(self.pick("helmet"), self.pick("helmet"), "smooth")
        parts = [
            (ellipse(at[0], at[1], r * 1.3, r * 0.8, theta, 10), vest),
            (ellipse(at[0], at[1], r * 0.6, r * 0.6, 0, 8), helmet),
        ]
        return [Thing(WORKER, parts, r * 1.5, group)]

    def material(
        self, at: np.ndarray | None = None, size: float | None = None, group: int = -1
    ) -> list[Thing]:
        rng = self.rng
        if at is None:
            if self.roads and rng.random() < 0.5:
                pts, rw = self.roads[int(rng.integers(len(self.roads)))]
                p, theta = along(pts, rng.uniform(0.05, 0.95))
                at = p + (rw / 2 + self.dim(6, 14)) * np.array(
                    [-math.sin(theta), math.cos(theta)]
                ) * rng.choice([-1, 1])
            else:
                at = self.point()
        length = size if size is not None else self.dim(10, 26, 5)
        width = length * rng.uniform(0.5, 0.9)
        theta = rng.uniform(0, math.pi)
        color = self.pick("material")
        block = self.paint(color, self.pick("material"), "material")
        gap = self.paint(scaled(color, 0.55), color, "smooth")
        parts = [(rect(at[0], at[1], length, width, theta), block)]
        n = int(rng.integers(1, 4))
        u = np.array([math.cos(theta), math.sin(theta)])
        for k in range(1, n + 1):  # separations between stacked bundles
            p = at + (k / (n + 1) - 0.5) * length * u
            parts.append((rect(p[0], p[1], 1.0, width, theta), gap))
        return [Thing(MATERIAL, parts, max(2.0, length * 0.2), group)]

    def crowd(self) -> list[Thing]:
        """A cluster of workers or a pile of materials, annotated as one iscrowd region."""
        rng = self.rng
        g = self.groups
        self.groups += 1
        c = self.point(margin=-10)
        radius = self.dim(8, 16, 5)
        things: list[Thing] = []
        if rng.random() < 0.5:
            for _ in range(rng.integers(6, 13)):
                things += self.worker(c + rng.normal(0, radius / 2, 2), group=g)
        else:
            for _ in range(rng.integers(8, 15)):
                things += self.material(c + rng.normal(0, radius / 2, 2), self.dim(4, 9, 3), group=g)
        return things

    def things(self) -> None:
        rng = self.rng
        site = list(SITE_KINDS)[int(rng.integers(len(SITE_KINDS)))]
        kinds, weights = zip(*SITE_KINDS[site].items())
        p = np.array(weights) / sum(weights)
        target = int(rng.integers(3, 13))
        target = max(1, round(target * self.density))  # exactly ``target`` at density 1
        counts: dict[int, int] = {}
        total = 0
        while total < target:
            k = int(rng.choice(kinds, p=p))
            n = min(int(rng.integers(2, 6)), target - total) if k == PANEL else 1
            counts[k] = counts.get(k, 0) + n
            total += n
        built: list[Thing] = []
        for k in BUILD_ORDER:
            n = counts.get(k, 0)
            if k == PANEL and n:
                built += self.panels(n)
                continue
            for _ in range(n):
                built += {
                    TRENCH: self.trench,
                    PIPE: self.pipe,
                    EXCAVATOR: self.excavator,
                    TRUCK: self.truck,
                    MATERIAL: self.material,
                    WORKER: self.worker,
                }[k]()
        if rng.random() < self.crowd_fraction:
            built += self.crowd()
        # stable sort by jittered layer; a crowd's members share one key so they stay together
        group_keys: dict[int, float] = {}
        keys = []
        for t in built:
            key = LAYER[t.class_id] + rng.normal(0, 0.6)
            if t.group >= 0:
                key = group_keys.setdefault(t.group, key)
            keys.append(key)
        order = sorted(range(len(built)), key=lambda i: keys[i])
        self.scene.things = [built[i] for i in order]


def make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    crowd_fraction: float = 0.0,
    *,
    ground: Ground = GROUNDS["default"],
    lighting: float = 1.0,
    warmth: float = 0.0,
    haze: float = 0.0,
    density: float = 1.0,
) -> Scene:
    """Lay out one random scene: stuff regions, 3-12 things (times ``density``; plus, with
    probability ``crowd_fraction``, an iscrowd cluster), lighting and sun direction.

    The site: ``ground`` colours the stuff and sets how much vegetation and water there is,
    ``lighting`` scales every scene's exposure, ``warmth`` shifts its white balance towards red
    (> 0) or blue (< 0), ``haze`` veils it. At the defaults the scene is today's, draw for draw.
    """
    layout = _Layout(rng, height, width, crowd_fraction, ground, density)
    sc = layout.scene
    a = rng.uniform(0, 2 * math.pi)
    sc.sun = (math.cos(a), math.sin(a))
    sc.shadow = float(rng.uniform(0.45, 0.75))
    sc.gain = float(rng.uniform(0.7, 1.25)) * lighting
    r, g, b = (float(x) for x in rng.uniform(0.9, 1.1, 3))
    sc.tint = (r * (1.0 + warmth), g * (1.0 + 0.3 * warmth), b * (1.0 - warmth))
    sc.haze = haze
    layout.stuff()
    layout.things()
    return sc
