"""The figures of ``reports/index.html`` (``segpipe report``), drawn with matplotlib's Agg backend
and returned as PNG bytes, so that the page embeds them and opens offline.

Each function takes plain data (no file is read here): learning curves (validation score and
training loss against seconds, one line per architecture), per-class IoU bars (one panel per
model) and a row-normalised confusion heatmap with class names.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; the same pixels on every host
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # no timestamps or version in the file: the same figure gives the same bytes
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Two panels: validation score and training loss against seconds of training, one line per
    architecture (``histories``: arch -> rows of history.tsv with ``elapsed_s``, ``val_score``,
    ``train_loss``; empty cells are None). An architecture never validated has no validation line."""
    plt = _pyplot()
    fig, (val_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arch, rows) in enumerate(sorted(histories.items())):
        colour = plt.get_cmap("tab10")(i % 10)
        scored = [(r["elapsed_s"], r["val_score"]) for r in rows if _finite(r.get("elapsed_s")) and _finite(r.get("val_score"))]
        loss = [(r["elapsed_s"], r["train_loss"]) for r in rows if _finite(r.get("elapsed_s")) and _finite(r.get("train_loss"))]
        if scored:
            val_ax.plot(*zip(*scored), marker="o", markersize=3, color=colour, label=arch)
        if loss:
            loss_ax.plot(*zip(*loss), marker="o", markersize=2, color=colour, label=arch)
    val_ax.set(title="validation score", xlabel="seconds of training", ylabel="val score (mIoU; things: thing mIoU)")
    loss_ax.set(title="training loss", xlabel="seconds of training", ylabel="loss")
    for ax in (val_ax, loss_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def iou_bars(per_model: Mapping[str, Mapping[str, float | None]]) -> bytes:
    """Horizontal bars of per-class IoU, one panel per model (``per_model``: model -> class -> IoU;
    None for a class absent from both the ground truth and the predictions)."""
    plt = _pyplot()
    models = sorted(per_model)
    cols = min(len(models), 4) or 1
    rows = math.ceil(len(models) / cols) or 1
    height = max(max((len(v) for v in per_model.values()), default=1) * 0.22 + 0.8, 2.0)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, model in zip(axes.flat, models):
        classes = list(per_model[model])
        values = [per_model[model][c] for c in classes]
        y = np.arange(len(classes))
        ax.barh(y, [0 if v is None else v for v in values], color="#4878d0")
        for yi, v in zip(y, values):
            ax.text(0.01 if v is None else v + 0.01, yi, "n/a" if v is None else f"{v:.2f}", va="center", fontsize=7)
        ax.set_yticks(y, classes, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15)
        ax.set_title(model, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.supxlabel("IoU")
    fig.tight_layout()
    return _png(fig)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row (actual class) divided by its sum: the share of its pixels predicted as each
    class; rows without pixels stay 0."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def confusion_heatmap(model: str, names: Sequence[str], counts: np.ndarray) -> bytes:
    """The row-normalised confusion matrix of ``counts`` (actual x predicted pixels, in the order
    of ``names``) as a heatmap with class names and the share in each cell."""
    plt = _pyplot()
    shares = row_normalised(counts)
    n = len(names)
    size = max(3.0, 0.3 * n + 1.6)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="actual", title=f"{model}: share of each actual class's pixels")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if shares[i, j] >= 0.005:
                    ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if shares[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def search_curves(trials: Mapping[str, Sequence[tuple[float, float]]], stopped: Sequence[str], best: str | None,
                  metric: str) -> bytes:
    """A search's trials: ``metric`` against seconds since the search started, one line per trial
    (``trials``: trial id -> (seconds, value) per report). Trials ASHA stopped early are dashed and
    end in a cross; the best trial is drawn thick."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (trial, points) in enumerate(sorted(trials.items())):
        points = [(t, v) for t, v in points if _finite(t) and _finite(v)]
        if not points:
            continue
        colour = plt.get_cmap("tab10")(i % 10)
        early = trial in stopped
        ax.plot(*zip(*points), marker="o", markersize=3, color=colour, linestyle="--" if early else "-",
                linewidth=2.5 if trial == best else 1.2,
                label=f"{trial}{' (best)' if trial == best else ''}{' (stopped early)' if early else ''}")
        if early:
            ax.plot(*points[-1], marker="x", markersize=9, color=colour)
    ax.set(title=f"search: {metric} of each trial", xlabel="seconds since the search started", ylabel=metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["confusion_heatmap", "iou_bars", "learning_curves", "row_normalised", "search_curves"]
