"""The timm family: ``timm.models.vision_transformer.VisionTransformer`` (ViT-B/L/H, DINOv2,
any timm ViT name), prompted by :class:`~vpt.prompts.PromptedViT`; classification heads and
the multi-level segmentation decoder."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt.families.base import EncoderFamily, register_family
from vpt.prompts.vit import PromptedViT

__all__ = ["TimmViTFamily"]


class TimmViTFamily(EncoderFamily):
    name = "timm"
    wrapper = PromptedViT
    tasks = ("classification", "segmentation")
    mlp_layers = ("fc1", "fc2")
    qkv_layer = "qkv"
    shallow_prompts = True
    prompt_projection = True
    example_model = "vit_b"

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, VisionTransformer)

    def build_classifier_encoder(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_vit

        return build_vit(cfg)

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_vit_segmenter

        return build_vit_segmenter(cfg, num_classes)


register_family(TimmViTFamily())
