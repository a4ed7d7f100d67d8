"""The sam family: segment-anything's ``ImageEncoderViT`` (SAM ViT-B/L/H, MedSAM), prompted by
:class:`~vpt.prompts.PromptedSamEncoder`; SAM's own mask decoder for automatic multi-class
and for box / point prompted segmentation."""

from __future__ import annotations

from typing import Any

from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from vpt.families.base import EncoderFamily, register_family
from vpt.prompts.sam import PromptedSamEncoder

__all__ = ["SamFamily"]


class SamFamily(EncoderFamily):
    name = "sam"
    wrapper = PromptedSamEncoder
    tasks = ("segmentation", "interactive_segmentation")
    mlp_layers = ("lin1", "lin2")
    qkv_layer = "qkv"
    shallow_prompts = True
    prompt_projection = False
    example_model = "sam_vit_b"

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, ImageEncoderViT)

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_sam_segmenter

        return build_sam_segmenter(cfg, num_classes)

    def build_interactive(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_interactive_sam

        return build_interactive_sam(cfg)


register_family(SamFamily())
