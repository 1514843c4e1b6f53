"""The logic of a hyperparameter search (``segpipe tune``), without Ray: the search space of
``tune.space.<arch>`` checked against the train section before any trial starts, a trial's
sampled values turned into the ``TrainParams`` that ``segpipe train`` runs, the trial table,
the best trial's ``best.yaml`` fragment, and that fragment merged into a params file.

A space entry names a train key (``lr``) or a key of the architecture's build kwargs
(``model.dice_weight``, i.e. ``train.model.<arch>.dice_weight``); a trial's value of a train key
becomes ``train.overrides.<arch>.<key>``, so the params a trial runs with are those of
``segpipe train --arch <arch>`` with that fragment merged in (the merge test pins this).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import UserError
from segpipe.params import (
    TUNE_METRICS,
    ParamsError,
    TrainParams,
    TuneParams,
    arch_train_params,
    as_dict,
    build,
)

MODEL_PREFIX = "model."


class TuneError(UserError, RuntimeError):
    """A search that cannot start or produced nothing usable; the message says which and why."""


# ----------------------------------------------------------------------------- the space


def space_for(tune: TuneParams, arch: str) -> dict[str, dict[str, Any]]:
    """``tune.space.<arch>``; ParamsError naming the key when the architecture has none."""
    space = tune.space.get(arch)
    if not space:
        raise ParamsError(f"tune.space.{arch}: no search space for {arch} (have: {', '.join(tune.space) or 'none'})")
    return space


def metric_of(metric: str, task: str, arch: str) -> tuple[str, str]:
    """What a trial reports for ``tune.metric`` (the train stage's ``val_score`` or ``train_loss``) and its
    mode (max or min). ``miou`` and ``thing_miou`` are the validation score of a semantic or an instance
    model: naming the other task's is a ParamsError."""
    if metric not in TUNE_METRICS:
        raise ParamsError(f"tune.metric = {metric!r}: must be one of {', '.join(TUNE_METRICS)}")
    wanted = {"miou": "semantic", "thing_miou": "instance"}.get(metric)
    if wanted and wanted != task:
        valid = "miou" if task == "semantic" else "thing_miou"
        raise ParamsError(f"tune.metric = {metric!r}: {arch} is a {task} model; its validation score is {valid} "
                          "(or val_score)")
    return ("train_loss" if metric == "train_loss" else "val_score"), TUNE_METRICS[metric]


def edge_values(spec: Mapping[str, Any]) -> list[Any]:
    """The values that bound a distribution: its low and high end (``randint``'s high is excluded), or
    every choice. A space whose edges give valid params gives valid params throughout (each key's
    checks are ranges)."""
    (name, args), = spec.items()
    if name == "choice":
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]  # what the continuous samplers give: floats, also for integer ends


def check_space(space: Mapping[str, Mapping[str, Any]], arch: str, train: TrainParams,
                model_keys: Iterable[str]) -> None:
    """Refuse a space before any trial starts: every ``model.<key>`` must be a build kwarg of ``arch``
    (``model_keys``), and every edge value of every distribution must make valid train params for
    ``arch`` (type and range, as ``segpipe train`` checks them). ParamsError names
    ``tune.space.<arch>.<key>``, the value and the rule."""
    keys = sorted(model_keys)
    for key, spec in space.items():
        where = f"tune.space.{arch}.{key}"
        if key.startswith(MODEL_PREFIX) and key[len(MODEL_PREFIX):] not in keys:
            raise ParamsError(f"{where}: {key[len(MODEL_PREFIX):]!r} is no build kwarg of {arch}; "
                              f"valid: {', '.join('model.' + k for k in keys)}")
        for value in edge_values(spec):
            try:
                arch_train_params(trial_params(train, arch, {key: value}), arch)  # as segpipe train checks it
            except ParamsError as e:
                raise ParamsError(f"{where} = {dict(spec)}: the value {value!r} is not valid: {e}") from None


def sampler(spec: Mapping[str, Any]) -> Any:
    """The ``ray.tune`` sampler of one space entry (already checked by ``TuneParams``)."""
    from ray import tune

    (name, args), = spec.items()
    if name == "choice":
        return tune.choice(list(args))
    if name == "uniform":
        return tune.uniform(float(args[0]), float(args[1]))
    if name == "loguniform":
        return tune.loguniform(float(args[0]), float(args[1]))
    if name == "quniform":
        return tune.quniform(float(args[0]), float(args[1]), float(args[2]))
    if name == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    raise ParamsError(f"unknown distribution {name!r}")  # TuneParams refuses it first


