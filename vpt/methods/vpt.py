"""VPT-deep and VPT-shallow (Jia et al., ECCV 2022): prompts + a new linear head."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from timm.models.vision_transformer import VisionTransformer

from vpt.errors import ConfigError
from vpt.methods.registry import register_method
from vpt.prompts import PromptedViT

__all__ = ["PromptConfig"]


@dataclass
class PromptConfig:
    """Settings of the prompt methods.

    Args:
        num_tokens: Prompt tokens per set (the paper searches 1 to 200; 50 is a common pick).
        dropout: Dropout on prompt tokens (the paper uses 0.1).
        project_dim: Optional prompt width before a shared linear projection; None for none.
    """

    num_tokens: int = 50
    dropout: float = 0.1
    project_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"method.num_tokens must be >= 1 for prompt tuning, got {self.num_tokens}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}.")
        if self.project_dim is not None and self.project_dim < 1:
            raise ConfigError(f"method.project_dim must be a positive width or null, got {self.project_dim}.")


def _prompted(vit: VisionTransformer, num_classes: int, deep: bool, **options: object) -> PromptedViT:
    config = PromptConfig(**options)  # type: ignore[arg-type]
    model = PromptedViT(
        vit, config.num_tokens, deep=deep, dropout=config.dropout, project_dim=config.project_dim
    )
    model.reset_classifier(num_classes)
    return model


def _with_options(builder):
    builder.options = {f.name for f in fields(PromptConfig)}
    return builder


@register_method("vpt_deep")
@_with_options
def vpt_deep(vit: VisionTransformer, num_classes: int, **options: object) -> PromptedViT:
    """A prompt set in every block; backbone frozen; prompts and head train."""
    return _prompted(vit, num_classes, deep=True, **options)


@register_method("vpt_shallow")
@_with_options
def vpt_shallow(vit: VisionTransformer, num_classes: int, **options: object) -> PromptedViT:
    """One prompt set at the input; backbone frozen; prompts and head train."""
    return _prompted(vit, num_classes, deep=False, **options)
