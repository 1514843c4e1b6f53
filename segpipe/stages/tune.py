"""``segpipe tune``: a Ray Tune search over one architecture's train params, each trial the train stage.

Every trial is ``segpipe train``'s own run (``segpipe.stages.train.run``: the same training
function in Ray Train worker actors, at least one, and the same checkpoints), with the trial's values
of ``tune.space.<arch>`` merged into ``train.overrides.<arch>`` / ``train.model.<arch>``
(``segpipe.tune``). Ray Train V2's pattern: a Tune function per trial builds and fits a
``TorchTrainer``, whose per-epoch reports reach Tune (``fit``'s ``tune_trial``), and ASHA stops
the trials that fall behind on the validation metric. A trial whose worker dies is retried from
its last checkpoint (``train.max_failures``: Tune reruns the trial, and the train run resumes from
the checkpoints it kept). A killed search, run again with the same ``--out`` and inputs, resumes
(Tune's ``Tuner.restore``); other inputs start a new search beside it.

Output directory ``OUT`` (a local folder)::

    OUT/trials.csv     one row per trial: status, stopped early and at which epoch, its values, the
                       metric at each epoch it reported
    OUT/best.yaml      the best trial's values as a train.overrides.<arch> / train.model.<arch>
                       fragment (`segpipe params --merge OUT/best.yaml` writes it into params.yaml)
    OUT/checkpoint/    the best trial's checkpoint, as `segpipe train` writes it (evaluate, promote)
    OUT/history.tsv    the best trial's learning curve
    OUT/search.png     the metric of every trial against the search's seconds
    OUT/metrics.json   the search: best trial and value, trials completed / stopped / failed, wall time
    OUT/.searches/<fingerprint>/   Tune's experiment (what a rerun restores) and each trial's train run
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from segpipe.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, check_local
from segpipe.params import (
    ParamsError,
    TrainParams,
    TuneParams,
    add_params_arguments,
    as_dict,
    build,
    from_args,
)
from segpipe.results import read_history
from segpipe.stages import train as train_stage
from segpipe.tune import (
    TrialRecord,
    TuneError,
    auto_concurrency,
    best_fragment,
    check_space,
    csv_text,
    current_values,
    metric_of,
    param_space,
    pick_best,
    plain,
    search_fingerprint,
    space_for,
    trial_bundles,
    trial_params,
    trial_rows,
)

SEARCHES = ".searches"  # OUT/.searches/<fingerprint>: Tune's experiment and the trials' train runs


def trial(config: dict[str, Any], train: TrainParams, arch: str, shards: str, runs: str) -> None:
    """One trial, in its own Tune process: the train stage's run with the trial's values, its
    output in ``runs/<trial id>/out`` (complete only when the trial was not stopped early)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    out = Path(runs) / trial_id / "out"
    if (out / "metrics.json").is_file():
        # It completed before the search was killed (Tune saves its state only now and then): its
        # result stands, and Tune gets its reports again instead of a second training.
        for row in read_history(out / "history.tsv"):
            ray.tune.report({**row, "val_score": train_stage.checkpoint_score(row)})
        return
    p = trial_params(train, arch, config)
    train_stage.run(p, arch, shards, str(out), tune_trial=True)


