"""Visual Prompt Tuning for SAM's frozen image encoder (segment-anything's ``ImageEncoderViT``).

SAM's encoder keeps its tokens as a (B, H, W, C) grid: most blocks attend inside
non-overlapping windows (padded when the window does not divide the grid), a few attend
over the whole grid, and every attention adds a decomposed relative-position bias. Prompt
tokens have no place on that grid, so they join the attention instead of the grid:

* in a global block they join the attention of the whole grid;
* in a windowed block they join the attention of every window (the same tokens in every
  window), so the prompts' reach does not depend on where a window lies;
* prompt keys get no relative-position bias (they have no position), and prompt queries
  (shallow prompts only) none either. The padding that windows add stays as the package
  has it: padded tokens take part as keys, as in segment-anything.

Deep prompts (one set per block) are keys and values only: their outputs would be thrown
away, so their queries, attention rows and MLP are never computed. Shallow prompts (one
set carried from block to block) are ordinary tokens: queries too, with the residual and
MLP. In a windowed block every window processes its own copy of the set, and the
attention outputs of the copies are averaged before the residual and MLP, as VPT does for
Swin Transformers.

Attention runs through ``F.scaled_dot_product_attention`` with the relative-position bias
as an additive mask. The package's own attention materialises the float32 score matrix, a
biased copy and its softmax, and autograd keeps them for the backward pass; at 1024 pixels
each is (12, 4096, 4096) floats, about 0.8 GB, per image and global block of ViT-B, which
is what bounds SAM training memory. The fused kernels keep only the inputs and the mask
(in the input's dtype, so half the size under bfloat16 autocast) and recompute the scores
in the backward pass.
"""

from __future__ import annotations

import logging
from typing import Optional, Set

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos, window_partition, window_unpartition

from vpt.errors import ConfigError
from vpt.prompts.vit import follow_train_mode, prompt_init_bound

__all__ = ["PromptedSamEncoder"]

_logger = logging.getLogger(__name__)


class PromptedSamEncoder(nn.Module):
    """A frozen SAM image encoder with learnable prompt tokens in the attention of every block.

    With ``num_tokens == 0`` it computes what ``ImageEncoderViT.forward`` computes (through
    the memory-lighter attention), which is the frozen encoder of linear-probe baselines.

    Args:
        image_encoder: segment-anything's ``ImageEncoderViT``; all its parameters are frozen.
        num_tokens: Prompt tokens per set; 0 gives the plain frozen encoder, and then
            ``prompt_embeddings`` is None.
        deep: One set per block, used as keys and values only (VPT-deep), instead of one
            set inserted before the first block and carried through all (VPT-shallow).
        dropout: Dropout on the prompts, drawn per sample as in the reference VPT code.
        backbone_eval: Hold the frozen encoder in eval mode while the module trains. Set
            False when the encoder itself is trained.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        num_tokens: int,
        deep: bool = True,
        dropout: float = 0.0,
        backbone_eval: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(image_encoder, ImageEncoderViT):
            raise ConfigError(
                f"PromptedSamEncoder wraps segment-anything's ImageEncoderViT, got {type(image_encoder).__name__}; "
                "pass sam.image_encoder of a model from vpt.backbones.sam.build_sam."
            )
        if num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}; set method.num_tokens.")
        self.image_encoder = image_encoder
        self.image_encoder.requires_grad_(False)
        self.num_tokens = num_tokens
        self.deep = deep
        self.backbone_eval = backbone_eval
        self.grad_checkpointing = False

        sets = len(image_encoder.blocks) if deep else 1
        if num_tokens > 0:
            bound = prompt_init_bound(tuple(image_encoder.patch_embed.proj.kernel_size), self.embed_dim)
            self.prompt_embeddings = nn.Parameter(
                torch.empty(sets, num_tokens, self.embed_dim).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("prompt_embeddings", None)
        self.prompt_dropout = nn.Dropout(dropout)

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.patch_embed.proj.out_channels

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # Prompts keep weight decay, as in the reference VPT optimiser; the encoder's position
        # embedding is exempt as in timm's SAM port (it matters when the encoder trains).
        return {"image_encoder.pos_embed"} if self.image_encoder.pos_embed is not None else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "PromptedSamEncoder":
        super().train(mode)
        if mode and self.backbone_eval:
            self.image_encoder.eval()
            follow_train_mode(self.image_encoder, mode)
        return self

    def prompts(self, index: int, batch_size: int) -> torch.Tensor:
        """Prompt tokens of set ``index``, with dropout.

        Returns:
            (1, T, C) when the batch shares them (no dropout active), else (B, T, C).
        """
        prompts = self.prompt_embeddings[index].unsqueeze(0)
        if self.training and self.prompt_dropout.p > 0:
            prompts = self.prompt_dropout(prompts.expand(batch_size, -1, -1))
        return prompts

    def _run_block(
        self, block: Block, x: torch.Tensor, prompts: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(prompted_block, block, x, prompts, not self.deep, use_reentrant=False)
        return prompted_block(block, x, prompts, not self.deep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings, as ``ImageEncoderViT.forward``.

        Args:
            x: Images, (B, 3, img_size, img_size), normalised as the weights expect.

        Returns:
            (B, out_chans, img_size / 16, img_size / 16), after the encoder's neck.
        """
        encoder = self.image_encoder
        if x.shape[-2:] != (encoder.img_size, encoder.img_size):
            raise ConfigError(
                f"Images are {tuple(x.shape[-2:])} but the SAM encoder was built for {encoder.img_size}x{encoder.img_size}; "
                "resize the images or build the model with model.img_size set to their size."
            )
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        batch = x.shape[0]

        carried: Optional[torch.Tensor] = None
        if self.num_tokens > 0 and not self.deep:
            carried = self.prompts(0, batch).expand(batch, -1, -1)
        for index, block in enumerate(encoder.blocks):
            if self.num_tokens > 0 and self.deep:
                x, _ = self._run_block(block, x, self.prompts(index, batch))
            else:
                x, carried = self._run_block(block, x, carried)
        return encoder.neck(x.permute(0, 3, 1, 2))


