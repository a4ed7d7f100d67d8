"""Build Segment Anything (SAM) models at any input size and give them weights from a local file.

The models are assembled from ``segment_anything.modeling`` exactly as the package's own
``build_sam.py`` does, with one difference: the input size is a parameter. The image
embedding is ``img_size // 16`` patches on a side, and the prompt encoder's
``image_embedding_size`` / ``input_image_size`` follow it, so a 512-pixel SAM is a
consistent model rather than a 1024-pixel one fed smaller images.

Weights come only from a local file (``.pth`` as published, or ``.safetensors``), read
without unpickling objects. A checkpoint saved at another input size is adapted on load:
the absolute position embedding is resized bicubically and the relative-position tables
of the global-attention blocks are resized linearly (windowed blocks keep theirs, since
the window size does not change with the input). Nothing is downloaded.

Using the result for training: ``Sam.forward`` runs under ``torch.no_grad()`` and takes
lists of dicts, so training code calls ``sam.image_encoder`` (or a
:class:`~vpt.prompts.sam.PromptedSamEncoder` around it), ``sam.prompt_encoder`` and
``sam.mask_decoder`` directly. ``MaskDecoder`` repeats the image embedding once per prompt
(``repeat_interleave``), so call it with one image's embedding, (1, C, h, w), and that
image's prompts. MedSAM was trained on images min-max scaled to [0, 1] and passed to the
image encoder without SAM's ``pixel_mean`` / ``pixel_std`` normalisation.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from vpt.backbones.checkpoint import LoadReport, existing_checkpoint_path, load_weights, read_state_dict
from vpt.errors import ConfigError, WeightsUnavailableError
from vpt.messages import log_setup

__all__ = [
    "SAM_BUILDERS",
    "build_sam",
    "build_sam_tiny",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "load_sam_checkpoint",
    "adapt_sam_state_dict",
]

_logger = logging.getLogger(__name__)

PATCH_SIZE = 16
_POS_EMBED_KEY = "image_encoder.pos_embed"
_REL_POS_KEY = "image_encoder.blocks.{index}.attn.rel_pos_{axis}"

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Each variant's published weights file and where to get it, for the message that asks for it.
_WEIGHTS_SOURCES = {
    "sam_vit_b": ("sam_vit_b_01ec64.pth", f"{_SAM_URL}sam_vit_b_01ec64.pth"),
    "sam_vit_l": ("sam_vit_l_0b3195.pth", f"{_SAM_URL}sam_vit_l_0b3195.pth"),
    "sam_vit_h": ("sam_vit_h_4b8939.pth", f"{_SAM_URL}sam_vit_h_4b8939.pth"),
    "medsam_vit_b": ("medsam_vit_b.pth", "https://github.com/bowang-lab/MedSAM"),
}


#: SAM's input normalisation, in 0-255 units (segment-anything's ``Sam`` defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _build_sam(
        *,
        img_size: int,
        encoder_embed_dim: int,
        encoder_depth: int,
        encoder_num_heads: int,
        encoder_global_attn_indexes: Sequence[int],
        window_size: int = 14,
        prompt_embed_dim: int = 256,
        mask_in_chans: int = 16,
        decoder_depth: int = 2,
        decoder_mlp_dim: int = 2048,
        decoder_num_heads: int = 8,
        iou_head_hidden_dim: int = 256,
        num_multimask_outputs: int = 3,
        pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
        pixel_std: Sequence[float] = SAM_PIXEL_STD,
) -> Sam:
    """segment-anything's ``_build_sam`` with the input size (and the sizes of the tiny variant) as arguments."""
    image_embedding_size = img_size // PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(img_size, img_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=list(pixel_mean),
        pixel_std=list(pixel_std),
    )


def _architecture_arguments() -> list[str]:
    return [name for name in inspect.signature(_build_sam).parameters if name != "img_size"]


def build_sam_vit_b(img_size: int = 1024, **overrides: Any) -> Sam:
    """SAM ViT-B (91M image encoder): 12 blocks of width 768, global attention in blocks 2, 5, 8, 11."""
    arch = dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11))
    return _build_sam(img_size=img_size, **{**arch, **overrides})


def build_sam_vit_l(img_size: int = 1024, **overrides: Any) -> Sam:
    """SAM ViT-L (308M image encoder): 24 blocks of width 1024, global attention in blocks 5, 11, 17, 23."""
    arch = dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23))
    return _build_sam(img_size=img_size, **{**arch, **overrides})


