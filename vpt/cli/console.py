"""A quiet, honest console for the command-line tools.

Lightning prints adverts for hosted services, a report of the devices it found, its own
model summary and warnings about things vpt does on purpose; a user should see the run's
own messages, each once, and the progress bars. What is dropped here is listed (and why),
nothing else is hidden. Warnings raised inside an installed library are shown without the
library file's path, which names a line the user cannot act on.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any, Optional, TextIO

__all__ = ["quiet_console", "DROPPED_MESSAGES"]

#: Substrings of messages the tools do not show, with the reason.
DROPPED_MESSAGES: dict[str, str] = {
    "💡 Tip": "Lightning's adverts for its hosted logging and model registry",
    "isinstance(treespec, LeafSpec)": "a torch deprecation inside Lightning, not actionable by users",
    "You have overridden `transfer_batch_to_device`": "vpt keeps whole test volumes on the host on purpose",
    "Experiment logs directory": "vpt's CSV logger continues metrics.csv on resume instead of deleting it",
    "GPU available: ": "Lightning's device report; vpt refuses a GPU trainer without a GPU in its own sentence",
    "TPU available: ": "Lightning's device report",
    "HPU available: ": "Lightning's device report",
    "LOCAL_RANK: ": "Lightning's device report (the user's own CUDA_VISIBLE_DEVICES)",
    "was configured so": "Lightning repeating a limit_*_batches value the user set",
    "Loading `train_dataloader` to estimate number of stepping batches": "a step inside Lightning, not a result",
    "is smaller than the logging interval": "vpt logs every epoch's mean as well; short epochs lose only per-step points",
    "`Trainer.fit` stopped: `max_epochs=": "the planned end of training; vpt's own lines follow",
    "`Trainer.fit` stopped: `max_steps=": "the planned end of training; vpt's own lines follow",
    "Restoring states from the checkpoint path at": "vpt says which checkpoint it resumes and which it tests",
    "Loaded model weights from the checkpoint at": "vpt says which checkpoint it resumes and which it tests",
}

_python_show_warning = warnings.showwarning


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in DROPPED_MESSAGES)


def _in_installed_package(filename: str) -> bool:
    return any(folder in filename for folder in ("site-packages", "dist-packages"))


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: Optional[TextIO] = None, line: Optional[str] = None,
) -> None:
    """Python's warning display, without the location when a library raised the warning."""
    if not _in_installed_package(filename):
        _python_show_warning(message, category, filename, lineno, file, line)
        return
    stream: Any = file if file is not None else sys.stderr
    try:
        stream.write(f"{category.__name__}: {message}\n")
    except (OSError, AttributeError):  # no console to write to (pythonw), as Python's own display
        pass


def _add_filter(filterer: logging.Filterer) -> None:
    if not any(isinstance(f, _DropMessages) for f in filterer.filters):
        filterer.addFilter(_DropMessages())


def quiet_console() -> None:
    """Install the filters (idempotent); call it again once logging is configured, so the
    console and log-file handlers then present get them too (Lightning logs from modules
    whose loggers carry no filter)."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch", "lightning.fabric")
    for name in names:
        _add_filter(logging.getLogger(name))
    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in names)):
        for handler in logger.handlers:
            _add_filter(handler)
    for text in DROPPED_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}.*")
    warnings.showwarning = _show_warning
