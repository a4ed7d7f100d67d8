"""Prompt projections kept across batches at inference.

Deep prompts are parameters: once training ends, the keys and values each block computes
from them are the same for every batch. :class:`KeptProjections` holds them per block for
:class:`~vpt.prompts.PromptedViT` and :class:`~vpt.prompts.PromptedSamEncoder`, and only
where that is exact: in eval mode without gradients, and for the state they were computed
in. The state is every tensor they come from (its storage and version counter, which
optimiser steps, ``load_state_dict`` and any in-place edit advance) plus the device, dtype
and autocast setting of the input; any difference drops what was kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["KeptProjections"]


class KeptProjections:
    """Per-block values computed from constant tensors, reused while those stay unchanged."""

    def __init__(self) -> None:
        self._values: dict[int, Any] = {}
        self._state: tuple[Any, ...] | None = None

    def active(self, enabled: bool, training: bool, sources: Iterable[torch.Tensor], x: torch.Tensor) -> bool:
        """Whether this forward may reuse kept values (inference only); drops them when any
        of ``sources`` or the input's device, dtype or autocast setting changed."""
        if not enabled or training or torch.is_grad_enabled():
            return False
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        state = (
            tuple((tensor.data_ptr(), tensor._version) for tensor in sources),
            x.device, x.dtype, autocast, torch.get_autocast_dtype(device) if autocast else None,
        )
        if state != self._state:
            self._values, self._state = {}, state
        return True

    def get(self, index: int, compute: Callable[[], Any]) -> Any:
        """The value kept for block ``index``, computed by ``compute`` the first time."""
        if index not in self._values:
            self._values[index] = compute()
        return self._values[index]
