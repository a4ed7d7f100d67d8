"""Classification metrics (torchmetrics): top-1 (micro), top-5, macro and per-class accuracy."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

__all__ = [
    "CLASSIFICATION_METRIC_DEFINITIONS",
    "classification_metrics",
    "per_class_accuracy",
    "class_support",
    "per_class_report",
]

#: What each classification number in metrics.json means, with its empty-class rule.
CLASSIFICATION_METRIC_DEFINITIONS: dict[str, str] = {
    "acc": "top-1 accuracy over all test images (correct / total; torchmetrics MulticlassAccuracy average='micro').",
    "acc_macro": (
        "balanced accuracy: the mean over classes of each class's recall (torchmetrics average='macro'); a class "
        "with no test images is left out of the mean unless it was predicted, in which case it counts as 0."
    ),
    "acc_top5": "top-5 accuracy over all test images (only with more than 5 classes).",
    "acc_per_class": "each class's recall (correct / test images of that class); null for a class with no test images.",
}


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


def class_support(num_classes: int) -> MulticlassStatScores:
    """Per-class true positives, false positives, true negatives, false negatives and support
    (synchronised across processes), to tell an absent class from a class scored 0."""
    return MulticlassStatScores(num_classes=num_classes, average=None)


def per_class_report(
    recalls: torch.Tensor, stat_scores: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Optional[float]]:
    """``{class: recall}``, with ``None`` for classes that have no test images.

    Args:
        recalls: (C,) from :func:`per_class_accuracy`.
        stat_scores: (C, 5) from :func:`class_support` (tp, fp, tn, fn, support).
        class_names: C names.
    """
    support = stat_scores[:, 4]
    return {
        name: (float(recall) if int(count) > 0 else None)
        for name, recall, count in zip(class_names, recalls.tolist(), support.tolist())
    }
