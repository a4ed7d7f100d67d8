"""VPT-deep and VPT-shallow (Jia et al., ECCV 2022): learned prompt tokens, encoder frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from vpt.errors import ConfigError
from vpt.methods.encoders import wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__ = ["PromptConfig"]


@dataclass
class PromptConfig(MethodConfig):
    """Settings of the prompt methods.

    Args:
        num_tokens: Prompt tokens per set (the paper searches 1 to 200; 50 is a common pick).
        dropout: Dropout on prompt tokens (the paper uses 0.1).
        project_dim: Optional prompt width before a shared linear projection (timm ViTs);
            None for none.
        gate: Deep prompts join each block's attention through a per-head gate initialised
            at zero, so training starts exactly from the frozen encoder (False: the paper's
            joint softmax). Deep prompts only. False here, so the Python API builds the
            paper's VPT; ``configs/method/vpt_deep.yaml`` turns it on for training runs, as
            the transfer benchmark supports (docs/transfer.md).
    """

    num_tokens: int = 50
    dropout: float = 0.1
    project_dim: Optional[int] = None
    gate: bool = False

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"method.num_tokens must be >= 1 for prompt tuning, got {self.num_tokens}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}.")
        if self.project_dim is not None and self.project_dim < 1:
            raise ConfigError(f"method.project_dim must be a positive width or null, got {self.project_dim}.")


@register_method("vpt_deep", PromptConfig)
def vpt_deep(encoder: nn.Module, config: PromptConfig) -> nn.Module:
    """A prompt set in every block (run as keys and values only); encoder frozen."""
    return wrap_encoder(
        encoder, config.num_tokens, deep=True, dropout=config.dropout, project_dim=config.project_dim, gate=config.gate
    )


@register_method("vpt_shallow", PromptConfig)
def vpt_shallow(encoder: nn.Module, config: PromptConfig) -> nn.Module:
    """One prompt set at the input, carried through every block; encoder frozen."""
    if config.gate:
        raise ConfigError("method.gate applies to deep prompts (keys and values only); use method=vpt_deep, or set method.gate=false.")
    return wrap_encoder(encoder, config.num_tokens, deep=False, dropout=config.dropout, project_dim=config.project_dim)
