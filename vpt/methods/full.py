"""Full fine-tuning: every encoder parameter trains (the costly upper baseline)."""

from __future__ import annotations

from torch import nn

from vpt.methods.encoders import inner_encoder, wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__: list[str] = []


@register_method("full", MethodConfig)
def full(encoder: nn.Module, config: MethodConfig) -> nn.Module:
    """No prompts; the whole encoder trains, in train mode (dropout, drop-path)."""
    model = wrap_encoder(encoder, 0, backbone_eval=False)
    inner_encoder(model).requires_grad_(True)
    return model
