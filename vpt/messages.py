"""Messages a process says once, and the set-up messages a rebuilt run does not repeat.

Data modules are set up again for every fit / validate / test call, and a training run
builds its data module twice (a probe checks the folder before the model is built, then the
one that trains): a message the reader has read once (a data set's layout and split, the
phantom cases, the preprocessing cache) is not said again in the same process
(:func:`log_once`). While a finished run is rebuilt to predict or evaluate
(:func:`rebuilding_a_run`) the set-up messages of its training (:func:`log_setup`) are not
said at all: the run said them, and they describe its training data, not what is being
predicted. Later and silenced messages go to DEBUG, so nothing is lost for a debug log.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

__all__ = ["log_once", "log_setup", "rebuilding_a_run"]

# (logger name, formatted message) of every message said in this process.
_said: set[tuple[str, str]] = set()
_rebuilding = 0


def log_once(logger: logging.Logger, level: int, message: str, *args: Any) -> bool:
    """Log ``message % args`` at ``level`` the first time this process says it (later at DEBUG).

    Args:
        logger: The caller's module logger.
        level: ``logging.INFO``, ``logging.WARNING``, ...
        message, args: As for :meth:`logging.Logger.log`.

    Returns:
        Whether it was logged at ``level``.
    """
    key = (logger.name, message % args if args else message)
    if key in _said:
        logger.debug(message, *args)
        return False
    _said.add(key)
    logger.log(level, message, *args)
    return True


def log_setup(logger: logging.Logger, level: int, message: str, *args: Any, once: bool = True) -> bool:
    """Log a set-up message: as :func:`log_once` (or every time with ``once=False``), and
    only at DEBUG while a finished run is rebuilt.

    Returns:
        Whether it was logged at ``level``.
    """
    if _rebuilding:
        logger.debug(message, *args)
        return False
    if once:
        return log_once(logger, level, message, *args)
    logger.log(level, message, *args)
    return True


@contextlib.contextmanager
def rebuilding_a_run() -> Iterator[None]:
    """Within this block a finished run is rebuilt (``vpt-predict``, ``vpt-evaluate``): the
    set-up messages of its training are not repeated."""
    global _rebuilding
    _rebuilding += 1
    try:
        yield
    finally:
        _rebuilding -= 1
