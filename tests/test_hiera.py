"""Deep prompts in SAM2's Hiera encoder (timm ``HieraDet``), against timm and a plain reference.

The encoder is tiny, random (every parameter perturbed, so misplaced norms or biases show)
and float64, so the tolerance can be 1e-10. Its seven blocks cover every kind Hiera has, at
64 px (token grids 16, 8, 4, 2):

    block 0: windows of 4 on the 16x16 grid
    block 1: windows of 4, q-pooled 16 -> 8, width 16 -> 32, heads 1 -> 2
    block 2: windows of 4 on the 8x8 grid
    block 3: windows of 4, q-pooled 8 -> 4, width 32 -> 64
    block 4: global attention on the 4x4 grid
    block 5: windows of 2, q-pooled 4 -> 2, width 64 -> 128
    block 6: a window of 3 on the 2x2 grid (padded)

The reference (``reference_block``) loops over windows, concatenates the prompts' keys and
values with each window's and writes the softmax out; it shares only the embedding with the
code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.hieradet_sam2 import HieraDet
from torch import nn

from vpt.errors import CheckpointError, ConfigError
from vpt.prompts.hiera import PromptedHiera, hiera_checkpoint_filter, sam2_hiera_trunk_state

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
SIZES = {"square_64": (64, 64), "wide_64x96": (64, 96)}


def tiny_hiera(seed: int = 0) -> HieraDet:
    torch.manual_seed(seed)
    hiera = HieraDet(
        embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), q_pool=3, window_spec=(4, 4, 2, 3),
        global_att_blocks=(4,), global_pos_size=(4, 4), num_classes=0,
    ).double()
    with torch.no_grad():
        for parameter in hiera.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return hiera.eval()


def images(size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def reference_block(
    block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """One Hiera block with prompt keys/values in every window, written out window by window.

    Args:
        x: (B, H, W, dim). prompts: (1 or B, T, dim). gate: (heads,) or None (joint softmax).
    """
    batch, height, width, _ = x.shape
    attn = block.attn
    heads, dim_out = attn.num_heads, block.dim_out
    head_dim = dim_out // heads
    w_q, w_k, w_v = attn.qkv.weight.split(dim_out)
    b_q, b_k, b_v = attn.qkv.bias.split(dim_out)
    stride = tuple(block.q_stride) if block.q_stride else (1, 1)

    hidden = block.norm1(x)
    shortcut = x
    if block.dim != dim_out:
        shortcut = block.proj(hidden)
        if block.q_stride:
            shortcut = F.max_pool2d(shortcut.permute(0, 3, 1, 2), stride).permute(0, 2, 3, 1)

    window = tuple(block.window_size) if block.is_windowed else (height, width)
    rows, cols = math.ceil(height / window[0]), math.ceil(width / window[1])
    hidden = F.pad(hidden, (0, 0, 0, cols * window[1] - width, 0, rows * window[0] - height))
    prompt_hidden = block.norm1(prompts).expand(batch, -1, -1)
    prompt_keys = F.linear(prompt_hidden, w_k, b_k)
    prompt_values = F.linear(prompt_hidden, w_v, b_v)
    out_h, out_w = window[0] // stride[0], window[1] // stride[1]
    out = torch.zeros(batch, rows * out_h, cols * out_w, dim_out, dtype=x.dtype)

    def heads_first(tokens: torch.Tensor) -> torch.Tensor:  # (L, dim_out) -> (heads, L, head_dim)
        return tokens.reshape(-1, heads, head_dim).transpose(0, 1)

    def softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ value

    for b in range(batch):
        prompt_key, prompt_value = heads_first(prompt_keys[b]), heads_first(prompt_values[b])
        for i in range(rows):
            for j in range(cols):
                tokens = hidden[b, i * window[0] : (i + 1) * window[0], j * window[1] : (j + 1) * window[1]]
                query = F.linear(tokens, w_q, b_q)
                if block.q_stride:
                    query = F.max_pool2d(query.permute(2, 0, 1)[None], stride)[0].permute(1, 2, 0)
                query = heads_first(query.reshape(-1, dim_out))
                key = heads_first(F.linear(tokens, w_k, b_k).reshape(-1, dim_out))
                value = heads_first(F.linear(tokens, w_v, b_v).reshape(-1, dim_out))
                if gate is None:
                    mixed = softmax_attention(
                        query, torch.cat([prompt_key, key], dim=1), torch.cat([prompt_value, value], dim=1)
                    )
                else:
                    mixed = softmax_attention(query, key, value) + torch.tanh(gate).view(-1, 1, 1) * softmax_attention(
                        query, prompt_key, prompt_value
                    )
                mixed = F.linear(mixed.transpose(0, 1).reshape(out_h, out_w, dim_out), attn.proj.weight, attn.proj.bias)
                out[b, i * out_h : (i + 1) * out_h, j * out_w : (j + 1) * out_w] = mixed
    x = shortcut + out[:, : height // stride[0], : width // stride[1]]
    return x + block.mlp(block.norm2(x))


def reference_stages(
    hiera: HieraDet, pixels: torch.Tensor, prompts: list[torch.Tensor], gates: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Every stage's output grid, NCHW, with ``prompts[i]`` ((1 or B, T, dim_i)) in block i."""
    x = hiera._pos_embed(hiera.patch_embed(pixels))
    stages = []
    for index, block in enumerate(hiera.blocks):
        x = reference_block(block, x, prompts[index], None if gates is None else gates[index])
        if index in hiera.stage_ends:
            stages.append(x.permute(0, 3, 1, 2))
    return stages


