"""Deep-prompt block forward that computes only what the VPT paper keeps.

In deep VPT every block receives fresh prompt tokens and throws the prompts' outputs away.
The naive form (concatenate prompts, run the block, slice them off) therefore spends queries,
attention rows, the output projection and the whole MLP on tokens whose results are
discarded. Here the prompts only contribute keys and values to the attention of the real
tokens; everything else runs on the real tokens alone. The result equals the naive form
up to floating-point reordering (tests/test_prompted_vit.py checks forward and gradients).

timm has no such path, which is why this module exists.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention
from timm.models.vision_transformer import Block

__all__ = [
    "supports_key_value_prompts",
    "key_value_prompt_block",
    "prompt_keys_values",
    "concat_prompt_block",
    "gated_prompt_attention",
]

_logger = logging.getLogger(__name__)


def supports_key_value_prompts(block: nn.Module) -> bool:
    """Whether ``block`` is timm's standard pre-norm ``Block`` with standard ``Attention``.

    Other block types (post-norm, parallel, custom attention) run through the naive
    concatenate-and-slice path instead, which is exact for any block, only slower.
    """
    if type(block) is not Block:  # subclasses may override forward
        return False
    # A method may have replaced the qkv layer (LoRA): its weight is no longer the whole story.
    return type(block.attn) is Attention and type(block.attn.qkv) is nn.Linear


def prompt_keys_values(block: Block, prompts: torch.Tensor) -> torch.Tensor:
    """The key/value projection a ``Block`` gives its (un-normalised) prompt tokens
    (1 or B, T, D): what :func:`key_value_prompt_block` computes, for callers that keep it
    (inference). Returns (1 or B, T, 2 * heads * head_dim), keys then values."""
    return _prompt_keys_values(block.attn, block.norm1(prompts))


def _prompt_keys_values(attn: Attention, prompts: torch.Tensor) -> torch.Tensor:
    """Key/value projection of normalised prompt tokens, skipping the unused query projection.

    Args:
        attn: The block's attention module.
        prompts: Normalised prompt tokens, (P, T, D) with P = 1 (shared) or the batch size.

    Returns:
        (P, T, 2 * heads * head_dim): keys then values, before ``k_norm``.
    """
    attn_dim = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[attn_dim:] if attn.qkv.bias is not None else None
    return F.linear(prompts, attn.qkv.weight[attn_dim:], bias)


def gated_prompt_attention(
    token_out: torch.Tensor,
    query: torch.Tensor,
    prompt_key: torch.Tensor,
    prompt_value: torch.Tensor,
    gate: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Add the prompts' attention to the tokens' own through a zero-initialised gate.

    ``out = attn(q, K_tokens, V_tokens) + tanh(gate) * attn(q, K_prompts, V_prompts)``, each
    attention with its own softmax (the zero-init attention of LLaMA-Adapter, Zhang et al.
    2023). With the gate at 0 the block computes exactly what the frozen block computes,
    so training starts from the frozen encoder and prompts can only add; the gate gets a
    gradient at 0 (the prompts' output), the prompts once the gate has moved. The paper's
    joint softmax cannot do this: any prompt key takes probability mass from the tokens.

    Args:
        token_out: The attention output over the real tokens alone, (B, heads, N, Dv).
        query: The queries, (B, heads, N, Dq).
        prompt_key: (P, heads, T, Dq) with P = 1 (shared) or B.
        prompt_value: (P, heads, T, Dv).
        gate: Gate logits, one per head, (heads,), or per sample and head, (B, heads).
        scale: Softmax scale (None: 1 / sqrt(Dq), as ``scaled_dot_product_attention``).

    Returns:
        (B, heads, N, Dv).
    """
    batch = query.shape[0]
    prompt_key = prompt_key.expand(batch, -1, -1, -1)
    prompt_value = prompt_value.expand(batch, -1, -1, -1)
    prompt_out = F.scaled_dot_product_attention(query, prompt_key, prompt_value, dropout_p=dropout_p, scale=scale)
    gate = gate.view(-1 if gate.dim() == 2 else 1, gate.shape[-1], 1, 1)
    return token_out + torch.tanh(gate).to(token_out.dtype) * prompt_out


