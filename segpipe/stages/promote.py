"""``segpipe promote``: choose a champion among evaluated candidates by rules read from params.

    segpipe promote --candidates models/eval/* models/fused --shards data/shards --baselines models/baselines
                    --registry models/registry --report reports/promotion

Every candidate is an evaluation result (``segpipe.results.EvalResult``: the output folder of
``segpipe evaluate`` or ``segpipe fuse``). Numbers are compared only when they were computed on the
same data: the current shards (``--shards``: their manifest sha256), the split and the scoring
settings of ``evaluate``. So the champion is judged on the candidates' data too: when its
registered scores were computed on another shard manifest (a new drop was ingested since), it is
**re-scored** on the current shards with the same scoring code (``segpipe.scoring``) before any
gate runs, and the score is kept in the registry, per data version, so it is computed once per
manifest, not once per run. A champion that cannot be re-scored (its files are missing or fail
their checksum) stops the promotion with an error naming the version: nothing is promoted.

One metric ranks everything in a run: the task's primary metric (``semantic_metric`` /
``instance_metric``) when every candidate and the champion share a task, else ``mixed_metric``
(``miou_things``: defined the same way for both tasks).

Gates, in order; a candidate must pass all of them to be promoted (the first three are
preconditions; after them every gate is judged, so the report gives each reason):

1. ``readable``: the result is valid, its checkpoint(s) exist and match the sha256 it recorded;
2. ``current_data``: it was computed on the current shards, split and scoring settings (a result
   left over from an older run is refused, with the manifests named);
3. ``metric``: the ranking metric is a finite number (NaN or missing never promotes);
4. ``min_value``: the metric is at least ``min_value``;
5. ``beats_baseline``: the metric beats the best reference predictor scored on the same data by
   more than ``baseline_margin`` (passes when no baselines are given or none defines the metric);
6. ``margin``: beats the champion's score on the same data by at least ``margin`` (and strictly);
7. ``protected_classes``: no protected class's IoU drops more than ``protected_tolerance`` below
   the champion's on the same data;
8. ``protected_collections``: on no protected source collection (``protected_collections``: a
   list, or ``all``) does the ranking metric drop more than ``protected_collection_tolerance``
   below the champion's on the same data.

The best candidate passing all gates becomes champion; the best one that passed gates 1-5 but was
not promoted becomes challenger. The registry update happens in one locked transaction.

Panoptic candidates (a model whose result has ``panoptic`` metrics, i.e. MaskFormer, and the fused
pair of ``segpipe fuse``) are ranked again, apart, on ``panoptic.<panoptic_metric>`` (PQ) with
the same gates except protected classes (an IoU rule), and move the ``panoptic-champion`` /
``panoptic-challenger`` aliases. A fused pair is registered as one bundle version.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.errors import UserError
from segpipe.files import atomic_write_json, atomic_write_text
from segpipe.params import EvaluateParams, PromoteParams, add_params_arguments, as_dict, from_args
from segpipe.registry import (
    DEFAULT_REGISTRY,
    add_bundle_version,
    add_score,
    add_version,
    alias_entry,
    find_version,
    point_alias,
    read_index,
    score_on,
    transaction,
    write_gto_tags,
)
from segpipe.results import EvalResult, ResultError, champion_line, fused_pair, metric_value, read_results

GATES = ("readable", "current_data", "metric", "min_value", "beats_baseline", "margin", "protected_classes",
         "protected_collections")
CHALLENGER_GATES = GATES[:5]
RANKINGS = {"model": ("champion", "challenger"), "panoptic": ("panoptic-champion", "panoptic-challenger")}


class PromoteError(UserError, RuntimeError):
    """Promotion cannot judge fairly (e.g. the champion cannot be re-scored); nothing was promoted."""


@dataclass(frozen=True)
class Data:
    """What every compared number must have been computed on: a shard manifest, a split, and the
    scoring settings (``EvaluateParams.scoring_key``)."""

    manifest: str
    split: str
    scoring: str

    def of(self, metrics: dict[str, Any]) -> bool:
        return (metrics.get("shards_manifest_sha256"), metrics.get("split"), metrics.get("scoring")) == \
            (self.manifest, self.split, self.scoring)

    def __str__(self) -> str:
        return f"shard manifest {self.manifest[:12]}..., split {self.split!r}, scoring {self.scoring}"

    @staticmethod
    def describe(metrics: dict[str, Any]) -> str:
        manifest = str(metrics.get("shards_manifest_sha256"))[:12]
        return f"shard manifest {manifest}..., split {metrics.get('split')!r}, scoring {metrics.get('scoring')}"


@dataclass
class Candidate:
    """One candidate: its result, or why it cannot be judged (``error``)."""

    eval_dir: Path
    result: EvalResult | None = None
    error: str | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.data if self.result is not None else {}

    @property
    def task(self) -> str | None:
        return self.result.task if self.result is not None else None

    @property
    def arch(self) -> str | None:
        return self.result.arch if self.result is not None else None

    @property
    def sha256(self) -> str | None:
        return self.result.identity() if self.result is not None and self.error is None else None


@dataclass
class Champion:
    """The reigning champion of a ranking: its registry entry, its score on the candidates' data
    (``scored``: as registered, or re-scored now) and how that score came to be."""

    entry: dict[str, Any]
    scored: dict[str, Any]
    how: str  # "registered" (its own score on this data) or "re-scored"

    @property
    def version(self) -> str:
        return str(self.entry["version"])

    @property
    def registered(self) -> dict[str, Any]:
        return self.entry.get("metrics") or {}


# --------------------------------------------------------------------------------------
# Pure rules
# --------------------------------------------------------------------------------------


def primary_metric(params: PromoteParams, task: str | None) -> str:
    return params.instance_metric if task == "instance" else params.semantic_metric


def ranking_metric(params: PromoteParams, tasks: list[str | None]) -> str:
    """The one metric a run ranks on: the shared task's primary metric, else ``mixed_metric``."""
    distinct = set(tasks)
    if len(distinct) == 1:
        return primary_metric(params, distinct.pop())
    return params.mixed_metric


