"""Prompts that start harmless (method.gate), separate learning rates for prompts and heads
(optimizer.prompt_lr_scale), the decoder controls (task.image_stem, task.encoder_features)
and a smoke run of the real-data transfer benchmark on generated data."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from vpt import PromptedSamEncoder, apply_method
from vpt.backbones.sam import build_sam
from vpt.errors import ConfigError
from vpt.heads import MultiLevelDecoder
from vpt.models.segmenters import VitSegmenter
from vpt.prompts.attention import key_value_prompt_block
from vpt.tasks.optim import OptimizerConfig, build_optimizer

REPO = Path(__file__).resolve().parents[1]


def tiny_vit(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=depth,
        num_heads=3, num_classes=0,
    ).eval()


def tiny_sam_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("sam_tiny", pretrained=False, img_size=64).image_encoder.eval()


def _randomise(module: torch.nn.Module) -> None:
    """Give prompts (and gates) values far from their initialisation."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "prompt" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


# --- method.gate ----------------------------------------------------------------------------


def test_gated_deep_prompts_start_as_the_frozen_timm_vit_and_the_gate_learns() -> None:
    images = torch.randn(3, 3, 32, 32)
    frozen = tiny_vit()
    with torch.no_grad():
        expected = frozen.forward_features(images)
    prompted = apply_method(tiny_vit(), "vpt_deep", num_tokens=5, gate=True)  # dropout 0.1, the paper's
    for mode in (False, True):  # eval, and training (prompt dropout drawn)
        prompted.train(mode)
        assert torch.equal(prompted.forward_features(images), expected)
    # Ungated prompts of the paper change the output from step 0: the check above can fail.
    ungated = apply_method(tiny_vit(), "vpt_deep", num_tokens=5).eval()
    assert (ungated.forward_features(images) - expected).abs().max() > 1e-3

    prompted.train()
    target = torch.randn_like(expected)
    loss = (prompted.forward_features(images) * target).sum()
    loss.backward()
    assert prompted.prompt_gates.grad is not None and prompted.prompt_gates.grad.abs().sum() > 0
    assert prompted.prompt_embeddings.grad.abs().sum() == 0  # behind tanh(0) at step 0
    optimizer = torch.optim.SGD([p for p in prompted.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    (prompted.forward_features(images) * target).sum().backward()
    assert prompted.prompt_embeddings.grad.abs().sum() > 0  # the gate moved, prompts now learn


def _reference_gated_block(block: torch.nn.Module, x: torch.Tensor, prompts: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A timm pre-norm block with gated key/value prompts, written out plainly."""
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    hidden = block.norm1(x)
    qkv = hidden @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.split(heads * head_dim, dim=-1)
    prompt_hidden = block.norm1(prompts)
    prompt_k = prompt_hidden @ attn.qkv.weight[heads * head_dim : 2 * heads * head_dim].T + attn.qkv.bias[heads * head_dim : 2 * heads * head_dim]
    prompt_v = prompt_hidden @ attn.qkv.weight[2 * heads * head_dim :].T + attn.qkv.bias[2 * heads * head_dim :]
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scale = 1.0 / math.sqrt(head_dim)
        tokens = torch.softmax(q[..., part] @ k[..., part].transpose(-1, -2) * scale, dim=-1) @ v[..., part]
        prompt = torch.softmax(q[..., part] @ prompt_k[..., part].transpose(-1, -2) * scale, dim=-1) @ prompt_v[..., part]
        outputs.append(tokens + math.tanh(float(gate[head])) * prompt)
    out = torch.cat(outputs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    x = x + block.ls1(out)
    return x + block.ls2(block.mlp(block.norm2(x)))


def test_gated_block_equals_a_plain_reference_in_float64() -> None:
    vit = tiny_vit().double()
    block = vit.blocks[1]
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    prompts = torch.randn(1, 4, 48, dtype=torch.float64)
    gate = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    got = key_value_prompt_block(block, x, prompts, prompt_gate=gate)
    assert torch.allclose(got, _reference_gated_block(block, x, prompts, gate), atol=1e-10)


@pytest.mark.parametrize("attention", ["folded", "bias"])
def test_gated_deep_prompts_start_as_the_frozen_sam_encoder_and_match_across_forms(attention: str) -> None:
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_sam_encoder()(images)
    prompted = PromptedSamEncoder(tiny_sam_encoder(), 3, gate=True, attention=attention)
    prompted.train()
    assert torch.allclose(prompted(images), expected, atol=1e-5)  # folded attention reorders sums
    target = torch.randn_like(expected)
    (prompted(images) * target).sum().backward()
    assert prompted.prompt_gates.grad.abs().sum() > 0

    # With open gates the two attention forms still agree, and kept keys/values change nothing.
    gated = {}
    for form in ("folded", "bias"):
        encoder = PromptedSamEncoder(tiny_sam_encoder(), 3, gate=True, attention=form)
        _randomise(encoder)
        encoder.eval()
        with torch.no_grad():
            gated[form] = encoder(images)
            encoder.cache_prompt_keys_values = False
            assert torch.allclose(encoder(images), gated[form], atol=1e-6)
    assert torch.allclose(gated["folded"], gated["bias"], atol=1e-4)
    assert (gated["bias"] - expected).abs().max() > 1e-3


def test_gate_is_refused_for_shallow_prompts() -> None:
    with pytest.raises(ConfigError, match="vpt_deep"):
        apply_method(tiny_vit(), "vpt_shallow", num_tokens=2, gate=True)


def test_gated_prompts_save_and_load_with_their_gates(tmp_path: Path) -> None:
    from vpt.methods import save_trained_weights
    from vpt.methods.trained_weights import load_trained_weights

    model = apply_method(tiny_vit(), "vpt_deep", num_tokens=2, gate=True)
    _randomise(model)
    save_trained_weights(model, tmp_path / "w.safetensors", metadata={"method": "vpt_deep", "method_options": {"num_tokens": 2, "gate": True}})
    fresh = apply_method(tiny_vit(), "vpt_deep", num_tokens=2, gate=True)
    load_trained_weights(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh.prompt_gates, model.prompt_gates)


# --- optimizer.prompt_lr_scale --------------------------------------------------------------


def test_prompt_lr_scale_gives_encoder_tensors_their_own_learning_rate() -> None:
    encoder = apply_method(tiny_vit(), "vpt_deep", num_tokens=2, gate=True)
    decoder = MultiLevelDecoder(48, 3, [0, 2], hidden_dim=16, stem_dim=8)
    model = VitSegmenter(encoder, decoder)
    optimizer = build_optimizer(model, OptimizerConfig(name="adamw", base_lr=0.1, weight_decay=0.01, prompt_lr_scale=10.0), lr=0.002)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            expected = 0.002 if name.startswith("decoder.") else 0.02
            assert group["lr"] == pytest.approx(expected), name
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert {"encoder.prompt_embeddings", "encoder.prompt_gates"} <= set(seen)
    with pytest.raises(ConfigError, match="prompt_lr_scale"):
        OptimizerConfig(prompt_lr_scale=0)


def test_prompt_lr_scale_reaches_the_optimiser_from_the_config(tmp_path: Path) -> None:
    from tests.test_training import FAST, compose_config
    from vpt.cli.train import train

    cfg = compose_config([*FAST, "trainer.max_epochs=1", "optimizer.prompt_lr_scale=4", "logger=csv", "num_preview_images=0",
                          "trainer.log_every_n_steps=1"])
    train(cfg, run_dir=tmp_path / "run")
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    lr_columns = [i for i, c in enumerate(columns) if c.startswith("lr-")]
    values = sorted({float(row.split(",")[i]) for row in rows for i in lr_columns if row.split(",")[i]})
    # One rate for the head, four times it for the prompts, at every logged step.
    assert len(lr_columns) >= 2
    by_column = [[float(r.split(",")[i]) for r in rows if r.split(",")[i]] for i in lr_columns]
    ratios = {round(max(a) / max(b), 6) for a in by_column for b in by_column if max(b) > 0}
    assert 4.0 in ratios, (columns, values)


# --- decoder controls -----------------------------------------------------------------------


def test_decoder_alone_without_stem_cannot_see_the_image() -> None:
    encoder = apply_method(tiny_vit(), "linear")
    decoder = MultiLevelDecoder(48, 3, [0, 2], hidden_dim=16, stem_dim=8, image_stem=False)
    assert not any("stem" in name for name, _ in decoder.named_parameters())
    zero = VitSegmenter(encoder, decoder, zero_features=True).eval()
    real = VitSegmenter(encoder, decoder).eval()
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(zero(a), zero(b))  # nothing of the image reaches the logits
        assert not torch.equal(real(a), real(b))
        with_stem = VitSegmenter(encoder, MultiLevelDecoder(48, 3, [0, 2], hidden_dim=16, stem_dim=8), zero_features=True).eval()
        assert not torch.equal(with_stem(a), with_stem(b))  # the stem alone sees the image


# --- the benchmark script -------------------------------------------------------------------


def _write_small_sets(root: Path) -> None:
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "Dataset501_MNIBrainTissue"
    for split, count in (("Tr", 5), ("Ts", 2)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir(parents=True)
        for case in range(count):
            label = np.zeros((24, 24, 4), np.uint8)
            label[4:20, 4:20] = 1
            label[8:16, 8:16] = 2
            image = (label * 40 + rng.normal(0, 5, label.shape)).astype(np.float32)
            nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"images{split}" / f"c{split}{case}_0000.nii.gz")
            nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"labels{split}" / f"c{split}{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}))
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        for digit in range(3):
            target = root / "digits" / split / str(digit)
            target.mkdir(parents=True)
            for index in range(count):
                pixels = np.zeros((8, 8), np.uint8)
                pixels[:, digit * 2 : digit * 2 + 3] = 200
                Image.fromarray(pixels).save(target / f"{index}.png")


def test_benchmark_transfer_runs_every_row_kind_on_generated_data(tmp_path: Path) -> None:
    """A smoke run (not its numbers): methods, a random-init control, the decoder-alone control,
    the variants and the baselines computed in the script all reach the table."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_transfer

    _write_small_sets(tmp_path / "data")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "micro.safetensors"))
    out = tmp_path / "transfer.md"
    args = [
        "--weights", str(tmp_path / "micro.safetensors"), "--data", str(tmp_path / "data"), "--model", "vit_micro",
        "--methods", "linear", "vpt_deep", "--random-init-methods", "vpt_deep", "--seeds", "0",
        "--seg-epochs", "1", "--cls-epochs", "1", "--runs", str(tmp_path / "runs"), "--out", str(out),
        "--override", "model.img_size=32", "task.data.batch_size=4", "--search", "linear", "--search-lr-factors", "1", "2",
    ]
    benchmark_transfer.main(args)
    text = out.read_text()
    assert "| linear, lr searched on validation (x1, x2) | recipe search |" in text
    # The candidate at the recipe's rate is the linear row's run, reused; only x2 trains anew.
    searched = tmp_path / "runs" / "digits" / "linear_lr_searched_on_validation_x1_x2" / "seed0"
    assert [p.name for p in searched.iterdir()] == ["0.2"]  # vit_micro's recipe: base_lr 0.1
    assert "Selected on validation" in text and "seed 0 lr " in text
    for label in ("| linear |", "| vpt_deep |", "vpt_deep, random-init encoder", "decoder alone (zero features)",
                  "per-class intensity rule", "paper form (no gate)", "no image stem", "majority class", "raw pixels"):
        assert label in text, label
    assert "## mni_tissue" in text and "## digits" in text
    # Finished runs are reused: a second invocation trains nothing and writes the same table rows.
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("metrics.json")}
    benchmark_transfer.main(args)
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("metrics.json")} == mtimes


