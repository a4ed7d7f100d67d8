"""How the command-line tools report a user's mistake: one sentence, no traceback."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, TypeVar

from omegaconf.errors import MissingMandatoryValue

from vpt.errors import VptError

__all__ = ["one_sentence", "exit_on_user_error"]

_logger = logging.getLogger("vpt")
F = TypeVar("F", bound=Callable[..., Any])


def one_sentence(error: BaseException) -> str:
    """The user-facing message of ``error``.

    A DataLoader worker re-raises an error with the worker's traceback folded into the
    message; the original sentence is its last line.
    """
    message = str(error)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def exit_on_user_error(fn: F) -> F:
    """Run ``fn``; on a :class:`VptError` (or a required config value left unset) print one
    sentence to stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VptError as error:
            message = one_sentence(error)
        except MissingMandatoryValue as error:
            # A config value written ??? (e.g. task=volume_seg's data root) that was not given.
            key = getattr(error, "full_key", None) or "a required value"
            message = f"{key} must be given; add {key}=... to the command line."
        _logger.debug("user error", exc_info=True)
        print(f"vpt: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

    return wrapper  # type: ignore[return-value]
