"""PromptedViT against a plain reference implementation of the VPT semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpt.prompts import PromptedViT
from tests.conftest import make_tiny_vit

# Model variants the wrapper must get right: register tokens, no_embed_class (DeiT-3 /
# big_vision), DINOv2-style layer scale, qk-norm, avg and MAP pooling, no class token.
VARIANTS = {
    "plain": dict(),
    "registers": dict(reg_tokens=4, init_values=0.5),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "qk_norm_map_pool": dict(qk_norm=True, global_pool="map"),
}


def reference_features(model: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    """VPT as the paper writes it: concatenate prompts, run each whole block, slice."""
    vit = model.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    prefix, tokens, batch = vit.num_prefix_tokens, model.num_tokens, images.shape[0]
    prompts = model.prompt_proj(model.prompt_embeddings)  # (sets, T, D)
    if model.deep:
        for index, block in enumerate(vit.blocks):
            p = prompts[index].expand(batch, -1, -1)
            x = block(torch.cat([x[:, :prefix], p, x[:, prefix:]], dim=1))
            x = torch.cat([x[:, :prefix], x[:, prefix + tokens:]], dim=1)
    else:
        x = torch.cat([x[:, :prefix], prompts[0].expand(batch, -1, -1), x[:, prefix:]], dim=1)
        for block in vit.blocks:
            x = block(x)
        x = torch.cat([x[:, :prefix], x[:, prefix + tokens:]], dim=1)
    return vit.norm(x)


def reference_logits(model: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    return model.vit.forward_head(reference_features(model, images))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_equivalence(model: PromptedViT, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    target = torch.randn(images.shape[0], model.num_classes)

    model.zero_grad()
    out = model(images)
    (out * target).sum().backward()
    fast = _grads(model)

    model.zero_grad()
    ref = reference_logits(model, images)
    (ref * target).sum().backward()
    slow = _grads(model)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set(fast) == set(slow) and "prompt_embeddings" in fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_reference(variant: str, deep: bool) -> None:
    torch.manual_seed(1)
    model = PromptedViT(make_tiny_vit(**VARIANTS[variant]), num_tokens=3, deep=deep)
    # Larger prompts than the init so a wrong insertion point or mask shows clearly.
    with torch.no_grad():
        model.prompt_embeddings.mul_(20)
    model.train()
    _check_equivalence(model, torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_reference_dynamic_image_size(deep: bool) -> None:
    torch.manual_seed(2)
    vit = make_tiny_vit(dynamic_img_size=True, reg_tokens=1)
    model = PromptedViT(vit, num_tokens=4, deep=deep)
    model.train()
    _check_equivalence(model, torch.randn(2, 3, 48, 40))  # 6x5 grid, not the 4x4 default


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_reference_with_gradient_checkpointing(deep: bool) -> None:
    torch.manual_seed(3)
    model = PromptedViT(make_tiny_vit(reg_tokens=2), num_tokens=2, deep=deep, project_dim=16)
    model.set_grad_checkpointing(True)
    model.train()
    _check_equivalence(model, torch.randn(2, 3, 32, 32))


def test_prompts_change_output_and_are_not_pooled() -> None:
    torch.manual_seed(4)
    model = PromptedViT(make_tiny_vit(global_pool="avg"), num_tokens=5).eval()
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (2, 1 + 16, 48)  # no prompt tokens in the output
    before = model(images)
    with torch.no_grad():
        model.prompt_embeddings.add_(torch.randn_like(model.prompt_embeddings))
    assert not torch.allclose(before, model(images))
    # The frozen model with zero prompts is timm's own forward.
    plain = PromptedViT(model.vit, num_tokens=0).eval()
    torch.testing.assert_close(plain(images), model.vit(images))


def test_surface_shapes_init_and_freezing() -> None:
    vit = make_tiny_vit(reg_tokens=4)
    deep = PromptedViT(vit, num_tokens=7, deep=True)
    assert isinstance(deep.prompt_embeddings, nn.Parameter)
    assert deep.prompt_embeddings.shape == (2, 7, 48)
    assert deep.num_prefix_tokens == 5
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 48))
    assert deep.prompt_embeddings.abs().max() <= bound
    assert deep.prompt_embeddings.abs().max() > 0.5 * bound  # uniform over the whole range
    assert not any(p.requires_grad for p in deep.vit.parameters())
    shallow = PromptedViT(make_tiny_vit(), num_tokens=7, deep=False)
    assert shallow.prompt_embeddings.shape == (1, 7, 48)
    assert "prompt_embeddings" not in deep.no_weight_decay()
    assert "vit.pos_embed" in deep.no_weight_decay()


def test_reset_classifier_makes_a_trainable_head() -> None:
    model = PromptedViT(make_tiny_vit(), num_tokens=2)
    model.reset_classifier(9)
    assert model.num_classes == 9
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_embeddings", "vit.head.weight", "vit.head.bias"}


def test_frozen_backbone_stays_in_eval_mode() -> None:
    vit = make_tiny_vit(drop_rate=0.5, drop_path_rate=0.5, proj_drop_rate=0.5)
    model = PromptedViT(vit, num_tokens=2).train()
    assert model.training and model.vit.head_drop.training
    assert not any(m.training for m in model.vit.blocks.modules())
    images = torch.randn(2, 3, 32, 32)
    # Backbone dropout is off, so only head dropout is random: features are repeatable.
    torch.testing.assert_close(model.forward_features(images), model.forward_features(images))
    free = PromptedViT(make_tiny_vit(drop_path_rate=0.5), num_tokens=2, backbone_eval=False).train()
    assert all(m.training for m in free.vit.blocks.modules())


def test_prompt_dropout_is_per_sample_and_off_in_eval() -> None:
    torch.manual_seed(5)
    model = PromptedViT(make_tiny_vit(), num_tokens=4, dropout=0.5)
    model.train()
    prompts = model.prompts(0, batch_size=6)
    assert prompts.shape == (6, 4, 48)
    assert not torch.equal(prompts[0], prompts[1])
    model.eval()
    assert model.prompts(0, batch_size=6).shape == (1, 4, 48)
    # With dropout active the fast path still matches the reference drawn with the same mask.
    model.train()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(6)
    fast = model(images)
    torch.manual_seed(6)
    dropped = [model.prompts(i, 2) for i in range(len(model.vit.blocks))]
    x = model.vit.norm_pre(model.vit._pos_embed(model.vit.patch_embed(images)))
    for block, p in zip(model.vit.blocks, dropped):
        x = block(torch.cat([x[:, :1], p, x[:, 1:]], dim=1))
        x = torch.cat([x[:, :1], x[:, 5:]], dim=1)
    torch.testing.assert_close(fast, model.vit.forward_head(model.vit.norm(x)), rtol=1e-5, atol=1e-5)


def test_non_standard_blocks_fall_back_to_concatenation() -> None:
    from timm.models.vision_transformer import ResPostBlock

    torch.manual_seed(7)
    vit = make_tiny_vit(block_fn=ResPostBlock, init_values=0.5)
    model = PromptedViT(vit, num_tokens=3, deep=True)
    assert not any(model._key_value_blocks)
    _check_equivalence(model, torch.randn(2, 3, 32, 32))