def _class_iou(metrics: dict[str, Any], name: str) -> tuple[bool, float]:
    """(present, iou) of one class; iou is NaN when the class was absent from the split."""
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not isinstance(per_class.get(name), dict):
        return False, math.nan
    iou = per_class[name].get("iou")
    if iou is None:  # evaluate writes null for a class absent from the split
        return True, math.nan
    if isinstance(iou, bool) or not isinstance(iou, (int, float)):
        return False, math.nan
    return True, float(iou)


def check_protected(
    candidate: dict[str, Any], champion: dict[str, Any], classes: list[str], tolerance: float
) -> list[str]:
    """Reasons a candidate fails the protected-class gate; empty when it passes."""
    failures = []
    for name in classes:
        has_c, c = _class_iou(candidate, name)
        has_h, h = _class_iou(champion, name)
        if not has_c:
            failures.append(f"protected class {name!r} missing from the candidate's per_class")
        elif not has_h:
            failures.append(f"protected class {name!r} missing from the champion's per_class")
        elif math.isnan(h) and math.isnan(c):
            continue  # absent from the (shared) split for both
        elif math.isnan(c):
            failures.append(f"protected class {name!r}: IoU is NaN (champion {h:.4f})")
        elif not math.isnan(h) and c < h - tolerance:
            failures.append(f"protected class {name!r}: IoU {c:.4f} < champion {h:.4f} - tolerance {tolerance}")
    return failures


def protected_collection_names(params: PromoteParams, candidate: dict[str, Any], champion: dict[str, Any]) -> list[str]:
    """The collections the gate checks: ``protected_collections``, or with ``all`` every collection
    of the champion's score on this data (those it can be compared on)."""
    if params.protected_collections == "all":
        return sorted(set(champion.get("per_collection") or {}) | set(candidate.get("per_collection") or {}))
    return list(params.protected_collections)


def check_collections(candidate: dict[str, Any], champion: dict[str, Any], names: list[str], metric: str,
                      tolerance: float) -> list[str]:
    """Reasons a candidate fails the protected-collection gate: on each collection in ``names``,
    ``metric`` may not drop more than ``tolerance`` below the champion's (same data)."""
    failures = []
    mine, theirs = candidate.get("per_collection") or {}, champion.get("per_collection") or {}
    for name in names:
        if name not in theirs and name not in mine:
            failures.append(f"protected collection {name!r} is not in the split")
            continue
        c = metric_value(mine.get(name, {}), metric)
        h = metric_value(theirs.get(name, {}), metric)
        if h is None:
            continue  # nothing of the champion's to hold on this collection (e.g. no image of a class)
        if c is None:
            failures.append(f"protected collection {name!r}: {metric} undefined (champion {h:.4f})")
        elif c < h - tolerance:
            failures.append(f"protected collection {name!r}: {metric} {c:.4f} < champion {h:.4f} - tolerance {tolerance}")
    return failures


