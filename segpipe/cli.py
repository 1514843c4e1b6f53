"""The ``segpipe`` command: one sub-command per stage, each in its own module.

Modules are imported only when their command runs, so ``segpipe synth`` does not pay for
importing Ray and torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("segpipe.stages.synth", "generate procedural construction-site scenes (COCO layout)"),
    "convert": ("segpipe.stages.convert", "compile annotations into checksummed Parquet shards"),
    "validate": ("segpipe.stages.validate", "run the converter's checks and write the report only"),
    "stats": ("segpipe.stages.stats", "per-class pixel and instance counts per split of a shard set"),
    "train": ("segpipe.stages.train", "train an architecture with Ray Train on Parquet shards"),
    "evaluate": ("segpipe.stages.evaluate", "evaluate a checkpoint on a split; write DVC metrics and plots"),
    "metrics": ("segpipe.stages.metrics", "score label PNGs or COCO results made by any system"),
    "promote": ("segpipe.stages.promote", "promote evaluated candidates into the model registry by rules"),
    "predict": ("segpipe.stages.predict", "run a model on images of any size (sliding window)"),
    "export": ("segpipe.stages.export", "export a model to ONNX or TorchScript with a parity check"),
    "report": ("segpipe.stages.report", "write reports/summary.md from evaluations and the promotion"),
    "ingest": ("pipelines.ingest", "validate a drop of site imagery and version it under data/raw (Prefect flow)"),
    "retrain": ("pipelines.retrain", "run the pipeline's stages as a Prefect flow, then promote"),
    "schedule": ("pipelines.deploy", "serve the Prefect retrain flow on its cron schedule"),
    "params": ("segpipe.stages.params_check", "validate params.yaml (and --set overrides)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: segpipe COMMAND [options]   (segpipe COMMAND --help for a command's options)", ""]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"segpipe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    from segpipe.params import ParamsError

    try:
        module.main(rest)
    except ParamsError as e:
        print(f"segpipe {name}: params error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
