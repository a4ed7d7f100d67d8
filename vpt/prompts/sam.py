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

Attention runs through ``F.scaled_dot_product_attention`` with no mask: the decomposed
relative-position bias is folded into the queries and keys. SAM's bias for query i and key
j is ``q_i . Rh[h_i - h_j] + q_i . Rw[w_i - w_j]``; with ``rel_h_i = q_i . Rh[h_i - .]`` (one
value per key row) and ``rel_w_i`` likewise, it is the dot product of ``[rel_h_i, rel_w_i]``
with ``[onehot(h_j), onehot(w_j)]``. So each query gets ``height + width`` columns (its
``rel_h``, ``rel_w``) beside its scaled self, each key the one-hots of its row and column, and
one unscaled product gives scores plus bias. Prompt keys get zero one-hots and prompt
queries zero ``rel`` columns: no bias, as above. Why: a dense bias is a (heads, L, L)
tensor per window, at 1024 pixels (12, 4096, 4096) floats, about 0.8 GB, per image and
global block of ViT-B, the same as segment-anything's own score matrix; autograd keeps it,
and an additive mask rules out the FlashAttention kernel on GPUs. Without a mask the fused
kernels (flash, memory-efficient, and the CPU flash kernel) keep only queries, keys and
values, a few times the size of the tokens, and recompute the scores in the backward pass;
no L x L tensor exists in forward or backward. Gradients reach the queries through both
parts of their columns, and the relative-position tables when they train (``full``).

``attention="bias"`` keeps the dense-bias form (the bias as an additive mask), the
reference the folded form is tested against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpt.errors import ConfigError
from vpt.prompts.attention import gated_prompt_attention
from vpt.prompts.kept import KeptProjections
from vpt.prompts.base import PromptedEncoder
from vpt.prompts.vit import prompt_init_bound

__all__ = ["ATTENTION_FORMS", "PromptedSamEncoder"]

_logger = logging.getLogger(__name__)

# "folded": the rel-pos bias folded into queries and keys, no mask (fused kernels, no L x L
# tensor); "bias": the bias as a dense additive mask, the reference.
ATTENTION_FORMS = ("folded", "bias")


