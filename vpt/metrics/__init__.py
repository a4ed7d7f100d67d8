"""Metrics: classification accuracy now; segmentation (Dice, HD95) joins here."""

from vpt.metrics.classification import classification_metrics, per_class_accuracy

__all__ = ["classification_metrics", "per_class_accuracy"]