def build_sam_vit_h(img_size: int = 1024, **overrides: Any) -> Sam:
    """SAM ViT-H (636M image encoder): 32 blocks of width 1280, global attention in blocks 7, 15, 23, 31."""
    arch = dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31))
    return _build_sam(img_size=img_size, **{**arch, **overrides})


def build_sam_tiny(img_size: int = 1024, **overrides: Any) -> Sam:
    """A few-thousand-parameter SAM for tests and demos, with windowed and global blocks.

    The window (3 patches) divides neither the 64- nor the 128-pixel grid (4 and 8 patches),
    so windows are padded as in real SAM at 1024 pixels (64 patches, window 14), and its
    rel-pos table length (5) differs from the global blocks' at those sizes (7 and 15).
    """
    arch = dict(
        encoder_embed_dim=32,
        encoder_depth=4,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1, 3),
        window_size=3,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )
    return _build_sam(img_size=img_size, **{**arch, **overrides})


# MedSAM fine-tunes SAM ViT-B: same architecture, different weights.
SAM_BUILDERS: dict[str, Callable[..., Sam]] = {
    "sam_vit_b": build_sam_vit_b,
    "sam_vit_l": build_sam_vit_l,
    "sam_vit_h": build_sam_vit_h,
    "medsam_vit_b": build_sam_vit_b,
    "sam_tiny": build_sam_tiny,
}


