"""Linear probing: the frozen backbone and a new trainable head."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from vpt.methods.registry import register_method
from vpt.prompts import PromptedViT

__all__: list[str] = []


@register_method("linear")
def linear(vit: VisionTransformer, num_classes: int) -> PromptedViT:
    """Frozen backbone (held in eval mode), only the new head trains."""
    model = PromptedViT(vit, num_tokens=0)
    model.reset_classifier(num_classes)
    return model
