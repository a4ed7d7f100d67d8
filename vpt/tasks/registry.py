"""Name -> task builder. A task turns the resolved config into the LightningModule and the
LightningDataModule that the trainer runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import lightning as L
from omegaconf import DictConfig
from torch import nn

from vpt.errors import ConfigError

__all__ = ["TaskParts", "register_task", "build_task", "available_tasks", "register_prediction_builder", "build_for_prediction"]


@dataclass
class TaskParts:
    """What a task builder returns.

    Args:
        module: The LightningModule to train and test.
        datamodule: Its data; ``None`` when built for prediction (:func:`build_for_prediction`).
        model: The network inside ``module`` whose trainable tensors are exported.
        metadata: Plain values that describe the model (backbone, method, classes, input
            size, normalisation); stored with exported weights.
    """

    module: L.LightningModule
    datamodule: Optional[L.LightningDataModule]
    model: nn.Module
    metadata: Dict[str, Any] = field(default_factory=dict)


TaskBuilder = Callable[[DictConfig], TaskParts]
_TASKS: Dict[str, TaskBuilder] = {}


def _registrar(table: Dict[str, Any], what: str, name: str) -> Callable[[Any], Any]:
    """A decorator that records a builder under ``name`` in ``table``, once."""
    def decorator(builder: Any) -> Any:
        if name in table:
            raise ValueError(f"{what} {name!r} is registered twice")
        table[name] = builder
        return builder

    return decorator


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    return _registrar(_TASKS, "task", name)


#: Builders of a task's model from a saved preprocessing record, without its data (prediction).
PredictionBuilder = Callable[[DictConfig, Any], TaskParts]
_PREDICTION: Dict[str, PredictionBuilder] = {}


def register_prediction_builder(name: str) -> Callable[[PredictionBuilder], PredictionBuilder]:
    """Register how task ``name`` builds its model for prediction from a
    :class:`~vpt.data.preprocessing.Preprocessing` alone (``TaskParts.datamodule`` is ``None``)."""
    return _registrar(_PREDICTION, "prediction builder", name)


def build_for_prediction(cfg: DictConfig, preprocessing: Any) -> TaskParts:
    """The parts of the run ``cfg`` describes, built for prediction from its saved preprocessing:
    no data folder is read, ``datamodule`` is ``None``."""
    name = str(cfg.task.name)
    if name not in _PREDICTION:
        raise ConfigError(f"Task {name!r} cannot be built for prediction; prediction supports {sorted(_PREDICTION)}.")
    return _with_model_switches(_PREDICTION[name](cfg, preprocessing), cfg)


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(cfg: DictConfig) -> TaskParts:
    """Build the parts of the task named by ``cfg.task.name`` (the config typed first, see
    :mod:`vpt.config_schema`)."""
    from vpt.config_schema import typed_run_config

    cfg = typed_run_config(cfg)
    name = cfg.task.name
    if name not in _TASKS:
        raise ConfigError(f"Unknown task kind {name!r}; choose one of {available_tasks()}.")
    return _with_model_switches(_TASKS[name](cfg), cfg)


def _with_model_switches(parts: TaskParts, cfg: DictConfig) -> TaskParts:
    """model.grad_checkpointing / compile / channels_last, the same for every task and build."""
    from vpt.models.switches import apply_model_switches

    apply_model_switches(parts.model, cfg.model)
    return parts
