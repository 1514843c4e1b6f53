"""``segpipe report``: what the pipeline ends with.

    segpipe report --evals models/eval --promotion reports/promotion --out reports/summary.md
                   [--train models/train] [--baselines models/baselines] [--fused models/fused]
                   [--html reports/index.html] [--drift DRIFT.json] [--screenshot PNG]

Three outputs, from the same results:

- ``--out`` (``reports/summary.md``): an architecture x metric table (with the reference
  predictors), a collection x model table, a panoptic quality table and the promotion decisions;
- ``--html`` (``reports/index.html``): one self-contained page that opens offline (figures inline,
  no script or font from elsewhere; ``segpipe.report_html``): the outcome, the summary table,
  learning curves of all architectures (validation score and loss against seconds), per-class
  IoU bars and a row-normalised confusion heatmap per model, the champion's overlays of
  validation images (image | ground truth | prediction, with a colour legend), the PQ table, the
  promotion with every gate and its reason, the per-collection table and, with ``--drift``, the
  drift report;
- on the console, the outcome (:func:`ending`): the champion and its metric against the best
  baseline, the panoptic champion and its PQ, what the promotion changed (promoted, refused and why), and
  where the report is. With ``SEGPIPE_ENDING=later`` (``make pipeline``, which prints it after
  DVC's own closing lines) it is only written, to ``ending.txt`` beside ``--out``.

Results are read through ``segpipe.results`` (one error policy: an unreadable result is named
under the tables, and the others are shown); the CSV files beside them (history.tsv,
per_class_iou.csv, confusion_counts.csv, overlays/) are read here.
"""

from __future__ import annotations

import argparse
import csv
import html as html_module
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import UserError
from segpipe.files import atomic_write_text
from segpipe.report_html import Section, Table, figure, json_html, page, paragraph, png_img
from segpipe.results import EvalResult, champion_line, fused_pair, metric_value, read_history, read_results

ENDING_ENV = "SEGPIPE_ENDING"  # "later": write the outcome to ending.txt, do not print it
ENDING_FILE = "ending.txt"
TITLE = "segpipe report"


class ReportError(UserError, ValueError):
    """An input of the report cannot be read (the message names the file)."""


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


# --------------------------------------------------------------------------------------
# Tables (Markdown and HTML from one Table each)
# --------------------------------------------------------------------------------------


def metrics_grid(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]],
                 baselines: dict[str, dict[str, Any]] | None = None, highlight: str | None = None) -> Table:
    """One row per architecture from evaluate (and train) metrics, then one per reference
    predictor (``baseline: NAME``); ``highlight``: the champion's row."""
    head = ["arch", "task", *[c for c, _ in COLUMNS], *[c for c, _ in TRAIN_COLUMNS]]
    rows = [(arch, evals[arch], train.get(arch, {})) for arch in sorted(evals)]
    rows += [(f"baseline: {name}", m, {}) for name, m in sorted((baselines or {}).items())]
    cells = tuple(tuple([label, str(m.get("task", "")), *[fmt(metric_value(m, key)) for _, key in COLUMNS],
                         *[fmt(t.get(key)) for _, key in TRAIN_COLUMNS]]) for label, m, t in rows)
    best = frozenset(i for i, (label, _, _) in enumerate(rows) if label == highlight)
    return Table(tuple(head), cells, numeric=frozenset(range(2, len(head))), highlight=best)


def metrics_table(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]],
                  baselines: dict[str, dict[str, Any]] | None = None) -> str:
    """Markdown of :func:`metrics_grid`."""
    return metrics_grid(evals, train, baselines).markdown()


# (column title, key path in a metrics.json's "panoptic" block)
PQ_COLUMNS: list[tuple[str, str]] = [("PQ", "pq"), ("SQ", "sq"), ("RQ", "rq"), ("PQ things", "pq_things"),
                                     ("PQ stuff", "pq_stuff")]


