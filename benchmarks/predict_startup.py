"""Start-up of a command that runs a U-Net without training it: ``segpipe predict`` of a few images.

The model registry imports an architecture's module when it is built, and the backbones import
torchvision when one is built (``segpipe.models``), so a U-Net process never imports torchvision,
nor the ``torch._dynamo`` that torchvision's import pulls in. The baseline is the same command
with ``import torchvision`` first, in the same interpreter (what every such process paid before):
the two alternate run by run, whole process timed from outside, after one untimed run each.

    python benchmarks/predict_startup.py [--repeats 7] [--images 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# the command as a module run, optionally after ``import torchvision`` (the baseline)
RUNNER = "import runpy, sys{pre}; sys.argv = ['segpipe'] + sys.argv[1:]; runpy.run_module('segpipe', run_name='__main__')"


def make_inputs(root: Path, n_images: int) -> tuple[Path, Path]:
    """A UNet checkpoint of the default size with seeded random weights, and ``n_images`` 256 px scenes."""
    import torch
    from PIL import Image

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs

    classes = tuple({"id": i, "name": f"c{i}", "isthing": False, "color": [i * 20, 0, 0]} for i in range(6))
    torch.manual_seed(0)
    meta = CheckpointMeta(arch="unet", num_classes=6, classes=classes, model_kwargs=default_kwargs("unet"),
                          ignore_index=255, image_size=256, params={"seed": 0}, epoch=1, shards_manifest_sha256="x" * 64)
    checkpoint = save_checkpoint(root / "unet", build_model("unet", 6), meta)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(images / f"site{i}.png")
    return checkpoint, images


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}  # as make runs it: bytecode cached
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, images = make_inputs(root, args.images)
        modes = {"lazy (as shipped)": "", "torchvision imported first": ", torchvision"}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args.repeats + 1):
            for j, (mode, pre) in enumerate(modes.items()):
                out = root / "out" / f"{i}-{j}"  # round, mode: a new folder each run
                cmd = [sys.executable, "-c", RUNNER.format(pre=pre), "predict", "--model", str(checkpoint),
                       "--input", str(images), "--out", str(out)]
                took = timed(cmd, env)
                if i:  # the first round is untimed: the file cache
                    times[mode].append(took)
        lazy, eager = times["lazy (as shipped)"], times["torchvision imported first"]
        for mode, t in times.items():
            print(f"{mode}: {min(t):.2f} / {statistics.median(t):.2f} / {max(t):.2f} s (min / median / max of {len(t)})")
        ratios = [a / b for a, b in zip(lazy, eager)]
        print(f"wall ratio lazy / torchvision first: median {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
