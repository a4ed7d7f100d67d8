"""Metrics: classification accuracy; segmentation Dice (per slice and per volume), HD95 and NSD."""

from vpt.metrics.classification import classification_metrics, per_class_accuracy
from vpt.metrics.segmentation import (
    DEFAULT_NSD_TOLERANCE,
    METRIC_DEFINITIONS,
    SliceDice,
    metric_definitions,
    slice_dice,
    summarize_volume_scores,
    volume_scores,
)

__all__ = [
    "classification_metrics",
    "per_class_accuracy",
    "DEFAULT_NSD_TOLERANCE",
    "METRIC_DEFINITIONS",
    "metric_definitions",
    "SliceDice",
    "slice_dice",
    "summarize_volume_scores",
    "volume_scores",
]
