"""``segpipe report``: ``reports/summary.md``, an architecture x metric table, a collection x model
table, a panoptic quality table (models with a panoptic output and the fused pair) and the
promotion decisions. Results are read through ``segpipe.results`` (one error policy: an
unreadable result is named under the table, and the others are shown)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segpipe.files import atomic_write_text
from segpipe.results import EvalResult, champion_line, metric_value, read_results

# (column title, key path in an evaluate metrics.json)
COLUMNS: list[tuple[str, str]] = [
    ("pixel acc", "pixel_acc"),
    ("mean acc", "mean_acc"),
    ("mIoU", "miou"),
    ("Boundary IoU", "boundary_iou"),
    ("fwIoU", "fwiou"),
    ("mDice", "mdice"),
    ("mIoU things", "miou_things"),
    ("segm AP", "segm.AP"),
    ("segm AP50", "segm.AP50"),
    ("segm Boundary AP", "segm.boundary_AP"),
    ("bbox AP", "bbox.AP"),
    ("segm AR100", "segm.AR100"),
]


def fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


TRAIN_COLUMNS: list[tuple[str, str]] = [
    ("epochs", "epochs"),
    ("steps", "steps"),
    ("train s", "train_s"),
    ("start-up s", "startup_s"),
    ("train img/s", "images_per_s"),
]


def metrics_table(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]],
                  baselines: dict[str, dict[str, Any]] | None = None) -> str:
    """Markdown table, one row per architecture from evaluate (and train) metrics, then one per
    reference predictor (``baseline: NAME``)."""
    head = ["arch", "task", *[c for c, _ in COLUMNS], *[c for c, _ in TRAIN_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(arch, evals[arch], train.get(arch, {})) for arch in sorted(evals)]
    rows += [(f"baseline: {name}", m, {}) for name, m in sorted((baselines or {}).items())]
    for label, m, t in rows:
        cells = [label, str(m.get("task", "")), *[fmt(metric_value(m, key)) for _, key in COLUMNS],
                 *[fmt(t.get(key)) for _, key in TRAIN_COLUMNS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (column title, key path in a metrics.json's "panoptic" block)
PQ_COLUMNS: list[tuple[str, str]] = [("PQ", "pq"), ("SQ", "sq"), ("RQ", "rq"), ("PQ things", "pq_things"),
                                     ("PQ stuff", "pq_stuff")]


def pq_table(evals: dict[str, dict[str, Any]], fused: dict[str, dict[str, Any]]) -> str:
    """Markdown PQ table: one row per eval with panoptic metrics (MaskFormer), then one per fused
    pair (``fused: SEMANTIC + INSTANCE``); empty when there is none."""
    rows = [(arch, m) for arch, m in sorted(evals.items()) if isinstance(m.get("panoptic"), dict)]
    for name, m in sorted(fused.items()):
        if not isinstance(m.get("panoptic"), dict):
            continue  # no pair was fused (see its metrics.json "skipped")
        ck = m.get("checkpoints") or {}
        pair = " + ".join(str((ck.get(k) or {}).get("arch", "?")) for k in ("semantic", "instance"))
        rows.append((f"{name}: {pair}", m))
    if not rows:
        return ""
    head = ["model", *[c for c, _ in PQ_COLUMNS], "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows:
        cells = [label, *[fmt(metric_value(m["panoptic"], key)) for _, key in PQ_COLUMNS], fmt(m.get("images"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collection_table(evals: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]] | None = None,
                     metric: str = "miou") -> str:
    """Markdown table, one row per source collection of the split and one column per model (and
    reference predictor): ``metric`` on that collection's images (evaluate's ``per_collection``).
    Empty when no result has per-collection metrics."""
    cols = [(arch, m) for arch, m in sorted(evals.items()) if m.get("per_collection")]
    cols += [(f"baseline: {name}", m) for name, m in sorted((baselines or {}).items()) if m.get("per_collection")]
    if not cols:
        return ""
    names = sorted({c for _, m in cols for c in m["per_collection"]})
    lines = ["| collection | images | " + " | ".join(label for label, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name in names:
        images = next((m["per_collection"][name].get("images") for _, m in cols if name in m["per_collection"]), None)
        cells = [fmt(metric_value(m["per_collection"].get(name, {}), metric)) for _, m in cols]
        lines.append(f"| {name} | {fmt(images)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_share(train: dict[str, dict[str, Any]]) -> str:
    """One sentence: seconds spent in epochs against start-up, summed over the train stages."""
    t = sum(float(m.get("train_s") or 0) for m in train.values())
    s = sum(float(m.get("startup_s") or 0) for m in train.values())
    if t + s <= 0:
        return ""
    return (f"Training: {t:.0f} s in epochs and {s:.0f} s of start-up over {len(train)} train stage(s); "
            f"training share {t / (t + s):.2f}.")


def promotion_section(promotion: dict[str, Any] | None) -> str:
    if promotion is None:
        return "No promotion report found."
    before, after = promotion.get("champion_before"), promotion.get("champion_after")

    def who(x: dict[str, Any] | None) -> str:
        return f"{x['version']} ({x['arch']})" if x else "none"

    lines = [f"Ranking metric `{promotion['metric']}`. Champion before: {who(before)}; after: {who(after)}.",
             f"Champion judged: {champion_line(promotion.get('champion_judged'), promotion['metric'])}."]
    pan = promotion.get("panoptic")
    if pan:
        def pwho(x: dict[str, Any] | None) -> str:
            return f"{x['version']} ({x['arch']})" if x else "none"

        lines.append(f"Panoptic ranking `{pan['metric']}`: panoptic champion before: {pwho(pan['champion_before'])}; "
                     f"after: {pwho(pan['champion_after'])}.")
    if promotion.get("created"):
        lines.append(f"New registry versions: {', '.join(promotion['created'])}.")
    lines += ["", "| candidate | decision |", "|---|---|"]
    for c in promotion.get("candidates", []):
        lines.append(f"| {c.get('arch', c.get('eval_dir'))} | {str(c.get('decision', '')).replace('|', '/')} |")
    return "\n".join(lines)


def render(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]], promotion: dict[str, Any] | None,
           baselines: dict[str, dict[str, Any]] | None = None, fused: dict[str, dict[str, Any]] | None = None) -> str:
    semantic = {k: m for k, m in evals.items() if m.get("task") != "panoptic"}
    fused = {**{k: m for k, m in evals.items() if m.get("task") == "panoptic"}, **(fused or {})}
    pq = pq_table(semantic, fused)
    panoptic = ["## Panoptic quality", "",
                "PQ, SQ, RQ (COCO's definition, see docs/metrics.md) of the models with a panoptic output "
                "and of the fused best semantic + best instance pair.", "", pq, ""] if pq else []
    collections = collection_table(semantic, baselines)
    per_collection = ["## Per collection", "",
                      "mIoU of each model on each source collection of the split (data/raw/<name>): where a "
                      "new site is weaker, or a drop made the old sites worse.", "", collections, ""] if collections else []
    return "\n".join([
        "# segpipe summary", "",
        "Validation metrics per architecture (fractions in [0, 1]; COCO AP/AR for instance-capable models), "
        "and of the reference predictors fitted on the train split (majority class, colour lookup).", "",
        metrics_table(semantic, train, baselines), "",
        training_share(train), "",
        *per_collection,
        *panoptic,
        "## Promotion", "",
        promotion_section(promotion), "",
    ])


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _results(folder: Path | None, problems: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: metrics}`` of the results under ``folder``; unreadable ones are added to ``problems``."""
    found = read_results(folder)
    problems += found.problems.values()
    return {name: r.data for name, r in found.ok.items()}


