"""Evaluation results and checkpoint references: the typed contracts that cross stages.

``segpipe evaluate`` (a model), ``segpipe fuse`` (a fused semantic + instance pair) and
``segpipe baselines`` (the reference predictors) each write a ``metrics.json``; promote, report,
the registry and the Prefect flows read them. They all go through this module:

- :class:`CheckpointRef` is "a checkpoint folder, by path and the sha256 of its weights": written
  by evaluate and fuse, resolved (an absolute path, or one relative to the result's folder) and
  verified (it exists, it is a checkpoint, its weights still hash to what was scored) in one place.
- :class:`EvalResult` is one parsed ``metrics.json``: its kind (``model``, ``fused``,
  ``baseline``), task, the shard manifest and split it was computed on, the checkpoint(s) it
  scored, and the metric values (:meth:`EvalResult.metric`, dotted keys such as ``segm.AP``).
  Two results are comparable only when :meth:`EvalResult.same_data` holds.
- :func:`read_results` reads a folder of results (``models/eval/*/metrics.json``) with one error
  policy: a result that cannot be read never stops the others; it comes back as a problem that
  names its file, for the caller to report.

A result is validated when it is read; a :class:`ResultError` names the file and the key at fault.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import UserError

METRICS = "metrics.json"
KINDS = ("model", "fused", "baseline")
TASKS = ("semantic", "instance", "panoptic")
FUSED_ARCH = "fused"
FUSED_MEMBERS = ("semantic", "instance")


class ResultError(UserError, ValueError):
    """An evaluation result, or a checkpoint it names, is missing, malformed or has changed."""


def metric_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics["segm"]["AP"]`` for ``"segm.AP"``; None when missing, not a number, or NaN/inf."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------------------
# A checkpoint by path and sha256
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint folder and the sha256 of its weights, as a result recorded them."""

    path: str
    sha256: str

    @classmethod
    def of(cls, directory: Path | str) -> CheckpointRef:
        """The reference of the checkpoint at ``directory`` (its weights hashed now)."""
        from segpipe.checkpoint import weights_sha256

        return cls(str(directory), weights_sha256(directory))

    @classmethod
    def from_json(cls, data: Any, where: str) -> CheckpointRef:
        if not isinstance(data, Mapping) or not isinstance(data.get("path"), str) \
                or not isinstance(data.get("sha256"), str):
            raise ResultError(f"{where}: expected {{\"path\": str, \"sha256\": str}}, got {data!r:.120}")
        return cls(data["path"], data["sha256"])

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    def resolve(self, base: Path | str | None = None) -> Path:
        """The checkpoint folder: ``path`` as written, or relative to ``base`` (the result's folder);
        ResultError when neither is a checkpoint."""
        from segpipe.checkpoint import META, WEIGHTS, is_checkpoint

        path = Path(self.path)
        if is_checkpoint(path):
            return path
        if base is not None and not path.is_absolute() and is_checkpoint(Path(base) / path):
            return Path(base) / path
        raise ResultError(f"checkpoint {self.path!r} is not a checkpoint directory (needs {WEIGHTS} and {META})")

    def verify(self, base: Path | str | None = None) -> Path:
        """:meth:`resolve`, then check that the weights still hash to ``sha256``; the folder."""
        from segpipe.checkpoint import WEIGHTS, weights_sha256

        path = self.resolve(base)
        found = weights_sha256(path)
        if found != self.sha256:
            raise ResultError(f"{path / WEIGHTS}: sha256 {found} differs from the evaluated {self.sha256} "
                              "(changed since evaluation; evaluate it again)")
        return path