def check_baselines(candidate: dict[str, Any], value: float, metric: str, baselines: list[EvalResult],
                    margin: float) -> tuple[bool, str]:
    """(passed, detail) of the ``beats_baseline`` gate: ``value`` must exceed the best baseline
    scored on the candidate's shards and split by more than ``margin``."""
    if not baselines:
        return True, "no baselines given"
    same = [b for b in baselines if (b.manifest, b.split) == (candidate.get("shards_manifest_sha256"),
                                                              candidate.get("split"))]
    if not same:
        return False, "no baseline was scored on the candidate's shards and split: not comparable"
    scored = [(b.name, v) for b in same if (v := b.metric(metric)) is not None]
    if not scored:
        return True, f"no baseline defines {metric}: not applicable"
    name, best = max(scored, key=lambda nv: nv[1])
    return value > best + margin, f"{metric} {value:.4f} vs best baseline {name} {best:.4f} + baseline_margin {margin}"


def judge(candidate: Candidate, champion: Champion | None, params: PromoteParams, metric: str, data: Data,
          baselines: list[EvalResult] = ()) -> list[dict[str, Any]]:
    """Every gate's outcome for one candidate: ``[{"gate", "passed", "detail"}]``. ``champion``'s
    ``scored`` metrics were computed on ``data``, like the candidate's.

    The first three gates are preconditions (without a readable result on the current data and a
    finite metric there is nothing to judge): the list stops at the first of them that fails. The
    others are judged independently, every one, so the report shows each reason a candidate falls
    short (a candidate may be both no better overall and worse on an old site)."""
    gates: list[dict[str, Any]] = []

    def gate(name: str, passed: bool, detail: str) -> bool:
        gates.append({"gate": name, "passed": passed, "detail": detail})
        return passed

    if not gate("readable", candidate.error is None, candidate.error or f"{candidate.result.where}"):
        return gates
    m = candidate.metrics
    if not gate("current_data", data.of(m), f"computed on the current data ({data})" if data.of(m) else
                f"computed on {data.describe(m)}, but the current data is {data}: not comparable (a result left "
                "over from an older run, or scored with other evaluate settings; evaluate it again)"):
        return gates
    value = metric_value(m, metric)
    if not gate("metric", value is not None, f"{metric} = {value}" if value is not None else f"{metric} is missing or NaN"):
        return gates
    gate("min_value", value >= params.min_value, f"{metric} {value:.4f} vs min_value {params.min_value}")
    gate("beats_baseline", *check_baselines(m, value, metric, list(baselines), params.baseline_margin))
    if champion is None:
        for name in GATES[5:]:
            gate(name, True, "no champion yet")
        return gates
    best = metric_value(champion.scored, metric)
    if candidate.sha256 == champion.entry["checkpoint_sha256"]:
        gate("margin", False, f"this checkpoint is the champion ({champion.version})")
    elif best is None:
        gate("margin", False, f"the champion {champion.version} has no finite {metric} on this data to compare with")
    else:
        gate("margin", value > best and value - best >= params.margin,
             f"{metric} {value:.4f} vs champion {champion.version} {best:.4f} ({champion.how} on this data) "
             f"+ margin {params.margin}")
    failures = check_protected(m, champion.scored, params.protected_classes, params.protected_tolerance)
    gate("protected_classes", not failures,
         "; ".join(failures) or f"{len(params.protected_classes)} protected class(es) held")
    names = protected_collection_names(params, m, champion.scored)
    failures = check_collections(m, champion.scored, names, metric, params.protected_collection_tolerance)
    gate("protected_collections", not failures,
         "; ".join(failures) or f"{metric} held on {len(names)} protected collection(s): {', '.join(names) or 'none'}")
    return gates


def passed(gates: list[dict[str, Any]], names: tuple[str, ...]) -> bool:
    outcome = {g["gate"]: g["passed"] for g in gates}
    return all(outcome.get(n, False) for n in names)


