"""How the command-line tools report a user's mistake: one sentence, no traceback."""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from vpt import errors as _vpt_errors
from vpt.errors import VptError

__all__ = ["one_sentence", "exit_on_user_error", "note_run_folder", "record_in_log_files", "run_folder_in_use"]

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


class _RunFolder:
    """The run folder of this process, as far as a refused or failed run must know it.

    ``created``: the folder did not exist before this command (Hydra makes it before the
    task function runs), so a refused run removes it again. ``in_use``: the checks passed
    and the run writes there, so an error is recorded at the end of its ``train.log``.
    """

    path: Optional[Path] = None
    created: list[Path] = []
    in_use: bool = False


def note_run_folder(path: Path) -> None:
    """Remember ``path`` and which of its folders do not exist yet (call before they are made)."""
    path = Path(path).absolute()
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    _RunFolder.path, _RunFolder.created, _RunFolder.in_use = path, missing, False


def run_folder_in_use() -> None:
    """The run's checks passed: from now on an error is recorded in its ``train.log``."""
    _RunFolder.in_use = True


def _forget_refused_run_folder() -> None:
    """Remove the folders this refused run made (Hydra made them before the checks ran),
    with the log file it may have opened there; anything else in them stays."""
    if _RunFolder.created and _RunFolder.path is not None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == _RunFolder.path:
                root.removeHandler(handler)
                handler.close()
                Path(handler.baseFilename).unlink(missing_ok=True)
    for folder in _RunFolder.created:  # deepest first
        try:
            folder.rmdir()  # only an empty folder; anything in it stays
        except OSError:
            break
    _RunFolder.created = []


def record_in_log_files(message: str, level: int = logging.ERROR, exc_info: Any = None, name: str = "vpt") -> None:
    """Append ``message`` to the run's log file(s) only (``train.log``): the console has its
    own line (a print, or the ``vpt: error:`` sentence)."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


# OmegaConf reports an error raised by a resolver as "<Type> raised while resolving interpolation: <text>".
_RESOLVER_ERROR = re.compile(r"^(\w+) raised while resolving interpolation: (.*)$")


def _user_error_of_resolver(error: InterpolationResolutionError) -> Optional[str]:
    """The sentence of a :class:`VptError` raised inside a config resolver (``vpt_required``)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    match = _RESOLVER_ERROR.match(first)
    kind = getattr(_vpt_errors, match.group(1), None) if match else None
    if match and isinstance(kind, type) and issubclass(kind, VptError):
        return match.group(2)
    return None


def exit_on_user_error(fn: F) -> F:
    """Run ``fn``; on a :class:`VptError` (or a required config value left unset) print one
    sentence to stderr and exit with code 2.

    A run refused before its checks passed leaves no trace: the run folder Hydra made for it
    is removed again while empty. A run that fails later keeps its folder, and its
    ``train.log`` ends with the error (the sentence, or the traceback of an unexpected one).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VptError as error:
            message = one_sentence(error)
        except MissingMandatoryValue as error:
            # A config value written ??? that was not given.
            key = getattr(error, "full_key", None) or "a required value"
            message = f"{key} must be given; add {key}=... to the command line."
        except InterpolationResolutionError as error:
            found = _user_error_of_resolver(error)
            if found is None:
                if _RunFolder.in_use:
                    record_in_log_files(f"The run failed: {error}", sys.exc_info())
                raise
            message = found
        except Exception as error:
            if _RunFolder.in_use:
                record_in_log_files(f"The run failed: {type(error).__name__}: {error}", sys.exc_info())
            raise
        _logger.debug("user error", exc_info=True)
        if _RunFolder.in_use:
            record_in_log_files(f"vpt: error: {message}")
        else:
            _forget_refused_run_folder()
        print(f"vpt: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

    return wrapper  # type: ignore[return-value]