def build_sam(
        variant: str,
        *,
        checkpoint: str | Path | None = None,
        img_size: int = 1024,
        pretrained: bool = True,
        **overrides: Any,
) -> Sam:
    """Build a SAM model for ``img_size`` inputs with weights from a local checkpoint, or random init.

    Args:
        variant: One of :data:`SAM_BUILDERS` (``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``,
            ``medsam_vit_b``, ``sam_tiny``).
        checkpoint: A local ``.pth``/``.pt``/``.safetensors`` state dict of the whole
            :class:`Sam` (as published); takes precedence over ``pretrained``. Saved at
            another input size, its position embeddings are resized to this one.
        img_size: Input side in pixels, a multiple of 16; the image embedding is
            ``img_size // 16`` on a side.
        pretrained: Without ``checkpoint``: True raises (vpt does not download SAM
            weights), False builds a random-init model with a warning.
        **overrides: Architecture arguments of the variant (``window_size``,
            ``encoder_depth``, ``prompt_embed_dim``, ``decoder_mlp_dim`` ...).

    Returns:
        The :class:`Sam` in train mode with every parameter trainable; freezing is the
        method's job.

    Raises:
        ConfigError: unknown variant, bad ``img_size`` or rejected overrides.
        CheckpointError: the checkpoint is missing, unsafe, unreadable or does not fit.
        WeightsUnavailableError: ``pretrained`` without a checkpoint.
    """
    if variant not in SAM_BUILDERS:
        raise ConfigError(f"Unknown SAM variant '{variant}'; pick one of {', '.join(SAM_BUILDERS)}.")
    if img_size <= 0 or img_size % PATCH_SIZE:
        # An error, not a warning: prompt coordinates span img_size pixels, the embedding grid fewer.
        lower = max(PATCH_SIZE, img_size // PATCH_SIZE * PATCH_SIZE)
        upper = max(PATCH_SIZE, -(-img_size // PATCH_SIZE) * PATCH_SIZE)
        nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise ConfigError(
            f"SAM img_size must be a positive multiple of its patch size {PATCH_SIZE}, got {img_size}; "
            f"set model.img_size to {nearest} (1024, 512 and 256 are common)."
        )
    if not checkpoint and pretrained:
        filename, where = _WEIGHTS_SOURCES.get(variant, ("weights.pth", f"{variant} has no published weights; use one you saved"))
        raise WeightsUnavailableError(
            f"SAM weights must be passed as model.checkpoint=/path/{filename} ({where}), since vpt downloads none; "
            "or set model.pretrained=false for a random-init model."
        )

    try:
        model = SAM_BUILDERS[variant](img_size=img_size, **overrides)
    except TypeError as error:  # an override the builder does not have
        raise ConfigError(
            f"SAM variant '{variant}' rejected the arguments {sorted(overrides)} ({error}); "
            f"use only the architecture arguments {', '.join(_architecture_arguments())}."
        ) from None

    if checkpoint:
        load_sam_checkpoint(model, checkpoint)
        return model.train()

    message = (
        f"Building {variant} as a random-init model: results will not reflect pretrained transfer; "
        "set model.checkpoint=/path/to/weights.pth for a real run."
    )
    # Logged only (no warnings.warn as well): the console would show it twice. Said at every build
    # (each builds a new random model), but not when a finished run is rebuilt: its training said it.
    log_setup(_logger, logging.WARNING, message, once=False)
    return model.train()


def load_sam_checkpoint(model: Sam, checkpoint: str | Path) -> LoadReport:
    """Load a local SAM state dict into ``model``, adapted to the model's input size.

    Args:
        model: The SAM to load into (in place).
        checkpoint: A file :func:`~vpt.backbones.checkpoint.read_state_dict` reads.

    Returns:
        What was loaded; unexpected keys are reported, missing ones raise.

    Raises:
        CheckpointError: the file is missing, unsafe, unreadable, lacks keys, or has
            tensors that do not fit even after resizing.
    """
    path = existing_checkpoint_path(checkpoint)
    state_dict = adapt_sam_state_dict(read_state_dict(path), model, source=path)
    return load_weights(model, state_dict, source=path)


def adapt_sam_state_dict(
        state_dict: dict[str, torch.Tensor], model: Sam, source: Optional[str | Path] = None
) -> dict[str, torch.Tensor]:
    """Resize a SAM checkpoint's position tensors to ``model``'s input size (a timm-style filter).

    The absolute position embedding, (1, H/16, W/16, C), is resized bicubically. The
    relative-position tables, (2 * size - 1, head_dim), are resized linearly along their
    length (as SAMed does, and as segment-anything's ``get_rel_pos`` would at run time), but
    only for the global-attention blocks: their attention spans the whole grid, which
    changes with the input; windowed blocks attend within a fixed window and keep their
    tables. Global blocks are told by the model's blocks (``window_size == 0``), which is
    how ``ImageEncoderViT`` applies ``global_attn_indexes``. Anything else that does not
    fit is left for :func:`~vpt.backbones.checkpoint.load_weights` to report.

    Args:
        state_dict: The checkpoint's tensors, keyed as in ``Sam.state_dict()``.
        model: The model the tensors are for.
        source: Where the checkpoint came from, for messages.

    Returns:
        A new dict with the resized tensors; the others are the same objects.
    """
    adapted = dict(state_dict)
    target = model.state_dict()
    what = f"Checkpoint {source}" if source is not None else "The checkpoint"

    pos_embed = adapted.get(_POS_EMBED_KEY)
    wanted = target.get(_POS_EMBED_KEY)
    if pos_embed is not None and wanted is not None and _differs_only_in(pos_embed, wanted, dims=(1, 2)):
        adapted[_POS_EMBED_KEY] = _resize_pos_embed(pos_embed, tuple(wanted.shape[1:3]))
        _logger.info(
            "%s: resized %s from %s to %s.", what, _POS_EMBED_KEY, tuple(pos_embed.shape[1:3]), tuple(wanted.shape[1:3])
        )

    for index, block in enumerate(model.image_encoder.blocks):
        if block.window_size > 0:
            continue
        for axis in ("h", "w"):
            key = _REL_POS_KEY.format(index=index, axis=axis)
            table, wanted = adapted.get(key), target.get(key)
            if table is not None and wanted is not None and _differs_only_in(table, wanted, dims=(0,)):
                adapted[key] = _resize_rel_pos(table, wanted.shape[0])
                _logger.info("%s: resized %s from %d to %d entries.", what, key, table.shape[0], wanted.shape[0])
    return adapted


def _differs_only_in(tensor: torch.Tensor, wanted: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Same rank and same sizes outside ``dims``, different inside: a resize fixes it."""
    if tensor.dim() != wanted.dim() or tensor.shape == wanted.shape:
        return False
    return all(tensor.shape[d] == wanted.shape[d] for d in range(tensor.dim()) if d not in dims)


def _resize_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w, C) -> (1, *size, C), bicubic; computed in float32 since half bicubic is not on every device."""
    grid = pos_embed.float().permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, head_dim) -> (length, head_dim), linear along L."""
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(table.dtype).contiguous()

