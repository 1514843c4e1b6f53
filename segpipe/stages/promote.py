"""``segpipe promote``: choose a champion among evaluated candidates by rules read from params.

Every candidate is the output directory of ``segpipe evaluate`` (its ``metrics.json`` and the
checkpoint that file names). One metric ranks everything in a run:

* the task's primary metric (``semantic_metric`` / ``instance_metric``) when every candidate and
  the current champion share a task;
* otherwise ``mixed_metric`` (``miou_things`` by default): the mean IoU over the thing classes,
  which evaluate writes for every model and which is the same quantity for both tasks (a
  class's IoU depends only on its own ground-truth and predicted pixels). Plain ``miou`` is not:
  an instance model's is over things plus one merged background class.

Gates, in order; a candidate must pass all of them to be promoted:

1. ``readable``: metrics.json is valid, the checkpoint it names exists and its sha256 matches;
2. ``metric``: the ranking metric is a finite number (NaN or missing never promotes);
3. ``min_value``: the metric is at least ``min_value``;
4. ``beats_baseline``: the metric beats the best reference predictor (``segpipe evaluate
   --baselines``: majority class, colour lookup) scored on the same shards and split, by more than
   ``baseline_margin``; passes when no baselines are given or none defines the metric;
5. ``same_data``: evaluated on the champion's shard manifest hash;
6. ``margin``: beats the champion by at least ``margin`` (and strictly);
7. ``protected_classes``: no protected class's IoU drops by more than ``protected_tolerance``.

The best candidate passing all gates becomes champion; the best one that passed gates 1-5
but was not promoted becomes challenger. The whole decision happens under the registry lock.

Panoptic candidates (a model whose eval has ``panoptic`` metrics, i.e. MaskFormer, and the fused
pair of ``segpipe evaluate --fuse-best``, task ``panoptic``) are ranked again, apart, on
``panoptic.<panoptic_metric>`` (PQ by default) with the same gates except protected classes (an
IoU rule), and move the ``panoptic-champion`` / ``panoptic-challenger`` aliases. A fused pair is
registered as one bundle version holding both checkpoints and the fusion params.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.checkpoint import WEIGHTS, is_checkpoint
from segpipe.files import atomic_write_json, atomic_write_text, sha256_file
from segpipe.metrics import metric_value  # noqa: F401  (also imported from here by report and pipelines)
from segpipe.params import PromoteParams, add_params_arguments, as_dict, from_args
from segpipe.registry import (
    DEFAULT_REGISTRY,
    add_version,
    alias_entry,
    point_alias,
    transaction,
    write_gto_tags,
)

REQUIRED_KEYS = ("arch", "task", "checkpoint", "shards_manifest_sha256", "per_class")
BUNDLE_KEYS = ("arch", "task", "checkpoints", "fusion", "shards_manifest_sha256", "panoptic")  # a fused pair's
GATES = ("readable", "metric", "min_value", "beats_baseline", "same_data", "margin", "protected_classes")
CHALLENGER_GATES = GATES[:5]


@dataclass
class Candidate:
    """One evaluated candidate as read from disk; ``error`` set when it cannot be judged."""

    eval_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    sha256: str | None = None  # a fused pair's: its bundle identity (segpipe.registry.bundle_sha256)
    error: str | None = None
    bundle: dict[str, Path] | None = None  # a fused pair's checkpoints: {"semantic": DIR, "instance": DIR}
    bundle_sha256: dict[str, str] | None = None  # and their weights' sha256

    @property
    def task(self) -> str | None:
        return self.metrics.get("task")

    @property
    def arch(self) -> str | None:
        return self.metrics.get("arch")


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


def check_baselines(candidate: dict[str, Any], value: float, metric: str, baselines: list[dict[str, Any]],
                    margin: float) -> tuple[bool, str]:
    """(passed, detail) of the ``beats_baseline`` gate: ``value`` must exceed the best baseline
    scored on the candidate's shards and split by more than ``margin``."""
    if not baselines:
        return True, "no baselines given"
    same = [b for b in baselines if b.get("shards_manifest_sha256") == candidate.get("shards_manifest_sha256")
            and b.get("split") == candidate.get("split")]
    if not same:
        return False, "no baseline was scored on the candidate's shards and split: not comparable"
    scored = [(str(b.get("baseline")), v) for b in same if (v := metric_value(b, metric)) is not None]
    if not scored:
        return True, f"no baseline defines {metric}: not applicable"
    name, best = max(scored, key=lambda nv: nv[1])
    return value > best + margin, f"{metric} {value:.4f} vs best baseline {name} {best:.4f} + baseline_margin {margin}"