def test_benchmark_transfer_search_selects_on_validation_not_test(tmp_path: Path) -> None:
    """A planted candidate with the best test score but not the best validation score is not selected."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_transfer

    planted = {"0.025": (0.70, 0.95), "0.05": (0.90, 0.60), "0.1": (0.80, 0.80)}  # lr: (best val dice, test dice)
    dirs, runs = [], []
    for lr, (val, test) in planted.items():
        run_dir = tmp_path / lr
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(f"monitor: val/dice\nmonitor_mode: max\noptimizer:\n  base_lr: {lr}\n")
        dirs.append(run_dir)
        runs.append({"best/val/dice": val, "test/dice": test, "benchmark_seconds": 1.0})
    selected = benchmark_transfer.select_on_validation(dirs, runs)
    assert selected["selected_run"] == str(tmp_path / "0.05") and selected["test/dice"] == 0.60
    assert selected["selected_lr"] == 0.05
    assert selected["benchmark_seconds"] == 3.0  # the row's time is the whole search
    # A loss monitor is minimised: the smallest validation loss wins.
    for run_dir in dirs:
        (run_dir / "config.yaml").write_text("monitor: val/loss\nmonitor_mode: min\n")
    losses = [{"best/val/loss": v, "test/dice": t} for v, t in [(0.3, 0.9), (0.5, 0.1), (0.2, 0.5)]]
    assert benchmark_transfer.select_on_validation(dirs, losses)["selected_run"] == str(tmp_path / "0.1")
    # No validation score anywhere: the search refuses to choose instead of guessing.
    with pytest.raises(SystemExit, match="cannot choose"):
        benchmark_transfer.select_on_validation(dirs, [{"test/dice": 0.9}] * 3)