def param_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {key: sampler(spec) for key, spec in space.items()}


def current_values(space: Mapping[str, Any], arch: str, train: TrainParams,
                   model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The values ``segpipe train --arch arch`` runs now for each key of ``space``: the train section
    with the architecture's overrides, and the build kwargs (``model_defaults``, the config's
    defaults) with ``train.model.<arch>``. With ``tune.include_current`` they are the search's first
    trial, so its best is never a configuration it did not compare with the params as they are."""
    section = arch_train_params(train, arch)
    model = {**model_defaults, **(train.model.get(arch) or {})}
    return {key: plain(model[key[len(MODEL_PREFIX):]] if key.startswith(MODEL_PREFIX) else getattr(section, key))
            for key in space}


# ----------------------------------------------------------------------------- a trial's params


def split_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's values as (train keys, model keys without their ``model.`` prefix)."""
    train = {k: v for k, v in values.items() if not k.startswith(MODEL_PREFIX)}
    model = {k[len(MODEL_PREFIX):]: v for k, v in values.items() if k.startswith(MODEL_PREFIX)}
    return train, model


def plain(value: Any) -> Any:
    """A sampled value as YAML and JSON write it (numpy scalars from Tune's samplers become Python's)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def trial_params(train: TrainParams, arch: str, values: Mapping[str, Any]) -> TrainParams:
    """The train section a trial runs: ``values``' train keys merged into ``train.overrides.<arch>``,
    its ``model.<key>`` values into ``train.model.<arch>``; validated like the file.

    A trial trains in one Ray Train worker actor where the architecture's ``workers`` is 0: Ray
    refuses ``ray.train`` calls in a Tune trial's own process, where local mode would make them.
    One worker actor trains the same model as local mode (tests/stages/test_train.py pins this), so
    the merged ``best.yaml`` reproduces the trial with either."""
    keys, model = split_values({k: plain(v) for k, v in values.items()})
    local = {**as_dict(train), **(train.overrides.get(arch) or {})}.get("workers") == 0
    overrides = {**train.overrides, arch: {**(train.overrides.get(arch) or {}), **keys, **({"workers": 1} if local else {})}}
    models = {**train.model, arch: {**(train.model.get(arch) or {}), **model}}
    data = {**as_dict(train), "overrides": overrides, "model": models}
    return build(TrainParams, data, f"tune trial of {arch}: train")


def best_fragment(arch: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The params fragment of a trial: ``{"train": {"overrides": {arch: ...}, "model": {arch: ...}}}``
    (a part only when it has keys)."""
    keys, model = split_values({k: plain(v) for k, v in values.items()})
    train: dict[str, Any] = {}
    if keys:
        train["overrides"] = {arch: dict(sorted(keys.items()))}
    if model:
        train["model"] = {arch: dict(sorted(model.items()))}
    return {"train": train}


# ----------------------------------------------------------------------------- merging into params.yaml


def merge_mapping(base: Any, fragment: Mapping[str, Any], where: str = "") -> Any:
    """``fragment`` merged into the mapping ``base`` in place, key by key (nested mappings merged,
    other values replaced); returns ``base``. A fragment mapping where ``base`` holds a scalar is a
    ParamsError naming the key."""
    for key, value in fragment.items():
        at = f"{where}.{key}" if where else str(key)
        if isinstance(value, Mapping):
            if key not in base or base[key] is None:
                base[key] = {}
            if not isinstance(base[key], Mapping):
                raise ParamsError(f"{at}: the params file holds {base[key]!r} here, the fragment a mapping")
            merge_mapping(base[key], value, at)
        else:
            base[key] = value
    return base


