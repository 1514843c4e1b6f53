"""How far the second synthetic site (``--site site2``) lies from the default one: image statistics.

    .venv/bin/python benchmarks/site_shift.py [--images 200] [--size 128] [--site site2]

Generates ``--images`` scenes of the default site (seed 0, as the default pipeline) and as many of
``--site`` (seed 1, as its drop would be), in memory, and prints for each: the per-channel mean and
standard deviation of the photos, their mean brightness (Rec. 601 luma), the objects per scene
and the share of pixels of each ground class. No training: this only describes the shift.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from segpipe.params import SynthParams
from segpipe.stages.synth import generate
from segpipe.synth.classes import CLASSES
from segpipe.synth.sites import SITES, site_preset

LUMA = np.array([0.299, 0.587, 0.114])
STUFF = [c for c in CLASSES if not c.isthing]


def describe(p: SynthParams) -> dict[str, np.ndarray | float]:
    """Photo and label statistics of images ``0 .. p.images - 1``."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = objects = 0
    classes = np.zeros(256, np.int64)
    for i in range(p.images):
        image, semantic, anns = generate(i, p)
        x = image.reshape(-1, 3).astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        pixels += len(x)
        objects += sum(1 for a in anns if not a["iscrowd"])
        classes += np.bincount(semantic.ravel(), minlength=256)
    mean = total / pixels
    std = np.sqrt(total_sq / pixels - mean * mean)
    return {
        "mean": mean,
        "std": std,
        "brightness": float(LUMA @ mean),
        "objects": objects / p.images,
        "stuff": classes[[c.id for c in STUFF]] / classes[:255].sum(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--site", choices=list(SITES), default="site2")
    args = ap.parse_args()

    base = SynthParams(images=args.images, size=(args.size, args.size), workers=1)
    sites = {
        "default (seed 0)": dataclasses.replace(base, seed=0),
        f"{args.site} (seed 1)": dataclasses.replace(base, seed=1, **site_preset(args.site)),
    }
    print(f"{args.images} scenes of {args.size} px per site; {args.site}: {site_preset(args.site)}")
    header = f"{'':18} {'mean R/G/B':>18} {'std R/G/B':>16} {'bright':>7} {'obj/img':>8}  "
    print(header + "  ".join(c.name for c in STUFF) + "  (pixel shares)")
    stats = {}
    for name, p in sites.items():
        t0 = time.perf_counter()
        s = stats[name] = describe(p)
        mean = "/".join(f"{v:.1f}" for v in s["mean"])
        std = "/".join(f"{v:.1f}" for v in s["std"])
        shares = "  ".join(f"{v:{len(c.name)}.3f}" for c, v in zip(STUFF, s["stuff"]))
        print(f"{name:18} {mean:>18} {std:>16} {s['brightness']:7.1f} {s['objects']:8.2f}  {shares}"
              f"   ({time.perf_counter() - t0:.1f} s)")
    a, b = stats.values()
    print(f"shift: brightness {b['brightness'] - a['brightness']:+.1f}, "
          f"channel means {'/'.join(f'{v:+.1f}' for v in b['mean'] - a['mean'])}, "
          f"objects per scene x{b['objects'] / a['objects']:.2f}")


if __name__ == "__main__":
    main()
