"""Visual Prompt Tuning for SAM2 / SAM2.1 Hiera image encoders (timm's ``HieraDet``).

Hiera keeps its tokens as a (B, H, W, C) grid in four stages of widths C, 2C, 4C, 8C and
strides 4, 8, 16, 32. Most blocks attend inside non-overlapping windows (padded when the
window does not divide the grid), a few attend over the whole grid, and the first block of
stages 2-4 max-pools its queries (and its shortcut) by 2, halving the grid. Prompt tokens
have no place on that grid, so, as in :mod:`vpt.prompts.sam`, deep prompts join the
attention instead:

* every block has its own prompt tokens, as wide as the block's input (a block that widens
  the grid maps its ``dim`` input to ``dim_out`` keys and values), so one width per stage;
* they go through the block's ``norm1`` and the key/value rows of its ``qkv``, and their
  keys and values join those of every window (the same ones in every window), or of the
  whole grid in a global block;
* q-pooled blocks pool the image queries only; prompt keys and values are never pooled;
* prompts carry no position embedding, and their outputs are never computed (keys and
  values only, as the deep prompts of ``PromptedViT`` and ``PromptedSamEncoder``).

VPT-shallow has no faithful definition here: a token carried from block to block would have
to be pooled with the grid at every stage change and copied into every window, so it is
refused. With ``num_tokens == 0`` every block is timm's own ``MultiScaleBlock``.

SAM2 checkpoints (``{"model": state_dict}`` with ``image_encoder.trunk.*`` and MLP layers
``mlp.layers.0/1``) become ``HieraDet`` state dicts with :func:`sam2_hiera_trunk_state` or,
in timm's builder style, :func:`hiera_checkpoint_filter`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from timm.models.hieradet_sam2 import (
    HieraDet,
    MultiScaleAttention,
    MultiScaleBlock,
    _calc_pad,
    checkpoint_filter_fn,
    window_partition,
    window_unpartition,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpt.errors import CheckpointError, ConfigError
from vpt.prompts.attention import gated_prompt_attention
from vpt.prompts.kept import KeptProjections
from vpt.prompts.base import PromptedEncoder
from vpt.prompts.vit import prompt_init_bound

__all__ = [
    "PromptedHiera",
    "prompted_hiera_block",
    "hiera_prompt_keys_values",
    "sam2_hiera_trunk_state",
    "hiera_checkpoint_filter",
    "SAM2_TRUNK_PREFIX",
]

_logger = logging.getLogger(__name__)

# Where an official SAM2 / SAM2.1 / MedSAM2 checkpoint keeps the Hiera trunk.
SAM2_TRUNK_PREFIX = "image_encoder.trunk."

# SAM2 trains its image encoders at 1024 px; used when the timm model names no input size.
_SAM2_IMG_SIZE = 1024


class PromptedHiera(PromptedEncoder):
    """A frozen timm ``HieraDet`` (SAM2 / SAM2.1 image encoder) with deep key/value prompts.

    With ``num_tokens == 0`` it runs timm's blocks themselves and computes exactly what
    ``HieraDet.forward_features`` / ``forward_intermediates`` compute.

    Args:
        hiera: timm's ``HieraDet``; all its parameters are frozen.
        num_tokens: Prompt tokens per block; 0 gives the plain frozen encoder, and then
            ``prompt_embeddings`` is None.
        deep: Must stay True when ``num_tokens > 0`` (VPT-deep); VPT-shallow is refused.
        dropout: Dropout on the prompts, drawn per sample as in the reference VPT code.
        backbone_eval: Hold the frozen encoder in eval mode while the module trains. Set
            False when the encoder itself is trained.
        gate: Deep prompts join each block's attention through a learnable per-head gate
            initialised at zero (``prompt_gates``, one (heads,) tensor per block, since heads
            double per stage; see :func:`~vpt.prompts.attention.gated_prompt_attention`):
            at step 0 the encoder equals the frozen one exactly. False keeps the paper's
            joint softmax.
        img_size: The input size the encoder is used at (data settings only: any size whose
            grids fit the windows runs, with position embeddings interpolated as timm does).
            None takes the timm model's ``pretrained_cfg`` input size, else SAM2's 1024.

    Parameters: ``prompt_embeddings.{i}`` (num_tokens, width of block i) and, with ``gate``,
    ``prompt_gates.{i}`` (heads of block i). Inference (eval mode without gradients) keeps
    each block's prompt keys and values (``cache_prompt_keys_values``, see
    :mod:`vpt.prompts.kept`).
    """

    trunk_attribute = "hiera"

    def __init__(
        self,
        hiera: HieraDet,
        num_tokens: int = 0,
        deep: bool = True,
        dropout: float = 0.0,
        backbone_eval: bool = True,
        gate: bool = False,
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(hiera, HieraDet):
            raise ConfigError(
                f"PromptedHiera wraps timm's HieraDet (SAM2 Hiera), got {type(hiera).__name__}; "
                "build the encoder with timm.create_model('sam2_hiera_tiny') or a sam2_hiera_* model config."
            )
        if num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}; set method.num_tokens.")
        if num_tokens > 0 and not deep:
            raise ConfigError(
                "VPT-shallow has no faithful definition in Hiera's pooled, windowed stages; use method=vpt_deep."
            )
        if gate and num_tokens == 0:
            raise ConfigError("method.gate applies to deep prompts (keys and values only); use method=vpt_deep, or set method.gate=false.")
        for index, block in enumerate(hiera.blocks):
            if type(block) is not MultiScaleBlock or type(block.attn) is not MultiScaleAttention:
                raise ConfigError(
                    f"Block {index} of the Hiera encoder is a {type(block).__name__}, not timm's MultiScaleBlock; "
                    "apply vpt_deep to the plain timm HieraDet before any method that replaces its blocks."
                )
        self.hiera = hiera
        self.hiera.requires_grad_(False)
        self.num_tokens = num_tokens
        self.deep = deep
        self.backbone_eval = backbone_eval
        self.grad_checkpointing = False
        self.compile_target = "_forward_blocks"  # what model.compile=true compiles
        self.cache_prompt_keys_values = True
        self._kept = KeptProjections()
        if img_size is None:
            input_size = (getattr(hiera, "pretrained_cfg", None) or {}).get("input_size")
            img_size = int(input_size[-1]) if input_size else _SAM2_IMG_SIZE
        self.img_size = img_size

        self.prompt_embeddings: nn.ParameterList | None = None
        self.prompt_gates: nn.ParameterList | None = None
        if num_tokens > 0:
            kernel = tuple(hiera.patch_embed.proj.kernel_size)
            prompts = []
            for block in hiera.blocks:
                bound = prompt_init_bound(kernel, block.dim)
                prompts.append(nn.Parameter(torch.empty(num_tokens, block.dim).uniform_(-bound, bound)))
            self.prompt_embeddings = nn.ParameterList(prompts)
        if gate:
            self.prompt_gates = nn.ParameterList(
                [nn.Parameter(torch.zeros(block.attn.num_heads)) for block in hiera.blocks]
            )
        self.prompt_dropout = nn.Dropout(dropout)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's per-stage ``num_chs`` / ``reduction`` / ``module`` of the wrapped encoder."""
        return self.hiera.feature_info

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last block of each stage."""
        return list(self.hiera.stage_ends)

    def prompts(self, index: int, batch_size: int) -> torch.Tensor:
        """Prompt tokens of block ``index``, with dropout.

        Returns:
            (1, T, C_i) when the batch shares them (no dropout active), else (B, T, C_i),
            with C_i the block's input width.
        """
        assert self.prompt_embeddings is not None, "a model without prompts has no prompt tokens"
        prompts = self.prompt_embeddings[index].unsqueeze(0)
        if self.training and self.prompt_dropout.p > 0:
            prompts = self.prompt_dropout(prompts.expand(batch_size, -1, -1))
        return prompts

    def _keep_keys_values(self, x: torch.Tensor) -> bool:
        """Whether this forward may reuse kept prompt keys/values (inference only)."""
        enabled = self.cache_prompt_keys_values and self.num_tokens > 0
        sources: list[torch.Tensor] = []
        if enabled:
            sources = list(self.prompt_embeddings)  # type: ignore[arg-type]
            for block in self.hiera.blocks:
                sources += [*block.norm1.parameters(), *block.attn.qkv.parameters()]
        return self._kept.active(enabled, self.training, sources, x)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus timm's interpolated position embeddings, (B, H/4, W/4, C)."""
        x = self.hiera.patch_embed(images)
        self._check_grid(tuple(images.shape[-2:]), x.shape[1], x.shape[2])
        return self.hiera._pos_embed(x)

    def _check_grid(self, image_hw: tuple[int, ...], height: int, width: int) -> None:
        """Refuse an input size whose token grids the encoder's windows cannot tile."""
        window = self.hiera.pos_embed_window.shape[-2:]
        fits = height % window[0] == 0 and width % window[1] == 0
        for block in self.hiera.blocks:
            if not fits:
                break
            if block.q_stride:
                stride = block.q_stride
                if block.is_windowed:
                    # The pooled windows must tile the pooled grid as the windows tile the grid.
                    pooled = (block.window_size[0] // stride[0], block.window_size[1] // stride[1])
                    fits = all(
                        pooled[axis] > 0
                        and math.ceil(size / block.window_size[axis]) == math.ceil(size // stride[axis] / pooled[axis])
                        for axis, size in enumerate((height, width))
                    )
                height, width = height // stride[0], width // stride[1]
        if not fits:
            raise ConfigError(
                f"Images of {image_hw[0]}x{image_hw[1]} give token grids that this Hiera encoder's windows cannot tile; "
                f"resize them to the size the encoder was trained at (e.g. {self.img_size})."
            )

    def _run_block(
        self,
        index: int,
        x: torch.Tensor,
        prompts: torch.Tensor | None,
        prompt_kv: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        block = self.hiera.blocks[index]
        if prompts is None:
            fn, args = block, (x,)
        else:
            gate = self.prompt_gates[index] if self.prompt_gates is not None else None
            fn, args = prompted_hiera_block, (block, x, prompts, prompt_kv, gate)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _forward_blocks(
        self, images: torch.Tensor, take: Sequence[int] = (), last: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed and run blocks ``0 .. last`` (all when None).

        Returns:
            The grid after the last block run (B, h, w, C), NHWC, and the grids after each
            block in ``take``, NHWC, in block order.
        """
        x = self._embed(images)
        batch = x.shape[0]
        depth = len(self.hiera.blocks)
        last = depth - 1 if last is None else last
        take = set(take)
        taken: list[torch.Tensor] = []
        reuse = self._keep_keys_values(x)
        for index in range(last + 1):
            prompts: torch.Tensor | None = None
            kept: tuple[torch.Tensor, torch.Tensor] | None = None
            if self.num_tokens > 0:
                prompts = self.prompts(index, batch)
                if reuse:
                    block = self.hiera.blocks[index]
                    kept = self._kept.get(index, lambda: hiera_prompt_keys_values(block, prompts))  # noqa: B023 - called now
            x = self._run_block(index, x, prompts, kept)
            if index in take:
                taken.append(x)
        return x, taken

    def forward_intermediates(
        self, images: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Stage outputs as feature grids, as timm's ``HieraDet.forward_intermediates`` with
        ``output_fmt="NCHW", intermediates_only=True`` (coarse: one grid per stage).

        Args:
            images: (B, 3, H, W), normalised as the weights expect.
            indices: Stages to return, timm's rule: None for all four, an int n for the last
                n, a sequence of stage indices (0-3, negatives count from the end).

        Returns:
            One (B, C_s, H / stride_s, W / stride_s) grid per stage taken, strides 4, 8,
            16, 32 and widths C, 2C, 4C, 8C for stages 0-3, in stage order.
        """
        stage_ends = self.hiera.stage_ends
        try:
            take_stages, last_stage = feature_take_indices(len(stage_ends), indices)
        except AssertionError as error:
            raise ConfigError(
                f"Stage indices {indices} are not valid for a {len(stage_ends)}-stage Hiera; "
                f"give stage indices in 0..{len(stage_ends) - 1}, or None for all."
            ) from error
        _, taken = self._forward_blocks(images, [stage_ends[i] for i in take_stages], stage_ends[last_stage])
        return [grid.permute(0, 3, 1, 2) for grid in taken]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens as timm's ``HieraDet.forward_features``: NHWC, (B, H/32, W/32, 8C).

        Args:
            images: (B, 3, H, W), normalised as the weights expect.
        """
        x, _ = self._forward_blocks(images)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> last-stage grid (B, 8C, H/32, W/32), NCHW (no head)."""
        return self.forward_features(images).permute(0, 3, 1, 2)


def hiera_prompt_keys_values(block: MultiScaleBlock, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a Hiera block gives its prompt tokens.

    Args:
        block: timm's ``MultiScaleBlock``.
        prompts: Un-normalised prompt tokens, (P, T, dim) with P = 1 (shared) or the batch
            size and ``dim`` the block's input width.

    Returns:
        Keys and values, each (P, heads, T, head_dim), head_dim = dim_out / heads.
    """
    attn = block.attn
    hidden = block.norm1(prompts)
    count, tokens, _ = hidden.shape
    dim_out = attn.dim_out
    if type(attn.qkv) is nn.Linear:
        # Skip the query rows: prompts are keys and values only.
        bias = attn.qkv.bias[dim_out:] if attn.qkv.bias is not None else None
        key_value = F.linear(hidden, attn.qkv.weight[dim_out:], bias)
    else:
        # A method replaced the layer (LoRA): run it whole so its update applies, keep k and v.
        key_value = attn.qkv(hidden)[..., dim_out:]
    key, value = key_value.reshape(count, tokens, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return key, value


def prompted_hiera_block(
    block: MultiScaleBlock,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm's ``MultiScaleBlock.forward`` with deep prompts joining every window's attention.

    The order of operations is timm's, so only the attention differs.

    Args:
        block: timm's ``MultiScaleBlock``.
        x: The token grid, (B, H, W, dim).
        prompts: This block's prompt tokens, (1, T, dim) shared by the batch or (B, T, dim);
            ignored when ``prompt_kv`` is given.
        prompt_kv: Their keys and values from :func:`hiera_prompt_keys_values`, when the
            caller kept them (inference).
        gate: Per-head gate logits (heads,): the prompts get their own softmax and join
            through ``tanh(gate)``; None for the joint softmax.

    Returns:
        The block's output grid, (B, H', W', dim_out), H' = H / 2 in q-pooled blocks.
    """
    if prompt_kv is None:
        assert prompts is not None, "prompts or their keys and values are needed"
        prompt_kv = hiera_prompt_keys_values(block, prompts)
    shortcut = x
    x = block.norm1(x)
    if block.dim != block.dim_out:
        shortcut = block.proj(x)
        if block.pool is not None:
            shortcut = block.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    window_size = block.window_size
    height, width = x.shape[1:3]
    padded_height, padded_width = height, width
    if block.is_windowed:
        padded_height, padded_width, pad_h, pad_w = _calc_pad(height, width, window_size)
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = window_partition(x, window_size)

    x = _prompted_attention(block.attn, x, prompt_kv, gate)
    if block.q_stride is not None:
        # Shapes have changed due to q pooling.
        window_size = (block.window_size[0] // block.q_stride[0], block.window_size[1] // block.q_stride[1])
        height, width = shortcut.shape[1:3]
        if block.is_windowed:
            padded_height, padded_width, _, _ = _calc_pad(height, width, window_size)

    if block.is_windowed:
        x = window_unpartition(x, window_size, (padded_height, padded_width))
        x = x[:, :height, :width, :].contiguous()

    x = shortcut + block.drop_path1(block.ls1(x))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x


def _per_window(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """(P, ...) with P = 1 or the batch size -> (count, ...), batch-major as ``window_partition``."""
    if tensor.shape[0] == count:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(count, *tensor.shape[1:])
    return tensor.repeat_interleave(count // tensor.shape[0], dim=0)


def _prompted_attention(
    attn: MultiScaleAttention,
    x: torch.Tensor,
    prompt_kv: tuple[torch.Tensor, torch.Tensor],
    gate: torch.Tensor | None,
) -> torch.Tensor:
    """timm's ``MultiScaleAttention.forward`` with prompt keys and values in every window.

    Args:
        attn: The block's attention.
        x: Normalised tokens of each window (or of the whole grid), (N, h, w, dim), N =
            B * windows per image (B in a global block).
        prompt_kv: Prompt keys and values, each (P, heads, T, head_dim), P = 1 or B.
        gate: Per-head gate logits (heads,), or None for the joint softmax.

    Returns:
        The projected output, (N, h', w', dim_out), h' = h / stride with q pooling.
    """
    count, height, width, _ = x.shape
    heads = attn.num_heads
    query, key, value = torch.unbind(attn.qkv(x).reshape(count, height * width, 3, heads, -1), 2)
    if attn.q_pool is not None:
        # Only the image queries are pooled; prompts are keys and values.
        query = attn.q_pool(query.reshape(count, height, width, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        height, width = query.shape[1:3]
        query = query.reshape(count, height * width, heads, -1)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    prompt_key, prompt_value = (tensor.to(key.dtype) for tensor in prompt_kv)
    if gate is None:
        # Attention does not depend on the order of keys, so the prompts lead.
        key = torch.cat([_per_window(prompt_key, count), key], dim=2)
        value = torch.cat([_per_window(prompt_value, count), value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value)
    else:
        out = F.scaled_dot_product_attention(query, key, value)
        out = gated_prompt_attention(
            out, query, _per_window(prompt_key, count), _per_window(prompt_value, count), gate
        )
    out = out.transpose(1, 2).reshape(count, height, width, -1)
    return attn.proj(out)


def sam2_hiera_trunk_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The Hiera trunk of an official SAM2 / SAM2.1 / MedSAM2 checkpoint, as ``HieraDet`` keys.

    Keys under ``image_encoder.trunk.`` lose that prefix and MLP layers ``mlp.layers.0/1``
    become timm's ``mlp.fc1/fc2`` (timm's own ``checkpoint_filter_fn``). Position embeddings
    stay as they are: ``HieraDet`` interpolates ``pos_embed`` to the grid at run time.

    Args:
        checkpoint: ``{"model": state_dict}`` as SAM2 saves it, or the state dict itself.

    Returns:
        The trunk's state dict, and the checkpoint keys it leaves out (the FPN neck, memory
        modules, mask decoder, ...), for the caller to report.
    """
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            "The SAM2 checkpoint's 'model' entry is not a state dict; pass an official SAM2 / SAM2.1 / MedSAM2 .pt file."
        )
    ignored = [key for key in state if not key.startswith(SAM2_TRUNK_PREFIX)]
    trunk = checkpoint_filter_fn(dict(state), prefix=SAM2_TRUNK_PREFIX)
    if not trunk:
        raise CheckpointError(
            f"The checkpoint has no '{SAM2_TRUNK_PREFIX}*' keys; pass an official SAM2 / SAM2.1 / MedSAM2 .pt file "
            "(a {'model': state_dict} with the image encoder's trunk)."
        )
    return trunk, ignored


def hiera_checkpoint_filter(state_dict: Mapping[str, Any], model: HieraDet) -> dict[str, torch.Tensor]:
    """timm-style filter: an official SAM2 checkpoint -> a state dict ``model`` loads strictly.

    The trunk comes from :func:`sam2_hiera_trunk_state`; the rest of SAM2 is dropped (logged).
    SAM2 has no classifier head, so ``model``'s own ``head.*`` tensors (unused by the encoder
    features) fill in for it. A trunk tensor whose shape differs from ``model``'s is refused.

    Args:
        state_dict: The checkpoint, ``{"model": state_dict}`` or the state dict itself.
        model: The ``HieraDet`` to load into.

    Returns:
        A state dict with exactly ``model``'s keys where the checkpoint has them.
    """
    trunk, ignored = sam2_hiera_trunk_state(state_dict)
    if ignored:
        _logger.info("Ignored %d checkpoint keys outside the Hiera trunk (e.g. %s).", len(ignored), ignored[0])
    own = model.state_dict()
    for key, tensor in trunk.items():
        if key in own and tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"Checkpoint tensor {SAM2_TRUNK_PREFIX}{key} has shape {tuple(tensor.shape)} but the model's {key} has "
                f"{tuple(own[key].shape)}; pick the model config that matches the checkpoint (e.g. model=sam2_hiera_tiny)."
            )
    for key, tensor in own.items():
        if key.startswith("head.") and key not in trunk:
            trunk[key] = tensor
    return trunk
