"""Training plumbing: the Trainer of a run, safe and resumable checkpoints, which of them is
tested, loggers, callbacks."""

from vpt.training.callbacks import available_callbacks, build_callbacks, register_callback
from vpt.training.checkpoints import (
    LastCheckpoint,
    RandomState,
    SafeCheckpointIO,
    WallTime,
    check_resume_fits,
    load_checkpoint_file,
    load_checkpoint_weights,
)
from vpt.training.loggers import ResumableCSVLogger, available_loggers, build_loggers, register_logger
from vpt.training.selection import TEST_CHECKPOINTS, check_test_checkpoint, validation_problem, warn_if_validation_cannot_choose
from vpt.training.trainer import TRAINER_ARGUMENTS, build_trainer, check_accelerator, check_trainer_values

__all__ = [
    "TEST_CHECKPOINTS",
    "TRAINER_ARGUMENTS",
    "LastCheckpoint",
    "RandomState",
    "ResumableCSVLogger",
    "SafeCheckpointIO",
    "WallTime",
    "available_callbacks",
    "available_loggers",
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_accelerator",
    "check_trainer_values",
    "check_resume_fits",
    "check_test_checkpoint",
    "load_checkpoint_file",
    "load_checkpoint_weights",
    "register_callback",
    "register_logger",
    "validation_problem",
    "warn_if_validation_cannot_choose",
]