def is_panoptic(c: Candidate) -> bool:
    """Ranked among the panoptic candidates: a fused pair, or a model whose result has panoptic metrics."""
    return c.task == "panoptic" or isinstance(c.metrics.get("panoptic"), dict)


def panoptic_key(params: PromoteParams) -> str:
    """The metrics.json key the panoptic ranking reads (``panoptic.pq`` for ``panoptic_metric: pq``)."""
    return f"panoptic.{params.panoptic_metric}"


def decide(candidates: list[Candidate], champion: Champion | None, params: PromoteParams, data: Data,
           baselines: list[EvalResult] = (), metric: str | None = None) -> dict[str, Any]:
    """The decision for every candidate, pure: no file is read or written. ``metric``: the one
    to rank on (default: :func:`ranking_metric` of the candidates' and the champion's tasks).

    Returns ``{"metric", "champion": index|None, "challenger": index|None, "candidates": [...]}``
    where each candidate row has its gates, value, the champion's values (as registered and on
    this data) and a one-line ``decision``.
    """
    # the tasks of what can be judged: a result left over from an older run (another manifest) does not
    # decide the metric the current ones rank on
    tasks = [c.task for c in candidates if c.error is None and data.of(c.metrics)]
    if champion is not None:
        tasks.append(champion.entry.get("task"))
    metric = metric or ranking_metric(params, tasks)
    rows = []
    for c in candidates:
        gates = judge(c, champion, params, metric, data, baselines)
        rows.append({
            "eval_dir": str(c.eval_dir),
            "arch": c.arch,
            "task": c.task,
            "sha256": c.sha256,
            "value": metric_value(c.metrics, metric) if c.error is None else None,
            "champion_registered": metric_value(champion.registered, metric) if champion else None,
            "champion_on_this_data": metric_value(champion.scored, metric) if champion else None,
            "gates": gates,
        })
    reigning = champion.entry["checkpoint_sha256"] if champion else None

    def best(names: tuple[str, ...], exclude: int | None) -> int | None:
        ok = [i for i, r in enumerate(rows) if passed(r["gates"], names) and i != exclude and r["sha256"] != reigning]
        # Highest value wins; ties go to the candidate listed first.
        return max(ok, key=lambda i: (rows[i]["value"], -i)) if ok else None

    winner = best(GATES, None)
    runner_up = best(CHALLENGER_GATES, winner)
    if runner_up is not None and winner is not None and rows[runner_up]["sha256"] == rows[winner]["sha256"]:
        runner_up = None
    for i, r in enumerate(rows):
        failed = next((g for g in r["gates"] if not g["passed"]), None)
        if i == winner:
            r["decision"] = "promoted to champion"
        elif failed is not None:
            r["decision"] = f"rejected at {failed['gate']}: {failed['detail']}"
        else:
            r["decision"] = f"passed every gate, but {rows[winner]['eval_dir']} ranks higher on {metric}"
        if i == runner_up:
            r["decision"] += "; made challenger"
    return {"metric": metric, "champion": winner, "challenger": runner_up, "candidates": rows}


# --------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------


def read_candidate(eval_dir: Path | str) -> Candidate:
    """Read a candidate's result and verify the checkpoint(s) it names; problems land in ``error``."""
    c = Candidate(Path(eval_dir))
    try:
        c.result = EvalResult.read(c.eval_dir)
        if c.result.kind == "baseline":
            raise ResultError(f"{c.result.where}: a reference predictor, not a model")
        if c.result.skipped is not None:
            raise ResultError(f"{c.result.where}: no fused pair was evaluated: {c.result.skipped}")
        c.result.verify()
    except ResultError as e:
        c.error = str(e)
    return c


def read_baselines(folder: Path | str | None) -> list[EvalResult]:
    """The results of the reference predictors under ``folder`` (``segpipe baselines --out``);
    ResultError naming the file when one is unreadable, or when the folder holds none."""
    if folder is None:
        return []
    found = read_results(folder)
    if found.problems:
        raise ResultError("; ".join(found.problems.values()))
    baselines = list(found.of_kind("baseline").values())
    if not baselines:
        raise ResultError(f"--baselines {folder}: no <baseline>/metrics.json inside (run segpipe baselines)")
    return baselines


