"""Classification metrics (torchmetrics): top-1 (micro), top-5, macro and per-class accuracy."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["classification_metrics", "per_class_accuracy"]


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy metrics named ``{prefix}acc``, ``{prefix}acc_macro`` and, with more than 5
    classes, ``{prefix}acc_top5``.

    ``acc`` is micro top-1 (correct / total); ``acc_macro`` is the mean of per-class
    recalls (balanced accuracy), which is what matters on imbalanced medical sets.
    """
    metrics = {
        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "acc_macro": MulticlassAccuracy(num_classes=num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=5)
    return MetricCollection(metrics, prefix=prefix)


def per_class_accuracy(num_classes: int) -> MulticlassAccuracy:
    """Accuracy of each class (its recall), for the final report."""
    return MulticlassAccuracy(num_classes=num_classes, average=None)
