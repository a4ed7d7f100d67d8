"""SAM's prompt encoder and mask decoder in single-mask mode: one mask per box or point.

The head of interactive segmentation (:mod:`vpt.tasks.interactive`); the automatic task's
all-classes-at-once head is :class:`~vpt.heads.sam_decoder.SamMulticlassDecoder`. Both run
SAM's two-way transformer through :func:`~vpt.heads.sam_decoder.decode_masks`.
"""

from __future__ import annotations

from typing import Optional

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

from vpt.errors import ConfigError
from vpt.heads.sam_decoder import decode_masks

__all__ = ["SamSingleMaskDecoder"]


class SamSingleMaskDecoder(nn.Module):
    """SAM's frozen prompt encoder and its mask decoder in single-mask mode.

    As segment-anything's ``MaskDecoder`` with ``multimask_output=False``: the IoU token and all
    mask tokens go through the two-way transformer, and mask token 0 with its hypernetwork makes
    the mask. The IoU head and the other hypernetworks are left out, since nothing here uses
    or trains them.

    Args:
        prompt_encoder: segment-anything's ``PromptEncoder``; frozen. Stored as
            ``sam_prompt_encoder`` so that it is not mistaken for VPT prompts.
        mask_decoder: segment-anything's ``MaskDecoder``; its transformer, upscaling, tokens and
            first hypernetwork are used (trainable unless frozen by the caller).
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.sam_prompt_encoder = prompt_encoder
        self.sam_prompt_encoder.requires_grad_(False)
        self.transformer = mask_decoder.transformer
        self.output_upscaling = mask_decoder.output_upscaling
        tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
        self.output_tokens = nn.Parameter(tokens.detach().clone())
        self.hypernetworks = nn.ModuleList([mask_decoder.output_hypernetworks_mlps[0]])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mask logits for one prompt per image embedding.

        Args:
            image_embeddings: (P, C, h, w), one row per prompt.
            boxes: (P, 4) ``(x0, y0, x1, y1)`` in input pixels, or None.
            points: (P, N, 2) ``(x, y)`` positive clicks in input pixels, or None.

        Returns:
            (P, 4h, 4w) mask logits.
        """
        if boxes is None and points is None:
            raise ConfigError("SAM needs a box or a point per mask; set task.prompt to box or point.")
        clicks = None
        if points is not None:
            clicks = (points, torch.ones(points.shape[:2], dtype=torch.int64, device=points.device))
        sparse, dense = self.sam_prompt_encoder(points=clicks, boxes=boxes, masks=None)
        image_pe = self.sam_prompt_encoder.get_dense_pe()
        masks = decode_masks(self, image_embeddings, image_pe, self.output_tokens, self.hypernetworks, sparse, dense)
        return masks[:, 0]
