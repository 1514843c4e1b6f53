"""A search against the defaults: ``segpipe tune`` on UNet with the wall time of four default UNet
runs, against the default params' UNet trained once. Both are scored by ``segpipe evaluate`` on
the val split (the number promote ranks by); prints each val mIoU and the trial table.

1. Baseline: ``segpipe train``'s run of UNet with params.yaml's train section (budget
   ``train.overrides.unet.budget_s`` x ``--scale``); its wall time W (start-up included).
2. Search: ``segpipe tune`` with ``tune.space.unet``, ``--trials`` trials, ASHA, and a search budget
   of 4 x W (``tune.budget_s``), every trial at the same per-run budget as the baseline.

    python benchmarks/tune.py [--scale 1.0] [--trials 8] [--concurrency 0] [--shards data/shards] [--out DIR]

``--scale`` < 1 shrinks the budget and the generated data (a smoke check: ``--scale 0.05`` takes a
few minutes on 2 cores); without ``--shards``, scenes are generated (2000 x scale, 256 px; 64 px
below scale 0.5). On a GPU host, ``--set train.use_gpu=true --concurrency <GPUs>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from segpipe.params import ConvertParams, SynthParams, TrainParams, TuneParams, load_section


def make_shards(root: Path, scale: float) -> Path:
    from segpipe.formats.coco import read_collections
    from segpipe.stages import convert, synth

    images, size = max(24, int(2000 * scale)), 256 if scale >= 0.5 else 64
    synth.run(SynthParams(images=images, size=(size, size), seed=0), root / "raw")
    convert.run(ConvertParams(val_fraction=0.05 if scale >= 0.5 else 0.25), read_collections(root / "raw"),
                root / "shards", progress=False)
    return root / "shards"


def val_miou(checkpoint: Path, shards: Path, out: Path) -> float:
    from segpipe.stages import evaluate

    evaluate.main(["--model", str(checkpoint), "--shards", str(shards), "--out", str(out)])
    return float(json.loads((out / "metrics.json").read_text())["miou"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="budget and generated data x this (smoke: 0.05)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=0, help="0 = as many as the cluster fits")
    ap.add_argument("--shards", default=None, help="existing shards (default: generate)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="where runs go (default: a temporary folder)")
    args = ap.parse_args()
    # Ray's worker processes (each trial's, and its train worker) import from cached bytecode, as under
    # `make`: with PYTHONDONTWRITEBYTECODE set each would compile torch from source (seconds per process)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    from segpipe.cluster import connect
    from segpipe.stages import train as train_stage
    from segpipe.stages import tune as tune_stage

    base_train: TrainParams = load_section("train", args.params) if Path(args.params).exists() else TrainParams()
    base_tune: TuneParams = load_section("tune", args.params) if Path(args.params).exists() else TuneParams()
    unet = train_stage.params_for(base_train, "unet")
    budget = round(unet.budget_s * args.scale, 1)
    over = {**base_train.overrides, "unet": {**base_train.overrides.get("unet", {}), "budget_s": budget}}
    train = dataclasses.replace(base_train, overrides=over)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        shards = Path(args.shards) if args.shards else make_shards(root / "data", args.scale)
        # Each on a Ray of its own, as two commands would run: the baseline's here, the search's its
        # own (segpipe tune starts its Ray with the dashboard, whose state API frees stopped trials' CPUs).
        with connect():
            t0 = time.time()
            base = train_stage.run(train, "unet", shards, root / "baseline")
            wall = time.time() - t0
        search_budget = round(4 * wall, 1)
        tune = dataclasses.replace(base_tune, trials=args.trials, concurrency=args.concurrency,
                                   budget_s=search_budget)
        t0 = time.time()
        found = tune_stage.run(tune, train, "unet", shards, root / "search")  # its own Ray, as the command's
        search_wall = time.time() - t0
        base_miou = val_miou(root / "baseline" / "checkpoint", shards, root / "eval-baseline")
        best_miou = val_miou(root / "search" / "checkpoint", shards, root / "eval-search")
        print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"scale {args.scale}: UNet budget {budget} s")
        print(f"defaults (one run):   val mIoU {base_miou:.4f}  wall {wall:.0f} s  (train {base['train_s']} s)")
        print(f"search (4 x {wall:.0f} s): val mIoU {best_miou:.4f}  wall {search_wall:.0f} s  "
              f"best {found['best_params']}; {found['completed']} completed, {found['stopped_early']} stopped "
              f"early, {found['not_run']} not run of {found['trials']}")
        print(f"ratio (search / defaults): {best_miou / base_miou:.3f}" if base_miou else "")
        print("\n" + (root / "search" / "trials.csv").read_text())


if __name__ == "__main__":
    main()
