"""The DataLoader settings every vpt data module uses, and the warnings they share."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vpt.data.transforms import reseed_worker_transform
from vpt.errors import ConfigError
from vpt.messages import log_once

__all__ = [
    "AUTO_WORKERS",
    "MAX_AUTO_WORKERS",
    "available_cpus",
    "default_num_workers",
    "make_loader",
    "resolve_num_workers",
    "warn_batch_exceeds_training_set",
    "warn_once",
]

_logger = logging.getLogger(__name__)

# More workers than this rarely speed up decoding and each holds a copy of the dataset object.
MAX_AUTO_WORKERS = 8
AUTO_WORKERS = "auto"


def warn_once(logger: logging.Logger, message: str, *args: Any) -> bool:
    """Log a warning the first time this message (after ``%`` formatting) is seen in the process.

    Data modules are set up again for every fit/validate/test call and datasets are rebuilt per
    epoch in some loops, so a plain warning would repeat a message the user has already read.

    Args:
        logger: The logger of the module that warns.
        message: A ``%``-style format string, as for ``logger.warning``.
        *args: Its arguments.

    Returns:
        Whether the warning was logged (False when it had been logged before).
    """
    return log_once(logger, logging.WARNING, message, *args)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as in containers).

    Returns:
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_num_workers(cpus: int | None = None) -> int:
    """Loader workers for this machine: one core is left to the training process, at most 8.

    Args:
        cpus: Cores to plan for; ``None`` asks :func:`available_cpus`.

    Returns:
        ``min(8, max(1, cpus - 1))``.
    """
    cpus = available_cpus() if cpus is None else int(cpus)
    return min(MAX_AUTO_WORKERS, max(1, cpus - 1))


def resolve_num_workers(num_workers: int | str | None) -> int:
    """Turn a configured ``num_workers`` into a worker count.

    Args:
        num_workers: A count (0 loads in the main process), or ``None`` / ``"auto"`` for
            :func:`default_num_workers`.

    Returns:
        The number of loader worker processes.

    Raises:
        ConfigError: A negative count or a value that is no count.
    """
    if num_workers is None or (isinstance(num_workers, str) and num_workers.strip().lower() == AUTO_WORKERS):
        workers = default_num_workers()
        _logger.info(
            "num_workers=%s: using %d loader workers (%d CPUs available).", num_workers, workers, available_cpus()
        )
        return workers
    text = str(num_workers).strip()
    # bool is an int to Python, but "num_workers: true" is a mistake, not one worker.
    if isinstance(num_workers, bool) or not re.fullmatch(r"[0-9]+", text):
        raise ConfigError(
            f"num_workers={num_workers!r} is not valid; set task.data.num_workers to 0 or more, or to null for "
            "one worker per CPU core (up to 8)."
        )
    return int(text)


def warn_batch_exceeds_training_set(
    logger: logging.Logger, batch_size: int, train_size: int, what: str, where: str
) -> bool:
    """Warn (once) that the training batch is larger than the training set.

    The training loader then yields a single batch of every item per epoch, so the batch size
    that was configured (and any learning rate tuned for it) is not what runs.

    Args:
        logger: The data module's logger.
        batch_size: The configured training batch size.
        train_size: Items in the training set.
        what: What an item is, plural (``"images"``, ``"slices"``).
        where: The data set, for the message (a folder or a class name).

    Returns:
        Whether a warning was logged.
    """
    if train_size == 0 or batch_size <= train_size:
        return False
    return warn_once(
        logger,
        "task.data.batch_size=%d is larger than the %d training %s of %s, so each epoch is one batch of %d "
        "(the effective batch size); lower task.data.batch_size to %d or less, or add training data.",
        batch_size, train_size, what, where, train_size, train_size,
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: Optional[bool] = None,
) -> DataLoader:
    """A DataLoader with persistent workers, pinned memory on CUDA machines (unless told), and
    each worker's augmentation stream reseeded (albumentations ignores global seeds)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        # Persistent workers carry their augmentation streams across epochs, which a resumed
        # run cannot reproduce; trainer.deterministic=true (which turns on torch's
        # deterministic algorithms) starts them afresh each epoch instead.
        persistent_workers=num_workers > 0 and not torch.are_deterministic_algorithms_enabled(),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=reseed_worker_transform if num_workers > 0 else None,
    )
