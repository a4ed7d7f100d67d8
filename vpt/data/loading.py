"""The DataLoader settings every vpt data module uses."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vpt.data.transforms import reseed_worker_transform

__all__ = ["make_loader"]


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
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=reseed_worker_transform if num_workers > 0 else None,
    )