def records_of(grid: Any, runs: Path, metric: str, started: float) -> list[TrialRecord]:
    """What each trial of a finished (or ended) search reported, and how it ended."""
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        rows = frame.to_dict("records") if frame is not None else []
        trial_id = str((result.metrics or {}).get("trial_id") or (rows[-1].get("trial_id") if rows else "")
                       or Path(result.path).name)
        reports = [{"epoch": int(r["epoch"]), "metric": _number(r.get(metric)),
                    "time_s": _number(r.get("timestamp")) - started}
                   for r in rows if _number(r.get("epoch")) is not None]
        out = runs / trial_id / "out"
        if (out / "metrics.json").is_file():
            status = "completed"
        elif result.error is not None:
            status = "error"
        else:
            status = "stopped" if reports else "not_run"
        error = train_stage.root_cause(result.error) if result.error is not None else ""
        records.append(TrialRecord(trial_id, {k: plain(v) for k, v in (result.config or {}).items()}, reports,
                                   status, error, str(out)))
    return records


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run(tune: TuneParams, train: TrainParams, arch: str, shards: Path | str, out: Path | str,
        ray_address: str | None = None) -> dict[str, Any]:
    """Search ``tune.space.<arch>`` on ``shards``; write ``out`` (see the module's docstring).
    The space is checked against the train params before Ray starts. TuneError when no trial
    completed (``trials.csv`` is still written, naming each trial's end)."""
    from segpipe.cluster import connect, serves_state_api
    from segpipe.models import MODELS, default_kwargs, spec_of
    from segpipe.shards import open_shards
    from segpipe.storage import resolve

    started_at = time.time()
    if arch not in MODELS:
        raise ParamsError(f"--arch {arch!r}: unknown architecture; valid: {', '.join(MODELS)}")
    out = check_local(out).resolve()
    space = space_for(tune, arch)
    metric, mode = metric_of(tune.metric, spec_of(arch).task, arch)
    check_space(space, arch, train, default_kwargs(arch))  # before any trial starts
    current = current_values(space, arch, train, default_kwargs(arch))
    p = train_stage.params_for(trial_params(train, arch, {}), arch)
    if tune.metric != "train_loss" and not p.val_every:
        raise ParamsError(f"train.overrides.{arch}.val_every = 0: trials would report no validation score for "
                          f"tune.metric {tune.metric!r}; set val_every >= 1 (or search on train_loss)")
    shard_set = open_shards(resolve(str(shards), "--shards"))
    fingerprint = search_fingerprint(tune, space, train, arch, shard_set.manifest_sha256)
    searches = out / SEARCHES
    experiment, runs = searches / fingerprint, searches / fingerprint / "runs"
    shards_uri = str(Path(shards).resolve()) if "://" not in str(shards) else str(shards)

    with connect(ray_address, dashboard=True):  # the state API frees the workers of a trial stopped early
        import ray
        from ray import tune as ray_tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.basic_variant import BasicVariantGenerator

        if not serves_state_api():
            print(f"[{arch}] warning: this Ray serves no state API (it runs without its dashboard): Ray Train "
                  "cannot free the workers of a trial stopped early, and later trials may wait for their CPUs; "
                  "start the cluster with its dashboard (ray start --head --include-dashboard=true)",
                  file=sys.stderr, flush=True)

        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(trial, train=train, arch=arch, shards=shards_uri, runs=str(runs)),
            ray_tune.PlacementGroupFactory(trial_bundles(p)))
        resumed = ray_tune.Tuner.can_restore(str(experiment))
        if resumed:
            print(f"[{arch}] resuming the search in {experiment}", flush=True)
            tuner = ray_tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            resources = ray.cluster_resources()
            concurrency = tune.concurrency or auto_concurrency(resources.get("CPU", 1.0), resources.get("GPU", 0.0), p)
            print(f"[{arch}] searching {len(space)} params ({', '.join(space)}) over {tune.trials} trials, "
                  f"{concurrency} at once; ASHA on {metric} ({mode}) per epoch"
                  + (f"; the first runs the current params {current}" if tune.include_current else ""), flush=True)
            tuner = ray_tune.Tuner(
                trainable,
                param_space=param_space(space),
                tune_config=ray_tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=tune.trials,
                    # max_t above the last epoch: ASHA stops a trial that reaches max_t, and one stopped
                    # at its last report would not write its output
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=max(p.epochs, tune.grace_epochs) + 1,
                                            grace_period=tune.grace_epochs, reduction_factor=tune.reduction_factor),
                    # the limit goes to the generator: Tune ignores max_concurrent_trials beside a
                    # search_alg of this kind (it logs a warning), and every trial would start at once
                    search_alg=BasicVariantGenerator(
                        random_state=tune.seed, max_concurrent=concurrency,
                        points_to_evaluate=[current] if tune.include_current else None),
                    time_budget_s=tune.budget_s or None),
                run_config=ray_tune.RunConfig(
                    name=fingerprint, storage_path=str(searches),
                    failure_config=ray_tune.FailureConfig(max_failures=p.max_failures), verbose=0),
            )
        grid = tuner.fit()
    records = records_of(grid, runs, metric, started_at)
    return write_outputs(out, arch, tune, space, records, metric, mode, fingerprint, resumed, started_at)