def rescore(entry: dict[str, Any], registry: Path, shards: Any, scoring: EvaluateParams, device: str) -> dict[str, Any]:
    """The registry version ``entry`` scored on ``scoring.split`` of ``shards`` with the scoring code
    every candidate was scored with; its files are verified against the registry first.
    PromoteError naming the version when it cannot be (missing or tampered files)."""
    from segpipe.params import FusionParams, build
    from segpipe.registry import RegistryError, checkpoint_dir, read_bundle
    from segpipe.scoring import score_checkpoint, score_fused

    version = entry["version"]
    try:
        directory = checkpoint_dir(version, registry)
        bundle = read_bundle(directory)
        if bundle is None:
            return score_checkpoint(directory, shards, scoring, device)
        fusion = build(FusionParams, bundle["fusion"], f"{registry / version / 'bundle.json'}: fusion")
        return score_fused(directory / bundle["members"]["semantic"], directory / bundle["members"]["instance"],
                           fusion, shards, scoring, device)
    except (RegistryError, ResultError, OSError) as e:
        raise PromoteError(f"the champion {version} cannot be re-scored on the current shards, so no candidate "
                           f"can be judged against it and nothing is promoted: {e}") from None


def rescore_champions(registry: Path, name: str, data: Data, shards: Any, scoring: EvaluateParams, device: str,
                      aliases: list[str]) -> list[str]:
    """Make sure each alias's champion has a score on ``data``: a champion whose scores are all of
    other data is scored again now (outside the registry lock: it takes a while) and the score is
    recorded in the registry, so a data version costs one re-score, not one per run. Returns the
    versions re-scored."""
    index = read_index(registry, name)
    todo = {}
    for alias in aliases:
        entry = alias_entry(index, alias)
        if entry is not None and score_on(entry, data.manifest, data.split, data.scoring) is None:
            todo.setdefault(entry["version"], entry)
    computed = {v: rescore(entry, registry, shards, scoring, device) for v, entry in todo.items()}
    if computed:
        with transaction(registry, name) as index:
            for version, metrics in computed.items():
                add_score(find_version(index, version), metrics, "re-scored")
    return sorted(computed)


def champion_on(index: dict[str, Any], alias: str, data: Data) -> Champion | None:
    """Inside a transaction: the champion ``alias`` points at, with its score on ``data``; PromoteError
    when it has none (the alias moved to a version scored on other data since the re-scoring)."""
    entry = alias_entry(index, alias)
    if entry is None:
        return None
    score = score_on(entry, data.manifest, data.split, data.scoring)
    if score is None:
        raise PromoteError(f"{alias} moved to {entry['version']}, which has no score on the current data, while "
                           "the champion was being re-scored (another promotion ran): run promote again")
    return Champion(entry, score["metrics"], score["how"])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable promotion report."""
    before, after = report["champion_before"], report["champion_after"]
    lines = [
        f"# Promotion report: {report['name']}",
        "",
        f"- Time: {report['time']}",
        f"- Registry: `{report['registry']}`",
        f"- Data: shard manifest `{report['data']['manifest'][:12]}...`, split `{report['data']['split']}`, "
        f"scoring `{report['data']['scoring']}`",
        f"- Ranking metric: `{report['metric']}`",
        f"- Baselines to beat: {', '.join(f'{k} {_fmt(v)}' for k, v in report.get('baselines', {}).items()) or 'none given'}",
        f"- Champion judged: {champion_line(report['champion_judged'], report['metric'])}",
        f"- Champion before: {before['version'] + ' (' + before['arch'] + ')' if before else 'none'}",
        f"- Champion after: {after['version'] + ' (' + after['arch'] + ')' if after else 'none'}",
        f"- Challenger: {report['challenger'] or 'none'}",
        f"- New versions: {', '.join(report['created']) or 'none'}",
        "",
    ]

    def table(rows: list[dict[str, Any]], metric: str) -> list[str]:
        out = [f"| candidate | arch | task | {metric} | champion as registered | champion on this data | decision |",
               "|---|---|---|---|---|---|---|"]
        for r in rows:
            decision = r["decision"].replace("|", "\\|")
            out.append(f"| `{r['eval_dir']}` | {r['arch']} | {r['task']} | {_fmt(r['value'])} | "
                       f"{_fmt(r['champion_registered'])} | {_fmt(r['champion_on_this_data'])} | {decision} |")
        return out

    lines += table(report["candidates"], report["metric"])
    pan = report.get("panoptic")
    if pan:
        lines += ["", "## Panoptic ranking", "",
                  f"- Ranking metric: `{pan['metric']}`; aliases panoptic-champion, panoptic-challenger",
                  f"- Champion judged: {champion_line(pan['champion_judged'], pan['metric'])}",
                  f"- Champion before: {pan['champion_before']['version'] if pan['champion_before'] else 'none'}",
                  f"- Champion after: {pan['champion_after']['version'] if pan['champion_after'] else 'none'}",
                  f"- Challenger: {pan['challenger'] or 'none'}", ""]
        lines += table(pan["candidates"], pan["metric"])
    lines += ["", "## Gates", ""]
    for r in report["candidates"] + (pan["candidates"] if pan else []):
        lines.append(f"### `{r['eval_dir']}`")
        lines.append("")
        for g in r["gates"]:
            lines.append(f"- {'PASS' if g['passed'] else 'FAIL'} {g['gate']}: {g['detail']}")
        lines.append("")
    return "\n".join(lines)


def _summary(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A registry entry in the report: version and architecture, and for a fused bundle the
    architectures of its two parts (``pair``: ``unet + mask_rcnn``)."""
    if entry is None:
        return None
    out = {"version": entry["version"], "arch": entry["arch"]}
    if entry.get("bundle"):
        out["pair"] = fused_pair(entry["bundle"])
    return out