def pq_grid(evals: dict[str, dict[str, Any]], fused: dict[str, dict[str, Any]]) -> Table | None:
    """One row per eval with panoptic metrics (MaskFormer), then one per fused pair (``fused:
    SEMANTIC + INSTANCE``); None when there is none."""
    rows = [(arch, m) for arch, m in sorted(evals.items()) if isinstance(m.get("panoptic"), dict)]
    for name, m in sorted(fused.items()):
        if not isinstance(m.get("panoptic"), dict):
            continue  # no pair was fused (see its metrics.json "skipped")
        rows.append((f"{name}: {fused_pair(m.get('checkpoints') or {})}", m))
    if not rows:
        return None
    head = ("model", *[c for c, _ in PQ_COLUMNS], "images")
    cells = tuple(tuple([label, *[fmt(metric_value(m["panoptic"], key)) for _, key in PQ_COLUMNS], fmt(m.get("images"))])
                  for label, m in rows)
    return Table(head, cells, numeric=frozenset(range(1, len(head))))


def pq_table(evals: dict[str, dict[str, Any]], fused: dict[str, dict[str, Any]]) -> str:
    """Markdown of :func:`pq_grid` ("" when there is no panoptic result)."""
    grid = pq_grid(evals, fused)
    return grid.markdown() if grid else ""


def collection_grid(evals: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]] | None = None,
                    metric: str = "miou") -> Table | None:
    """One row per source collection of the split and one column per model (and reference
    predictor): ``metric`` on that collection's images (evaluate's ``per_collection``). None
    when no result has per-collection metrics."""
    cols = [(arch, m) for arch, m in sorted(evals.items()) if m.get("per_collection")]
    cols += [(f"baseline: {name}", m) for name, m in sorted((baselines or {}).items()) if m.get("per_collection")]
    if not cols:
        return None
    names = sorted({c for _, m in cols for c in m["per_collection"]})
    rows = []
    for name in names:
        images = next((m["per_collection"][name].get("images") for _, m in cols if name in m["per_collection"]), None)
        rows.append((name, fmt(images), *[fmt(metric_value(m["per_collection"].get(name, {}), metric)) for _, m in cols]))
    return Table(("collection", "images", *[label for label, _ in cols]), tuple(rows),
                 numeric=frozenset(range(1, len(cols) + 2)))


def collection_table(evals: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]] | None = None,
                     metric: str = "miou") -> str:
    """Markdown of :func:`collection_grid` ("" without per-collection metrics)."""
    grid = collection_grid(evals, baselines, metric)
    return grid.markdown() if grid else ""


def training_share(train: dict[str, dict[str, Any]]) -> str:
    """One sentence: seconds spent in epochs against start-up, summed over the train stages."""
    t = sum(float(m.get("train_s") or 0) for m in train.values())
    s = sum(float(m.get("startup_s") or 0) for m in train.values())
    if t + s <= 0:
        return ""
    return (f"Training: {t:.0f} s in epochs and {s:.0f} s of start-up over {len(train)} train stage(s); "
            f"training share {t / (t + s):.2f}.")


def _who(x: dict[str, Any] | None) -> str:
    return f"{x['version']} ({x['arch']})" if x else "none"


def promotion_lines(promotion: dict[str, Any]) -> list[str]:
    """The promotion's headline sentences: the ranking metric, the champion before and after, how
    it was judged, the panoptic champion, the new registry versions."""
    before, after = promotion.get("champion_before"), promotion.get("champion_after")
    lines = [f"Ranking metric `{promotion['metric']}`. Champion before: {_who(before)}; after: {_who(after)}.",
             f"Champion judged: {champion_line(promotion.get('champion_judged'), promotion['metric'])}."]
    pan = promotion.get("panoptic")
    if pan:
        lines.append(f"Panoptic ranking `{pan['metric']}`: panoptic champion before: {_who(pan['champion_before'])}; "
                     f"after: {_who(pan['champion_after'])}.")
    if promotion.get("created"):
        lines.append(f"New registry versions: {', '.join(promotion['created'])}.")
    return lines


def promotion_section(promotion: dict[str, Any] | None) -> str:
    if promotion is None:
        return "No promotion report found."
    rows = tuple((str(c.get("arch", c.get("eval_dir"))), str(c.get("decision", "")))
                 for c in promotion.get("candidates", []))
    return "\n".join([*promotion_lines(promotion), "", Table(("candidate", "decision"), rows).markdown()])


def render(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]], promotion: dict[str, Any] | None,
           baselines: dict[str, dict[str, Any]] | None = None, fused: dict[str, dict[str, Any]] | None = None) -> str:
    """reports/summary.md."""
    semantic, fused = split_panoptic(evals, fused)
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


