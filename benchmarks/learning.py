"""The seven architectures compared at an equal wall-clock budget, through the real train stage.

For every seed and architecture: ``segpipe train`` (Ray Train fed by Ray Data, on one local Ray
shared by all runs) for ``--budget`` seconds at ``--size`` px crops, then ``segpipe evaluate`` on
the whole validation images. Prints one table (val mIoU, thing mIoU, segm AP50, mean and spread
over seeds; steps; start-up) and writes the learning curves (validation score against seconds of
training, from each run's history) to a PNG. The figures in docs/benchmarks.md come from it.

    python benchmarks/learning.py [--budget 240] [--size 128] [--seeds 0 1] [--archs ...]
        [--images 2000] [--png docs/learning.png] [--json learning.json]

It is not part of ``make test``: the default takes 7 x 2 x (4 min + start-up + evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from segpipe.params import ARCHITECTURES, BUDGETS, ConvertParams, EvaluateParams, SynthParams, TrainParams


def make_shards(root: Path, images: int) -> Path:
    from segpipe.formats.coco import read_collections
    from segpipe.stages import convert, synth

    raw, shards = root / "raw", root / "shards"
    synth.run(SynthParams(images=images), raw)
    convert.run(ConvertParams(), read_collections(raw), shards, progress=False)
    return shards


def run_one(arch: str, seed: int, shards: Path, out: Path, budget: float, size: int) -> dict:
    """Train ``arch`` for ``budget`` seconds, evaluate it; the row of the table and its curve."""
    from segpipe.checkpoint import load_meta
    from segpipe.stages import evaluate, train

    # The architecture's own settings of the default run (lr, batch, clipping), at this budget and size.
    over = {k: v for k, v in BUDGETS[arch].items() if k not in ("budget_s", "image_size", "val_every")}
    p = dataclasses.replace(TrainParams(), seed=seed, budget_s=budget, image_size=size, epochs=1000,
                            overrides={arch: over})
    summary = train.run(p, arch, shards, out / "train")
    m = evaluate.run(EvaluateParams(num_overlays=0), out / "train" / "checkpoint", shards, out / "eval")
    history = load_meta(out / "train" / "checkpoint").history
    return {
        "arch": arch, "seed": seed, "miou": m["miou"], "miou_things": m.get("miou_things"),
        "segm_ap50": m["segm"]["AP50"] if "segm" in m else None, "steps": summary["steps"],
        "train_s": summary["train_s"], "startup_s": summary["startup_s"],
        "curve": [(h["elapsed_s"], h["val_score"]) for h in history if h["val_score"] is not None],
        "semantic_metric": m.get("semantic_classes", "all classes"),
    }


def table(rows: list[dict]) -> str:
    def stat(values: list[float | None]) -> str:
        v = [x for x in values if x is not None]
        if not v:
            return "–"
        return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = ["| arch | val mIoU | thing mIoU | segm AP50 | steps | start-up s |", "|---|---|---|---|---|---|"]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        rs = [r for r in rows if r["arch"] == arch]
        miou = stat([r["miou"] for r in rs]) + (" (things + background)" if arch == "mask_rcnn" else "")
        lines.append(f"| {arch} | {miou} | {stat([r['miou_things'] for r in rs])} | "
                     f"{stat([r['segm_ap50'] for r in rs])} | {np.mean([r['steps'] for r in rs]):.0f} | "
                     f"{np.mean([r['startup_s'] for r in rs]):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path, budget: float, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = dict(zip(ARCHITECTURES, plt.get_cmap("tab10").colors))
    for r in rows:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        label = r["arch"] + (" (thing mIoU)" if r["arch"] == "mask_rcnn" else "")
        ax.plot(xs, ys, marker=".", color=colours.get(r["arch"]), linestyle="-" if r["seed"] == rows[0]["seed"] else "--",
                label=label if r["seed"] == rows[0]["seed"] else None)
    ax.set_xlabel("seconds of training (epoch loop)")
    ax.set_ylabel(f"validation mIoU ({size} px centre crops)")
    ax.set_title(f"segpipe train at an equal {budget:.0f} s budget, 2-core CPU (dashed: second seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--archs", nargs="+", default=list(ARCHITECTURES))
    ap.add_argument("--images", type=int, default=SynthParams().images)
    ap.add_argument("--png", type=Path, default=Path("docs/learning.png"))
    ap.add_argument("--json", type=Path, default=None, help="also write every row and curve here")
    args = ap.parse_args()

    from segpipe.cluster import local_ray
    from segpipe.lifetime import terminate_as_interrupt

    terminate_as_interrupt()  # a kill stops the local Ray too
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_ray() as env:
        import os

        os.environ.update({k: env[k] for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")})
        shards = make_shards(Path(tmp), args.images)
        for seed in args.seeds:
            for arch in args.archs:
                row = run_one(arch, seed, shards, Path(tmp) / f"{arch}-{seed}", args.budget, args.size)
                rows.append(row)
                print(f"{arch} seed {seed}: mIoU {row['miou']:.3f}, thing mIoU {row['miou_things']}, "
                      f"segm AP50 {row['segm_ap50']}, {row['steps']} steps", flush=True)
    print(f"\n{len(args.archs)} architectures x {len(args.seeds)} seeds at {args.budget:.0f} s, {args.size} px, "
          f"{args.images} generated images; {time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows))
    plot(rows, args.png, args.budget, args.size)
    print(f"\nlearning curves: {args.png}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
