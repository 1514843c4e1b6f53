"""Peak memory of ``segpipe convert`` and ``segpipe evaluate`` as the dataset grows 4x.

    .venv/bin/python benchmarks/memory.py [--images 100] [--size 512]

Both commands run as subprocesses, on N and on 4N synthetic images. Convert holds at most one
shard's rows (``convert.rows_per_shard``, 32 here) before writing them, so that is what bounds
its memory; both runs write several shards. The peak is the largest
sum of proportional set sizes (PSS: resident memory, pages shared between processes split
among them) over the command's process tree (the convert worker pool included), sampled every
50 ms. Evaluation scores a randomly initialised UNet (semantic path: a confusion
matrix accumulated image by image) on the val split. The last line gives both ratios
(peak at 4N / peak at N); "flat" means close to 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def peak_pss(cmd: list[str], interval: float = 0.05) -> tuple[float, int]:
    """(wall seconds, peak bytes of the process tree's summed PSS) of ``cmd``; raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    # PSS: pages shared by the forked workers count once, not once per process
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(interval)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - t0, peak


def unet_checkpoint(shards: Path, out: Path) -> Path:
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs
    from segpipe.shards import open_shards

    s = open_shards(shards)
    torch.manual_seed(0)
    meta = CheckpointMeta(arch="unet", num_classes=s.num_classes, classes=s.classes, ignore_index=s.ignore_index,
                          model_kwargs=default_kwargs("unet"), shards_manifest_sha256=s.manifest_sha256)
    return save_checkpoint(out, build_model("unet", s.num_classes), meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100, help="N (the large run uses 4N)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rows-per-shard", type=int, default=32)
    args = ap.parse_args()
    segpipe = [sys.executable, "-m", "segpipe.cli"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = root / "params.yaml"
        # Shards buffer rows_per_shard rows before writing: both runs must fill several shards, or
        # the larger one only shows a fuller buffer, not growth with the dataset.
        params.write_text(f"convert:\n  rows_per_shard: {args.rows_per_shard}\nevaluate:\n  num_overlays: 0\n")
        for n in (args.images, 4 * args.images):
            raw, shards = root / f"raw{n}", root / f"shards{n}"
            subprocess.run([*segpipe, "synth", "--out", str(raw / "synth"), "--images", str(n),
                            "--size", str(args.size), str(args.size), "--seed", "0"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            conv = peak_pss([*segpipe, "convert", "--format", "coco", "--input", str(raw), "--out", str(shards),
                             "--no-progress", "--params", str(params)])
            ckpt = unet_checkpoint(shards, root / f"ckpt{n}")
            ev = peak_pss([*segpipe, "evaluate", "--model", str(ckpt), "--shards", str(shards), "--split", "val",
                           "--out", str(root / f"eval{n}"), "--params", str(params)])
            rows[n] = (conv, ev)
            print(f"N={n:>5}: convert {conv[0]:6.1f} s peak {conv[1] / 2**20:7.1f} MiB | "
                  f"evaluate (val split) {ev[0]:6.1f} s peak {ev[1] / 2**20:7.1f} MiB", flush=True)
    small, large = rows[args.images], rows[4 * args.images]
    print(f"peak memory ratio at 4x the images: convert {large[0][1] / small[0][1]:.2f}x, "
          f"evaluate {large[1][1] / small[1][1]:.2f}x")


if __name__ == "__main__":
    main()