def split_panoptic(evals: dict[str, dict[str, Any]], fused: dict[str, dict[str, Any]] | None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The model results, and the fused results (a panoptic result among the evals counts as fused)."""
    semantic = {k: m for k, m in evals.items() if m.get("task") != "panoptic"}
    return semantic, {**{k: m for k, m in evals.items() if m.get("task") == "panoptic"}, **(fused or {})}


# --------------------------------------------------------------------------------------
# The outcome
# --------------------------------------------------------------------------------------


def _f4(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def champion_eval(ranking: dict[str, Any] | None) -> str | None:
    """The name of the eval folder that scored the champion in this run: the candidate promoted,
    or the one that is the champion's own checkpoint (rejected at ``margin`` as the champion);
    None when the champion was evaluated in an earlier run."""
    for c in (ranking or {}).get("candidates", []):
        own = any(g.get("gate") == "margin" and str(g.get("detail", "")).startswith("this checkpoint is the champion")
                  for g in c.get("gates", []))
        if c.get("decision") == "promoted to champion" or own:
            return Path(str(c.get("eval_dir", ""))).name or None
    return None


def _champion_value(ranking: dict[str, Any]) -> tuple[float | None, str]:
    """The champion's metric on this run's data, and whether it changed in this run."""
    after = ranking.get("champion_after")
    for c in ranking.get("candidates", []):
        if c.get("decision") == "promoted to champion":
            before = ranking.get("champion_before")
            return c.get("value"), f"newly promoted (was {_who(before)})" if before else "newly promoted"
    judged = ranking.get("champion_judged") or {}
    if after and judged.get("version") == after.get("version"):
        return judged.get("on_this_data"), "unchanged"
    return None, "unchanged"


def ending(promotion: dict[str, Any] | None, evals: dict[str, dict[str, Any]], report: str) -> str:
    """What ``make pipeline`` ends with: the champion and its metric against the best baseline,
    the panoptic champion and its PQ, what the promotion changed (each candidate promoted or
    refused, and why), and where the report is (``report``: its path)."""
    when = f" (promotion of {promotion['time']})" if promotion and promotion.get("time") else ""
    lines = [f"== segpipe: the outcome{when} =="]
    if promotion is None:
        ranked = sorted(((m.get("miou"), arch) for arch, m in evals.items() if metric_value(m, "miou") is not None),
                        reverse=True)
        lines.append("No promotion report: run segpipe promote. "
                     + (f"Best model by miou: {ranked[0][1]} {_f4(ranked[0][0])}." if ranked else "No model results."))
    else:
        metric, split = promotion["metric"], (promotion.get("data") or {}).get("split", "the split")
        after = promotion.get("champion_after")
        if after:
            value, how = _champion_value(promotion)
            text = f"Champion: {_who(after)}, {how}: {metric} {_f4(value)} on {split}"
            scored = {k: v for k, v in (promotion.get("baselines") or {}).items() if v is not None}
            if scored:
                name = max(scored, key=lambda k: scored[k])
                delta = f" ({value - scored[name]:+.4f})" if value is not None else ""
                text += f"; best baseline {name} {_f4(scored[name])}{delta}"
            lines.append(text + ".")
        else:
            lines.append(f"No champion: no candidate passed every gate on {metric}.")
        pan = promotion.get("panoptic")
        if pan and pan.get("champion_after"):
            value, how = _champion_value(pan)
            who = _who(pan["champion_after"])
            if pan["champion_after"].get("pair"):  # a fused bundle: its parts as registered
                who += f" = {pan['champion_after']['pair']}"
            lines.append(f"Panoptic champion: {who}, {how}: {pan['metric']} {_f4(value)}.")
        rows = [*promotion.get("candidates", []), *((pan or {}).get("candidates") or [])]
        if rows:
            lines.append("Decisions:")
            width = max(len(str(r.get("arch", ""))) for r in rows)
            lines += [f"  {str(r.get('arch', '')):<{width}}  {r.get('decision', '')}" for r in rows]
        if promotion.get("created"):
            lines.append(f"New registry versions: {', '.join(promotion['created'])}.")
    lines.append(f"Report: {report}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_iou(folder: Path, classes: list[str]) -> dict[str, float | None]:
    """Per-class IoU of an eval folder's per_class_iou.csv, in the order of ``classes`` (None
    where the class has no IoU)."""
    path = folder / "per_class_iou.csv"
    try:
        found = {r["class"]: _number(r["iou"]) for r in csv.DictReader(io.StringIO(path.read_text()))}
    except (OSError, UnicodeDecodeError, KeyError, csv.Error) as e:
        raise ReportError(f"{path}: not a readable class,iou table: {e}") from None
    return {c: found.get(c) for c in [*classes, *[c for c in found if c not in classes]]}


def read_confusion(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """The pixel counts of an eval folder's confusion_counts.csv as a matrix over ``classes``
    (and any other name the file holds, appended)."""
    path = folder / "confusion_counts.csv"
    try:
        rows = [(r["actual"], r["predicted"], int(r["count"])) for r in csv.DictReader(io.StringIO(path.read_text()))]
    except (OSError, UnicodeDecodeError, KeyError, ValueError, csv.Error) as e:
        raise ReportError(f"{path}: not a readable actual,predicted,count table: {e}") from None
    names = list(classes) + sorted({n for a, p, _ in rows for n in (a, p)} - set(classes))
    index = {n: i for i, n in enumerate(names)}
    mat = np.zeros((len(names), len(names)), dtype=np.int64)
    for a, p, n in rows:
        mat[index[a], index[p]] += n
    return names, mat


@dataclass(frozen=True)
class Inputs:
    """Everything the report shows, read once."""

    evals: dict[str, EvalResult]
    train: dict[str, dict[str, Any]]
    histories: dict[str, list[dict[str, float | None]]]
    baselines: dict[str, EvalResult]
    fused: dict[str, dict[str, Any]]
    promotion: dict[str, Any] | None
    drift: Any
    problems: list[str]

    @property
    def eval_data(self) -> dict[str, dict[str, Any]]:
        return {k: r.data for k, r in self.evals.items()}

    @property
    def baseline_data(self) -> dict[str, dict[str, Any]]:
        return {k: r.data for k, r in self.baselines.items()}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not readable JSON: {e}") from None


def gather(evals_dir: Path, promotion_dir: Path, train_dir: Path | None = None, baselines_dir: Path | None = None,
           fused_dir: Path | None = None, drift: Path | None = None) -> Inputs:
    """Read the results; an unreadable eval, baseline or fused result is named in ``problems``."""
    problems: list[str] = []
    found = read_results(evals_dir)
    problems += found.problems.values()
    base = read_results(baselines_dir)
    problems += base.problems.values()
    fused: dict[str, dict[str, Any]] = {}
    if fused_dir is not None and (Path(fused_dir) / "metrics.json").is_file():
        try:
            fused[Path(fused_dir).name] = EvalResult.read(fused_dir).data
        except ValueError as e:
            problems.append(str(e))
    train: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float | None]]] = {}
    if train_dir is not None and Path(train_dir).is_dir():
        for d in sorted(Path(train_dir).iterdir()):
            if d.is_dir() and (m := _read_json(d / "metrics.json")):
                train[d.name] = m
            if (d / "history.tsv").is_file():
                histories[d.name] = read_history(d / "history.tsv")
    if drift is not None and not Path(drift).is_file():
        raise ReportError(f"--drift {drift}: no such file")
    return Inputs(evals=dict(found.ok), train=train, histories=histories, baselines=dict(base.ok), fused=fused,
                  promotion=_read_json(Path(promotion_dir) / "promotion.json"),
                  drift=_read_json(Path(drift)) if drift is not None else None, problems=problems)


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


def gates_table(ranking: dict[str, Any]) -> Table:
    """One row per candidate: its value of the ranking metric, the decision, and every gate it
    reached with its outcome and reason."""
    rows = []
    for c in ranking.get("candidates", []):
        gates = "\n".join(f"{'PASS' if g.get('passed') else 'FAIL'} {g.get('gate')}: {g.get('detail')}"
                          for g in c.get("gates", []))
        rows.append((str(c.get("arch", "")), str(c.get("eval_dir", "")), fmt(c.get("value")),
                     str(c.get("decision", "")), gates))
    return Table(("candidate", "result", ranking.get("metric", "value"), "decision", "gates"), tuple(rows),
                 numeric=frozenset({2}))


def _gates_html(table: Table) -> str:
    """The gates column as a list, each gate's PASS or FAIL marked."""
    gates = len(table.head) - 1

    def cell(column: int, text: str) -> str:
        if column != gates:
            return _esc(text)
        items = "".join(f'<li><span class="{"pass" if ln.startswith("PASS") else "fail"}">{_esc(ln[:4])}</span>'
                        f"{_esc(ln[4:])}</li>" for ln in text.splitlines())
        return f'<ul class="gates">{items}</ul>'

    return table.html(cell)


