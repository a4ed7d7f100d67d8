"""Partial fine-tuning (the VPT paper's Partial-k baseline): the last ``k`` blocks train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpt.errors import ConfigError
from vpt.methods.encoders import encoder_blocks, mark_follows_train_mode, wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__ = ["PartialConfig"]


@dataclass
class PartialConfig(MethodConfig):
    """Args:
        k: How many of the last transformer blocks train (the paper's Partial-k; 1 is common).
    """

    k: int = 1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"method.k must be >= 1, got {self.k}.")


@register_method("partial", PartialConfig)
def partial(encoder: nn.Module, config: PartialConfig) -> nn.Module:
    """The last ``k`` transformer blocks train (in train mode); the others stay frozen."""
    model = wrap_encoder(encoder, 0)
    blocks = encoder_blocks(model)
    if config.k > len(blocks):
        raise ConfigError(f"method.k={config.k} but the encoder has {len(blocks)} blocks; pick 1 to {len(blocks)}.")
    for block in blocks[-config.k:]:
        block.requires_grad_(True)
        mark_follows_train_mode(block)
    return model
