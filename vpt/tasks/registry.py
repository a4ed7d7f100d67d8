"""Name -> task builder. A task turns the resolved config into the LightningModule and the
LightningDataModule that the trainer runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import lightning as L
from omegaconf import DictConfig
from torch import nn

from vpt.errors import ConfigError

__all__ = ["TaskParts", "register_task", "build_task", "available_tasks"]


@dataclass
class TaskParts:
    """What a task builder returns.

    Args:
        module: The LightningModule to train and test.
        datamodule: Its data.
        model: The network inside ``module`` whose trainable tensors are exported.
        metadata: Plain values that describe the model (backbone, method, classes, input
            size, normalisation); stored with exported weights.
    """

    module: L.LightningModule
    datamodule: L.LightningDataModule
    model: nn.Module
    metadata: Dict[str, Any] = field(default_factory=dict)


TaskBuilder = Callable[[DictConfig], TaskParts]
_TASKS: Dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def decorator(builder: TaskBuilder) -> TaskBuilder:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = builder
        return builder

    return decorator


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(cfg: DictConfig) -> TaskParts:
    """Build the parts of the task named by ``cfg.task.name``."""
    name = cfg.task.name
    if name not in _TASKS:
        raise ConfigError(f"Unknown task kind {name!r}; choose one of {available_tasks()}.")
    parts = _TASKS[name](cfg)
    from vpt.models.switches import apply_model_switches

    # model.grad_checkpointing / compile / channels_last, the same for every task.
    apply_model_switches(parts.model, cfg.model)
    return parts
