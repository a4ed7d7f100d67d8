"""The timm family: ``timm.models.vision_transformer.VisionTransformer`` (ViT-B/L/H, DINOv2,
any timm ViT name), prompted by :class:`~vpt.prompts.PromptedViT`; classification heads and
the multi-level segmentation decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt.families.base import EncoderFamily, FeatureLevel, register_family
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

    def _raw(self, encoder: nn.Module) -> VisionTransformer:
        return self.inner(encoder) if isinstance(encoder, self.wrapper) else encoder

    def feature_levels(self, encoder: nn.Module) -> list[FeatureLevel]:
        """One patch grid per block (the multi-level decoder picks some), all at the patch stride."""
        vit = self._raw(encoder)
        stride = int(vit.patch_embed.patch_size[0])
        return [FeatureLevel(int(vit.embed_dim), stride) for _ in vit.blocks]

    def data_settings(self, encoder: nn.Module, model_cfg: Any = None) -> dict[str, Any]:
        """The ViT's own input size and its weights' normalisation (timm's pretrained config)."""
        from vpt.backbones.timm_vit import vit_data_config

        config = vit_data_config(self._raw(encoder))
        data = {"image_size": tuple(config["input_size"]), "mean": config["mean"], "std": config["std"]}
        return self.configured_normalisation(data, model_cfg)

    def checkpoint_filter(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """timm's own ``checkpoint_filter_fn`` (JAX/DeiT/DINOv2 layouts, position embeddings resized)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(dict(state_dict), self._raw(model))

    def load_checkpoint(self, model: nn.Module, path: str | Path) -> Any:
        from vpt.backbones.timm_vit import load_vit_checkpoint

        return load_vit_checkpoint(self._raw(model), path)

    def build_classifier_encoder(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_vit

        return build_vit(cfg)

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_vit_segmenter

        return build_vit_segmenter(cfg, num_classes)


register_family(TimmViTFamily())
