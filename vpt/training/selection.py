"""Which weights a run tests, and whether its validation split can choose them.

``task.test_checkpoint=best`` tests the epoch with the best validation score (the
``best.ckpt`` that ``monitor`` picked); ``last`` tests the weights at the end of training.
"Best" is only as good as the split that ranks the epochs: a single case, or a class with
almost no voxels (or images) in it, gives a score that stays flat or jumps by chance, and
the "best" epoch can then be one of the first. :func:`validation_problem` says so before
training, so that the user can test ``last`` or give validation more data.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Sequence, get_args

import numpy as np

from vpt.errors import ConfigError

__all__ = [
    "MIN_VALIDATION_IMAGES",
    "MIN_VALIDATION_VOXELS",
    "TEST_CHECKPOINTS",
    "TestCheckpoint",
    "check_test_checkpoint",
    "classification_validation_problem",
    "segmentation_validation_problem",
    "validation_problem",
    "warn_if_validation_cannot_choose",
]

_logger = logging.getLogger(__name__)

TestCheckpoint = Literal["best", "last"]
#: The values of ``task.test_checkpoint``.
TEST_CHECKPOINTS: tuple[str, ...] = get_args(TestCheckpoint)

#: Fewer labelled voxels of a class than this in the whole validation split, and its Dice
#: is decided by a handful of voxels (or is undefined when the class is absent).
MIN_VALIDATION_VOXELS = 100
#: Fewer validation images of a class than this, and its accuracy moves in steps of 100%.
MIN_VALIDATION_IMAGES = 2


def check_test_checkpoint(value: Any) -> TestCheckpoint:
    """The checked value of ``task.test_checkpoint``.

    Raises:
        ConfigError: anything but ``best`` or ``last``.
    """
    if value not in TEST_CHECKPOINTS:
        raise ConfigError(
            f"task.test_checkpoint={value} is not a checkpoint vpt can test; use task.test_checkpoint=best "
            "(the best validation epoch) or task.test_checkpoint=last (the weights at the end of training)."
        )
    return value  # type: ignore[return-value]


def _listed(class_names: Sequence[str], counts: np.ndarray, indices: Sequence[int]) -> str:
    shown = ", ".join(f"{class_names[index]} ({int(counts[index])})" for index in indices[:5])
    return shown + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def segmentation_validation_problem(
    case_ids: Sequence[str], voxel_counts: np.ndarray, class_names: Sequence[str]
) -> Optional[str]:
    """What makes a segmentation validation split too small to rank epochs.

    Args:
        case_ids: The validation cases.
        voxel_counts: ``(C,)`` labelled voxels of each class over the validation split,
            background (index 0) first.
        class_names: Class names by index.

    Returns:
        A clause (``"it holds a single case (x)"``), or ``None`` when the split is usable or
        empty (no validation: there is no best epoch to choose).
    """
    if len(case_ids) == 0:
        return None
    problems = []
    if len(case_ids) == 1:
        problems.append(f"it holds a single case ({case_ids[0]})")
    scarce = [index for index in range(1, len(voxel_counts)) if voxel_counts[index] < MIN_VALIDATION_VOXELS]
    if scarce:
        problems.append(
            f"the class(es) {_listed(class_names, voxel_counts, scarce)} have fewer than {MIN_VALIDATION_VOXELS} "
            "labelled voxels in it"
        )
    return " and ".join(problems) or None


def classification_validation_problem(labels: np.ndarray, class_names: Sequence[str]) -> Optional[str]:
    """What makes a classification validation split too small to rank epochs.

    Args:
        labels: ``(N,)`` class indices of the validation images.
        class_names: Class names by index.

    Returns:
        A clause, or ``None`` when the split is usable or empty.
    """
    if len(labels) == 0:
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    scarce = [index for index in range(len(class_names)) if counts[index] < MIN_VALIDATION_IMAGES]
    if not scarce:
        return None
    return f"it holds fewer than {MIN_VALIDATION_IMAGES} images of the class(es) {_listed(class_names, counts, scarce)}"


def validation_problem(datamodule: Any, monitor: str = "the validation score") -> Optional[str]:
    """The warning for a validation split too small to choose the tested epoch, or ``None``.

    Args:
        datamodule: A vpt data module: a segmentation one (``class_voxel_counts`` and
            ``cases``) or a classification one (``split_labels``). Others are not judged.
        monitor: The metric that picks ``best.ckpt``, for the message.

    Returns:
        One sentence that says what is wrong and names the fixes.
    """
    if hasattr(datamodule, "class_voxel_counts"):
        cases = [case.case_id for case in datamodule.cases("val")]
        counts = datamodule.class_voxel_counts("val") if cases else np.zeros(0, dtype=np.int64)
        problem = segmentation_validation_problem(cases, counts, datamodule.class_names)
    elif hasattr(datamodule, "split_labels"):
        problem = classification_validation_problem(datamodule.split_labels("val"), datamodule.class_names)
    else:
        return None
    if problem is None:
        return None
    fraction = getattr(datamodule, "val_fraction", None)
    now = f", now {fraction}" if fraction is not None else ""
    return (
        f"The validation split is too small to choose the tested epoch: {problem}, so {monitor} can stay flat or jump "
        "by chance and the 'best' checkpoint may come from one of the first epochs; set task.test_checkpoint=last to "
        f"test the weights at the end of training, or give validation more data (raise task.data.val_fraction{now})."
    )


def warn_if_validation_cannot_choose(datamodule: Any, monitor: str = "the validation score") -> Optional[str]:
    """Log :func:`validation_problem`'s warning, if any (call once per run, before training).

    Returns:
        The warning, or ``None``.
    """
    message = validation_problem(datamodule, monitor)
    if message is not None:
        _logger.warning(message)
    return message
