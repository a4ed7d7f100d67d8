"""Tasks (config group ``task``): the LightningModules and how they are built from a config.

A new task is one module here that registers a builder with :func:`register_task`, plus its
configs in ``configs/task/``.
"""

from vpt.tasks.registry import TaskParts, available_tasks, build_task, register_task

# Importing the task modules registers them.
from vpt.tasks.classification import ClassificationTask  # noqa: E402  isort: skip
from vpt.tasks.segmentation import SegmentationTask  # noqa: E402  isort: skip
from vpt.tasks.interactive import InteractiveSegmentationTask  # noqa: E402  isort: skip

__all__ = ["TaskParts", "available_tasks", "build_task", "register_task", "ClassificationTask", "SegmentationTask", "InteractiveSegmentationTask"]
