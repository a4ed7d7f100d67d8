"""The Lightning Trainer of a run: its arguments, checkpointing, loggers and callbacks.

Every ``trainer.*`` key of the config is a ``lightning.Trainer`` argument; vpt adds the
pieces the run folder relies on (``best.ckpt``, ``last.ckpt`` every epoch, the random
states for exact resumption, atomic and safe checkpoint I/O, ``metrics.csv``).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vpt.errors import ConfigError
from vpt.training.callbacks import build_callbacks
from vpt.training.checkpoints import LastCheckpoint, RandomState, SafeCheckpointIO
from vpt.training.loggers import build_loggers

__all__ = ["TRAINER_ARGUMENTS", "build_trainer", "check_accelerator"]

_logger = logging.getLogger(__name__)

#: Every keyword argument of ``lightning.Trainer``; ``trainer.X=...`` works for each.
TRAINER_ARGUMENTS: frozenset[str] = frozenset(
    name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"
)
# vpt sets these itself from the run folder and the logger / callbacks groups.
_MANAGED = {"default_root_dir", "logger", "callbacks", "plugins", "enable_checkpointing"}


def check_accelerator(trainer_options: Mapping[str, Any]) -> None:
    """Refuse a GPU trainer on a machine without a usable GPU, in one sentence.

    Raises:
        ConfigError: ``accelerator`` is ``gpu``/``cuda`` and CUDA is not available, or
            ``mps`` without Apple's MPS.
    """
    accelerator = str(trainer_options.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU, but torch sees none on this machine; "
            "use trainer=cpu (or trainer.accelerator=auto)."
        )
    if accelerator == "mps" and not (torch.backends.mps.is_available()):
        raise ConfigError("trainer.accelerator=mps needs Apple's MPS, which torch does not see here; use trainer=cpu.")
    unknown = sorted(set(trainer_options) - TRAINER_ARGUMENTS)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]} is not a lightning.Trainer argument; see `python -c \"import lightning; help(lightning.Trainer)\"`.")
    managed = sorted(set(trainer_options) & _MANAGED)
    if managed:
        raise ConfigError(
            f"trainer.{managed[0]} is set by vpt from the run folder; use the logger=... / callbacks=[...] groups instead."
        )


def build_trainer(
    trainer_options: Mapping[str, Any],
    run_dir: Path,
    monitor: str,
    monitor_mode: str,
    logger_config: Optional[Mapping[str, Any]] = None,
    callback_config: Optional[Mapping[str, Any]] = None,
    resume_step: Optional[int] = None,
    preloaded: Optional[dict[str, dict[str, Any]]] = None,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Trainer for one run and its best-checkpoint callback.

    Args:
        trainer_options: The ``trainer`` config node as plain values.
        run_dir: The run folder.
        monitor, monitor_mode: The metric that picks ``best.ckpt``.
        logger_config: The ``logger`` node (extra loggers beside ``metrics.csv``).
        callback_config: The ``callbacks`` node.
        resume_step: Global step of the checkpoint being resumed (keeps ``metrics.csv`` rows).
        preloaded: Checkpoints already read and checked (path -> dict).

    Returns:
        ``(trainer, best_checkpoint_callback)``.
    """
    check_accelerator(trainer_options)
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=monitor_mode,
        save_last=False,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    callbacks = [best, LastCheckpoint(run_dir / "checkpoints"), RandomState(), *build_callbacks(callback_config)]
    trainer = L.Trainer(
        **dict(trainer_options),
        default_root_dir=str(run_dir),
        logger=build_loggers(logger_config, run_dir, resume_step),
        callbacks=callbacks,
        plugins=[SafeCheckpointIO(preloaded)],
    )
    return trainer, best
