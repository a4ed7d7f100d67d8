"""Visual Prompt Tuning (Jia et al., ECCV 2022) for frozen timm Vision Transformers."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer

from vpt.errors import ConfigError
from vpt.prompts.kept import KeptProjections
from vpt.prompts.base import PromptedEncoder, follow_train_mode  # noqa: F401  (follow_train_mode: old import path)
from vpt.prompts.attention import (
    concat_prompt_block,
    key_value_prompt_block,
    prompt_keys_values,
    supports_key_value_prompts,
)

__all__ = ["PromptedViT", "prompt_init_bound", "follow_train_mode"]

_logger = logging.getLogger(__name__)

# Children of a timm ViT that belong to the classifier, not to the frozen trunk: they follow
# the requested train/eval mode even when the trunk is held in eval mode.
_HEAD_MODULES = ("head", "head_drop")


def prompt_init_bound(patch_size: tuple[int, int], prompt_dim: int) -> float:
    """The VPT paper's uniform init bound, sqrt(6 / (3 * patch_h * patch_w + prompt_dim))."""
    return math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + prompt_dim))


class PromptedViT(PromptedEncoder):
    """A frozen timm ``VisionTransformer`` with learnable prompt tokens.

    Prompts sit after the prefix tokens (class and register tokens) and before the patch
    tokens, after the position embeddings, so they carry no position. Shallow prompts are
    inserted once and travel through every block; deep prompts are new in every block and
    their outputs are discarded, so a block only needs their keys and values (see
    :mod:`vpt.prompts.attention`). Pooling and the head never see prompt tokens.

    Args:
        vit: The timm model to wrap; all its parameters are frozen.
        num_tokens: Prompt tokens per set; 0 gives the plain frozen model (linear probing).
        deep: One set per block (VPT-deep) instead of one set at the input (VPT-shallow).
        dropout: Dropout on the prompts, drawn per sample as in the reference code.
        project_dim: Learn prompts in this dimension and project them to the model's width
            with one shared linear layer (the paper's optional projection); None for none.
        backbone_eval: Hold the frozen trunk in eval mode (no dropout or drop-path) while
            the module trains. Set False when the backbone itself is trained.
        key_value_prompts: Run deep prompts as keys and values only where the block allows
            (exact and faster); False forces the naive concatenation (for checks and
            benchmarks).
        gate: Deep prompts join each block's attention through a learnable per-head gate
            initialised at zero (``prompt_gates``, (depth, heads); see
            :func:`~vpt.prompts.attention.gated_prompt_attention`): at step 0 the model
            equals the frozen one exactly. False keeps the paper's joint softmax.

    Inference: in eval mode without gradients, deep prompts' keys and values are constants,
    so they are computed once per block and kept (``cache_prompt_keys_values``, on by
    default); the kept ones are dropped whenever a prompt, the prompt projection or a
    block's norm/qkv weights change (in-place updates, ``load_state_dict``), or the device,
    dtype or autocast setting differs.
    """

    trunk_attribute = "vit"

    def __init__(
        self,
        vit: VisionTransformer,
        num_tokens: int,
        deep: bool = True,
        dropout: float = 0.0,
        project_dim: Optional[int] = None,
        backbone_eval: bool = True,
        key_value_prompts: bool = True,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise ConfigError(
                f"PromptedViT wraps timm VisionTransformer models, got {type(vit).__name__}; "
                "pick a ViT model (e.g. model=vit_b)."
            )
        if num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}; set method.num_tokens.")
        self.vit = vit
        self.vit.requires_grad_(False)
        self.num_tokens = num_tokens
        self.deep = deep
        self.backbone_eval = backbone_eval
        self.grad_checkpointing = False

        embed_dim = vit.embed_dim
        prompt_dim = project_dim or embed_dim
        sets = len(vit.blocks) if deep else 1
        if num_tokens > 0:
            bound = prompt_init_bound(tuple(vit.patch_embed.patch_size), prompt_dim)
            self.prompt_embeddings = nn.Parameter(torch.empty(sets, num_tokens, prompt_dim).uniform_(-bound, bound))
        else:
            self.register_parameter("prompt_embeddings", None)
        if project_dim is not None and num_tokens > 0:
            self.prompt_proj: nn.Module = nn.Linear(project_dim, embed_dim)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        else:
            self.prompt_proj = nn.Identity()
        self.prompt_dropout = nn.Dropout(dropout)
        self._key_value_blocks = [key_value_prompts and supports_key_value_prompts(block) for block in vit.blocks]
        self.cache_prompt_keys_values = True
        self.compile_target = "_forward_blocks"  # what model.compile=true compiles
        self._kept = KeptProjections()
        if gate and not (deep and num_tokens > 0 and all(self._key_value_blocks)):
            raise ConfigError(
                "method.gate applies to deep prompts in timm's standard blocks (keys and values only); "
                "use method=vpt_deep, or set method.gate=false."
            )
        if gate:
            self.prompt_gates: Optional[nn.Parameter] = nn.Parameter(torch.zeros(len(vit.blocks), vit.blocks[0].attn.num_heads))
        else:
            self.register_parameter("prompt_gates", None)
        if key_value_prompts and deep and num_tokens > 0 and not all(self._key_value_blocks):
            _logger.info("Some blocks are not timm's standard Block; they run deep prompts by concatenation.")

    # timm's model protocol, so timm utilities (data config, optimizers) treat us as a ViT.
    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_features(self) -> int:
        return self.vit.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.vit.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.vit.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a new, trainable one (timm's ``reset_classifier``)."""
        self.vit.reset_classifier(num_classes, global_pool)
        self.vit.get_classifier().requires_grad_(True)

    def hold_trunk_in_eval(self) -> None:
        # The classifier head is new and trains: it keeps the wrapper's mode.
        for name, module in self.vit.named_children():
            if name not in _HEAD_MODULES:
                module.eval()

    def prompts(self, index: int, batch_size: int) -> torch.Tensor:
        """Prompt tokens of set ``index``, projected and with dropout.

        Returns:
            (1, T, D) when the batch shares them (no dropout active), else (B, T, D).
        """
        prompts = self.prompt_proj(self.prompt_embeddings[index]).unsqueeze(0)
        if self.training and self.prompt_dropout.p > 0:
            prompts = self.prompt_dropout(prompts.expand(batch_size, -1, -1))
        return prompts

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _keep_keys_values(self, x: torch.Tensor) -> bool:
        """Whether this forward may use kept prompt keys/values (inference with own deep
        prompts); drops the kept ones when anything they were computed from changed."""
        sources: list[torch.Tensor] = []
        if self.num_tokens > 0:
            sources = [self.prompt_embeddings, *self.prompt_proj.parameters()]
            for index, block in enumerate(self.vit.blocks):
                if self._key_value_blocks[index]:
                    sources += [*block.norm1.parameters(), *block.attn.qkv.parameters(), *block.attn.k_norm.parameters()]
        enabled = self.cache_prompt_keys_values and self.deep and self.num_tokens > 0
        return self._kept.active(enabled, self.training, sources, x)

    def _run_block(
        self,
        index: int,
        x: torch.Tensor,
        prompts: Optional[torch.Tensor],
        reuse: bool = False,
        gates: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        block = self.vit.blocks[index]
        gate = None
        if self.prompt_gates is not None:
            gate = self.prompt_gates[index] if gates is None else gates[:, index]
        if prompts is None:
            fn, args = block, (x,)
        elif reuse and self._key_value_blocks[index]:
            kept = self._kept.get(index, lambda: prompt_keys_values(block, prompts))
            fn, args = key_value_prompt_block, (block, x, None, kept, gate)
        elif self._key_value_blocks[index]:
            fn, args = key_value_prompt_block, (block, x, prompts, None, gate)
        else:
            fn, args = concat_prompt_block, (block, x, prompts, self.num_prefix_tokens)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_features(
        self, x: torch.Tensor, prompt_sets: Optional[torch.Tensor] = None, gate_sets: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Tokens after the final norm, prompts removed.

        Args:
            x: Images, (B, C, H, W).
            prompt_sets: Per-sample prompts to use instead of this module's own, already
                projected to the model's width: (B, S, T, D) with S the module's number of
                sets (depth for deep, 1 for shallow) and T its ``num_tokens``. No prompt
                dropout is applied to them. :class:`~vpt.prompts.PromptBank` uses this to run
                several tasks' prompts in one batch.
            gate_sets: With ``prompt_sets`` of a gated model: per-sample gate logits,
                (B, depth, heads).

        Returns:
            (B, num_prefix_tokens + num_patches, D), as timm's ``forward_features``.
        """
        x, _ = self._forward_blocks(x, prompt_sets, (), gate_sets)
        return self.vit.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Patch-token maps after the blocks ``indices`` (0-based), for dense decoders.

        Only patch tokens are returned: prefix tokens and prompts (shallow prompts travel
        with the tokens, deep ones never enter them) are removed, so a decoder sees the grid
        the prompts adapted but never the prompts themselves. The final norm is not applied
        (as UNETR and DPT read ViT blocks); a decoder normalises each level itself.

        Args:
            x: Images, (B, C, H, W), at the model's input size.
            indices: Block indices, ascending, each in ``0 .. depth - 1``.

        Returns:
            One (B, D, H / patch, W / patch) map per index, in the order given.
        """
        depth = len(self.vit.blocks)
        wanted = [int(index) for index in indices]
        if not wanted or any(not 0 <= index < depth for index in wanted) or wanted != sorted(set(wanted)):
            raise ConfigError(f"Block indices {list(indices)} are not valid for a {depth}-block ViT; give distinct ascending indices in 0..{depth - 1}.")
        patch = self.vit.patch_embed.patch_size
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
        _, kept = self._forward_blocks(x, None, wanted)
        prefix = self.num_prefix_tokens
        maps = []
        for tokens in kept:
            patches = tokens[:, prefix:]
            if patches.shape[1] != grid[0] * grid[1]:
                raise ConfigError(f"{patches.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid of a {tuple(x.shape[-2:])} input.")
            maps.append(patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid))
        return maps

    def _forward_blocks(
        self,
        x: torch.Tensor,
        prompt_sets: Optional[torch.Tensor],
        keep: Sequence[int],
        gate_sets: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed and run every block; returns the prompt-free tokens after the last block
        (no final norm) and, for each block index in ``keep``, its prompt-free output
        (prefix + patches), deep or shallow prompts removed."""
        x = self._embed(x)
        batch = x.shape[0]
        depth = len(self.vit.blocks)
        if prompt_sets is not None:
            self._check_prompt_sets(prompt_sets, batch, gate_sets)
        keep = set(keep)
        kept: list[torch.Tensor] = []

        def prompts_of(index: int) -> torch.Tensor:
            return self.prompts(index, batch) if prompt_sets is None else prompt_sets[:, index]

        prefix = self.num_prefix_tokens
        shallow = self.num_tokens > 0 and not self.deep

        def without_prompts(tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([tokens[:, :prefix], tokens[:, prefix + self.num_tokens :]], dim=1) if shallow else tokens

        if shallow:
            prompts = prompts_of(0).expand(batch, -1, -1)
            x = torch.cat([x[:, :prefix], prompts, x[:, prefix:]], dim=1)
        reuse = prompt_sets is None and self._keep_keys_values(x)
        for index in range(depth):
            deep_prompts = prompts_of(index) if self.num_tokens > 0 and self.deep else None
            x = self._run_block(index, x, deep_prompts, reuse, gate_sets)
            if index in keep:
                kept.append(without_prompts(x))
        return without_prompts(x), kept

    def _check_prompt_sets(self, prompt_sets: torch.Tensor, batch: int, gate_sets: Optional[torch.Tensor]) -> None:
        if (gate_sets is None) != (self.prompt_gates is None) or (
            gate_sets is not None and tuple(gate_sets.shape) != (batch, *self.prompt_gates.shape)  # type: ignore[union-attr]
        ):
            raise ConfigError(
                "Gated prompts need their gates and ungated ones none: pass gate_sets of shape (batch, depth, heads) "
                "exactly when the model was built with gate=True."
            )
        sets = len(self.vit.blocks) if self.deep else 1
        expected = (batch, sets, self.num_tokens, self.embed_dim)
        if self.num_tokens == 0 or tuple(prompt_sets.shape) != expected:
            raise ConfigError(
                f"prompt_sets has shape {tuple(prompt_sets.shape)} but this model takes {expected} "
                "(batch, sets, num_tokens, width); build the model with the prompts' method and num_tokens."
            )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's pooling and classifier on prompt-free tokens (B, N, D) -> (B, num_classes)."""
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))
