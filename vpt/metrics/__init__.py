"""Metrics: classification accuracy; segmentation Dice (per slice and per volume), HD95 and NSD;
per-prompt Dice and per-organ 3D scores of interactive segmentation."""

from vpt.metrics.classification import classification_metrics, per_class_accuracy
from vpt.metrics.interactive import mask_dice, score_volume_prompts
from vpt.metrics.segmentation import (
    DEFAULT_NSD_TOLERANCE,
    METRIC_DEFINITIONS,
    SliceDice,
    format_organ_table,
    metric_definitions,
    slice_dice,
    summarize_volume_scores,
    volume_scores,
)

__all__ = [
    "classification_metrics",
    "per_class_accuracy",
    "mask_dice",
    "score_volume_prompts",
    "DEFAULT_NSD_TOLERANCE",
    "METRIC_DEFINITIONS",
    "metric_definitions",
    "SliceDice",
    "format_organ_table",
    "slice_dice",
    "summarize_volume_scores",
    "volume_scores",
]
