"""A quiet, honest console for the command-line tools.

Lightning prints adverts for hosted services and warnings about things vpt does on
purpose; a user should see the run's own messages, each once. What is dropped here is
listed (and why), nothing else is hidden.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_console", "DROPPED_MESSAGES"]

#: Substrings of messages the tools do not show, with the reason.
DROPPED_MESSAGES: dict[str, str] = {
    "💡 Tip": "Lightning's adverts for its hosted logging and model registry",
    "isinstance(treespec, LeafSpec)": "a torch deprecation inside Lightning, not actionable by users",
    "You have overridden `transfer_batch_to_device`": "vpt keeps whole test volumes on the host on purpose",
    "Experiment logs directory": "vpt's CSV logger continues metrics.csv on resume instead of deleting it",
}


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in DROPPED_MESSAGES)


def quiet_console() -> None:
    """Install the filters (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())
    for text in DROPPED_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}.*")
