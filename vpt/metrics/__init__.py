"""Metrics: classification accuracy; segmentation Dice and HD95 (per slice and per volume)."""

from vpt.metrics.classification import classification_metrics, per_class_accuracy
from vpt.metrics.segmentation import SliceDice, slice_dice, summarize_volume_scores, volume_scores

__all__ = [
    "classification_metrics",
    "per_class_accuracy",
    "SliceDice",
    "slice_dice",
    "summarize_volume_scores",
    "volume_scores",
]
