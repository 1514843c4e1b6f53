"""The ``segpipe`` command: one sub-command per module, the DVC stages in ``segpipe/stages/``
(synth, convert, train, tune, evaluate, baselines, fuse, promote), the other commands in ``segpipe/commands/``.

Modules are imported only when their command runs, so ``segpipe synth`` does not pay for
importing Ray and torch.

Errors a user can cause (``segpipe.errors.UserError``: bad params, input, shards, checkpoints,
registry entries; and OSError: a full disk, a missing file) end the command with one line on
stderr naming the file, key or argument at fault, and a non-zero exit status: 2 for params, 1 for
the rest, 130 when interrupted. Anything else is a bug and keeps its traceback.

Every ``segpipe.*`` command runs in a ``segpipe.progress.session``: messages of Ray and other
libraries go to ``logs/<command>[-<name>].log`` (its path printed once), and the console keeps the
stage's progress line, its results and its errors. ``segpipe -v COMMAND`` (or ``SEGPIPE_LOG=debug``)
shows everything. The Prefect commands (``pipelines.*``) keep Prefect's own log on the console.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("segpipe.stages.synth", "generate procedural construction-site scenes (COCO layout)"),
    "convert": ("segpipe.stages.convert", "compile annotations into checksummed Parquet shards"),
    "validate": ("segpipe.commands.validate", "run the converter's checks and write the report only"),
    "stats": ("segpipe.commands.stats", "per-class pixel and instance counts per split of a shard set"),
    "train": ("segpipe.stages.train", "train an architecture with Ray Train on Parquet shards"),
    "tune": ("segpipe.stages.tune", "search train params with Ray Tune (ASHA), every trial the train stage"),
    "evaluate": ("segpipe.stages.evaluate", "evaluate a checkpoint on a split; write DVC metrics and plots"),
    "baselines": ("segpipe.stages.baselines", "score the reference predictors a model must beat"),
    "fuse": ("segpipe.stages.fuse", "fuse the best semantic and instance models into one panoptic model, scored"),
    "metrics": ("segpipe.commands.metrics", "score label PNGs or COCO results made by any system"),
    "promote": ("segpipe.stages.promote", "promote evaluated candidates into the model registry by rules"),
    "registry": ("segpipe.commands.registry", "list the registry, print a model's lineage, roll an alias back"),
    "predict": ("segpipe.commands.predict", "run a model on images of any size (sliding window), in this process or on Ray"),
    "serve": ("segpipe.commands.serve", "serve a model over HTTP on Ray Serve (batched, follows its registry alias)"),
    "export": ("segpipe.commands.export", "export a model to ONNX or TorchScript with a parity check"),
    "report": ("segpipe.commands.report", "write reports/summary.md from evaluations and the promotion"),
    "audit": ("segpipe.commands.audit", "rank annotations by how strongly a trained model disagrees with them"),
    "select": ("segpipe.commands.select", "pick the unlabelled frames worth labelling (uncertain and diverse)"),
    "drift": ("segpipe.commands.drift", "compare a drop of images with the shards the model was trained on"),
    "ingest": ("pipelines.ingest", "validate a drop of site imagery and version it under data/raw (Prefect flow)"),
    "retrain": ("pipelines.retrain", "run the pipeline's stages as a Prefect flow, then promote"),
    "schedule": ("pipelines.deploy", "serve the Prefect retrain flow on its cron schedule"),
    "params": ("segpipe.commands.params", "validate params.yaml (and --set overrides); --merge a best.yaml into it"),
    "with-ray": ("segpipe.commands.with_ray", "run a command (e.g. dvc repro) against a local Ray started for it"),
}


def known_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix: a :class:`segpipe.errors.UserError` or an OSError
    (a missing file, a full disk, a permission)."""
    from segpipe.errors import UserError

    return isinstance(exc, (UserError, OSError))


def error_line(command: str, exc: BaseException) -> str:
    """The single line a failed command ends with."""
    if isinstance(exc, OSError):
        from segpipe.files import describe_os_error

        message = describe_os_error(exc)
    else:
        message = str(exc) or type(exc).__name__
    return f"segpipe {command}: error: " + " ".join(message.split("\n")).strip()


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: segpipe [-v] COMMAND [options]   (segpipe COMMAND --help for a command's options;",
             "       -v: every message of Ray and other libraries on the console, as SEGPIPE_LOG=debug)", ""]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-v"], ["--verbose"]):
        import os

        from segpipe.progress import LOG_ENV

        os.environ[LOG_ENV] = "debug"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"segpipe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    from segpipe.params import ParamsError
    from segpipe.progress import session

    try:
        with session(name, rest) if COMMANDS[name][0].startswith("segpipe.") else contextlib.nullcontext():
            module.main(rest)
    except ParamsError as e:
        print(f"segpipe {name}: params error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"segpipe {name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if not known_error(e):
            raise
        print(error_line(name, e), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