def write_outputs(out: Path, arch: str, tune: TuneParams, space: dict[str, Any], records: list[TrialRecord],
                  metric: str, mode: str, fingerprint: str, resumed: bool, started_at: float) -> dict[str, Any]:
    """trials.csv and the figure always; the best trial's checkpoint, history, best.yaml and
    metrics.json (written last) when a trial completed, else TuneError."""
    from segpipe.figures import search_curves

    label = tune.metric if tune.metric != "val_score" else metric
    atomic_write_text(out / "trials.csv", csv_text(trial_rows(records, list(space), label, mode)))
    best = pick_best(records, mode)
    stopped = [r.trial_id for r in records if r.status == "stopped"]
    curves = {r.trial_id: [(x["time_s"], x["metric"]) for x in r.reports] for r in records}
    atomic_write_bytes(out / "search.png", search_curves(curves, stopped, best.trial_id if best else None, label))
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "error", "not_run")}
    if best is None:
        errors = [f"{r.trial_id}: {r.error}" for r in records if r.error]
        raise TuneError(f"[{arch}] no trial of the search completed ({counts}); nothing to keep. "
                        + (f"First error: {errors[0]}. " if errors else "")
                        + f"See {out / 'trials.csv'} and the log.")
    best_out = Path(best.out)
    with atomic_dir(out / "checkpoint") as tmp:
        shutil.copytree(best_out / "checkpoint", tmp, dirs_exist_ok=True)
    shutil.copyfile(best_out / "history.tsv", out / ".history.tsv.tmp")
    os.replace(out / ".history.tsv.tmp", out / "history.tsv")
    value = round(best.best(mode), 6)
    header = (f"# segpipe tune --arch {arch}: best of {len(records)} trials, trial {best.trial_id}, best "
              f"{label} {value}\n# merge into params.yaml: segpipe params --merge {out / 'best.yaml'}\n")
    import yaml

    fragment = best_fragment(arch, best.values)
    atomic_write_text(out / "best.yaml", header + yaml.safe_dump(fragment, sort_keys=False))
    summary = {"arch": arch, "metric": label, "mode": mode, "best_trial": best.trial_id, "best_value": value,
               "best_params": {k: plain(v) for k, v in best.values.items()}, "trials": len(records),
               "completed": counts["completed"], "stopped_early": counts["stopped"], "errors": counts["error"],
               "not_run": counts["not_run"], "search": fingerprint, "resumed": resumed,
               "wall_s": round(time.time() - started_at, 1)}
    atomic_write_json(out / "metrics.json", summary)
    print(f"[{arch}] best trial {best.trial_id}: {label} {value} with {summary['best_params']}; "
          f"{counts['completed']} completed, {counts['stopped']} stopped early of {len(records)}; wrote {out}")
    return summary


def main(argv: list[str] | None = None) -> None:
    from segpipe.lifetime import die_with_parent, terminate_as_interrupt

    die_with_parent(os.getppid(), signal.SIGTERM)
    terminate_as_interrupt()
    ap = argparse.ArgumentParser(prog="segpipe tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="architecture name (see segpipe.models.MODELS)")
    ap.add_argument("--shards", required=True, help="shard folder or URI (segpipe convert --out)")
    ap.add_argument("--out", required=True, help="output folder (local); a rerun with the same one resumes")
    ap.add_argument("--trials", type=int, default=None, help="configurations to sample (default: tune.trials)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds of the whole search "
                    "(default: tune.budget_s; 0 = every trial runs)")
    ap.add_argument("--metric", default=None, help="val_score | miou | thing_miou | train_loss (default: tune.metric)")
    ap.add_argument("--concurrency", type=int, default=None, help="trials at once (default: tune.concurrency; "
                    "0 = as many as the cluster fits)")
    ap.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS, else local)")
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    tune = from_args(args, "tune")
    flags = {k: v for k, v in {"trials": args.trials, "budget_s": args.budget_s, "metric": args.metric,
                               "concurrency": args.concurrency}.items() if v is not None}
    if flags:
        tune = build(TuneParams, {**as_dict(tune), **flags}, "tune (with command-line flags)")
    train = from_args(args, "train")
    run(tune, train, args.arch, args.shards, args.out, args.ray_address)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