def key_value_prompt_block(
    block: Block,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    prompt_kv: torch.Tensor | None = None,
    prompt_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one timm ``Block`` on ``x`` with ``prompts`` joining only as keys and values.

    Equivalent to ``block(cat(prefix, prompts, patches))`` with the prompt outputs removed.
    With a ``prompt_gate``, the prompts get their own softmax and join through it instead
    (see :func:`gated_prompt_attention`).

    The queries and the key/value projection are two matrix products of the same weights
    (rows split), so the prompts' keys/values join the tokens' in one contiguous copy of the
    (B, T + N, 2D) projection; concatenating the strided key and value views separately
    cost ~17% of a ViT-B inference pass on an H100.

    Args:
        block: A timm ``Block`` (see :func:`supports_key_value_prompts`).
        x: Real tokens (prefix + patches), (B, N, D).
        prompts: This block's prompt tokens, (1, T, D) shared by the batch or (B, T, D);
            ignored when ``prompt_kv`` is given.
        prompt_kv: The prompts' key/value projection from :func:`prompt_keys_values`,
            when the caller kept it (a constant at inference).
        prompt_gate: Per-head gate logits, (heads,) or (B, heads); None for the paper's joint softmax.

    Returns:
        The block's output for the real tokens, (B, N, D).
    """
    attn = block.attn
    batch, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = heads * head_dim

    hidden = block.norm1(x)
    gate = attn.gate(hidden).sigmoid() if getattr(attn, "gate", None) is not None else None
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query = F.linear(hidden, weight[:attn_dim], bias[:attn_dim] if bias is not None else None)
    key_value = F.linear(hidden, weight[attn_dim:], bias[attn_dim:] if bias is not None else None)
    if prompt_kv is None:
        assert prompts is not None, "prompts or their key/value projection are needed"
        # Computed once for the whole batch when the prompts are shared.
        prompt_kv = _prompt_keys_values(attn, block.norm1(prompts))
    query = attn.q_norm(query.view(batch, length, heads, head_dim).transpose(1, 2))
    dropout = attn.attn_drop.p if attn.training else 0.0
    if prompt_gate is None:
        # Attention is invariant to the order of keys, so prompts can lead.
        key_value = torch.cat([prompt_kv.to(key_value.dtype).expand(batch, -1, -1), key_value], dim=1)
    tokens = key_value.shape[1]
    key, value = key_value.view(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    key = attn.k_norm(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
    if prompt_gate is not None:
        prompt_kv = prompt_kv.to(key_value.dtype)
        count, num_prompts = prompt_kv.shape[:2]
        prompt_key, prompt_value = prompt_kv.view(count, num_prompts, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = gated_prompt_attention(out, query, attn.k_norm(prompt_key), prompt_value, prompt_gate, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, length, attn_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))

    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x


def concat_prompt_block(
    block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """The naive deep-prompt block: insert prompts after the prefix tokens, run, remove them.

    Args:
        block: Any transformer block taking (B, L, D).
        x: Real tokens, (B, N, D).
        prompts: (1, T, D) or (B, T, D).
        num_prefix_tokens: Class and register tokens at the front of ``x``.

    Returns:
        The block's output for the real tokens, (B, N, D).
    """
    batch = x.shape[0]
    tokens = prompts.shape[1]
    prompts = prompts.expand(batch, -1, -1)
    x = torch.cat([x[:, :num_prefix_tokens], prompts, x[:, num_prefix_tokens:]], dim=1)
    x = block(x)
    return torch.cat([x[:, :num_prefix_tokens], x[:, num_prefix_tokens + tokens :]], dim=1)
