"""Rasterise a ``Scene``: the semantic label map, the instance map and the photo.

Labels come from one pass of polygon fills (later things overwrite earlier ones, which is
the occlusion); the photo colours each pixel by the paint drawn there, modulated by noise
fields at three scales, cast shadows, uneven illumination, exposure, white balance and haze.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from segpipe.synth.scene import Scene

HAZE = (206.0, 212.0, 220.0)  # the veil's colour: bright, slightly blue (scattered skylight)


@dataclass
class Rendered:
    image: np.ndarray  # H x W x 3 uint8
    semantic: np.ndarray  # H x W uint8 class ids (no ignore yet)
    instances: np.ndarray  # H x W uint8: 0 = stuff, k = scene.things[k - 1] (visible part)


def noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth value noise (about unit spread) with features about ``cell`` pixels wide."""
    gh, gw = int(np.ceil(height / cell)) + 2, int(np.ceil(width / cell)) + 2
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((width, height), Image.BILINEAR), dtype=np.float32)


def soften(x: np.ndarray) -> np.ndarray:
    """A [1 4 1] / 6 blur along both axes (edges replicated): drone optics and motion soften
    the hard polygon edges."""
    a, b = np.float32(4 / 6), np.float32(1 / 6)
    y = x * a
    y[1:] += x[:-1] * b
    y[:-1] += x[1:] * b
    y[0] += x[0] * b
    y[-1] += x[-1] * b
    z = y * a
    z[:, 1:] += y[:, :-1] * b
    z[:, :-1] += y[:, 1:] * b
    z[:, 0] += y[:, 0] * b
    z[:, -1] += y[:, -1] * b
    return z


def _flat(poly: np.ndarray) -> list[float]:
    return poly.ravel().tolist()


def rasterise(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stuff class map, instance map, paint map, shadow-caster map), each H x W uint8."""
    size = (scene.width, scene.height)
    if len(scene.things) > 254:
        raise ValueError(f"scene has {len(scene.things)} things; at most 254 fit the instance map")
    stuff, inst, paint, shadow = (Image.new("L", size, 0) for _ in range(4))
    ds, di, dp, dsh = (ImageDraw.Draw(im) for im in (stuff, inst, paint, shadow))
    for region in scene.regions:
        for poly in region.polygons:
            xy = _flat(poly)
            ds.polygon(xy, fill=region.class_id)
            dp.polygon(xy, fill=region.paint)
    sun = np.array(scene.sun)
    for k, thing in enumerate(scene.things, 1):
        if thing.height > 0:
            shift = sun * thing.height
            for poly, _ in thing.parts:
                dsh.polygon(_flat(poly + shift), fill=k)
        for poly, p in thing.parts:
            xy = _flat(poly)
            di.polygon(xy, fill=k)
            dp.polygon(xy, fill=p)
    return tuple(np.asarray(im, dtype=np.uint8) for im in (stuff, inst, paint, shadow))  # type: ignore[return-value]


def render(scene: Scene, rng: np.random.Generator) -> Rendered:
    """Rasterise ``scene`` and paint the photo (``rng`` draws the noise fields)."""
    h, w = scene.height, scene.width
    stuff, inst, paint_map, caster = rasterise(scene)
    lut = np.zeros(256, np.uint8)
    for k, thing in enumerate(scene.things, 1):
        lut[k] = thing.class_id
    semantic = np.where(inst > 0, lut[inst], stuff)

    # per-paint table, one row per quantity: base colour (3), alt - base (3), mix, amplitudes (3)
    table = np.array(
        [
            (*p.color, *(b - a for a, b in zip(p.color, p.alt)), p.mix, p.fine, p.medium, p.coarse)
            for p in scene.paints
        ],
        np.float32,
    ).T.copy()

    def per_pixel(row: int) -> np.ndarray:
        return np.take(table[row], paint_map)  # H x W, contiguous

    fine = rng.standard_normal((h, w), dtype=np.float32)
    medium = noise(rng, h, w, 5.0)
    coarse = noise(rng, h, w, 40.0)
    blend = noise(rng, h, w, 12.0)
    light = noise(rng, h, w, 80.0)

    t = np.clip(0.5 + 0.6 * blend, 0.0, 1.0) * per_pixel(6)
    lum = 1.0 + per_pixel(7) * fine
    lum += per_pixel(8) * medium
    lum += per_pixel(9) * coarse
    lum *= 1.0 + 0.08 * light
    lum[(caster > 0) & (caster != inst)] *= np.float32(scene.shadow)
    image = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        ch = per_pixel(c) + per_pixel(3 + c) * t
        ch *= lum * np.float32(scene.gain * scene.tint[c])
        if scene.haze > 0:
            ch *= np.float32(1.0 - scene.haze)
            ch += np.float32(scene.haze * HAZE[c])
        image[..., c] = np.clip(soften(ch), 0, 255)
    return Rendered(image, semantic.astype(np.uint8), inst)
