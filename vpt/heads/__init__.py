"""Heads: what turns frozen-encoder features into task outputs (segmentation decoders, and SAM's
prompt-driven single-mask decoder for interactive segmentation)."""

from vpt.heads.multilevel import MultiLevelDecoder, evenly_spaced_blocks
from vpt.heads.sam_decoder import SamMulticlassDecoder, decode_masks
from vpt.heads.sam_single_mask import SamSingleMaskDecoder
from vpt.heads.vit_decoder import PatchTokenDecoder

__all__ = [
    "MultiLevelDecoder",
    "evenly_spaced_blocks",
    "SamMulticlassDecoder", "SamSingleMaskDecoder", "PatchTokenDecoder", "decode_masks"]