class PromptedSamEncoder(PromptedEncoder):
    """A frozen SAM image encoder with learnable prompt tokens in the attention of every block.

    With ``num_tokens == 0`` it computes what ``ImageEncoderViT.forward`` computes (through
    fused attention with no L x L tensor), which is the frozen encoder of linear-probe
    baselines.

    Args:
        image_encoder: segment-anything's ``ImageEncoderViT``; all its parameters are frozen.
        num_tokens: Prompt tokens per set; 0 gives the plain frozen encoder, and then
            ``prompt_embeddings`` is None.
        deep: One set per block, used as keys and values only (VPT-deep), instead of one
            set inserted before the first block and carried through all (VPT-shallow).
        dropout: Dropout on the prompts, drawn per sample as in the reference VPT code.
        backbone_eval: Hold the frozen encoder in eval mode while the module trains. Set
            False when the encoder itself is trained.
        attention: ``"folded"`` (the relative-position bias folded into queries and keys,
            fused kernels, no L x L tensor) or ``"bias"`` (the bias as a dense additive mask,
            the reference); see the module docstring.
        gate: Deep prompts join each block's attention through a learnable per-head gate
            initialised at zero (``prompt_gates``, (depth, heads); see
            :func:`~vpt.prompts.attention.gated_prompt_attention`): at step 0 the encoder
            equals the frozen one exactly. False keeps the paper's joint softmax.
    """

    trunk_attribute = "image_encoder"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        num_tokens: int,
        deep: bool = True,
        dropout: float = 0.0,
        backbone_eval: bool = True,
        attention: str = "folded",
        gate: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(image_encoder, ImageEncoderViT):
            raise ConfigError(
                f"PromptedSamEncoder wraps segment-anything's ImageEncoderViT, got {type(image_encoder).__name__}; "
                "pass sam.image_encoder of a model from vpt.backbones.sam.build_sam."
            )
        if num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}; set method.num_tokens.")
        if attention not in ATTENTION_FORMS:
            raise ConfigError(
                f"attention must be one of {ATTENTION_FORMS}, got {attention!r}; pass attention='folded' "
                "(fused kernels, no L x L tensor) or attention='bias' (the dense-bias reference)."
            )
        self.image_encoder = image_encoder
        self.image_encoder.requires_grad_(False)
        self.num_tokens = num_tokens
        self.deep = deep
        self.backbone_eval = backbone_eval
        self.attention = attention
        self.compile_target = "forward"  # what model.compile=true compiles
        # Inference keeps deep prompts' keys/values per block (see vpt.prompts.kept).
        self.cache_prompt_keys_values = True
        self._kept = KeptProjections()
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
        if gate and not (deep and num_tokens > 0):
            raise ConfigError("method.gate applies to deep prompts (keys and values only); use method=vpt_deep, or set method.gate=false.")
        if gate:
            heads = image_encoder.blocks[0].attn.num_heads
            self.prompt_gates: nn.Parameter | None = nn.Parameter(torch.zeros(len(image_encoder.blocks), heads))
        else:
            self.register_parameter("prompt_gates", None)

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.patch_embed.proj.out_channels

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Prompts keep weight decay, as in the reference VPT optimiser; the encoder's position
        # embedding is exempt as in timm's SAM port (it matters when the encoder trains).
        return {"image_encoder.pos_embed"} if self.image_encoder.pos_embed is not None else set()

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
        self,
        block: Block,
        x: torch.Tensor,
        prompts: torch.Tensor | None,
        prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        gate: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                prompted_block, block, x, prompts, not self.deep, attention=self.attention, prompt_kv=prompt_kv,
                gate=gate, use_reentrant=False,
            )
        return prompted_block(block, x, prompts, not self.deep, attention=self.attention, prompt_kv=prompt_kv, gate=gate)

    def _keep_keys_values(self, x: torch.Tensor) -> bool:
        """Whether this forward may reuse kept deep-prompt keys/values (inference only)."""
        enabled = self.cache_prompt_keys_values and self.deep and self.num_tokens > 0
        sources: list[torch.Tensor] = []
        if enabled:
            sources = [self.prompt_embeddings]
            for block in self.image_encoder.blocks:
                sources += [*block.norm1.parameters(), *block.attn.qkv.parameters()]
        return self._kept.active(enabled, self.training, sources, x)

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

        carried: torch.Tensor | None = None
        if self.num_tokens > 0 and not self.deep:
            carried = self.prompts(0, batch).expand(batch, -1, -1)
        reuse = self._keep_keys_values(x)
        for index, block in enumerate(encoder.blocks):
            if self.num_tokens > 0 and self.deep:
                prompts = self.prompts(index, batch)
                kept = None
                if reuse:
                    kept = self._kept.get(
                        index, lambda: _project(block.attn, block.norm1(prompts), parts=2)  # noqa: B023 - called now
                    )
                gate = self.prompt_gates[index] if self.prompt_gates is not None else None
                x, _ = self._run_block(block, x, prompts, kept, gate)
            else:
                x, carried = self._run_block(block, x, carried)
        return encoder.neck(x.permute(0, 3, 1, 2))


