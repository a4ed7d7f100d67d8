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

__all__ = ["supports_key_value_prompts", "key_value_prompt_block", "prompt_keys_values", "concat_prompt_block"]

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


def prompt_keys_values(block: Block, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a ``Block`` gives its (un-normalised) prompt tokens (1 or B, T, D):
    what :func:`key_value_prompt_block` computes, for callers that keep them (inference)."""
    return _prompt_keys_values(block.attn, block.norm1(prompts))


def _prompt_keys_values(attn: Attention, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of normalised prompt tokens, skipping the unused query projection.

    Args:
        attn: The block's attention module.
        prompts: Normalised prompt tokens, (P, T, D) with P = 1 (shared) or the batch size.

    Returns:
        Keys and values, each (P, heads, T, head_dim).
    """
    attn_dim = attn.num_heads * attn.head_dim
    weight = attn.qkv.weight[attn_dim:]
    bias = attn.qkv.bias[attn_dim:] if attn.qkv.bias is not None else None
    batch, tokens, _ = prompts.shape
    kv = F.linear(prompts, weight, bias).reshape(batch, tokens, 2, attn.num_heads, attn.head_dim)
    key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.k_norm(key), value


def key_value_prompt_block(
    block: Block,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run one timm ``Block`` on ``x`` with ``prompts`` joining only as keys and values.

    Equivalent to ``block(cat(prefix, prompts, patches))`` with the prompt outputs removed.

    Args:
        block: A timm ``Block`` (see :func:`supports_key_value_prompts`).
        x: Real tokens (prefix + patches), (B, N, D).
        prompts: This block's prompt tokens, (1, T, D) shared by the batch or (B, T, D);
            ignored when ``keys_values`` is given.
        keys_values: The prompts' keys and values from :func:`prompt_keys_values`, when
            the caller kept them (they are constants at inference).

    Returns:
        The block's output for the real tokens, (B, N, D).
    """
    attn = block.attn
    batch, length, _ = x.shape
    attn_dim = attn.num_heads * attn.head_dim

    hidden = block.norm1(x)
    gate = attn.gate(hidden).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(hidden).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    query, key = attn.q_norm(query), attn.k_norm(key)

    # Prompt keys/values are computed once for the whole batch when the prompts are shared.
    if keys_values is None:
        assert prompts is not None, "prompts or their keys and values are needed"
        keys_values = _prompt_keys_values(attn, block.norm1(prompts))
    prompt_key, prompt_value = keys_values
    if prompt_key.shape[0] != batch:
        prompt_key = prompt_key.expand(batch, -1, -1, -1)
        prompt_value = prompt_value.expand(batch, -1, -1, -1)
    # Attention is invariant to the order of keys, so prompts can lead.
    key = torch.cat([prompt_key, key], dim=2)
    value = torch.cat([prompt_value, value], dim=2)

    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
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
