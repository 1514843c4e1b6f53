"""Start-up of a command that reads the model registry: ``segpipe registry list`` and ``lineage``.

Reading a checkpoint's meta and hashing its weights needs no torch: ``segpipe.checkpoint`` imports
torch (and safetensors' torch half) only where tensors are read or written, so the registry
commands and the promote stage (unless it re-scores a champion) never import it. The
baseline is the same command with ``import torch`` first, in the same interpreter (what every
such process paid before): the two alternate run by run, whole process timed from outside, after
one untimed round.

    python benchmarks/registry_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from predict_startup import RUNNER, make_inputs, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from segpipe.registry import register, set_alias

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}  # as make runs it: bytecode cached
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, _ = make_inputs(root, 0)
        registry = root / "registry"
        entry, _ = register(registry, checkpoint)
        set_alias(registry, "champion", entry["version"], "benchmark")
        modes = {"as shipped": "", "torch imported first": ", torch"}
        for command in (["list"], ["lineage", "champion"]):
            times: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(args.repeats + 1):
                for mode, pre in modes.items():
                    took = timed([sys.executable, "-c", RUNNER.format(pre=pre), "registry", *command,
                                  "--registry", str(registry)], env)
                    if i:  # the first round is untimed: the file cache
                        times[mode].append(took)
            print(f"segpipe registry {' '.join(command)}")
            for mode, t in times.items():
                print(f"  {mode}: {min(t):.2f} / {statistics.median(t):.2f} / {max(t):.2f} s "
                      f"(min / median / max of {len(t)})")
            ratios = [a / b for a, b in zip(times["as shipped"], times["torch imported first"])]
            print(f"  wall ratio as shipped / torch first: median {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
