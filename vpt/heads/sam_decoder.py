"""SAM's mask decoder for automatic multi-class segmentation (no clicks).

As in SAMed (Zhang & Liu, 2023), the decoder's mask tokens are resized to one token per
class (background included) and all classes are decoded in one pass; a softmax over the
class masks gives the segmentation. The tokens and the per-token hypernetwork MLPs start
from the pretrained ones (cycled), so a pretrained decoder is a good start.

segment-anything's ``MaskDecoder.predict_masks`` repeats the image embedding once per
prompt set (it assumes one image and many prompts); :func:`decode_masks` is the same
computation for a batch of images with one prompt set each, which is what training needs.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

__all__ = ["SamMulticlassDecoder", "decode_masks"]

_logger = logging.getLogger(__name__)


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    output_tokens: torch.Tensor,
    hypernetworks: nn.ModuleList,
    sparse_prompt_embeddings: Optional[torch.Tensor] = None,
    dense_prompt_embeddings: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run SAM's two-way transformer and mask head for one prompt set per image.

    Args:
        decoder: Supplies ``transformer`` and ``output_upscaling``.
        image_embeddings: (B, C, h, w) from the image encoder.
        image_pe: (1, C, h, w) dense positional encoding (``PromptEncoder.get_dense_pe``).
        output_tokens: (T, C) learned output tokens; token ``1 + i`` makes mask ``i``
            (token 0 is SAM's IoU token).
        hypernetworks: One MLP per mask token, (C,) -> (C / 8,).
        sparse_prompt_embeddings: (B, S, C) point / box embeddings, or None.
        dense_prompt_embeddings: (B or 1, C, h, w) mask-prompt embedding, or None.

    Returns:
        Mask logits, (B, len(hypernetworks), 4h, 4w).
    """
    batch, channels, height, width = image_embeddings.shape
    tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
    if sparse_prompt_embeddings is not None and sparse_prompt_embeddings.shape[1] > 0:
        tokens = torch.cat([tokens, sparse_prompt_embeddings], dim=1)
    src = image_embeddings if dense_prompt_embeddings is None else image_embeddings + dense_prompt_embeddings
    pos = image_pe.expand(batch, -1, -1, -1)
    hidden, src = decoder.transformer(src, pos, tokens)
    mask_tokens = hidden[:, 1 : 1 + len(hypernetworks), :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
    hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(hypernetworks)], dim=1)
    b, c, h, w = upscaled.shape
    return (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


class SamMulticlassDecoder(nn.Module):
    """All classes from SAM's mask decoder at once, with learned per-class tokens.

    Args:
        mask_decoder: A (pretrained) segment-anything ``MaskDecoder``; its transformer and
            upscaling are used, its mask tokens and MLPs seed the per-class ones.
        prompt_encoder: Supplies the dense positional encoding and the "no mask" embedding;
            it stays frozen (buffers here).
        num_classes: Classes including background.
    """

    def __init__(self, mask_decoder: MaskDecoder, prompt_encoder: PromptEncoder, num_classes: int) -> None:
        super().__init__()
        pretrained_tokens = mask_decoder.mask_tokens.weight.detach()
        count = pretrained_tokens.shape[0]
        self.num_classes = num_classes
        self.transformer = mask_decoder.transformer
        self.output_upscaling = mask_decoder.output_upscaling
        self.iou_token = nn.Parameter(mask_decoder.iou_token.weight.detach().clone())
        self.class_tokens = nn.Parameter(torch.stack([pretrained_tokens[i % count] for i in range(num_classes)]).clone())
        self.class_mlps = nn.ModuleList(
            copy.deepcopy(mask_decoder.output_hypernetworks_mlps[i % count]) for i in range(num_classes)
        )
        with torch.no_grad():
            self.register_buffer("image_pe", prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
            no_mask = prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone()
        self.register_buffer("no_mask_embed", no_mask, persistent=False)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, C, h, w) -> class logits (B, num_classes, 4h, 4w)."""
        tokens = torch.cat([self.iou_token, self.class_tokens], dim=0)
        dense = self.no_mask_embed.expand(-1, -1, *image_embeddings.shape[-2:])
        return decode_masks(self, image_embeddings, self.image_pe, tokens, self.class_mlps, None, dense)
