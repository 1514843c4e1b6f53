"""Visible instance masks to COCO annotations: polygons, compressed RLE, uncompressed RLE.

Polygons are traced along pixel edges (vertices on pixel corners), which pycocotools decodes
back to exactly the traced mask. A mask with a hole cannot be a COCO polygon (polygons of one
annotation are unioned), so such masks are written as RLE instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segpipe.synth.classes import IGNORE_INDEX
from segpipe.synth.scene import Scene

MIN_VISIBLE_PIXELS = 6  # smaller visible remnants are unannotatable: ignored in the label map
BAND_MIN_PIXELS = 80  # only objects at least this large get an ignore band
BAND_PROBABILITY = 0.3

# edge directions in image coordinates (y down): +x, +y, -x, -y; walking them in this order
# goes clockwise around a pixel, so outer boundaries have positive shoelace area, holes negative
_RIGHT_TURN = np.array([1, 2, 3, 0])


def trace_polygons(mask: np.ndarray) -> list[list[int]] | None:
    """Outer boundaries of a boolean mask as polygons with vertices on pixel corners.

    Components that touch only at a corner are separate polygons. Returns None when the mask
    has a hole (a polygon union cannot express it) and [] for an empty mask.
    """
    h, w = mask.shape
    m = np.pad(mask.astype(bool), 1)
    core = m[1:-1, 1:-1]
    edges = []
    for d, (neighbour, dx0, dy0, dx1, dy1) in enumerate(
        (
            (m[:-2, 1:-1], 0, 0, 1, 0),  # top edge, walked +x
            (m[1:-1, 2:], 1, 0, 1, 1),  # right edge, walked +y
            (m[2:, 1:-1], 1, 1, 0, 1),  # bottom edge, walked -x
            (m[1:-1, :-2], 0, 1, 0, 0),  # left edge, walked -y
        )
    ):
        r, c = np.nonzero(core & ~neighbour)
        edges.append((c + dx0, r + dy0, c + dx1, r + dy1, np.full(r.size, d)))
    if not any(e[0].size for e in edges):
        return []
    sx, sy, ex, ey, dirs = (np.concatenate(parts) for parts in zip(*edges))
    start = sy * (w + 1) + sx
    end = ey * (w + 1) + ex

    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    lo = np.searchsorted(sorted_start, end, "left")
    hi = np.searchsorted(sorted_start, end, "right")
    nxt = order[lo]
    # a corner shared by two diagonal pixels has two outgoing edges: turning right keeps
    # each pixel's own loop, so diagonal neighbours become separate (4-connected) polygons
    saddle = np.flatnonzero(hi - lo == 2)
    if saddle.size:
        other = order[lo[saddle] + 1]
        keep = dirs[nxt[saddle]] == _RIGHT_TURN[dirs[saddle]]
        nxt[saddle] = np.where(keep, nxt[saddle], other)

    nxt_list = nxt.tolist()
    seen = bytearray(len(nxt_list))
    polygons: list[list[int]] = []
    for e0 in range(len(nxt_list)):
        if seen[e0]:
            continue
        cycle = []
        e = e0
        while not seen[e]:
            seen[e] = 1
            cycle.append(e)
            e = nxt_list[e]
        idx = np.array(cycle)
        d = dirs[idx]
        corner = d != np.roll(d, 1)  # a vertex wherever the walk changes direction
        xs, ys = sx[idx][corner], sy[idx][corner]
        area2 = int(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys))
        if area2 < 0:
            return None
        polygons.append(np.stack([xs, ys], axis=1).ravel().tolist())
    return polygons


def rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE with a list of run lengths (column-major, starting with a run of zeros)."""
    h, w = mask.shape
    flat = mask.T.ravel().astype(bool)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rle_compressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE with the compressed string counts."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def polygon_segmentation(mask: np.ndarray, x0: int, y0: int, full: tuple[int, int]) -> list[list[int]] | None:
    """Polygons for ``mask`` (a crop whose top-left is (x0, y0) in a ``full`` = (h, w) image),
    or None when they would not decode back to exactly this mask."""
    polys = trace_polygons(mask)
    if not polys:
        return None
    polys = [[v + (x0 if i % 2 == 0 else y0) for i, v in enumerate(p)] for p in polys]
    # the tracer is exact; this check guards the contract that readers rely on
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, *full)))
    crop = decoded[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    if int(decoded.sum()) != int(mask.sum()) or not np.array_equal(crop.astype(bool), mask):
        return None
    return polys


def inner_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` (4-connected steps) of its edge; the image border
    does not count as an edge."""
    eroded = mask.copy()
    for _ in range(width):
        p = np.pad(eroded, 1, constant_values=True)
        eroded = eroded & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def annotate(
    scene: Scene,
    semantic: np.ndarray,
    instances: np.ndarray,
    rng: np.random.Generator,
    rle_fraction: float,
    ignore_band: int,
) -> list[dict[str, Any]]:
    """COCO annotations (without ``id`` / ``image_id``) for the visible things of a scene.

    Writes IGNORE_INDEX into ``semantic`` (in place) for remnants too small to annotate and
    for the ignore bands. A share ``rle_fraction`` of instances is RLE (half compressed, half
    uncompressed); the members of each crowd group become one ``iscrowd`` RLE annotation.
    """
    h, w = semantic.shape
    anns: list[dict[str, Any]] = []
    groups: dict[int, tuple[int, np.ndarray]] = {}
    for k, thing in enumerate(scene.things, 1):
        mask = instances == k
        area = int(mask.sum())
        if area == 0:
            continue
        if thing.group >= 0:
            cls, acc = groups.setdefault(thing.group, (thing.class_id, np.zeros((h, w), bool)))
            acc |= mask
            continue
        if area < MIN_VISIBLE_PIXELS:
            semantic[mask] = IGNORE_INDEX
            continue
        if ignore_band > 0 and area >= BAND_MIN_PIXELS and rng.random() < BAND_PROBABILITY:
            semantic[inner_band(mask, ignore_band)] = IGNORE_INDEX
        x, y, bw, bh = _box(mask)
        segmentation: Any = None
        if rng.random() < rle_fraction:
            segmentation = rle_compressed(mask) if rng.random() < 0.5 else rle_uncompressed(mask)
        else:
            segmentation = polygon_segmentation(mask[y : y + bh, x : x + bw], x, y, (h, w)) or rle_compressed(
                mask
            )
        anns.append(
            {
                "category_id": thing.class_id,
                "iscrowd": 0,
                "area": area,
                "bbox": [x, y, bw, bh],
                "segmentation": segmentation,
            }
        )
    for _, (cls, mask) in sorted(groups.items()):
        area = int(mask.sum())
        if area < MIN_VISIBLE_PIXELS:
            semantic[mask] = IGNORE_INDEX
            continue
        anns.append(
            {
                "category_id": cls,
                "iscrowd": 1,
                "area": area,
                "bbox": list(_box(mask)),
                "segmentation": rle_uncompressed(mask),
            }
        )
    return anns
