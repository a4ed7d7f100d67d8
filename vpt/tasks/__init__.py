"""Tasks (config group ``task``): the LightningModules and how they are built from a config.

A new task is one module here that registers a builder with :func:`register_task`, plus its
configs in ``configs/task/``.
"""

from typing import TYPE_CHECKING

from vpt.tasks.registry import TaskParts, available_tasks, build_task, register_task

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Importing the task modules registers them.
from vpt.tasks.classification import ClassificationTask  # noqa: E402  isort: skip
from vpt.tasks.segmentation import SegmentationTask  # noqa: E402  isort: skip
from vpt.tasks.interactive import InteractiveSegmentationTask  # noqa: E402  isort: skip
from vpt.tasks.segmentation import check_training_splits  # noqa: E402  isort: skip


def check_training_data(cfg: "DictConfig") -> None:
    """What a training run needs of its data, checked before anything is built or written:
    for the volume tasks, a case in each of the train, validation and test splits."""
    if str(cfg.task.name) in ("segmentation", "interactive_segmentation"):
        check_training_splits(cfg.task)

__all__ = ["TaskParts", "available_tasks", "build_task", "check_training_data", "register_task", "ClassificationTask", "SegmentationTask", "InteractiveSegmentationTask"]