def bundle_sha256(members: Mapping[str, str], fusion: Mapping[str, Any]) -> str:
    """The identity of a fused pair: sha256 of its members' weights sha256 and the fusion params."""
    import hashlib

    blob = json.dumps({"members": dict(members), "fusion": dict(fusion)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def fused_pair(parts: Mapping[str, Any]) -> str:
    """``SEMANTIC + INSTANCE``: the architectures of a fused pair's members (a fused result's
    ``checkpoints``, a registry entry's ``bundle``; ``?`` for a member not named)."""
    return " + ".join(str((parts.get(k) or {}).get("arch", "?")) for k in FUSED_MEMBERS)


def read_history(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a train run's ``history.tsv`` (``segpipe.stages.train.history_tsv``): ``epoch`` and
    ``steps`` as ints, the other columns as floats, an empty or non-finite cell as None."""
    import csv
    import io

    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ResultError(f"{path}: not a readable history: {e}") from None

    def number(key: str, text: str | None) -> float | int | None:
        try:
            v = float(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if not math.isfinite(v):
            return None
        return int(v) if key in ("epoch", "steps") else v

    return [{k: number(k, v) for k, v in r.items() if k} for r in rows]


# --------------------------------------------------------------------------------------
# One metrics.json
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """One ``metrics.json`` of evaluate, fuse or baselines, checked.

    ``data`` is the whole JSON object (metric values are read from it by :meth:`metric`);
    ``where`` the file it was read from (or a description), for messages. ``checkpoint`` is the
    scored checkpoint of a model; ``members`` the two checkpoints of a fused pair (``semantic``,
    ``instance``) and ``fusion`` its fusion params; a fused result without a pair has ``skipped``.
    """

    data: dict[str, Any]
    where: str
    kind: str
    checkpoint: CheckpointRef | None = None
    members: dict[str, CheckpointRef] = field(default_factory=dict)
    fusion: dict[str, Any] | None = None
    skipped: str | None = None

    @property
    def arch(self) -> str:
        return str(self.data["arch"])

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def split(self) -> str:
        return str(self.data["split"])

    @property
    def manifest(self) -> str:
        """The sha256 of the shard manifest the result was computed on."""
        return str(self.data["shards_manifest_sha256"])

    @property
    def name(self) -> str:
        """The baseline's name, else the folder the result lies in."""
        return str(self.data.get("baseline") or Path(self.where).parent.name)

    @property
    def folder(self) -> Path:
        return Path(self.where).parent

    def metric(self, key: str) -> float | None:
        """The value at a dotted key (``miou``, ``segm.AP``, ``panoptic.pq``); None when undefined."""
        return metric_value(self.data, key)

    def same_data(self, other: EvalResult | Mapping[str, Any]) -> bool:
        """Computed on the same shard manifest and split as ``other`` (a result, or a registry
        entry's scores with ``shards_manifest_sha256`` and ``split``)."""
        theirs = other.data if isinstance(other, EvalResult) else other
        return (self.manifest, self.split) == (theirs.get("shards_manifest_sha256"), theirs.get("split"))

    def identity(self) -> str:
        """What the registry knows this model by: a model's weights sha256, a fused pair's bundle sha256."""
        if self.kind == "fused":
            return bundle_sha256({k: r.sha256 for k, r in self.members.items()}, self.fusion or {})
        if self.checkpoint is None:
            raise ResultError(f"{self.where}: a {self.kind} result names no checkpoint")
        return self.checkpoint.sha256

    def verify(self) -> dict[str, Path]:
        """Every checkpoint the result scored, resolved and checked against its sha256:
        ``{"model": DIR}`` or ``{"semantic": DIR, "instance": DIR}``; ResultError naming the file."""
        try:
            if self.kind == "fused":
                return {k: ref.verify(self.folder) for k, ref in self.members.items()}
            if self.checkpoint is None:
                raise ResultError(f"a {self.kind} result names no checkpoint")
            return {"model": self.checkpoint.verify(self.folder)}
        except ResultError as e:
            raise ResultError(f"{self.where}: {e}") from None

    @classmethod
    def from_json(cls, data: Any, where: str) -> EvalResult:
        """Check a parsed metrics.json; ResultError naming ``where`` and the key at fault."""
        if not isinstance(data, dict):
            raise ResultError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "baseline" in data:
            kind = "baseline"
        elif data.get("task") == "panoptic" and data.get("arch") == FUSED_ARCH:
            kind = "fused"
        else:
            kind = "model"
        required = ["arch", "task", "shards_manifest_sha256", "split"]
        if kind == "model":
            required += ["checkpoint", "per_class"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ResultError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        if data["task"] not in TASKS:
            raise ResultError(f"{where}: key 'task' is {data['task']!r}; valid: {', '.join(TASKS)}")
        for key in ("arch", "shards_manifest_sha256", "split"):
            if not isinstance(data[key], str):
                raise ResultError(f"{where}: key {key!r} must be a string, got {data[key]!r:.80}")
        if kind == "model":
            return cls(data, where, kind, checkpoint=CheckpointRef.from_json(data["checkpoint"], f"{where}: key 'checkpoint'"))
        if kind == "baseline":
            return cls(data, where, kind)
        if "skipped" in data:
            return cls(data, where, kind, fusion=data.get("fusion"), skipped=str(data["skipped"]))
        for key in ("checkpoints", "fusion", "panoptic"):
            if not isinstance(data.get(key), dict):
                raise ResultError(f"{where}: a fused result needs the object {key!r}")
        members = {k: CheckpointRef.from_json(data["checkpoints"].get(k), f"{where}: key 'checkpoints.{k}'")
                   for k in FUSED_MEMBERS}
        return cls(data, where, kind, members=members, fusion=data["fusion"])

    @classmethod
    def read(cls, path: Path | str) -> EvalResult:
        """The result in ``path`` (a metrics.json, or the folder holding one)."""
        path = Path(path)
        if path.is_dir() or path.name != METRICS:
            path = path / METRICS
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ResultError(f"{path}: not found (is {path.parent} an output of segpipe evaluate?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultError(f"{path}: not a readable metrics file: {e}") from None
        return cls.from_json(data, str(path))


@dataclass(frozen=True)
class Results:
    """A folder of results: ``ok`` by folder name, ``problems`` (folder name -> why unreadable)."""

    ok: dict[str, EvalResult]
    problems: dict[str, str]

    def of_kind(self, *kinds: str) -> dict[str, EvalResult]:
        return {k: r for k, r in self.ok.items() if r.kind in kinds}


def read_results(folder: Path | str | None, skip: Path | str | None = None) -> Results:
    """Every ``folder/<name>/metrics.json`` (``skip``: a folder to leave out, e.g. the caller's own
    output). One policy for all callers: an unreadable result is returned in ``problems`` with
    its reason, and the others are read; a folder that does not exist holds no results."""
    ok: dict[str, EvalResult] = {}
    problems: dict[str, str] = {}
    if folder is None or not Path(folder).is_dir():
        return Results(ok, problems)
    skipped = Path(skip).resolve() if skip is not None else None
    for f in sorted(Path(folder).glob(f"*/{METRICS}")):
        if skipped is not None and f.parent.resolve() == skipped:
            continue
        try:
            ok[f.parent.name] = EvalResult.read(f)
        except ResultError as e:
            problems[f.parent.name] = str(e)
    return Results(ok, problems)


def _fmt4(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def champion_line(champion: dict[str, Any] | None, metric: str) -> str:
    """How the champion was judged: its registered figure, the figure on this data, which one the gates used."""
    if champion is None:
        return "no champion yet"
    if champion["how"] == "registered":
        return (f"{champion['version']} ({champion['arch']}): {metric} {_fmt4(champion['on_this_data'])} as registered, "
                "on this same data; the gates used it")
    return (f"{champion['version']} ({champion['arch']}): {metric} {_fmt4(champion['registered'])} as registered "
            f"(shard manifest {str(champion['registered_manifest'])[:12]}...), re-scored {_fmt4(champion['on_this_data'])} "
            "on the current shards; the gates used the re-scored figure")


__all__ = ["CheckpointRef", "EvalResult", "FUSED_ARCH", "FUSED_MEMBERS", "KINDS", "METRICS", "ResultError",
           "Results", "TASKS", "bundle_sha256", "champion_line", "fused_pair", "metric_value", "read_history",
           "read_results"]