def merged_params_text(params_text: str, fragment: Mapping[str, Any]) -> str:
    """The params file ``params_text`` with ``fragment`` merged in, its comments, order and layout
    kept (ruamel's round trip): only the fragment's keys change."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    data = yaml.load(params_text) or {}
    merge_mapping(data, fragment)
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def read_fragment(path: Path | str) -> dict[str, Any]:
    """A ``best.yaml`` (or any params fragment): a mapping of sections; ParamsError naming the file."""
    from segpipe.params import read_yaml

    data = read_yaml(Path(path))
    if not data:
        raise ParamsError(f"{path}: the fragment is empty")
    return {k: v for k, v in data.items()}


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search left it: its values, what it reported per epoch, and how it ended:
    ``completed`` (its train run wrote its output), ``stopped`` (ASHA ended it early) or ``error``."""

    trial_id: str
    values: dict[str, Any]
    reports: list[dict[str, Any]]  # per report: epoch, the metric, time_s (seconds since the trial started)
    status: str
    error: str = ""
    out: str = ""  # the trial's train output folder
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, mode: str) -> float:
        """The trial's best reported metric (NaN when it reported none)."""
        finite = [r["metric"] for r in self.reports if isinstance(r.get("metric"), (int, float))
                  and math.isfinite(r["metric"])]
        if not finite:
            return math.nan
        return max(finite) if mode == "max" else min(finite)

    @property
    def last_epoch(self) -> int | None:
        return max((int(r["epoch"]) for r in self.reports), default=None)


def pick_best(records: Sequence[TrialRecord], mode: str) -> TrialRecord | None:
    """The completed trial with the best reported metric (only a completed trial wrote a checkpoint
    and a history); None when no trial completed with a finite metric."""
    done = [r for r in records if r.status == "completed" and not math.isnan(r.best(mode))]
    if not done:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(done, key=lambda r: (sign * r.best(mode), r.trial_id))


def trial_rows(records: Sequence[TrialRecord], keys: Sequence[str], metric: str, mode: str) -> list[dict[str, Any]]:
    """The rows of ``trials.csv``: trial, status, ``stopped_early`` and the epoch it stopped at, its
    values, its best metric, then the metric at each epoch (``<metric>@<epoch>``; empty where the
    trial did not report)."""
    epochs = sorted({int(r["epoch"]) for t in records for r in t.reports})
    rows = []
    for t in sorted(records, key=lambda t: t.trial_id):
        by_epoch = {int(r["epoch"]): r["metric"] for r in t.reports}
        best = t.best(mode)
        row = {"trial_id": t.trial_id, "status": t.status, "stopped_early": t.status == "stopped",
               "stopped_at_epoch": t.last_epoch if t.status == "stopped" else "",
               "epochs_reported": len(t.reports),
               **{k: plain(t.values.get(k, "")) for k in keys},
               f"best_{metric}": "" if math.isnan(best) else round(best, 6),
               **{f"{metric}@{e}": "" if by_epoch.get(e) is None else round(float(by_epoch[e]), 6) for e in epochs},
               "error": t.error}
        rows.append(row)
    return rows


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_trials_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ----------------------------------------------------------------------------- resources


# CPUs a search leaves free for the trials' Ray Data tasks: Ray Data schedules its own tasks outside
# a trial's placement group (its SPREAD strategy escapes Tune's capture), so a search that reserved
# every CPU for its trials would wait forever for its first batch (seen on 2 cores).
DATA_CPUS = 1.0


def trial_bundles(train: TrainParams) -> list[dict[str, float]]:
    """The placement group Tune reserves for a trial's own process, which only builds the trainer and
    waits: Ray Train reserves its worker actors' CPUs (and GPUs) itself."""
    return [{"CPU": 0.1}]


def auto_concurrency(cpus: float, gpus: float, train: TrainParams) -> int:
    """Trials that fit at once on ``cpus`` and ``gpus`` with ``DATA_CPUS`` left to Ray Data: each takes
    its bundle (``trial_bundles``) and, with worker actors, ``workers x cpus_per_worker`` CPUs (and a
    GPU each with ``use_gpu``); at least one."""
    cpu = sum(b.get("CPU", 0.0) for b in trial_bundles(train)) + max(train.workers, 1) * train.cpus_per_worker
    n = math.floor((cpus - DATA_CPUS) / cpu + 1e-9)
    if train.use_gpu:
        n = min(n, math.floor(gpus / max(train.workers, 1) + 1e-9))
    return max(1, n)


def search_fingerprint(tune: TuneParams, space: Mapping[str, Any], train: TrainParams, arch: str,
                       manifest_sha256: str) -> str:
    """Identifies a search's inputs: a rerun with the same ones resumes the search, other ones start anew."""
    blob = json.dumps({"arch": arch, "space": space, "train": as_dict(train), "data": manifest_sha256,
                       "trials": tune.trials, "metric": tune.metric, "seed": tune.seed,
                       "grace": tune.grace_epochs, "rf": tune.reduction_factor,
                       "current": tune.include_current}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
