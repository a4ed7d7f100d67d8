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
from vpt.training.checkpoints import LastCheckpoint, RandomState, SafeCheckpointIO, WallTime
from vpt.training.loggers import build_loggers

__all__ = ["TRAINER_ARGUMENTS", "build_trainer", "check_accelerator", "check_trainer_values"]

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


def _whole(value: Any) -> Optional[int]:
    """``value`` as an int when it is a whole number (not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _precisions() -> tuple[str, ...]:
    import typing

    from lightning.fabric import connector

    names = [*typing.get_args(connector._PRECISION_INPUT_STR), *typing.get_args(connector._PRECISION_INPUT_STR_ALIAS)]
    return tuple(dict.fromkeys([*names, *(str(n) for n in typing.get_args(connector._PRECISION_INPUT_INT))]))


def check_trainer_values(trainer_options: Mapping[str, Any]) -> None:
    """Refuse, in one sentence and before anything is built, the values ``lightning.Trainer``
    would refuse later with a traceback (or accept and do nothing with: ``max_epochs=0``
    trains nothing and would leave a run folder that looks finished).

    Raises:
        ConfigError: the first bad value, naming the key and what it may be.
    """

    def refuse(key: str, allowed: str) -> None:
        raise ConfigError(f"trainer.{key}={trainer_options[key]!r} is not valid; use {allowed}.")

    def whole_at_least(key: str, low: int, allowed: str, none_ok: bool = False) -> None:
        if key not in trainer_options or (none_ok and trainer_options[key] is None):
            return
        number = _whole(trainer_options[key])
        if number is None or number < low:
            refuse(key, allowed)

    max_steps = _whole(trainer_options.get("max_steps", -1))
    if "max_epochs" in trainer_options and trainer_options["max_epochs"] is not None:
        epochs = _whole(trainer_options["max_epochs"])
        if epochs is None or (epochs < 1 and not (epochs == -1 and max_steps is not None and max_steps >= 1)):
            refuse("max_epochs", "a whole number of 1 or more (or -1 together with trainer.max_steps of 1 or more)")
    if "max_steps" in trainer_options and trainer_options["max_steps"] is not None:
        if max_steps is None or (max_steps < 1 and max_steps != -1):
            refuse("max_steps", "-1 (no limit) or a whole number of 1 or more")
    whole_at_least("min_epochs", 0, "a whole number of 0 or more", none_ok=True)
    whole_at_least("min_steps", 0, "a whole number of 0 or more", none_ok=True)
    whole_at_least("accumulate_grad_batches", 1, "a whole number of 1 or more")
    whole_at_least("log_every_n_steps", 1, "a whole number of 1 or more", none_ok=True)
    whole_at_least("check_val_every_n_epoch", 1, "a whole number of 1 or more (or null)", none_ok=True)
    whole_at_least("num_sanity_val_steps", -1, "-1 (all) or a whole number of 0 or more", none_ok=True)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches"):
        value = trainer_options.get(key)
        if value is None or key not in trainer_options:
            continue
        number = _whole(value)
        fraction_ok = isinstance(value, float) and not value.is_integer() and 0.0 <= value <= 1.0
        if not (fraction_ok or (number is not None and number >= 0)):
            refuse(key, "a fraction in [0, 1] or a whole number of batches")
    if trainer_options.get("limit_train_batches") in (0, 0.0) and "limit_train_batches" in trainer_options:
        refuse("limit_train_batches", "more than 0 (0 trains nothing)")
    value = trainer_options.get("val_check_interval")
    if value is not None:
        number = _whole(value)
        if not ((isinstance(value, float) and 0.0 < value <= 1.0) or (number is not None and number >= 1)):
            refuse("val_check_interval", "a fraction in (0, 1] of an epoch or a whole number of 1 or more batches")
    value = trainer_options.get("gradient_clip_val")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        refuse("gradient_clip_val", "null or a number of 0 or more")
    if "precision" in trainer_options and trainer_options["precision"] is not None:
        allowed = _precisions()
        if str(trainer_options["precision"]) not in allowed:
            refuse("precision", "one of " + ", ".join(allowed))
    if "devices" in trainer_options:
        devices = trainer_options["devices"]
        number = _whole(devices)
        if not (devices == "auto" or isinstance(devices, (list, tuple)) or (number is not None and (number >= 1 or number == -1))
                or (isinstance(devices, str) and devices.replace(",", "").replace("-", "").strip().isdigit())):
            refuse("devices", "auto, -1 (all), a number of 1 or more, or a list of device indices")


def build_trainer(
    trainer_options: Mapping[str, Any],
    run_dir: Path,
    monitor: str,
    monitor_mode: str,
    logger_config: Optional[Mapping[str, Any]] = None,
    callback_config: Optional[Mapping[str, Any]] = None,
    resume_step: Optional[int] = None,
    preloaded: Optional[dict[str, dict[str, Any]]] = None,
    wall_time: Optional[WallTime] = None,
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
        wall_time: Keeps the run's segment times in its checkpoints (a new one if ``None``).

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
    callbacks = [best, LastCheckpoint(run_dir / "checkpoints"), RandomState(), wall_time or WallTime(),
                 *build_callbacks(callback_config)]
    options = dict(trainer_options)
    # vpt prints its own table of trainable parameters; Lightning's summary repeats it (with
    # a FLOPs column that reads 0); trainer.enable_model_summary=true brings it back.
    options.setdefault("enable_model_summary", False)
    trainer = L.Trainer(
        **options,
        default_root_dir=str(run_dir),
        logger=build_loggers(logger_config, run_dir, resume_step),
        callbacks=callbacks,
        plugins=[SafeCheckpointIO(preloaded)],
    )
    return trainer, best
