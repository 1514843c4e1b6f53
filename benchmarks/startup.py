"""Start-up of ``segpipe train``: Ray Train's local mode (``train.workers: 0``) against one worker actor.

Each run is the whole command, timed from outside (``python -m segpipe train``, interpreter start to
exit), with an epoch loop of almost nothing: ``budget_s`` 0.01 ends it at its first batch, no
validation. One untimed run per mode comes first (it caches the precision trial and warms the
file cache). The modes alternate run by run (A, B, A, B, ...), so a host whose load changes
slows both alike, and the ratio of each pair is reported with min / median / max of each mode.
Like ``make pipeline``, every run joins one shared local Ray (``segpipe with-ray``) unless
``--own-ray``, where each command starts and stops a Ray of its own.

The per-phase medians come from the runs' ``metrics.json`` (``startup_phases``; see
``segpipe.stages.train.startup_phases``), ``startup_s`` is everything but the epoch loop.

    python benchmarks/startup.py [--shards DIR] [--arch unet] [--repeats 5] [--own-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("imports_s", "shards_s", "ray_connect_s", "plan_s", "dataset_s", "trainer_s", "first_batch_s", "finish_s")


def make_shards(root: Path) -> Path:
    """The default run's data: ``segpipe synth`` and ``segpipe convert`` with params.yaml's defaults."""
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams, SynthParams
    from segpipe.stages import convert, synth

    synth.run(SynthParams(), root / "raw" / "synth")
    convert.run(ConvertParams(), read_collections(root / "raw"), root / "shards", progress=False)
    return root / "shards"


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def one_run(arch: str, shards: Path, root: Path, workers: int, env: dict[str, str], default: bool = False) -> dict:
    """One ``segpipe train``, timed whole. ``default``: the repository's params.yaml (the default run's
    per-architecture crops, batches and models), only the budget and validation changed."""
    if default:
        params = REPO_PARAMS
        sets = [f"train.workers={workers}", f"train.overrides.{arch}.budget_s=0.01", f"train.overrides.{arch}.val_every=0"]
    else:
        params = root / f"params-{workers}.yaml"
        params.write_text(f"train:\n  architectures: [{arch}]\n  workers: {workers}\n  budget_s: 0.01\n"
                          "  val_every: 0\n  overrides: {}\n")
        sets = []
    out = root / f"out-{arch}-{workers}"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "segpipe", "train", "--arch", arch, "--shards", str(shards),
                           "--out", str(out), "--params", str(params), *(a for s in sets for a in ("--set", s))],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"segpipe train (workers {workers}) failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "startup_s": metrics["startup_s"], "train_s": metrics["train_s"], "steps": metrics["steps"],
            **metrics["startup_phases"]}


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def every_arch(shards: Path, root: Path, env: dict[str, str]) -> None:
    """Each architecture of the default run in local mode (its precision trial cached by a first,
    untimed run), and the training share its default budgets would give with that start-up."""
    from segpipe.params import load_section
    from segpipe.stages.train import params_for

    params = load_section("train", REPO_PARAMS)

    print(f"{'arch':<11} {'wall s':>7} {'startup_s':>9}  " + " ".join(f"{p[:-2]:>11}" for p in PHASES), flush=True)
    budgets, startups = 0.0, 0.0
    for arch in params.architectures:
        one_run(arch, shards, root, 0, env, default=True)
        r = one_run(arch, shards, root, 0, env, default=True)
        print(f"{arch:<11} {r['wall']:>7.1f} {r['startup_s']:>9.1f}  " + " ".join(f"{r[p]:>11.2f}" for p in PHASES),
              flush=True)
        budgets += params_for(params, arch).budget_s
        startups += r["startup_s"]
    print(f"training share of the default budgets ({budgets:g} s) with these start-ups ({startups:.1f} s): "
          f"{budgets / (budgets + startups):.3f}; load average {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="shard folder (default: generate the default run's data)")
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 1], help="train.workers of each mode")
    ap.add_argument("--own-ray", action="store_true", help="each command starts its own Ray")
    ap.add_argument("--all-archs", action="store_true",
                    help="instead: every architecture once in local mode with the default run's params.yaml, after "
                         "an untimed run each, and the training share of the default budgets")
    args = ap.parse_args()

    from segpipe.cluster import local_ray

    with tempfile.TemporaryDirectory(prefix="segpipe-startup-") as tmp:
        root = Path(tmp)
        shards = args.shards or make_shards(root)
        # every command imports from cached bytecode, as `make` runs them (it clears PYTHONDONTWRITEBYTECODE:
        # with it set, each process compiles torch from source, which doubles the start-up measured)
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE")}
        runs: dict[int, list[dict]] = {m: [] for m in args.modes}
        loads = [load_average()]

        def measure(env: dict[str, str]) -> None:
            for m in args.modes:  # untimed: the precision trial is cached, files and bytecode are warm
                one_run(args.arch, shards, root, m, env)
            for r in range(args.repeats):
                for m in args.modes:
                    runs[m].append(one_run(args.arch, shards, root, m, env))
                    print(f"round {r + 1} workers {m}: wall {runs[m][-1]['wall']:.1f} s, "
                          f"startup_s {runs[m][-1]['startup_s']}", flush=True)
                loads.append(load_average())

        if args.all_archs:
            with local_ray() as env:
                every_arch(shards, root, {**base, **env})
            return
        if args.own_ray:
            measure(base)
        else:
            with local_ray() as env:
                measure({**base, **env})

    print(f"\n{args.arch}, {'own Ray per command' if args.own_ray else 'one shared Ray (segpipe with-ray)'}, "
          f"{args.repeats} runs per mode, interleaved; load average (1, 5, 15 min) before and after each round: "
          f"{' | '.join(loads)}")
    print(f"{'workers':<8} {'wall s min/med/max':>20} {'startup_s min/med/max':>22}  "
          + " ".join(f"{p[:-2]:>11}" for p in PHASES))
    for m, rs in runs.items():
        print(f"{m:<8} {spread([r['wall'] for r in rs]):>20} {spread([r['startup_s'] for r in rs]):>22}  "
              + " ".join(f"{statistics.median([r[p] for r in rs]):>11.2f}" for p in PHASES))
    if len(args.modes) == 2:
        a, b = args.modes
        ratios = [x["wall"] / y["wall"] for x, y in zip(runs[a], runs[b])]
        print(f"wall ratio workers {a} / workers {b}, per round: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
