"""Full fine-tuning: every parameter trains (the paper's upper-cost baseline)."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from vpt.methods.registry import register_method
from vpt.prompts import PromptedViT

__all__: list[str] = []


@register_method("full")
def full(vit: VisionTransformer, num_classes: int) -> PromptedViT:
    """No prompts; backbone and new head train, backbone in train mode (dropout, drop-path)."""
    model = PromptedViT(vit, num_tokens=0, backbone_eval=False)
    model.vit.requires_grad_(True)
    model.reset_classifier(num_classes)
    return model
