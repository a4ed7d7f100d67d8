"""Heads: what turns frozen-encoder features into task outputs (segmentation decoders)."""

from vpt.heads.sam_decoder import SamMulticlassDecoder, decode_masks
from vpt.heads.vit_decoder import PatchTokenDecoder

__all__ = ["SamMulticlassDecoder", "PatchTokenDecoder", "decode_masks"]
