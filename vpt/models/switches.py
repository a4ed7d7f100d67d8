"""Speed and memory switches of ``model.*``, applied to any task's network after it is built.

* ``model.grad_checkpointing``: every prompted encoder (timm ViT or SAM) recomputes its
  blocks in the backward pass instead of keeping their activations (less memory, ~30% more
  compute);
* ``model.compile``: ``torch.compile`` of each encoder's block loop; where compiling fails
  (no compiler, an unsupported operation) the encoder runs eagerly after one warning that
  says why;
* ``model.channels_last``: convolution weights (patch embedding, decoders) in channels-last
  memory format, which tensor-core convolutions prefer on GPUs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

__all__ = ["apply_model_switches", "prompted_encoders"]

_logger = logging.getLogger(__name__)


def prompted_encoders(model: nn.Module) -> list[nn.Module]:
    """The prompted encoders (every family's wrapper: :class:`~vpt.prompts.PromptedViT`,
    :class:`~vpt.prompts.PromptedSamEncoder`, ...) in ``model``."""
    from vpt.families import is_wrapped

    return [module for module in model.modules() if is_wrapped(module)]


class CompiledWithFallback:
    """``torch.compile(eager)`` that runs ``eager`` from the first failure on, warning once.

    Args:
        eager: The bound method to compile.
        name: Names it in the warning.
    """

    def __init__(self, eager: Callable[..., Any], name: str) -> None:
        self.eager = eager
        self.name = name
        self.failed = False
        try:
            self.compiled: Callable[..., Any] | None = torch.compile(eager)
        except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        self.failed, self.compiled = True, None
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        _logger.warning(
            "model.compile=true: %s could not be compiled (%s); it runs without torch.compile. "
            "Set model.compile=false to silence this.", self.name, reason,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - compilation errors surface at the first call
                self._fall_back(error)
        return self.eager(*args, **kwargs)


def apply_model_switches(model: nn.Module, model_cfg: DictConfig | dict[str, Any]) -> nn.Module:
    """Apply ``model.grad_checkpointing`` / ``compile`` / ``channels_last`` to ``model`` in place."""
    get = model_cfg.get
    encoders = prompted_encoders(model)
    if get("grad_checkpointing", False):
        for encoder in encoders:
            encoder.set_grad_checkpointing(True)
    if get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    if get("compile", False):
        for encoder in encoders:
            name = encoder.compile_target
            if not isinstance(getattr(encoder, name), CompiledWithFallback):
                setattr(encoder, name, CompiledWithFallback(getattr(encoder, name), f"{type(encoder).__name__}.{name}"))
    return model