def _judged(champion: Champion | None, metric: str) -> dict[str, Any] | None:
    if champion is None:
        return None
    return {"version": champion.version, "arch": champion.entry["arch"], "how": champion.how,
            "registered": metric_value(champion.registered, metric),
            "registered_manifest": champion.registered.get("shards_manifest_sha256"),
            "on_this_data": metric_value(champion.scored, metric)}


def _apply(registry: Path, index: dict[str, Any], read: list[Candidate], decision: dict[str, Any],
           aliases: tuple[str, str], created: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Inside a transaction: register the decision's champion and challenger (a fused pair as a
    bundle of both checkpoints) and point ``aliases`` (champion, challenger) at them; returns the
    entries the aliases point at afterwards. New versions are appended to ``created``."""
    champion_alias, challenger_alias = aliases
    new_champion, challenger = alias_entry(index, champion_alias), alias_entry(index, challenger_alias)
    for alias in aliases:
        i = decision["champion" if alias == champion_alias else "challenger"]
        if i is None:
            continue
        c = read[i]
        if c.result.kind == "fused":
            entry, was_new = add_bundle_version(registry, index, c.result, {"eval_dir": str(c.eval_dir)})
        else:
            checkpoint = c.result.verify()["model"]
            entry, was_new = add_version(registry, index, checkpoint, c.result,
                                         {"eval_dir": str(c.eval_dir), "checkpoint": str(checkpoint), "sha256": c.sha256})
        if was_new:
            created.append(entry["version"])
        point_alias(index, alias, entry["version"], f"promote: {decision['candidates'][i]['decision']}")
        decision["candidates"][i]["version"] = entry["version"]
        if alias == champion_alias:
            new_champion = entry
        else:
            challenger = entry
    if new_champion is not None and index["aliases"].get(challenger_alias) == new_champion["version"]:
        point_alias(index, challenger_alias, None, "became the champion")
        challenger = None
    return new_champion, challenger


def run(params: PromoteParams, candidates: list[Path], shards: Path | str, scoring: EvaluateParams,
        registry: Path = DEFAULT_REGISTRY, report_dir: Path | None = Path("reports/promotion"),
        baselines: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Judge ``candidates`` on the current ``shards`` (re-scoring a champion scored on other data),
    update the registry in one locked transaction, write the report; returns it (also written as
    ``promotion.json`` and ``promotion.md``)."""
    from segpipe.shards import open_shards
    from segpipe.storage import resolve

    if not candidates:
        raise PromoteError("promote: no --candidates given")
    registry = Path(registry)
    shard_set = open_shards(resolve(shards, "--shards"))
    data = Data(shard_set.manifest_sha256, scoring.split, scoring.scoring_key())
    read = [read_candidate(d) for d in candidates]
    reference = read_baselines(baselines)
    ranked = [c for c in read if c.task != "panoptic"]  # a fused pair has no semantic or instance metrics
    panoptic = [c for c in read if is_panoptic(c)]
    wanted = (["champion"] if ranked else []) + (["panoptic-champion"] if panoptic else [])
    rescore_champions(registry, params.name, data, shard_set, scoring, device, wanted)
    pan_params = dataclasses.replace(params, protected_classes=[])  # protected classes are IoU rules
    pan: dict[str, Any] | None = None
    pan_promoted: str | None = None
    with transaction(registry, params.name) as index:
        # judged against the champions there now, with their scores on this data (never another's)
        champion = champion_on(index, "champion", data) if ranked else None
        decision = decide(ranked, champion, params, data, reference) if ranked else {
            "metric": ranking_metric(params, []), "champion": None, "challenger": None, "candidates": []}
        metric = decision["metric"]
        created: list[str] = []
        new_champion, challenger = _apply(registry, index, ranked, decision, RANKINGS["model"], created)
        if panoptic:
            pan_champion = champion_on(index, "panoptic-champion", data)
            key = panoptic_key(params)
            pan_decision = decide(panoptic, pan_champion, pan_params, data, reference, metric=key)
            pan_after, pan_challenger = _apply(registry, index, panoptic, pan_decision, RANKINGS["panoptic"], created)
            pan = {"metric": key, "champion_judged": _judged(pan_champion, key),
                   "champion_before": _summary(pan_champion.entry if pan_champion else None),
                   "champion_after": _summary(pan_after),
                   "challenger": pan_challenger["version"] if pan_challenger else None,
                   "candidates": pan_decision["candidates"]}
            if pan_decision["champion"] is not None:
                pan_promoted = pan_after["version"]
    tags: list[str] = []
    if params.gto_tags and decision["champion"] is not None:
        tags = write_gto_tags(params.name, new_champion["version"], promoted=True)
    if params.gto_tags and pan_promoted is not None:
        # the panoptic champion is its own GTO artifact (NAME-panoptic): its prod stage moves apart
        tags += write_gto_tags(f"{params.name}-panoptic", pan_promoted, promoted=True)
    report = {
        "name": params.name,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "registry": str(registry),
        "params": as_dict(params),
        "data": dataclasses.asdict(data),
        "metric": metric,
        "champion_judged": _judged(champion, metric),
        "champion_before": _summary(champion.entry if champion else None),
        "champion_after": _summary(new_champion),
        "challenger": challenger["version"] if challenger else None,
        "created": created,
        "git_tags": tags,
        "baselines": {b.name: b.metric(metric) for b in reference},
        "candidates": decision["candidates"],
        "panoptic": pan,
    }
    if report_dir is not None:
        atomic_write_json(Path(report_dir) / "promotion.json", report)
        atomic_write_text(Path(report_dir) / "promotion.md", render_markdown(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe promote", description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", nargs="+", required=True, metavar="EVAL_DIR",
                        help="output folders of segpipe evaluate / segpipe fuse")
    parser.add_argument("--shards", required=True, help="the current shard set (folder or URI): what every compared "
                                                        "number must have been computed on")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=Path("reports/promotion"), help="report directory (default: %(default)s)")
    parser.add_argument("--baselines", type=Path, default=None, metavar="DIR",
                        help="reference predictors to beat (segpipe baselines --out DIR)")
    parser.add_argument("--device", default="cpu", help="where a champion is re-scored: cpu | cuda (default: cpu)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    report = run(from_args(args, "promote"), [Path(c) for c in args.candidates], args.shards,
                 from_args(args, "evaluate"), args.registry, args.report, args.baselines, args.device)
    # One line: every decision, each gate with its reason, is in the report (and in `segpipe report`'s outcome).
    rows = report["candidates"] + ((report["panoptic"] or {}).get("candidates") or [])
    promoted = sum(r["decision"].startswith("promoted") for r in rows)
    after = report["champion_after"]
    print(f"promote: {len(rows)} candidate(s) judged on {report['data']['split']} of shard manifest "
          f"{report['data']['manifest'][:12]}..., {promoted} promoted; champion "
          f"{after['version'] + ' (' + after['arch'] + ')' if after else 'none'}; report {args.report / 'promotion.md'}")