def overlay_files(inputs: Inputs, name: str | None) -> list[Path]:
    if name is None or name not in inputs.evals:
        return []
    return sorted((inputs.evals[name].folder / "overlays").glob("*.png"))


OVERLAY_MIN_WIDTH = 480  # CSS pixels: small images (64 px scenes) are shown enlarged, pixels kept sharp


def overlay_img(path: Path) -> str:
    """An overlay PNG inline, enlarged by a whole factor when it is narrower than OVERLAY_MIN_WIDTH."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width = im.width
    scale = max(1, math.ceil(OVERLAY_MIN_WIDTH / max(width, 1)))
    return png_img(data, path.stem).replace("<img ", f'<img class="pixels" width="{width * scale}" ', 1)


def html_report(inputs: Inputs, outcome: str) -> str:
    """reports/index.html: see the module docstring for what it shows."""
    from segpipe import figures

    semantic, fused = split_panoptic(inputs.eval_data, inputs.fused)
    promotion = inputs.promotion or {}
    champ = champion_eval(promotion) if promotion else None
    subtitle = "Validation results of every architecture, the reference predictors and the promotion"
    if promotion.get("time"):
        subtitle += f"; promotion run at {promotion['time']}"
    if promotion.get("data"):
        subtitle += f"; split {promotion['data'].get('split')}, shard manifest {str(promotion['data'].get('manifest'))[:12]}"
    sections = [Section("outcome", "Outcome", f'<div class="outcome">{_esc(outcome)}</div>')]

    grid = metrics_grid(semantic, inputs.train, inputs.baseline_data, highlight=champ)
    body = paragraph("Validation metrics per architecture (fractions in [0, 1]; COCO AP/AR for instance-capable "
                     "models), then the reference predictors fitted on the train split. The champion's row is "
                     "green.") + grid.html()
    if (share := training_share(inputs.train)):
        body += paragraph(share, "note")
    sections.append(Section("summary", "Models and baselines", body))

    if inputs.histories:
        never = sorted(a for a, rows in inputs.histories.items() if not any(r.get("val_score") is not None for r in rows))
        note = (paragraph(f"Not validated during training (train.val_every 0; evaluate scores their last checkpoint): "
                          f"{', '.join(never)}.", "note") if never else "")
        sections.append(Section("curves", "Learning curves", figure(
            figures.learning_curves(inputs.histories),
            "Validation score (mIoU; thing mIoU for instance models) and training loss against seconds of "
            "training, every architecture") + note))

    problems = list(inputs.problems)
    ious, confusions = {}, []
    for name, r in sorted((k, r) for k, r in inputs.evals.items() if k in semantic):
        classes = list((r.data.get("per_class") or {}).keys())
        try:
            ious[name] = read_iou(r.folder, classes)
            names, counts = read_confusion(r.folder, classes)
            confusions.append(figure(figures.confusion_heatmap(name, names, counts),
                                     f"{name}: rows are the actual class, each row sums to 1"))
        except ReportError as e:
            problems.append(str(e))
    if ious:
        sections.append(Section("per-class-iou", "Per-class IoU", figure(
            figures.iou_bars(ious), "IoU of each class, per model (instance models: things and background)")))
    if confusions:
        sections.append(Section("confusion", "Confusion matrices (row-normalised)",
                                f'<div class="grid">{"".join(confusions)}</div>'))

    if promotion.get("champion_after"):
        files = overlay_files(inputs, champ)
        who = _who(promotion["champion_after"])
        if files:
            body = paragraph(f"The champion {who} on validation images: image | ground truth | prediction, "
                             "with the colour of each class named below.") + '<div class="grid">' + "".join(
                f"<figure>{overlay_img(f)}<figcaption>{_esc(f.stem)}</figcaption></figure>" for f in files) + "</div>"
        else:
            body = paragraph(f"The champion {who} was evaluated in an earlier run; its overlays are in that run's "
                             "report (or run segpipe evaluate on it).", "note")
        sections.append(Section("overlays", "The champion on validation images", body))

    if (pq := pq_grid(semantic, fused)) is not None:
        sections.append(Section("pq", "Panoptic quality", paragraph(
            "PQ, SQ, RQ (COCO's definition, see docs/metrics.md) of the models with a panoptic output and of "
            "the fused best semantic + best instance pair.") + pq.html()))

    if (col := collection_grid(semantic, inputs.baseline_data)) is not None:
        sections.append(Section("collections", "Per collection", paragraph(
            "mIoU of each model on each source collection of the split (data/raw/<name>): where a new site is "
            "weaker, or a drop made the old sites worse.") + col.html()))

    if inputs.promotion is None:
        sections.append(Section("promotion", "Promotion", paragraph("No promotion report found.")))
    else:
        body = "".join(paragraph(line.replace("`", "")) for line in promotion_lines(promotion))
        body += "<h3>Candidates and their gates</h3>" + _gates_html(gates_table(promotion))
        if promotion.get("panoptic"):
            body += "<h3>Panoptic candidates and their gates</h3>" + _gates_html(gates_table(promotion["panoptic"]))
        sections.append(Section("promotion", "Promotion", body))

    if inputs.drift is not None:
        sections.append(Section("drift", "Drift", json_html(inputs.drift)))
    if problems:
        sections.append(Section("not-shown", "Not shown", "<ul>" + "".join(f"<li>{_esc(p)}</li>" for p in problems)
                                + "</ul>"))
    return page(TITLE, subtitle, sections)


def _esc(text: str) -> str:
    return html_module.escape(text)


# --------------------------------------------------------------------------------------
# run / main
# --------------------------------------------------------------------------------------


def run(evals_dir: Path, promotion_dir: Path, out: Path, train_dir: Path | None = None,
        baselines_dir: Path | None = None, fused_dir: Path | None = None, html: Path | None = None,
        drift: Path | None = None) -> str:
    """Write the Markdown summary to ``out`` (returned), the page to ``html`` when given, and the
    outcome to ``ending.txt`` beside ``out``."""
    inputs = gather(evals_dir, promotion_dir, train_dir, baselines_dir, fused_dir, drift)
    semantic, _ = split_panoptic(inputs.eval_data, inputs.fused)
    outcome = ending(inputs.promotion, semantic, f"{html} (tables: {out})" if html else str(out))
    if html is not None:
        atomic_write_text(html, html_report(inputs, outcome))
    text = render(inputs.eval_data, inputs.train, inputs.promotion, inputs.baseline_data, inputs.fused)
    if inputs.problems:
        text += "\n## Not shown\n\n" + "\n".join(f"- {p}" for p in inputs.problems) + "\n"
    atomic_write_text(out, text)
    atomic_write_text(Path(out).parent / ENDING_FILE, outcome + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--evals", type=Path, required=True, help="folder of evaluate outputs, one per architecture")
    ap.add_argument("--train", type=Path, default=None, help="folder of train outputs (optional)")
    ap.add_argument("--promotion", type=Path, required=True, help="promotion report folder")
    ap.add_argument("--baselines", type=Path, default=None, help="folder of reference predictors (optional)")
    ap.add_argument("--fused", type=Path, default=None,
                    help="output of segpipe fuse (optional): a PQ row for the fused pair")
    ap.add_argument("--out", type=Path, required=True, help="the Markdown summary (ending.txt is written beside it)")
    ap.add_argument("--html", type=Path, default=None, help="the self-contained HTML report (optional)")
    ap.add_argument("--drift", type=Path, default=None, help="a drift report (JSON) to show (optional)")
    ap.add_argument("--screenshot", type=Path, default=None,
                    help="also render --html in headless Chromium into this PNG (e.g. docs/report.png)")
    args = ap.parse_args(argv)
    if args.screenshot is not None and args.html is None:
        raise ReportError("--screenshot needs --html (the page to render)")
    run(args.evals, args.promotion, args.out, args.train, args.baselines, args.fused, args.html, args.drift)
    if args.screenshot is not None:
        from segpipe.report_html import screenshot

        screenshot(args.html, args.screenshot, stable=True)
    outcome = (args.out.parent / ENDING_FILE).read_text().rstrip("\n")
    if os.environ.get(ENDING_ENV, "").strip().lower() == "later":
        print(f"report: wrote {', '.join(str(p) for p in (args.html, args.out) if p)}")
    else:
        print(outcome)
