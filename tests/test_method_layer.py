"""One method layer for both encoder families: LoRA, adapters, BitFit, partial beside VPT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vpt
from tests.conftest import make_tiny_vit
from tests.test_training import compose_config
from vpt.backbones.sam import build_sam
from vpt.cli.train import train
from vpt.errors import CheckpointError, ConfigError
from vpt.methods import (
    apply_method,
    available_methods,
    build_method,
    load_trained_weights,
    merge_lora,
    method_config,
    parameter_groups,
    save_trained_weights,
)
from vpt.methods.lora import SplitQKV

METHODS = {
    "vpt_deep": {"num_tokens": 3},
    "vpt_shallow": {"num_tokens": 3},
    "linear": {},
    "full": {},
    "lora": {},
    "adapter": {},
    "bitfit": {},
    "partial": {"k": 1},
}
CLASSES = 5


def tiny_sam_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("sam_tiny", pretrained=False, img_size=64).image_encoder


def _randomise_lora(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero; give every update a value so the checks can see it."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "adapter" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_the_public_api_is_at_the_top_level() -> None:
    assert vpt.apply_method is apply_method and vpt.PromptedViT and vpt.PromptedSamEncoder and vpt.volume_scores
    assert set(available_methods()) >= set(METHODS)


@pytest.mark.parametrize("family", ["timm", "sam"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_the_encoder_output_shape_and_trains_only_its_tensors(family: str, method: str) -> None:
    encoder = make_tiny_vit() if family == "timm" else tiny_sam_encoder()
    images = torch.randn(2, 3, 32, 32) if family == "timm" else torch.randn(1, 3, 64, 64)
    encoder.eval()
    with torch.no_grad():
        expected = encoder.forward_features(images) if family == "timm" else encoder(images)
    model = apply_method(encoder, method, **METHODS[method]).eval()
    with torch.no_grad():
        out = model.forward_features(images) if family == "timm" else model(images)
    assert out.shape == expected.shape
    if method in ("lora", "adapter", "bitfit", "partial", "linear", "full"):
        # Zero-initialised updates: at step 0 the model is the frozen encoder (SAM through
        # vpt's attention, equal to segment-anything's within float error).
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "linear":
        assert not trainable
    elif method.startswith("vpt"):
        assert trainable == {"prompt_embeddings"}
    elif method == "lora":
        assert trainable and all("lora_" in n and (".q." in n or ".v." in n) for n in trainable)
    elif method == "adapter":
        assert trainable and all(".adapter." in n for n in trainable)
    elif method == "bitfit":
        assert trainable and all(n.endswith(".bias") for n in trainable)
    elif method == "partial":
        last = len(model.vit.blocks if family == "timm" else model.image_encoder.blocks) - 1
        assert trainable and all(f"blocks.{last}." in n for n in trainable)


def test_lora_updates_exactly_the_q_and_v_slices_of_qkv() -> None:
    """Against a reference with separate q, k, v layers, as SAMed writes them."""
    torch.manual_seed(0)
    vit = make_tiny_vit()
    qkv = vit.blocks[0].attn.qkv
    weight, bias = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    model = apply_method(vit, "lora", rank=2, alpha=3.0)
    _randomise_lora(model)
    layer = model.vit.blocks[0].attn.qkv
    assert isinstance(layer, SplitQKV)
    x = torch.randn(4, 7, weight.shape[1])
    width = weight.shape[0] // 3
    reference = []
    for index, name in enumerate("qkv"):
        rows = slice(index * width, (index + 1) * width)
        out = x @ weight[rows].T + bias[rows]
        if name in "qv":
            lora = getattr(layer, name)
            a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            out = out + (3.0 / 2) * (x @ a.T @ b.T)
        else:
            assert not hasattr(getattr(layer, name), "lora_A")  # keys get no update
        reference.append(out)
    torch.testing.assert_close(layer(x), torch.cat(reference, dim=-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["timm", "sam"])
@pytest.mark.parametrize("targets", [["q", "v"], ["qkv", "proj", "fc1", "fc2"]])
def test_merged_lora_gives_the_same_outputs(family: str, targets: list[str]) -> None:
    encoder = make_tiny_vit() if family == "timm" else tiny_sam_encoder()
    images = torch.randn(2, 3, 32, 32) if family == "timm" else torch.randn(1, 3, 64, 64)
    model = apply_method(encoder, "lora", targets=targets).eval()
    _randomise_lora(model)
    with torch.no_grad():
        before = model(images) if family == "sam" else model.forward_features(images)
        merge_lora(model)
        after = model(images) if family == "sam" else model.forward_features(images)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(type(block.attn.qkv) is torch.nn.Linear for block in (model.vit if family == "timm" else model.image_encoder).blocks)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def _steps(model: torch.nn.Module, images: torch.Tensor, forward, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        forward(model, images).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("family", ["timm", "sam"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_frozen_encoder_tensors_are_bit_identical_after_training(family: str, method: str) -> None:
    encoder = make_tiny_vit(drop_path_rate=0.1) if family == "timm" else tiny_sam_encoder()
    images = torch.randn(2, 3, 32, 32) if family == "timm" else torch.randn(1, 3, 64, 64)
    model = apply_method(encoder, method, **METHODS[method])
    if family == "timm":
        model.reset_classifier(CLASSES)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if not trained:  # linear probing on SAM: the decoder is all that trains
        return
    model.train()
    _steps(model, images, (lambda m, x: m(x)))
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    if trained and method not in ("lora", "adapter"):  # zero-init B / up: only they move at first
        assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_reproduces_logits_and_counts_match(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = make_tiny_vit()
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    model = build_method(method, vit, CLASSES, **METHODS[method])
    _randomise_lora(model)
    model.train()
    _steps(model, torch.randn(2, 3, 32, 32), (lambda m, x: m(x)))
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    expected = model(images)
    path = save_trained_weights(model, tmp_path / "w.safetensors", {"backbone": "tiny"})
    tensors = load_file(str(path))
    assert sum(t.numel() for t in tensors.values()) == parameter_groups(model)["total"][0]

    fresh_vit = make_tiny_vit()
    fresh_vit.load_state_dict(state)
    torch.manual_seed(7)
    fresh = build_method(method, fresh_vit, CLASSES, **METHODS[method]).eval()
    metadata = load_trained_weights(fresh, path)
    assert metadata["method"] == method and metadata["method_options"] == method_config(method, **METHODS[method]).__dict__
    assert torch.equal(fresh(images), expected)


def test_loading_weights_of_another_method_or_options_is_refused(tmp_path: Path) -> None:
    model = build_method("lora", make_tiny_vit(), CLASSES)
    path = save_trained_weights(model, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="trained with method=lora"):
        load_trained_weights(build_method("lora", make_tiny_vit(), CLASSES, rank=8), path)
    with pytest.raises(CheckpointError, match="trained with method=lora"):
        load_trained_weights(build_method("adapter", make_tiny_vit(), CLASSES), path)


def test_options_of_other_methods_are_dropped_with_a_warning_typos_are_refused(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vpt.methods.registry"):
        config = method_config("lora", num_tokens=10, rank=2)
    assert config.rank == 2 and "ignores the options ['num_tokens']" in caplog.text
    with pytest.raises(ConfigError, match="not an option of any method"):
        method_config("lora", rnak=2)
    with pytest.raises(ConfigError, match="method.targets"):
        method_config("lora", targets=["qkv", "q"])
    with pytest.raises(ConfigError, match="method.k=9"):
        apply_method(make_tiny_vit(), "partial", k=9)


def test_adapter_and_lora_dropout_train_while_the_encoder_is_held_in_eval() -> None:
    model = apply_method(make_tiny_vit(), "adapter", dropout=0.5)
    model.train()
    block = model.vit.blocks[0]
    assert not block.training and block.mlp.adapter.training and block.mlp.adapter.drop.training
    lora = apply_method(make_tiny_vit(), "lora", dropout=0.3).train()
    assert lora.vit.blocks[0].attn.qkv.q.lora_dropout.training and not lora.vit.blocks[0].attn.training


# ----------------------------------------------------------------------------------------------
# Every method x every encoder family x every task, through the training entry point

RUN = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=2",
       "+trainer.limit_val_batches=1", "num_preview_images=0"]
TASKS = {
    "vit_seg": ["experiment=quickstart", "model=vit_micro"],
    "sam_seg": ["experiment=quickstart", "model=sam_tiny", "model.img_size=64"],
    "vit_shapes": ["experiment=quickstart_classification", "model=vit_micro", "task.data.samples_per_class=8"],
    "sam_interactive": ["model=sam_tiny", "model.img_size=64", "task=organ_seg_interactive_synthetic"],
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("method_data") / "phantoms"


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_saves_and_reports_on_every_task(task: str, method: str, tmp_path: Path, phantoms: Path) -> None:
    options = [f"method={method}"] + [f"++method.{k}={v}" for k, v in METHODS[method].items()]
    cfg = compose_config([*TASKS[task], *RUN, *options, f"task.data.root={phantoms}"]
                         if task != "vit_shapes" else [*TASKS[task], *RUN, *options])
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir=run_dir)
    written = json.loads((run_dir / "metrics.json").read_text())
    tensors = load_file(str(run_dir / "prompts.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == written["trainable_params"] == metrics["trainable_params"]
    headline = "test/dice" if task != "vit_shapes" else "test/acc"
    assert headline in written
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{name}" for name in tensors}


def test_each_model_family_brings_its_optimiser_recipe() -> None:
    assert compose_config(["model=vit_b"]).optimizer.name == "sgd"
    dinov2 = compose_config(["model=vit_s_dinov2"])
    assert (dinov2.optimizer.name, dinov2.optimizer.base_lr) == ("adamw", 0.05)
    assert compose_config(["model=sam_vit_b"]).optimizer.name == "adamw"
    assert compose_config(["model=vit_s_dinov2", "optimizer.base_lr=0.2"]).optimizer.base_lr == 0.2
    assert compose_config(["experiment=quickstart"]).optimizer.base_lr == 0.5  # experiments win


def test_method_zoo_sweeps_every_method() -> None:
    from hydra import compose, initialize_config_dir

    from tests.test_training import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=method_zoo"], return_hydra_config=True)
    swept = set(str(cfg.hydra.sweeper.params.method).split(","))
    assert swept == set(available_methods())
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_readme_sweep_runs_every_method_with_shared_keys(tmp_path: Path) -> None:
    """The README's sweep line, shortened: method.num_tokens does not break linear or lora."""
    from tests.test_training import run_cli

    result = run_cli(["-m", "experiment=quickstart_classification", "model=vit_micro", "method=vpt_deep,linear,lora",
                      "method.num_tokens=2,4", "trainer.fast_dev_run=true", "task.data.samples_per_class=8",
                      "num_preview_images=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(finished) == 6
    from omegaconf import OmegaConf

    runs = [OmegaConf.load(p.parent / "config.yaml").method for p in finished]
    assert sorted(m.name for m in runs) == ["linear", "linear", "lora", "lora", "vpt_deep", "vpt_deep"]
    assert sorted(m.num_tokens for m in runs if m.name == "vpt_deep") == [2, 4]
    assert "ignores the options ['num_tokens']" in result.stdout + result.stderr


def test_a_second_method_on_the_same_encoder_is_refused() -> None:
    vit = make_tiny_vit()
    apply_method(vit, "lora")
    with pytest.raises(ConfigError, match="already adapted"):
        apply_method(vit, "vpt_deep", num_tokens=2)


@pytest.mark.parametrize("family", ["timm", "sam"])
def test_prompts_see_the_lora_update(family: str) -> None:
    """Deep prompts around a LoRA'd encoder give what they give around the merged weights
    (the key/value shortcut must not read the bare qkv weight)."""
    import copy

    from vpt.prompts import PromptedSamEncoder, PromptedViT

    encoder = make_tiny_vit() if family == "timm" else tiny_sam_encoder()
    images = torch.randn(2, 3, 32, 32) if family == "timm" else torch.randn(1, 3, 64, 64)
    adapted = apply_method(encoder, "lora", targets=["q", "v"])
    _randomise_lora(adapted)
    merged = merge_lora(copy.deepcopy(adapted))
    wrap = (lambda m: PromptedViT(m.vit, 2, deep=True)) if family == "timm" else (lambda m: PromptedSamEncoder(m.image_encoder, 2, deep=True))
    torch.manual_seed(3)
    with_lora = wrap(adapted).eval()
    torch.manual_seed(3)
    with_merged = wrap(merged).eval()
    with torch.no_grad():
        out_lora = with_lora.forward_features(images) if family == "timm" else with_lora(images)
        out_merged = with_merged.forward_features(images) if family == "timm" else with_merged(images)
    torch.testing.assert_close(out_lora, out_merged, atol=1e-5, rtol=1e-5)


def test_lora_targets_as_one_word_mean_that_layer() -> None:
    assert method_config("lora", targets="qkv").targets == ["qkv"]


def test_merged_lora_weights_say_they_are_merged(tmp_path: Path) -> None:
    model = build_method("lora", make_tiny_vit(), CLASSES)
    path = save_trained_weights(merge_lora(model), tmp_path / "merged.safetensors")
    with pytest.raises(CheckpointError, match="method=lora_merged"):
        load_trained_weights(build_method("lora", make_tiny_vit(), CLASSES), path)