def weighted_sum(grids: list[torch.Tensor]) -> torch.Tensor:
    """A loss that weighs every output differently, so no gradient cancels."""
    generator = torch.Generator().manual_seed(2)
    return sum((grid * torch.randn(grid.shape, generator=generator, dtype=grid.dtype)).sum() for grid in grids)


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_no_prompts_equal_timm_hiera(size: tuple[int, int]) -> None:
    hiera = tiny_hiera()
    prompted = PromptedHiera(hiera, num_tokens=0).eval()
    pixels = images(size)
    with torch.no_grad():
        expected_last, expected = hiera.forward_intermediates(pixels)
        grids = prompted.forward_intermediates(pixels)
        assert [tuple(grid.shape) for grid in grids] == [
            (2, 16 * 2**stage, size[0] // 4 // 2**stage, size[1] // 4 // 2**stage) for stage in range(4)
        ]
        for grid, reference in zip(grids, expected):
            assert torch.equal(grid, reference)
        assert torch.equal(prompted.forward_features(pixels), hiera.forward_features(pixels))
        assert torch.equal(prompted(pixels), expected_last.permute(0, 3, 1, 2))
        for indices in (2, [0, -1], [1]):
            taken = prompted.forward_intermediates(pixels, indices)
            reference = hiera.forward_intermediates(pixels, indices, intermediates_only=True)
            assert len(taken) == len(reference) and all(map(torch.equal, taken, reference))


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_deep_prompts_match_the_window_reference(size: tuple[int, int]) -> None:
    hiera = tiny_hiera()
    prompted = PromptedHiera(hiera, num_tokens=3).double()
    assert [tuple(p.shape) for p in prompted.prompt_embeddings] == [(3, block.dim) for block in hiera.blocks]
    pixels = images(size)
    prompts = list(prompted.prompt_embeddings)

    grids = prompted.train().forward_intermediates(pixels)
    expected = reference_stages(hiera, pixels, [p.unsqueeze(0) for p in prompts])
    for grid, reference in zip(grids, expected):
        torch.testing.assert_close(grid, reference, **TOLERANCE)
    # Prompts change every stage: the check above is not a check of the frozen encoder.
    with torch.no_grad():
        frozen = hiera.forward_intermediates(pixels, intermediates_only=True)
    assert all((grid - plain).abs().max() > 1e-3 for grid, plain in zip(grids, frozen))
    torch.testing.assert_close(prompted(pixels), expected[-1], **TOLERANCE)

    gradients = torch.autograd.grad(weighted_sum(grids), prompts)
    expected_gradients = torch.autograd.grad(weighted_sum(expected), prompts)
    for index, (gradient, reference) in enumerate(zip(gradients, expected_gradients)):
        assert gradient.abs().max() > 0, f"no gradient reaches the prompts of block {index}"
        torch.testing.assert_close(gradient, reference, **TOLERANCE)


class FixedPerSampleScale(nn.Module):
    """Stands in for prompt dropout: a known per-sample mask, so the reference can repeat it."""

    p = 0.5

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts * self.scale.view(-1, 1, 1)


def test_per_sample_prompts_reach_their_own_sample_in_every_window() -> None:
    hiera = tiny_hiera()
    prompted = PromptedHiera(hiera, num_tokens=2).double().train()
    scale = torch.tensor([0.0, 2.0], dtype=torch.float64)
    prompted.prompt_dropout = FixedPerSampleScale(scale)
    pixels = images((64, 64))
    grids = prompted.forward_intermediates(pixels)
    expected = reference_stages(hiera, pixels, [p.unsqueeze(0) * scale.view(-1, 1, 1) for p in prompted.prompt_embeddings])
    for grid, reference in zip(grids, expected):
        torch.testing.assert_close(grid, reference, **TOLERANCE)


def test_frozen_trunk_stays_frozen_and_in_eval_mode() -> None:
    hiera = tiny_hiera()
    hiera.blocks[2].mlp.follows_train_mode = True  # a module a method added or unfroze
    prompted = PromptedHiera(hiera, num_tokens=2, dropout=0.1, gate=True).train()
    assert not any(p.requires_grad for p in hiera.parameters())
    trainable = {name for name, p in prompted.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_embeddings.{i}" for i in range(7)} | {f"prompt_gates.{i}" for i in range(7)}
    assert prompted.training and prompted.prompt_dropout.training
    following = {id(module) for module in hiera.blocks[2].mlp.modules()}
    assert all(not module.training for module in hiera.modules() if id(module) not in following)
    assert hiera.blocks[2].mlp.training
    prompted.eval()
    assert not hiera.blocks[2].mlp.training and not prompted.prompt_dropout.training

    held = PromptedHiera(tiny_hiera(), num_tokens=2, backbone_eval=False).train()
    assert held.hiera.training

    names = dict(prompted.named_parameters())
    assert prompted.no_weight_decay() == {"hiera.pos_embed", "hiera.pos_embed_window"} <= set(names)
    assert prompted.compile_target == "_forward_blocks" and callable(getattr(prompted, prompted.compile_target))
    assert prompted.num_tokens == 2 and prompted.deep and prompted.img_size == 1024


def test_zero_gates_equal_the_frozen_encoder_and_learn() -> None:
    hiera = tiny_hiera()
    prompted = PromptedHiera(hiera, num_tokens=3, gate=True).double().train()
    assert [tuple(g.shape) for g in prompted.prompt_gates] == [(block.attn.num_heads,) for block in hiera.blocks]
    pixels = images((64, 64))
    grids = prompted.forward_intermediates(pixels)
    with torch.no_grad():
        frozen = hiera.forward_intermediates(pixels, intermediates_only=True)
    assert all(map(torch.equal, grids, frozen))
    gates = list(prompted.prompt_gates)
    for index, gradient in enumerate(torch.autograd.grad(weighted_sum(grids), gates)):
        assert gradient.abs().max() > 0, f"no gradient reaches the gate of block {index}"

    # Once the gates move, the prompts' separate softmax is added through tanh(gate).
    with torch.no_grad():
        for gate in gates:
            gate.copy_(torch.randn_like(gate))
    grids = prompted.forward_intermediates(pixels)
    expected = reference_stages(hiera, pixels, [p.unsqueeze(0) for p in prompted.prompt_embeddings], gates)
    for grid, reference in zip(grids, expected):
        torch.testing.assert_close(grid, reference, **TOLERANCE)
    prompts = list(prompted.prompt_embeddings)
    for gradient, reference in zip(
        torch.autograd.grad(weighted_sum(grids), prompts + gates),
        torch.autograd.grad(weighted_sum(expected), prompts + gates),
    ):
        torch.testing.assert_close(gradient, reference, **TOLERANCE)


def test_vpt_shallow_is_refused_naming_vpt_deep() -> None:
    with pytest.raises(ConfigError, match="vpt_deep"):
        PromptedHiera(tiny_hiera(), num_tokens=4, deep=False)
    with pytest.raises(ConfigError, match="vpt_deep"):
        PromptedHiera(tiny_hiera(), num_tokens=0, gate=True)
    assert PromptedHiera(tiny_hiera(), num_tokens=0, deep=False).prompt_embeddings is None


def test_kept_keys_values_and_grad_checkpointing_change_nothing() -> None:
    hiera = tiny_hiera()
    prompted = PromptedHiera(hiera, num_tokens=3).double().eval()
    pixels = images((64, 64))
    computed = prompted(pixels)  # gradients on: nothing kept
    with torch.no_grad():
        assert torch.equal(prompted(pixels), computed.detach())
        assert torch.equal(prompted(pixels), computed.detach())  # from the kept keys/values
        prompted.prompt_embeddings[6].mul_(2.0)  # an update drops what was kept
        changed = prompted(pixels)
    assert not torch.allclose(changed, computed.detach())

    prompted.train()
    plain = prompted(pixels)
    plain_gradients = torch.autograd.grad(weighted_sum([plain]), list(prompted.prompt_embeddings))
    prompted.set_grad_checkpointing(True)
    checkpointed = prompted(pixels)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    gradients = torch.autograd.grad(weighted_sum([checkpointed]), list(prompted.prompt_embeddings))
    for gradient, reference in zip(gradients, plain_gradients):
        torch.testing.assert_close(gradient, reference, **TOLERANCE)


def test_input_sizes_the_windows_cannot_tile_are_refused() -> None:
    prompted = PromptedHiera(tiny_hiera(), num_tokens=1).double()
    with pytest.raises(ConfigError, match="resize"):
        prompted(images((72, 72)))  # a 18x18 grid: windows of 4 do not tile the position embedding


def official_layout(hiera: HieraDet, with_head: bool) -> dict[str, torch.Tensor]:
    """A SAM2 checkpoint's state dict as the official repository writes it."""
    state = {}
    for key, tensor in hiera.state_dict().items():
        if key.startswith("head.") and not with_head:
            continue
        key = key.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")
        state[f"image_encoder.trunk.{key}"] = tensor.clone()
    state["image_encoder.neck.convs.0.conv.weight"] = torch.randn(8, 128, 1, 1)
    state["image_encoder.neck.position_encoding.dummy"] = torch.randn(3)
    state["sam_mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    state["memory_encoder.out_proj.weight"] = torch.randn(4, 4)
    return state


def test_official_sam2_checkpoint_loads_into_hieradet() -> None:
    source = tiny_hiera(seed=3)
    ignored_keys = [
        "image_encoder.neck.convs.0.conv.weight", "image_encoder.neck.position_encoding.dummy",
        "sam_mask_decoder.iou_token.weight", "memory_encoder.out_proj.weight",
    ]
    layout = official_layout(source, with_head=True)
    assert any(".mlp.layers.0." in key for key in layout)

    trunk, ignored = sam2_hiera_trunk_state({"model": layout})
    assert sorted(ignored) == sorted(ignored_keys)
    target = tiny_hiera(seed=4)
    target.load_state_dict(trunk, strict=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key

    # Real SAM2 checkpoints have no classifier head: the filter keeps the model's own.
    target = tiny_hiera(seed=4)
    head = {key: tensor.clone() for key, tensor in target.state_dict().items() if key.startswith("head.")}
    target.load_state_dict(hiera_checkpoint_filter({"model": official_layout(source, with_head=False)}, target), strict=True)
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, head[key] if key.startswith("head.") else source.state_dict()[key]), key

    wrong = official_layout(source, with_head=False)
    wrong["image_encoder.trunk.blocks.3.attn.qkv.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"image_encoder\.trunk\.blocks\.3\.attn\.qkv\.weight"):
        hiera_checkpoint_filter({"model": wrong}, target)
    with pytest.raises(CheckpointError, match="image_encoder.trunk"):
        sam2_hiera_trunk_state({"model": {"sam_mask_decoder.iou_token.weight": torch.zeros(1)}})
