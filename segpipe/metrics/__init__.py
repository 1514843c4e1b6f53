"""Evaluation metrics: semantic (a confusion matrix, Boundary IoU counts in ``boundary``), COCO
(COCOeval's numbers through faster-coco-eval, in ``coco``) and panoptic quality (``panoptic``).

Conventions are written down in ``docs/metrics.md``. ``segpipe.metrics.coco`` imports
faster-coco-eval and is not imported here.
"""

from __future__ import annotations

import math
from typing import Any

from segpipe.metrics.boundary import BoundaryIoU
from segpipe.metrics.semantic import ConfusionMatrix, MetricsInputError, compute


def metric_value(metrics: dict[str, Any], key: str) -> float | None:
    """``metrics["segm"]["AP"]`` for ``"segm.AP"`` in an evaluate metrics.json; None when missing,
    not a number, or NaN/inf."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


__all__ = ["BoundaryIoU", "ConfusionMatrix", "MetricsInputError", "compute", "metric_value"]
