"""Training plumbing: the Trainer of a run, safe and resumable checkpoints, loggers, callbacks."""

from vpt.training.callbacks import available_callbacks, build_callbacks, register_callback
from vpt.training.checkpoints import (
    LastCheckpoint,
    RandomState,
    SafeCheckpointIO,
    check_resume_fits,
    load_checkpoint_file,
)
from vpt.training.loggers import ResumableCSVLogger, available_loggers, build_loggers, register_logger
from vpt.training.trainer import TRAINER_ARGUMENTS, build_trainer, check_accelerator

__all__ = [
    "TRAINER_ARGUMENTS",
    "LastCheckpoint",
    "RandomState",
    "ResumableCSVLogger",
    "SafeCheckpointIO",
    "available_callbacks",
    "available_loggers",
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_accelerator",
    "check_resume_fits",
    "load_checkpoint_file",
    "register_callback",
    "register_logger",
]
