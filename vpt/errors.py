"""Errors a user can cause and fix.

Every error here carries one sentence that says what is wrong and how to fix it. The
command-line entry points print that sentence without a traceback and exit non-zero;
library users catch :class:`VptError` (or one of its kinds).
"""

from __future__ import annotations

__all__ = ["VptError", "ConfigError", "DataError", "CheckpointError", "WeightsUnavailableError"]


class VptError(Exception):
    """A problem in the user's input (paths, data, checkpoints, configs) with a fix to name."""


class ConfigError(VptError, ValueError):
    """A configuration value that cannot work (unknown method, bad size, existing run folder)."""


class DataError(VptError, ValueError):
    """Data that cannot be used as it is: missing folders, unreadable images, bad labels."""


class CheckpointError(VptError, ValueError):
    """A weights file that is missing, unsafe to load, or does not fit the model."""


class WeightsUnavailableError(VptError, RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, no local file)."""
