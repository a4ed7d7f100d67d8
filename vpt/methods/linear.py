"""Linear probing: the frozen encoder; only the new head (or decoder) trains."""

from __future__ import annotations

from torch import nn

from vpt.methods.encoders import wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__: list[str] = []


@register_method("linear", MethodConfig)
def linear(encoder: nn.Module, config: MethodConfig) -> nn.Module:
    """Frozen encoder held in eval mode; nothing of it trains."""
    return wrap_encoder(encoder, 0)