def prompted_block(
    block: Block,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    prompts_as_queries: bool,
    *,
    attention: str = "folded",
    prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one segment-anything ``Block`` with prompt tokens joining its attention.

    Args:
        block: The encoder block (windowed when ``block.window_size > 0``, else global).
        x: The token grid, (B, H, W, C).
        prompts: None, or the prompt tokens: (1, T, C) shared by the batch or (B, T, C).
        prompts_as_queries: Shallow prompts: they are queries too, go through the residual
            and MLP, and their updated tokens are returned. Otherwise (deep prompts) they
            are keys and values only.
        attention: ``"folded"`` or ``"bias"``, as ``PromptedSamEncoder``.
        prompt_kv: Deep prompts' keys and values for this block, (P, heads, T, head_dim)
            each, when the caller kept them (inference); ``prompts`` is then not projected.
        gate: Deep prompts only: per-head gate logits (heads,); the prompts then get their
            own softmax and join through ``tanh(gate)`` (None: the joint softmax).

    Returns:
        The block's output grid (B, H, W, C), and the updated prompts (B, T, C) when
        ``prompts_as_queries`` (else None).
    """
    batch, height, width, _ = x.shape
    shortcut = x
    hidden = block.norm1(x)
    if block.window_size > 0:
        hidden, padded_hw = window_partition(hidden, block.window_size)

    prompt_out: torch.Tensor | None = None
    if prompts is None:
        out, _ = _attention(block.attn, hidden, None, None, None, attention=attention)
    elif prompts_as_queries:
        # Projected once per sample, then copied to each of the sample's windows.
        query, key, value = _project(block.attn, block.norm1(prompts), parts=3)
        out, prompt_out = _attention(block.attn, hidden, query, key, value, attention=attention)
        windows = hidden.shape[0] // batch
        # Every window processed its own copy; VPT for Swin averages them back to one set.
        prompt_out = prompt_out.view(batch, windows, *prompt_out.shape[1:]).mean(dim=1)
    else:
        # The block's own prompt keys/values, computed once for the batch when shared.
        key, value = prompt_kv if prompt_kv is not None else _project(block.attn, block.norm1(prompts), parts=2)
        out, _ = _attention(block.attn, hidden, None, key, value, attention=attention, gate=gate)

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
    prompt_query: torch.Tensor | None,
    prompt_key: torch.Tensor | None,
    prompt_value: torch.Tensor | None,
    *,
    attention: str = "folded",
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """segment-anything's ``Attention.forward`` with prompt tokens and fused attention.

    Args:
        attn: The block's attention module.
        x: Normalised tokens of each window (or of the whole grid), (N, h, w, C), where N
            is B * num_windows (B for a global block).
        prompt_query: Prompt queries, (P, heads, T, head_dim) with P = 1 or B, or None
            when prompts are keys and values only.
        prompt_key: Prompt keys, as ``prompt_query``; None for no prompts.
        prompt_value: Prompt values, as ``prompt_key``.
        attention: ``"folded"``: the relative-position bias folded into queries and keys
            (no mask, no L x L tensor); ``"bias"``: the bias as a dense additive mask.
        gate: Per-head gate logits (heads,) for key/value prompts: their attention gets its
            own softmax and is added through ``tanh(gate)``; None for the joint softmax.

    Returns:
        The projected output for the grid tokens (N, h, w, C) and, when prompts are
        queries, for the prompt tokens in each window (N, T, C).
    """
    count, height, width, dim = x.shape
    length = height * width
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    query, key, value = attn.qkv(x).reshape(count, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    folded = attn.use_rel_pos and attention == "folded"
    bias = _rel_pos_bias(attn, query, height, width) if attn.use_rel_pos and not folded else None
    scale = attn.scale
    if folded:
        query, key = _fold_rel_pos(attn, query, key, height, width)
        scale = 1.0  # the queries carry attn.scale now, and the bias columns must stay unscaled

    prompt_queries = 0
    gated: tuple[torch.Tensor, torch.Tensor] | None = None
    if prompt_key is not None and gate is not None:
        if prompt_query is not None:
            raise ConfigError("Gated prompts are keys and values only; use method=vpt_deep with method.gate.")
        if folded:
            # Zero one-hot columns: prompt keys have no position, so no bias.
            prompt_key = _widen(prompt_key, key.shape[-1])
        gated = (_per_window(prompt_key, count), _per_window(prompt_value, count))
    elif prompt_key is not None:
        tokens = prompt_key.shape[2]
        if folded:
            # Zero one-hot columns: prompt keys have no position, so no bias.
            prompt_key = _widen(prompt_key, key.shape[-1])
        # Attention does not depend on the order of keys, so the prompts lead.
        key = torch.cat([_per_window(prompt_key, count), key], dim=2)
        value = torch.cat([_per_window(prompt_value, count), value], dim=2)
        if prompt_query is not None:
            prompt_queries = tokens
            if folded:
                # Zero rel columns: prompt queries get no bias either.
                prompt_query = _widen(prompt_query * attn.scale, query.shape[-1])
            query = torch.cat([_per_window(prompt_query, count), query], dim=2)
        if bias is not None:
            # Zero columns for prompt keys (no position) and zero rows for prompt queries.
            bias = F.pad(bias, (tokens, 0, prompt_queries, 0))
    if folded:
        # FlashAttention wants values as wide as queries and keys; the zero columns add
        # nothing to the output and are cut off below.
        value = _widen(value, query.shape[-1])

    # An additive mask (the "bias" form) rules out the FlashAttention kernel on GPUs; the
    # memory-efficient kernel takes it (and its gradient, which reaches the queries through
    # the bias).
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    if gated is not None:
        gated_key, gated_value = gated
        if folded:
            gated_value = _widen(gated_value, query.shape[-1])
        out = gated_prompt_attention(out, query, gated_key, gated_value, gate, scale=scale)
    out = out[..., :head_dim]
    out = attn.proj(out.transpose(1, 2).reshape(count, prompt_queries + length, dim))
    grid_out = out[:, prompt_queries:].reshape(count, height, width, dim)
    return grid_out, (out[:, :prompt_queries] if prompt_queries else None)


def _widen(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero columns appended to the last dimension of ``tensor`` up to ``width``."""
    return F.pad(tensor, (0, width - tensor.shape[-1]))


def _fold_rel_pos(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose unscaled product is ``query . key * scale`` plus the rel-pos bias.

    The bias of query i and key j at (h_j, w_j) is ``rel_h[i, h_j] + rel_w[i, w_j]`` (see
    :func:`_rel_pos_bias`), the product of ``[rel_h_i, rel_w_i]`` with the one-hots of
    ``h_j`` and ``w_j``. Both are padded with zeros to a width that is a multiple of 8,
    which the fused kernels want.

    Args:
        attn: The attention with ``rel_pos_h`` / ``rel_pos_w`` tables.
        query: (N, heads, height * width, head_dim), unscaled as the package uses it.
        key: As ``query``.

    Returns:
        The folded query ``[query * scale, rel_h, rel_w, 0]`` and key ``[key, onehot(h),
        onehot(w), 0]``, each (N, heads, height * width, D) with D the multiple of 8 at or
        above head_dim + height + width.
    """
    rel_h, rel_w = _rel_pos_terms(attn, query, height, width)
    count, heads, length, head_dim = query.shape
    folded_dim = -(-(head_dim + height + width) // 8) * 8
    query = _widen(torch.cat([query * attn.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)], dim=-1), folded_dim)

    # Keys are row-major over the grid: key j sits at row j // width, column j % width.
    rows = torch.eye(height, dtype=key.dtype, device=key.device).repeat_interleave(width, dim=0)
    columns = torch.eye(width, dtype=key.dtype, device=key.device).repeat(height, 1)
    positions = torch.cat([rows, columns], dim=-1).expand(count, heads, length, height + width)
    key = _widen(torch.cat([key, positions], dim=-1), folded_dim)
    return query, key


def _rel_pos_terms(
    attn: Attention, query: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of segment-anything's decomposed relative-position bias.

    Args:
        attn: The attention with ``rel_pos_h`` / ``rel_pos_w`` tables.
        query: (N, heads, height * width, head_dim), unscaled as the package uses it.

    Returns:
        ``rel_h`` (N, heads, height, width, key_height), the bias of each query for each key
        row, and ``rel_w`` (N, heads, height, width, key_width) for each key column.
    """
    rel_h_table = get_rel_pos(height, height, attn.rel_pos_h)  # (height, height, head_dim)
    rel_w_table = get_rel_pos(width, width, attn.rel_pos_w)
    grid_query = query.unflatten(2, (height, width))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table.to(query.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table.to(query.dtype))
    return rel_h, rel_w


def _rel_pos_bias(attn: Attention, query: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """segment-anything's ``add_decomposed_rel_pos`` as a bias tensor instead of an in-place sum.

    Args:
        attn: The attention with ``rel_pos_h`` / ``rel_pos_w`` tables.
        query: (N, heads, height * width, head_dim), unscaled as the package uses it.

    Returns:
        The additive bias, (N, heads, height * width, height * width).
    """
    rel_h, rel_w = _rel_pos_terms(attn, query, height, width)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (N, heads, h, w, key_h, key_w)
    return bias.flatten(4).flatten(2, 3)
