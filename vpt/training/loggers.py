"""Experiment loggers by name (the ``logger`` config group), built without ``_target_``.

``metrics.csv`` in the run folder is always written: the curves and the resume history
come from it. ``logger=tensorboard|mlflow|wandb`` adds that logger beside it; its options
are the logger class's own keyword arguments. Only the names registered here can be built,
so a config read from a run folder or a weights file cannot name arbitrary code.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from typing_extensions import override

from vpt.atomic import atomic_path
from vpt.errors import ConfigError

__all__ = ["ResumableCSVLogger", "build_loggers", "available_loggers", "register_logger"]

_logger = logging.getLogger(__name__)


class _AppendingWriter(_ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued.

    Lightning deletes the file when the folder is reused; a resumed run keeps the rows
    logged before the step it resumes from (Lightning logs epoch-end rows at the epoch's
    last step, ``global_step - 1``) and drops later ones: they belong to work the crash
    lost, which is now done again.
    """

    def __init__(self, log_dir: str, keep_until_step: Optional[int]) -> None:
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self._fs = get_filesystem(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if keep_until_step is None:
            raise ConfigError(f"{path} exists already; vpt does not overwrite a run's history, choose another run folder.")
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if float(row.get("step") or 0) < keep_until_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` directly in the run folder; continued, not wiped, when resuming.

    Args:
        save_dir: The run folder.
        resume_step: The global step of the checkpoint being resumed (``None`` for a new
            run; an existing ``metrics.csv`` is then refused).
    """

    def __init__(self, save_dir: str | Path, resume_step: Optional[int] = None) -> None:
        super().__init__(save_dir=str(save_dir), name="", version="")
        self._resume_step = resume_step

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment

    @override
    def log_hyperparams(self, params: Any = None) -> None:
        # The run folder already holds the resolved config (config.yaml); a second copy
        # (hparams.yaml) only goes stale on resume.
        return None


def _csv(run_dir: Path, resume_step: Optional[int], **options: Any) -> Logger:
    return ResumableCSVLogger(run_dir, resume_step)


def _needs(package: str, logger: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"logger={logger} needs the {package} package; install it (pip install {package}) or drop logger={logger}.")


def _tensorboard(run_dir: Path, resume_step: Optional[int], **options: Any) -> Logger:
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("logger=tensorboard needs the tensorboard package; install it (pip install tensorboard) or drop logger=tensorboard.")
    from lightning.pytorch.loggers import TensorBoardLogger

    options = {"name": "tensorboard", "version": "", "default_hp_metric": False, **options}
    return TensorBoardLogger(save_dir=str(run_dir), **options)


def _mlflow(run_dir: Path, resume_step: Optional[int], **options: Any) -> Logger:
    _needs("mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    options = {"tracking_uri": f"file:{run_dir / 'mlruns'}", **options}
    return MLFlowLogger(**options)


def _wandb(run_dir: Path, resume_step: Optional[int], **options: Any) -> Logger:
    _needs("wandb", "wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=str(run_dir), **options)


LoggerBuilder = Callable[..., Logger]
_LOGGERS: dict[str, LoggerBuilder] = {"csv": _csv, "tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}


def register_logger(name: str, builder: LoggerBuilder) -> None:
    """Make ``logger=<name>`` build ``builder(run_dir, resume_step, **options)`` (from Python code)."""
    if name in _LOGGERS:
        raise ValueError(f"logger {name!r} is registered twice")
    _LOGGERS[name] = builder


def available_loggers() -> list[str]:
    return sorted(_LOGGERS)


def build_loggers(config: Optional[Mapping[str, Any]], run_dir: Path, resume_step: Optional[int] = None) -> list[Logger]:
    """The CSV logger plus every logger named in ``config`` (``{name: {options}}``).

    Args:
        config: The ``logger`` config node as plain containers (``None``: CSV only).
        run_dir: The run folder.
        resume_step: Global step of the checkpoint being resumed, if any.

    Raises:
        ConfigError: an unknown logger name, or its package is not installed.
    """
    loggers: list[Logger] = [_csv(run_dir, resume_step)]
    for name, options in (config or {}).items():
        if name == "csv":
            continue
        if name not in _LOGGERS:
            raise ConfigError(f"Unknown logger {name!r}; choose from {available_loggers()} (logger=...).")
        loggers.append(_LOGGERS[name](run_dir, resume_step, **dict(options or {})))
    return loggers
