"""The sam family: segment-anything's ``ImageEncoderViT`` (SAM ViT-B/L/H, MedSAM), prompted by
:class:`~vpt.prompts.PromptedSamEncoder`; SAM's own mask decoder for automatic multi-class
and for box / point prompted segmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from vpt.families.base import EncoderFamily, FeatureLevel, register_family
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

    def _raw(self, encoder: nn.Module) -> ImageEncoderViT:
        return self.inner(encoder) if isinstance(encoder, self.wrapper) else encoder

    def feature_levels(self, encoder: nn.Module) -> list[FeatureLevel]:
        """The neck's output: one grid at the patch stride (SAM's mask decoder reads it)."""
        raw = self._raw(encoder)
        return [FeatureLevel(int(raw.neck[0].out_channels), int(raw.patch_embed.proj.kernel_size[0]))]

    def data_settings(self, encoder: nn.Module, model_cfg: Any = None) -> dict[str, Any]:
        """SAM's fixed square input and its ImageNet statistics, unless the model config states
        ``mean`` / ``std`` (MedSAM: 0 and 1)."""
        from vpt.backbones.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD

        size = int(self._raw(encoder).img_size)
        data = {
            "image_size": (size, size),
            "mean": tuple(v / 255.0 for v in SAM_PIXEL_MEAN),
            "std": tuple(v / 255.0 for v in SAM_PIXEL_STD),
        }
        return self.configured_normalisation(data, model_cfg)

    def checkpoint_filter(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """An official SAM / MedSAM state dict adapted to ``model``, segment-anything's whole
        ``Sam`` (its checkpoints hold the prompt encoder and mask decoder too):
        the position embedding and the global blocks' relative-position tables resized."""
        from vpt.backbones.sam import adapt_sam_state_dict

        return adapt_sam_state_dict(dict(state_dict), model)

    def load_checkpoint(self, model: nn.Module, path: str | Path) -> Any:
        from vpt.backbones.sam import load_sam_checkpoint

        return load_sam_checkpoint(model, path)

    def build_segmenter(self, cfg: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_sam_segmenter

        return build_sam_segmenter(cfg, num_classes)

    def build_interactive(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from vpt.models.build import build_interactive_sam

        return build_interactive_sam(cfg)


register_family(SamFamily())