def prompted_block(
    block: Block, x: torch.Tensor, prompts: Optional[torch.Tensor], prompts_as_queries: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run one segment-anything ``Block`` with prompt tokens joining its attention.

    Args:
        block: The encoder block (windowed when ``block.window_size > 0``, else global).
        x: The token grid, (B, H, W, C).
        prompts: None, or the prompt tokens: (1, T, C) shared by the batch or (B, T, C).
        prompts_as_queries: Shallow prompts: they are queries too, go through the residual
            and MLP, and their updated tokens are returned. Otherwise (deep prompts) they
            are keys and values only.

    Returns:
        The block's output grid (B, H, W, C), and the updated prompts (B, T, C) when
        ``prompts_as_queries`` (else None).
    """
    batch, height, width, _ = x.shape
    shortcut = x
    hidden = block.norm1(x)
    if block.window_size > 0:
        hidden, padded_hw = window_partition(hidden, block.window_size)

    prompt_out: Optional[torch.Tensor] = None
    if prompts is None:
        out, _ = _attention(block.attn, hidden, None, None, None)
    elif prompts_as_queries:
        # Projected once per sample, then copied to each of the sample's windows.
        query, key, value = _project(block.attn, block.norm1(prompts), parts=3)
        out, prompt_out = _attention(block.attn, hidden, query, key, value)
        windows = hidden.shape[0] // batch
        # Every window processed its own copy; VPT for Swin averages them back to one set.
        prompt_out = prompt_out.view(batch, windows, *prompt_out.shape[1:]).mean(dim=1)
    else:
        # The block's own prompt keys/values, computed once for the batch when shared.
        key, value = _project(block.attn, block.norm1(prompts), parts=2)
        out, _ = _attention(block.attn, hidden, None, key, value)

    if block.window_size > 0:
        out = window_unpartition(out, block.window_size, padded_hw, (height, width))
    x = shortcut + out
    x = x + block.mlp(block.norm2(x))

    if prompt_out is None:
        return x, None
    prompts = prompts + prompt_out
    return x, prompts + block.mlp(block.norm2(prompts))


def _project(attn: Attention, tokens: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values (``parts=3``) or keys and values only (``parts=2``) of tokens.

    Args:
        attn: The block's attention; its ``qkv`` rows are [queries; keys; values].
        tokens: Normalised tokens, (P, T, C).

    Returns:
        ``parts`` tensors, each (P, heads, T, head_dim).
    """
    count, length, dim = tokens.shape
    if type(attn.qkv) is nn.Linear:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        rows = weight.shape[0] // 3 * parts
        weight, bias = weight[-rows:], (bias[-rows:] if bias is not None else None)
        projected = F.linear(tokens, weight, bias)
    else:
        # A method replaced the layer (LoRA): run it whole so its update applies, keep k (and v).
        projected = attn.qkv(tokens)[..., -(dim * parts):]
    projected = projected.reshape(count, length, parts, attn.num_heads, dim // attn.num_heads)
    return tuple(projected.permute(2, 0, 3, 1, 4).unbind(0))


def _per_window(tensor: torch.Tensor, windows_total: int) -> torch.Tensor:
    """(P, ...) with P = 1 or the batch size -> (B * num_windows, ...), batch-major as window_partition."""
    count = tensor.shape[0]
    if count == windows_total:
        return tensor
    return tensor.unsqueeze(1).expand(count, windows_total // count, *tensor.shape[1:]).flatten(0, 1)


def _attention(
    attn: Attention,
    x: torch.Tensor,
    prompt_query: Optional[torch.Tensor],
    prompt_key: Optional[torch.Tensor],
    prompt_value: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """segment-anything's ``Attention.forward`` with prompt tokens and fused attention.

    Args:
        attn: The block's attention module.
        x: Normalised tokens of each window (or of the whole grid), (N, h, w, C), where N
            is B * num_windows (B for a global block).
        prompt_query: Prompt queries, (P, heads, T, head_dim) with P = 1 or B, or None
            when prompts are keys and values only.
        prompt_key: Prompt keys, as ``prompt_query``; None for no prompts.
        prompt_value: Prompt values, as ``prompt_key``.

    Returns:
        The projected output for the grid tokens (N, h, w, C) and, when prompts are
        queries, for the prompt tokens in each window (N, T, C).
    """
    count, height, width, dim = x.shape
    length = height * width
    heads = attn.num_heads
    query, key, value = attn.qkv(x).reshape(count, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    bias = _rel_pos_bias(attn, query, height, width) if attn.use_rel_pos else None

    prompt_queries = 0
    if prompt_key is not None:
        tokens = prompt_key.shape[2]
        # Attention does not depend on the order of keys, so the prompts lead.
        key = torch.cat([_per_window(prompt_key, count), key], dim=2)
        value = torch.cat([_per_window(prompt_value, count), value], dim=2)
        if prompt_query is not None:
            prompt_queries = tokens
            query = torch.cat([_per_window(prompt_query, count), query], dim=2)
        if bias is not None:
            # Zero columns for prompt keys (no position) and zero rows for prompt queries.
            bias = F.pad(bias, (tokens, 0, prompt_queries, 0))

    # An additive mask rules out the FlashAttention kernel on GPUs; the memory-efficient
    # kernel takes it (and its gradient, which reaches the queries through the bias).
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scale)
    out = attn.proj(out.transpose(1, 2).reshape(count, prompt_queries + length, dim))
    grid_out = out[:, prompt_queries:].reshape(count, height, width, dim)
    return grid_out, (out[:, :prompt_queries] if prompt_queries else None)


def _rel_pos_bias(attn: Attention, query: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """segment-anything's ``add_decomposed_rel_pos`` as a bias tensor instead of an in-place sum.

    Args:
        attn: The attention with ``rel_pos_h`` / ``rel_pos_w`` tables.
        query: (N, heads, height * width, head_dim), unscaled as the package uses it.

    Returns:
        The additive bias, (N, heads, height * width, height * width).
    """
    rel_h_table = get_rel_pos(height, height, attn.rel_pos_h)  # (height, height, head_dim)
    rel_w_table = get_rel_pos(width, width, attn.rel_pos_w)
    grid_query = query.unflatten(2, (height, width))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table.to(query.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table.to(query.dtype))
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (N, heads, h, w, key_h, key_w)
    return bias.flatten(4).flatten(2, 3)
