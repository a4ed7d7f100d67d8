"""Heads: what turns frozen-encoder features into task outputs (segmentation decoders, and SAM's
prompt-driven single-mask decoder for interactive segmentation; SAM2's mask decoder on Hiera)."""

from vpt.heads.multilevel import MultiLevelDecoder, evenly_spaced_blocks
from vpt.heads.sam_decoder import SamMulticlassDecoder, decode_masks
from vpt.heads.sam_single_mask import SamSingleMaskDecoder
from vpt.heads.vit_decoder import PatchTokenDecoder

__all__ = [
    "MultiLevelDecoder",
    "evenly_spaced_blocks",
    "SamMulticlassDecoder", "SamSingleMaskDecoder", "PatchTokenDecoder", "decode_masks",
    "Sam2DecoderParts", "Sam2MulticlassDecoder"]


def __getattr__(name: str):
    # SAM2's decoder imports transformers' SAM2 modules (about 2 s): only when asked for.
    if name in ("Sam2DecoderParts", "Sam2MulticlassDecoder"):
        from vpt.heads import sam2_decoder

        return getattr(sam2_decoder, name)
    raise AttributeError(f"module 'vpt.heads' has no attribute {name!r}")
