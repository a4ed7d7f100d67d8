"""SAM2's own mask decoder on a (prompted) Hiera trunk, for automatic multi-class segmentation.

The parts are the ``transformers`` implementation of SAM2 (``Sam2VisionNeck``, the FPN neck
that turns Hiera's four stage grids into 256-channel maps; ``Sam2PromptEncoder``;
``Sam2MaskDecoder``): a well-kept implementation that is installed with peft anyway, and
that, unlike the ``sam2`` package, does not initialise a global Hydra of its own on import
(which would clash with our Hydra application). What vpt adds is the wiring SAM2's image
predictor does (scalp of the stride-32 level, ``conv_s0``/``conv_s1`` high-resolution
features, the "no memory" embedding on the stride-16 map), the reading of official SAM2 /
SAM2.1 / MedSAM2 checkpoints into those modules (:func:`sam2_decoder_state`), and, as for SAM
(:class:`~vpt.heads.SamMulticlassDecoder`, SAMed's design), one learned output token per class
so that all classes decode in one pass; the class tokens and their hypernetwork MLPs start
from SAM2's pretrained mask tokens (cycled).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers.models.sam2.configuration_sam2 import (
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder, Sam2PromptEncoder, Sam2VisionNeck

from vpt.errors import CheckpointError, ConfigError

__all__ = [
    "Sam2DecoderParts",
    "Sam2MulticlassDecoder",
    "Sam2SingleMaskDecoder",
    "sam2_decoder_state",
    "grid_positions",
    "image_features",
    "SAM2_DECODER_PREFIXES",
]

_logger = logging.getLogger(__name__)

#: Checkpoint keys (official SAM2 layout) the decoder parts are read from.
SAM2_DECODER_PREFIXES = ("image_encoder.neck.", "sam_mask_decoder.", "sam_prompt_encoder.", "no_mem_embed")

#: SAM2's decoder width (``d_model`` of the neck, ``transformer_dim`` of the mask decoder).
SAM2_DIM = 256


class Sam2DecoderParts(nn.Module):
    """What SAM2 puts between its Hiera trunk and a mask: the FPN neck, the prompt encoder,
    the mask decoder and the "no memory" embedding, as ``transformers`` modules.

    Args:
        stage_widths: The trunk's channel widths per stage, highest resolution first
            (Hiera-T/S: 96, 192, 384, 768; B+: 112, 224, 448, 896).
        image_size: The model's input size (the prompt encoder's coordinate frame).
    """

    def __init__(self, stage_widths: Sequence[int], image_size: int = 1024) -> None:
        super().__init__()
        if len(stage_widths) != 4:
            raise ValueError(f"SAM2's neck reads four Hiera stages, got widths {list(stage_widths)}")
        # The neck lists its lateral convolutions lowest resolution first, as SAM2 does.
        neck_config = Sam2VisionConfig(
            backbone_channel_list=[int(w) for w in reversed(stage_widths)], fpn_hidden_size=SAM2_DIM,
            fpn_top_down_levels=[2, 3], num_feature_levels=3,
        )
        self.neck = Sam2VisionNeck(neck_config)
        self.prompt_encoder = Sam2PromptEncoder(
            Sam2PromptEncoderConfig(hidden_size=SAM2_DIM, image_size=int(image_size), patch_size=16)
        )
        decoder_config = Sam2MaskDecoderConfig(hidden_size=SAM2_DIM)
        # A module built outside a PreTrainedModel has no attention backend chosen; use
        # PyTorch's scaled_dot_product_attention, as SAM2 itself does.
        decoder_config._attn_implementation = "sdpa"
        self.mask_decoder = Sam2MaskDecoder(decoder_config)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, SAM2_DIM))

    def load_official(self, checkpoint: Mapping[str, Any], source: Any = None) -> Any:
        """Load the neck, prompt encoder, mask decoder and ``no_mem_embed`` of an official
        SAM2 checkpoint (``{"model": state_dict}`` or the state dict).

        Returns:
            The :class:`~vpt.backbones.LoadReport` (missing keys refused, shapes checked).
        """
        from vpt.backbones.checkpoint import load_weights

        state, _ = sam2_decoder_state(checkpoint)
        return load_weights(self, state, source=source)


# Renames from SAM2's module names to transformers' (regex, replacement), applied in order
# to a key that has already lost its component prefix.
_MLP3 = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"
_RENAMES: tuple[tuple[str, str], ...] = (
    # three-layer MLPs: layers.0 -> proj_in, layers.1 -> layers.0, layers.2 -> proj_out
    (rf"^{_MLP3}\.layers\.0\.", r"\1.proj_in."),
    (rf"^{_MLP3}\.layers\.2\.", r"\1.proj_out."),
    (rf"^{_MLP3}\.layers\.1\.", r"\1.layers.0."),
    # the two-way transformer's blocks
    (r"^(transformer\.layers\.\d+)\.mlp\.layers\.0\.", r"\1.mlp.proj_in."),
    (r"^(transformer\.layers\.\d+)\.mlp\.layers\.1\.", r"\1.mlp.proj_out."),
    (r"^(transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
    (r"\.out_proj\.", ".o_proj."),
    (r"^output_upscaling\.0\.", "upscale_conv1."),
    (r"^output_upscaling\.1\.", "upscale_layer_norm."),
    (r"^output_upscaling\.3\.", "upscale_conv2."),
    # prompt encoder
    (r"^pe_layer\.positional_encoding_gaussian_matrix$", "shared_embedding.positional_embedding"),
    (r"^mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"^mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"^mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"^mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"^mask_downscaling\.6\.", "mask_embed.conv3."),
    # neck: SAM2 wraps each lateral conv in a Sequential named "conv"
    (r"^convs\.(\d+)\.conv\.", r"convs.\1."),
)

_COMPONENTS = (
    ("sam_mask_decoder.", "mask_decoder."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("image_encoder.neck.", "neck."),
)


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def sam2_decoder_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The decoder parts of an official SAM2 / SAM2.1 / MedSAM2 checkpoint, keyed as
    :class:`Sam2DecoderParts`' state dict.

    SAM2's ``point_embeddings.{0..3}`` (four one-row embeddings) become the rows of
    transformers' single ``point_embed``.

    Args:
        checkpoint: ``{"model": state_dict}`` as SAM2 saves it, or the state dict itself.

    Returns:
        The parts' state dict, and the checkpoint keys it leaves out (trunk, memory modules).

    Raises:
        CheckpointError: the checkpoint has no mask decoder (e.g. a trunk-only file).
    """
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            "The SAM2 checkpoint's 'model' entry is not a state dict; pass an official SAM2 / SAM2.1 / MedSAM2 .pt file."
        )
    parts: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        if key == "no_mem_embed":
            parts["no_mem_embed"] = tensor
            continue
        for prefix, target in _COMPONENTS:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                match = re.fullmatch(r"point_embeddings\.(\d+)\.weight", rest)
                if prefix == "sam_prompt_encoder." and match:
                    points[int(match.group(1))] = tensor
                else:
                    parts[target + _rename(rest)] = tensor
                break
        else:
            ignored.append(key)
    if points:
        parts["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
    if not any(key.startswith("mask_decoder.") for key in parts):
        raise CheckpointError(
            "The checkpoint has no 'sam_mask_decoder.*' keys, so task.decoder=sam2 cannot start from SAM2's decoder; "
            "pass a full official SAM2 / SAM2.1 / MedSAM2 .pt file, or use task.decoder=multilevel."
        )
    return parts, ignored


def grid_positions(gaussian_matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SAM2's random-Fourier positional encoding of a (height, width) grid at cell centres:
    (1, 2 * gaussian_matrix.shape[1], height, width) (``PromptEncoder.get_dense_pe``)."""
    ys = (torch.arange(height, device=gaussian_matrix.device, dtype=gaussian_matrix.dtype) + 0.5) / height
    xs = (torch.arange(width, device=gaussian_matrix.device, dtype=gaussian_matrix.dtype) + 0.5) / width
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
    projected = 2 * torch.pi * ((2 * grid - 1) @ gaussian_matrix)
    return torch.cat([projected.sin(), projected.cos()], dim=-1).permute(2, 0, 1).unsqueeze(0)


def image_features(
    neck: nn.Module, conv_s0: nn.Module, conv_s1: nn.Module, no_mem_embed: torch.Tensor, grids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What SAM2's image predictor hands its mask decoder, from Hiera's four stage grids.

    Args:
        neck: transformers' ``Sam2VisionNeck`` (lateral 1x1 convolutions, top-down into stride 16).
        conv_s0, conv_s1: The mask decoder's projections of the stride-4 and stride-8 maps.
        no_mem_embed: (1, 1, 256), added to the stride-16 map (an image without video memory).
        grids: Stage grids, NCHW, strides 4/8/16/32.

    Returns:
        The image embedding (B, 256, H/16, W/16) and the high-resolution features
        ``[stride 4 (B, 32, ...), stride 8 (B, 64, ...)]``; the stride-32 level is dropped.
    """
    if len(grids) != 4:
        raise ValueError(f"SAM2's decoder reads the four Hiera stage grids, got {len(grids)}")
    levels, _ = neck([grid.permute(0, 2, 3, 1) for grid in grids])  # lowest resolution first
    stride16, stride8, stride4 = levels[-3], levels[-2], levels[-1]
    embedding = stride16 + no_mem_embed.reshape(1, -1, 1, 1)
    return embedding, [conv_s0(stride4), conv_s1(stride8)]


class Sam2MulticlassDecoder(nn.Module):
    """All classes at once from SAM2's mask decoder, on Hiera's four stage grids.

    The neck maps the stage grids to 256 channels; the stride-16 map (plus the "no memory"
    embedding, as SAM2's image predictor adds it) is the image embedding, the stride-8 and
    stride-4 maps are the high-resolution features (through ``conv_s1`` / ``conv_s0``); the
    stride-32 map is dropped as SAM2 does. Tokens: SAM2's object-score and IoU tokens, then
    one learned token per class; class ``i``'s mask is its hypernetwork MLP's output dotted
    with the upscaled embedding.

    Args:
        parts: SAM2's neck, prompt encoder, mask decoder and ``no_mem_embed`` (pretrained or not).
        num_classes: Classes including background.
    """

    #: The segmenter hands this decoder the encoder's stage grids (not tokens).
    reads_grids = True

    def __init__(self, parts: Sam2DecoderParts, num_classes: int) -> None:
        super().__init__()
        decoder = parts.mask_decoder
        pretrained_tokens = decoder.mask_tokens.weight.detach()
        count = pretrained_tokens.shape[0]
        self.num_classes = num_classes
        #: Every stage (the segmenter asks for these grids).
        self.blocks: Optional[list[int]] = None
        self.neck = parts.neck
        self.transformer = decoder.transformer
        self.upscale_conv1 = decoder.upscale_conv1
        self.upscale_layer_norm = decoder.upscale_layer_norm
        self.upscale_conv2 = decoder.upscale_conv2
        self.activation = decoder.activation
        self.conv_s0 = decoder.conv_s0
        self.conv_s1 = decoder.conv_s1
        self.obj_score_token = nn.Parameter(decoder.obj_score_token.weight.detach().clone())
        self.iou_token = nn.Parameter(decoder.iou_token.weight.detach().clone())
        self.class_tokens = nn.Parameter(torch.stack([pretrained_tokens[i % count] for i in range(num_classes)]).clone())
        self.class_mlps = nn.ModuleList(copy.deepcopy(decoder.output_hypernetworks_mlps[i % count]) for i in range(num_classes))
        self.no_mem_embed = nn.Parameter(parts.no_mem_embed.detach().clone())
        # The prompt encoder only supplies fixed things here: the random-Fourier positional
        # encoding of the image grid and the "no mask" dense embedding.
        self.register_buffer(
            "gaussian_matrix", parts.prompt_encoder.shared_embedding.positional_embedding.detach().clone(), persistent=False
        )
        self.register_buffer(
            "no_mask_embed", parts.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone(), persistent=False
        )

    def forward(self, grids: Sequence[torch.Tensor], images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hiera's four stage grids (NCHW, strides 4/8/16/32) -> class logits (B, K, H/4, W/4).

        ``images`` is accepted for the segmenter's grid-decoder call and not read.
        """
        embedding, (high_res_s0, high_res_s1) = image_features(self.neck, self.conv_s0, self.conv_s1, self.no_mem_embed, grids)
        batch, channels, height, width = embedding.shape
        tokens = torch.cat([self.obj_score_token, self.iou_token, self.class_tokens], dim=0)
        tokens = tokens.to(embedding.dtype).reshape(1, 1, -1, channels).expand(batch, 1, -1, -1)
        source = embedding + self.no_mask_embed.to(embedding.dtype)
        position = grid_positions(self.gaussian_matrix, height, width).to(embedding.dtype).expand(batch, -1, -1, -1)
        queries, keys = self.transformer(
            point_embeddings=tokens, image_embeddings=source, image_positional_embeddings=position, attention_similarity=None
        )
        class_out = queries[:, 0, 2 : 2 + self.num_classes, :]
        source = keys[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = self.activation(self.upscale_layer_norm(self.upscale_conv1(source) + high_res_s1))
        upscaled = self.activation(self.upscale_conv2(upscaled) + high_res_s0)
        hyper = torch.stack([mlp(class_out[:, i, :]) for i, mlp in enumerate(self.class_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        return (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, self.num_classes, h, w)


class Sam2SingleMaskDecoder(nn.Module):
    """SAM2's prompt encoder and mask decoder in single-mask mode: one mask per box or point,
    on Hiera's stage grids (interactive segmentation).

    As SAM2's image predictor with ``multimask_output=False``, with one difference: SAM2 at
    inference may swap in one of its three multimask outputs when mask 0 looks unstable
    (``dynamic_multimask_via_stability``); fine-tuning trains mask 0 only, so here mask 0 is
    always the answer, in training and at test time.

    The mask decoder also computes SAM2's IoU and object-score heads and the masks of tokens
    1-3; nothing here reads them, so their heads and hypernetworks stay frozen whatever
    ``requires_grad_`` is asked (trainable tensors without gradients would only decay under
    AdamW and stop DDP).

    Args:
        parts: SAM2's neck, prompt encoder (kept frozen; stored as ``sam2_prompt_encoder``
            so that it is not mistaken for VPT prompts), mask decoder and ``no_mem_embed``.
    """

    reads_grids = True

    def __init__(self, parts: Sam2DecoderParts) -> None:
        super().__init__()
        self.neck = parts.neck
        self.sam2_prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.mask_decoder.dynamic_multimask_via_stability = False
        self.no_mem_embed = parts.no_mem_embed
        self.requires_grad_(True)

    def _unused(self) -> list[nn.Module]:
        decoder = self.mask_decoder
        return [self.sam2_prompt_encoder, decoder.iou_prediction_head, decoder.pred_obj_score_head,
                *list(decoder.output_hypernetworks_mlps)[1:]]

    def requires_grad_(self, requires_grad: bool = True) -> "Sam2SingleMaskDecoder":
        """Set the trainable parts (neck, two-way transformer, tokens, upscaling, mask 0's
        hypernetwork); the prompt encoder and the unused heads stay frozen."""
        super().requires_grad_(requires_grad)
        for module in self._unused():
            module.requires_grad_(False)
        return self

    def forward(
        self,
        grids: Sequence[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mask logits for prompts on the images of the grids.

        Args:
            grids: Hiera's four stage grids (NCHW) of the images.
            boxes: (P, 4) ``(x0, y0, x1, y1)`` in input pixels, or None.
            points: (P, N, 2) ``(x, y)`` positive clicks in input pixels, or None.
            rows: (P,) the image (row of the grids) of each prompt; None: one row per prompt.

        Returns:
            (P, H/4, W/4) mask logits.
        """
        if boxes is None and points is None:
            raise ConfigError("SAM2 needs a box or a point per mask; set task.prompt to box or point.")
        decoder = self.mask_decoder
        embedding, high_res = image_features(self.neck, decoder.conv_s0, decoder.conv_s1, self.no_mem_embed, grids)
        if rows is not None:  # the neck runs once per image, not once per prompt
            embedding, high_res = embedding[rows], [features[rows] for features in high_res]
        count, _, height, width = embedding.shape
        encoder = self.sam2_prompt_encoder
        if encoder.image_embedding_size != (height, width):
            raise ConfigError(
                f"SAM2's prompt encoder was built for a {encoder.image_embedding_size} embedding, the image gives "
                f"{(height, width)}; images must be model.img_size square."
            )
        labels = None
        if points is not None:
            points = points.unsqueeze(1)  # (P, 1, N, 2): one mask per prompt
            labels = torch.ones(points.shape[:3], dtype=torch.int64, device=points.device)
        sparse, dense = encoder(
            input_points=points, input_labels=labels, input_boxes=None if boxes is None else boxes.unsqueeze(1), input_masks=None
        )
        position = grid_positions(encoder.shared_embedding.positional_embedding, height, width)
        masks, *_ = decoder(
            image_embeddings=embedding, image_positional_embeddings=position.to(embedding.dtype).expand(count, -1, -1, -1),
            sparse_prompt_embeddings=sparse.to(embedding.dtype), dense_prompt_embeddings=dense.to(embedding.dtype),
            multimask_output=False, high_resolution_features=high_res,
        )
        return masks[:, 0, 0]