def run(evals_dir: Path, promotion_dir: Path, out: Path, train_dir: Path | None = None,
        baselines_dir: Path | None = None, fused_dir: Path | None = None) -> str:
    problems: list[str] = []
    fused = {}
    if fused_dir is not None and (Path(fused_dir) / "metrics.json").is_file():
        try:
            fused[Path(fused_dir).name] = EvalResult.read(fused_dir).data
        except ValueError as e:
            problems.append(str(e))
    train = {d.name: m for d in sorted(Path(train_dir).iterdir()) if d.is_dir() and (m := _read(d / "metrics.json"))} \
        if train_dir is not None and Path(train_dir).is_dir() else {}
    text = render(_results(evals_dir, problems), train, _read(Path(promotion_dir) / "promotion.json"),
                  _results(baselines_dir, problems), fused)
    if problems:
        text += "\n## Not shown\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    atomic_write_text(out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe report", description=__doc__)
    ap.add_argument("--evals", type=Path, required=True, help="folder of evaluate outputs, one per architecture")
    ap.add_argument("--train", type=Path, default=None, help="folder of train outputs (optional)")
    ap.add_argument("--promotion", type=Path, required=True, help="promotion report folder")
    ap.add_argument("--baselines", type=Path, default=None, help="folder of reference predictors (optional)")
    ap.add_argument("--fused", type=Path, default=None,
                    help="output of segpipe evaluate --fuse-best (optional): a PQ row for the fused pair")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(run(args.evals, args.promotion, args.out, args.train, args.baselines, args.fused))
