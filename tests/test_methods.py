"""Methods: what trains, parameter accounting, trained-weights files, optimiser and schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpt.errors import CheckpointError, ConfigError
from vpt.methods import (
    available_methods,
    build_method,
    load_trained_weights,
    parameter_groups,
    save_trained_weights,
)
from vpt.prompts import PromptedViT
from vpt.tasks.optim import OptimizerConfig, WarmupCosine, build_optimizer, scaled_lr
from tests.conftest import make_tiny_vit

DIM, DEPTH, TOKENS, CLASSES = 48, 2, 3, 7
HEAD = DIM * CLASSES + CLASSES


def _backbone_params(model) -> int:
    return sum(p.numel() for n, p in model.vit.named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize(
    "method, expected_trainable",
    [
        ("vpt_deep", DEPTH * TOKENS * DIM + HEAD),
        ("vpt_shallow", TOKENS * DIM + HEAD),
        ("linear", HEAD),
        ("full", None),  # every parameter
    ],
)
def test_trainable_parameter_counts(method: str, expected_trainable) -> None:
    options = {"num_tokens": TOKENS} if method.startswith("vpt") else {}
    model = build_method(method, make_tiny_vit(), CLASSES, **options)
    groups = parameter_groups(model)
    trainable, total = groups["total"]
    if expected_trainable is None:
        assert trainable == total
        assert groups["encoder"][0] == _backbone_params(model)
    else:
        assert trainable == expected_trainable
        assert groups["encoder"][0] == 0
        assert groups["head"] == (HEAD, HEAD)
    assert groups["encoder"][1] == _backbone_params(model)


def test_method_registry_and_validation() -> None:
    assert set(available_methods()) >= {"vpt_deep", "vpt_shallow", "linear", "full"}
    with pytest.raises(ConfigError, match="Unknown method"):
        build_method("lora_maybe", make_tiny_vit(), 3)
    with pytest.raises(ConfigError, match="num_tokens"):
        build_method("vpt_deep", make_tiny_vit(), 3, num_tokens=0)


def _train_steps(model, steps: int = 3) -> None:
    optimizer = build_optimizer(model, OptimizerConfig(name="sgd", base_lr=1.0), lr=0.5)
    torch.manual_seed(0)
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, CLASSES, (4,))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "linear"])
def test_backbone_is_bit_identical_after_training(method: str) -> None:
    options = {"num_tokens": TOKENS} if method.startswith("vpt") else {}
    model = build_method(method, make_tiny_vit(drop_path_rate=0.2), CLASSES, **options)
    before = {n: p.clone() for n, p in model.vit.named_parameters() if not n.startswith("head.")}
    head_before = model.vit.head.weight.clone()
    model.train()
    _train_steps(model)
    for name, param in model.vit.named_parameters():
        if not name.startswith("head."):
            assert torch.equal(param, before[name]), name
    assert not torch.equal(model.vit.head.weight, head_before)  # training did happen


def test_full_method_changes_the_backbone() -> None:
    model = build_method("full", make_tiny_vit(), CLASSES)
    before = model.vit.blocks[0].attn.qkv.weight.clone()
    model.train()
    _train_steps(model)
    assert not torch.equal(model.vit.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "linear"])
def test_trained_weights_round_trip_reproduces_logits(tmp_path, method: str) -> None:
    options = {"num_tokens": TOKENS, "project_dim": 16} if method.startswith("vpt") else {}
    torch.manual_seed(0)
    vit = make_tiny_vit()
    backbone_state = {k: v.clone() for k, v in vit.state_dict().items()}
    model = build_method(method, vit, CLASSES, **options)
    model.train()
    _train_steps(model)
    model.eval()
    images = torch.randn(5, 3, 32, 32)
    expected = model(images)

    path = save_trained_weights(model, tmp_path / "prompts.safetensors", {"backbone": "tiny", "method": method})
    size = path.stat().st_size
    assert size < 4 * (sum(p.numel() for p in model.parameters() if p.requires_grad) + 512)

    fresh_vit = make_tiny_vit()
    fresh_vit.load_state_dict(backbone_state)  # the same frozen backbone
    torch.manual_seed(123)  # a different random head / prompts before loading
    fresh = build_method(method, fresh_vit, CLASSES, **options).eval()
    assert not torch.equal(fresh(images), expected)
    metadata = load_trained_weights(fresh, path)
    assert metadata["method"] == method
    assert torch.equal(fresh(images), expected)


def test_trained_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    model = build_method("vpt_deep", make_tiny_vit(), CLASSES, num_tokens=TOKENS)
    path = save_trained_weights(model, tmp_path / "p.safetensors", {"method": "vpt_deep"})
    other = build_method("vpt_deep", make_tiny_vit(), CLASSES, num_tokens=TOKENS + 1)
    with pytest.raises(CheckpointError, match="trained with method=vpt_deep.*'num_tokens': 3"):
        load_trained_weights(other, path)
    # A file without method metadata (written from a hand-built PromptedViT) is checked
    # tensor by tensor.
    bare = PromptedViT(make_tiny_vit(), TOKENS)
    bare.reset_classifier(CLASSES)
    bare_path = save_trained_weights(bare, tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="mis-shaped.*prompt_embeddings"):
        load_trained_weights(other, bare_path)
    linear = build_method("linear", make_tiny_vit(), CLASSES)
    with pytest.raises(CheckpointError, match="trained with method=vpt_deep"):
        load_trained_weights(linear, path)
    with pytest.raises(CheckpointError, match="unexpected.*prompt_embeddings"):
        load_trained_weights(linear, bare_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_trained_weights(model, tmp_path / "junk.safetensors")


def test_optimizer_groups_follow_vpt() -> None:
    model = build_method("vpt_deep", make_tiny_vit(), CLASSES, num_tokens=TOKENS)
    optimizer = build_optimizer(model, OptimizerConfig(name="sgd", weight_decay=0.01), lr=0.3)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.prompt_embeddings) in decay  # prompts decay, as in the reference code
    assert id(model.vit.head.weight) in decay
    assert id(model.vit.head.bias) not in decay
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert scaled_lr(0.1, 512) == pytest.approx(0.2)


def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    values = [schedule(s) for s in range(110)]
    assert all(a < b for a, b in zip(values[:10], values[1:11]))  # rising during warm-up
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then falling
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