def judge(
    candidate: Candidate, champion: dict[str, Any] | None, params: PromoteParams, metric: str,
    baselines: list[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Every gate's outcome for one candidate: ``[{"gate", "passed", "detail"}]`` (stops at the first failure).

    ``champion`` is the champion's registry entry (with its ``metrics``) or None; ``baselines``
    the metrics of the reference predictors.
    """
    gates: list[dict[str, Any]] = []

    def gate(name: str, passed: bool, detail: str) -> bool:
        gates.append({"gate": name, "passed": passed, "detail": detail})
        return passed

    if not gate("readable", candidate.error is None, candidate.error or f"checkpoint {candidate.checkpoint}"):
        return gates
    value = metric_value(candidate.metrics, metric)
    if not gate("metric", value is not None, f"{metric} = {value}" if value is not None else f"{metric} is missing or NaN"):
        return gates
    if not gate("min_value", value >= params.min_value, f"{metric} {value:.4f} vs min_value {params.min_value}"):
        return gates
    if not gate("beats_baseline", *check_baselines(candidate.metrics, value, metric, list(baselines),
                                                   params.baseline_margin)):
        return gates
    if champion is None:
        gate("same_data", True, "no champion yet")
        gate("margin", True, "no champion yet")
        gate("protected_classes", True, "no champion yet")
        return gates
    ours, theirs = candidate.metrics.get("shards_manifest_sha256"), champion.get("shards_manifest_sha256")
    if not gate(
        "same_data", ours == theirs,
        "same shard manifest as the champion" if ours == theirs
        else f"evaluated on shard manifest {ours}, champion {champion['version']} on {theirs}: not comparable",
    ):
        return gates
    if candidate.sha256 == champion["checkpoint_sha256"]:
        gate("margin", False, f"this checkpoint is the champion ({champion['version']})")
        return gates
    best = metric_value(champion.get("metrics", {}), metric)
    if best is None:
        gate("margin", False, f"the champion {champion['version']} has no finite {metric} to compare with")
        return gates
    passed = value > best and value - best >= params.margin
    if not gate("margin", passed, f"{metric} {value:.4f} vs champion {champion['version']} {best:.4f} + margin {params.margin}"):
        return gates
    failures = check_protected(candidate.metrics, champion.get("metrics", {}), params.protected_classes, params.protected_tolerance)
    gate("protected_classes", not failures, "; ".join(failures) or f"{len(params.protected_classes)} protected class(es) held")
    return gates


def passed(gates: list[dict[str, Any]], names: tuple[str, ...]) -> bool:
    outcome = {g["gate"]: g["passed"] for g in gates}
    return all(outcome.get(n, False) for n in names)


def is_panoptic(c: Candidate) -> bool:
    """Ranked among the panoptic candidates: a fused pair, or a model whose eval has panoptic metrics."""
    return c.task == "panoptic" or isinstance(c.metrics.get("panoptic"), dict)


def panoptic_key(params: PromoteParams) -> str:
    """The metrics.json key the panoptic ranking reads (``panoptic.pq`` for ``panoptic_metric: pq``)."""
    return f"panoptic.{params.panoptic_metric}"


def decide(candidates: list[Candidate], champion: dict[str, Any] | None, params: PromoteParams,
           baselines: list[dict[str, Any]] = (), metric: str | None = None) -> dict[str, Any]:
    """The decision for every candidate, pure: no file is read or written. ``metric``: the one
    to rank on (default: :func:`ranking_metric` of the candidates' and the champion's tasks).

    Returns ``{"metric", "champion": index|None, "challenger": index|None, "candidates": [...]}``
    where each candidate row has its gates, value and a one-line ``decision``.
    """
    tasks = [c.task for c in candidates if c.error is None]
    if champion is not None:
        tasks.append(champion.get("task"))
    metric = metric or ranking_metric(params, tasks)
    rows = []
    for c in candidates:
        gates = judge(c, champion, params, metric, baselines)
        rows.append({
            "eval_dir": str(c.eval_dir),
            "arch": c.arch,
            "task": c.task,
            "checkpoint": str(c.checkpoint) if c.checkpoint else None,
            "sha256": c.sha256,
            "value": metric_value(c.metrics, metric) if c.error is None else None,
            "gates": gates,
        })

    reigning = champion["checkpoint_sha256"] if champion else None

    def best(names: tuple[str, ...], exclude: int | None) -> int | None:
        ok = [
            i for i, r in enumerate(rows)
            if passed(r["gates"], names) and i != exclude and r["sha256"] != reigning
        ]
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
    """Read ``EVAL_DIR/metrics.json`` and check the checkpoint it names; problems land in ``error``."""
    eval_dir = Path(eval_dir)
    c = Candidate(eval_dir)
    path = eval_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        c.error = f"{path}: not found (is {eval_dir} an output of segpipe evaluate?)"
        return c
    except json.JSONDecodeError as e:
        c.error = f"{path}: not valid JSON: {e}"
        return c
    if not isinstance(metrics, dict):
        c.error = f"{path}: expected a JSON object"
        return c
    c.metrics = metrics
    if metrics.get("task") == "panoptic":
        return _read_bundle(c, path)
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        c.error = f"{path}: missing key(s) {', '.join(map(repr, missing))}"
        return c
    ck = metrics["checkpoint"]
    if not isinstance(ck, dict) or not isinstance(ck.get("path"), str) or not isinstance(ck.get("sha256"), str):
        c.error = f"{path}: key 'checkpoint' must be {{\"path\": str, \"sha256\": str}}"
        return c
    checkpoint = Path(ck["path"])
    if not is_checkpoint(checkpoint) and not checkpoint.is_absolute() and is_checkpoint(eval_dir / checkpoint):
        checkpoint = eval_dir / checkpoint
    if not is_checkpoint(checkpoint):
        c.error = f"{path}: checkpoint {ck['path']!r} is not a checkpoint directory (needs {WEIGHTS} and meta.json)"
        return c
    c.checkpoint = checkpoint
    c.sha256 = sha256_file(checkpoint / WEIGHTS)
    if c.sha256 != ck["sha256"]:
        c.error = f"{checkpoint / WEIGHTS}: sha256 {c.sha256} differs from the evaluated {ck['sha256']} (changed since evaluation)"
    return c


def _read_bundle(c: Candidate, path: Path) -> Candidate:
    """A fused pair's metrics.json (``segpipe evaluate --fuse-best``): both checkpoints must exist
    with the sha256 the evaluation recorded."""
    from segpipe.registry import bundle_sha256

    m = c.metrics
    if "skipped" in m:
        c.error = f"{path}: no fused pair was evaluated: {m['skipped']}"
        return c
    missing = [k for k in BUNDLE_KEYS if k not in m]
    if missing:
        c.error = f"{path}: missing key(s) {', '.join(map(repr, missing))}"
        return c
    members, paths, shas = m["checkpoints"], {}, {}
    for k in ("semantic", "instance"):
        ck = members.get(k) if isinstance(members, dict) else None
        if not isinstance(ck, dict) or not isinstance(ck.get("path"), str) or not isinstance(ck.get("sha256"), str):
            c.error = f"{path}: key 'checkpoints.{k}' must be {{\"path\": str, \"sha256\": str}}"
            return c
        folder = Path(ck["path"])
        if not is_checkpoint(folder):
            c.error = f"{path}: {k} checkpoint {ck['path']!r} is not a checkpoint directory (needs {WEIGHTS} and meta.json)"
            return c
        paths[k], shas[k] = folder, sha256_file(folder / WEIGHTS)
        if shas[k] != ck["sha256"]:
            c.error = (f"{folder / WEIGHTS}: sha256 {shas[k]} differs from the evaluated {ck['sha256']} "
                       "(changed since evaluation)")
            return c
    c.bundle, c.bundle_sha256 = paths, shas
    c.checkpoint = paths["semantic"]
    c.sha256 = bundle_sha256(shas, m["fusion"])
    return c


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
        f"- Ranking metric: `{report['metric']}`",
        f"- Baselines to beat: {', '.join(f'{k} {_fmt(v)}' for k, v in report.get('baselines', {}).items()) or 'none given'}",
        f"- Champion before: {before['version'] + ' (' + before['arch'] + ', ' + _fmt(before['value']) + ')' if before else 'none'}",
        f"- Champion after: {after['version'] + ' (' + after['arch'] + ', ' + _fmt(after['value']) + ')' if after else 'none'}",
        f"- Challenger: {report['challenger'] or 'none'}",
        f"- New versions: {', '.join(report['created']) or 'none'}",
        "",
        "| candidate | arch | task | " + report["metric"] + " | decision |",
        "|---|---|---|---|---|",
    ]
    for r in report["candidates"]:
        decision = r["decision"].replace("|", "\\|")
        lines.append(f"| `{r['eval_dir']}` | {r['arch']} | {r['task']} | {_fmt(r['value'])} | {decision} |")
    pan = report.get("panoptic")
    if pan:
        def who(x: dict[str, Any] | None) -> str:
            return f"{x['version']} ({x['arch']}, {_fmt(x['value'])})" if x else "none"

        lines += ["", "## Panoptic ranking", "",
                  f"- Ranking metric: `{pan['metric']}`; aliases panoptic-champion, panoptic-challenger",
                  f"- Champion before: {who(pan['champion_before'])}",
                  f"- Champion after: {who(pan['champion_after'])}",
                  f"- Challenger: {pan['challenger'] or 'none'}", "",
                  "| candidate | arch | task | " + pan["metric"] + " | decision |", "|---|---|---|---|---|"]
        for r in pan["candidates"]:
            decision = r["decision"].replace("|", "\\|")
            lines.append(f"| `{r['eval_dir']}` | {r['arch']} | {r['task']} | {_fmt(r['value'])} | {decision} |")
    lines += ["", "## Gates", ""]
    for r in report["candidates"] + (pan["candidates"] if pan else []):
        lines.append(f"### `{r['eval_dir']}`")
        lines.append("")
        for g in r["gates"]:
            lines.append(f"- {'PASS' if g['passed'] else 'FAIL'} {g['gate']}: {g['detail']}")
        lines.append("")
    return "\n".join(lines)


def _summary(entry: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"version": entry["version"], "arch": entry["arch"], "value": metric_value(entry.get("metrics", {}), metric)}


def read_baselines(folder: Path | str | None) -> list[dict[str, Any]]:
    """The metrics of every reference predictor under ``folder`` (``segpipe evaluate --baselines --out``);
    ValueError naming the file when one is unreadable, or when the folder holds none."""
    if folder is None:
        return []
    folder = Path(folder)
    files = sorted(folder.glob("*/metrics.json"))
    if not files:
        raise ValueError(f"--baselines {folder}: no <baseline>/metrics.json inside (run segpipe evaluate --baselines)")
    out = []
    for f in files:
        try:
            m = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a readable baseline metrics file: {e}") from None
        if not isinstance(m, dict) or "baseline" not in m:
            raise ValueError(f"{f}: not a baseline's metrics (no 'baseline' key)")
        out.append(m)
    return out


def _apply(registry: Path, index: dict[str, Any], read: list[Candidate], decision: dict[str, Any],
           aliases: tuple[str, str], created: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Inside a transaction: register the decision's champion and challenger (a fused pair as a
    bundle of both checkpoints) and point ``aliases`` (champion, challenger) at them; returns the
    entries the aliases point at afterwards. New versions are appended to ``created``."""
    from segpipe.registry import add_bundle_version

    champion_alias, challenger_alias = aliases
    new_champion, challenger = alias_entry(index, champion_alias), alias_entry(index, challenger_alias)
    for alias in aliases:
        i = decision["champion" if alias == champion_alias else "challenger"]
        if i is None:
            continue
        c = read[i]
        if c.bundle is not None:
            source = {"eval_dir": str(c.eval_dir), **{k: str(v) for k, v in c.bundle.items()}}
            entry, was_new = add_bundle_version(registry, index, c.bundle, c.metrics["fusion"], c.metrics, source,
                                                c.bundle_sha256)
        else:
            source = {"eval_dir": str(c.eval_dir), "checkpoint": str(c.checkpoint), "sha256": c.sha256}
            entry, was_new = add_version(registry, index, c.checkpoint, c.metrics, source, c.sha256)
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


def run(
    params: PromoteParams,
    candidates: list[Path],
    registry: Path = DEFAULT_REGISTRY,
    report_dir: Path | None = Path("reports/promotion"),
    baselines: Path | None = None,
) -> dict[str, Any]:
    """Judge ``candidates`` (against the reference predictors under ``baselines``, if given), update
    the registry in one locked transaction, write the report.

    Returns the report dict (also written as ``promotion.json`` and ``promotion.md``).
    """
    if not candidates:
        raise ValueError("promote: no --candidates given")
    registry = Path(registry)
    read = [read_candidate(d) for d in candidates]
    reference = read_baselines(baselines)
    ranked = [c for c in read if c.task != "panoptic"]  # a fused pair has no semantic or instance metrics
    panoptic = [c for c in read if is_panoptic(c)]
    pan_params = dataclasses.replace(params, protected_classes=[])  # protected classes are IoU rules
    pan: dict[str, Any] | None = None
    pan_promoted: str | None = None
    with transaction(registry, params.name) as index:
        champion = alias_entry(index, "champion")
        decision = decide(ranked, champion, params, reference) if ranked else {
            "metric": ranking_metric(params, []), "champion": None, "challenger": None, "candidates": []}
        metric = decision["metric"]
        created: list[str] = []
        new_champion, challenger = _apply(registry, index, ranked, decision, ("champion", "challenger"), created)
        if panoptic:
            pan_champion = alias_entry(index, "panoptic-champion")
            pan_decision = decide(panoptic, pan_champion, pan_params, reference, metric=panoptic_key(params))
            pan_after, pan_challenger = _apply(registry, index, panoptic, pan_decision,
                                               ("panoptic-champion", "panoptic-challenger"), created)
            key = pan_decision["metric"]
            pan = {"metric": key, "champion_before": _summary(pan_champion, key),
                   "champion_after": _summary(pan_after, key),
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
        "metric": metric,
        "champion_before": _summary(champion, metric),
        "champion_after": _summary(new_champion, metric),
        "challenger": challenger["version"] if challenger else None,
        "created": created,
        "git_tags": tags,
        "baselines": {str(b["baseline"]): metric_value(b, metric) for b in reference},
        "candidates": decision["candidates"],
        "panoptic": pan,
    }
    if report_dir is not None:
        atomic_write_json(Path(report_dir) / "promotion.json", report)
        atomic_write_text(Path(report_dir) / "promotion.md", render_markdown(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe promote", description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", nargs="+", type=Path, required=True, metavar="EVAL_DIR",
                        help="output directories of segpipe evaluate")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=Path("reports/promotion"), help="report directory (default: %(default)s)")
    parser.add_argument("--baselines", type=Path, default=None, metavar="DIR",
                        help="reference predictors to beat (segpipe evaluate --baselines --out DIR)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "promote")
    report = run(params, args.candidates, args.registry, args.report, args.baselines)
    for r in report["candidates"]:
        print(f"{r['eval_dir']}: {r['decision']}")
    after = report["champion_after"]
    print(f"champion: {after['version'] + ' (' + after['arch'] + ')' if after else 'none'}; "
          f"report: {args.report / 'promotion.md'}")


if __name__ == "__main__":
    main()
