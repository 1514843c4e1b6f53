"""Evaluation metrics: semantic (a confusion matrix) and COCO (pycocotools' COCOeval, in ``coco``).

Conventions are written down in ``docs/metrics.md``. ``segpipe.metrics.coco`` imports
pycocotools and is not imported here.
"""

from __future__ import annotations

from segpipe.metrics.semantic import ConfusionMatrix, MetricsInputError, compute

__all__ = ["ConfusionMatrix", "MetricsInputError", "compute"]
