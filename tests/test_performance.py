"""Performance paths: kept prompt keys/values at inference, and the model switches
(gradient checkpointing, torch.compile with fallback, channels-last)."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

import vpt.prompts.vit as prompted_vit
from tests.test_training import compose_config
from vpt import apply_method
from vpt.models import apply_model_switches


def _deep(tokens: int = 4, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2,
        num_classes=5,
    )
    return apply_method(vit, "vpt_deep", num_tokens=tokens, **options)


def _count_projections(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = prompted_vit.prompt_keys_values

    def counting(block, prompts):
        calls.append(1)
        return original(block, prompts)

    monkeypatch.setattr(prompted_vit, "prompt_keys_values", counting)
    return calls


def test_inference_keeps_prompt_keys_values_and_equals_the_full_computation(monkeypatch) -> None:
    model = _deep().eval()
    images = torch.randn(3, 3, 32, 32)
    model.cache_prompt_keys_values = False
    with torch.no_grad():
        reference = model(images)
    model.cache_prompt_keys_values = True
    calls = _count_projections(monkeypatch)
    with torch.no_grad():
        first = model(images)
        second = model(images[:2])
    with torch.inference_mode():
        third = model(images)
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, reference[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(third, reference, rtol=0, atol=1e-6)
    assert len(calls) == 3, "one projection per block, then reused across batches"


def test_kept_keys_values_follow_the_prompts_and_weights(monkeypatch) -> None:
    model = _deep().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        model.prompt_embeddings.add_(torch.randn_like(model.prompt_embeddings))  # in place, as an optimiser step
        after_prompts = model(images)
    assert not torch.allclose(before, after_prompts)
    model.cache_prompt_keys_values = False
    with torch.no_grad():
        torch.testing.assert_close(after_prompts, model(images), rtol=0, atol=1e-6)
    model.cache_prompt_keys_values = True

    # Loading other prompts, or a method changing a block's qkv bias (BitFit), invalidates too.
    other = _deep()
    other.prompt_embeddings.data.normal_()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = model(images)
        model.vit.blocks[1].attn.qkv.bias.add_(torch.randn_like(model.vit.blocks[1].attn.qkv.bias))
        biased = model(images)
    model.cache_prompt_keys_values = False
    with torch.no_grad():
        torch.testing.assert_close(biased, model(images), rtol=0, atol=1e-6)
    assert not torch.allclose(loaded, biased)


def test_training_and_gradients_never_use_kept_keys_values(monkeypatch) -> None:
    model = _deep()
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model(images)  # fills the kept keys/values
    calls = _count_projections(monkeypatch)
    model.train()
    model(images).sum().backward()
    assert model.prompt_embeddings.grad is not None and model.prompt_embeddings.grad.abs().sum() > 0
    model.eval()
    model.prompt_embeddings.grad = None
    model(images).sum().backward()  # eval mode with gradients (saliency): computed afresh
    assert model.prompt_embeddings.grad.abs().sum() > 0
    assert not calls, "kept keys/values are only used without gradients"


def test_autocast_gets_its_own_kept_keys_values() -> None:
    model = _deep().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
        again = model(images)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05)


# -- model switches -------------------------------------------------------------------------------


def _segmenter(overrides: list[str]):
    from vpt.models import build_segmenter

    cfg = compose_config(["experiment=quickstart", *overrides])
    model, _ = build_segmenter(cfg, 4)
    return cfg, model


def test_grad_checkpointing_switch_reaches_every_encoder_and_keeps_gradients() -> None:
    cfg, model = _segmenter([])
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model(images).sum().backward()
    reference = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    cfg.model.grad_checkpointing = True
    apply_model_switches(model, cfg.model)
    assert model.encoder.grad_checkpointing
    model(images).sum().backward()
    for expected, param in zip(reference, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)

    from vpt.prompts import PromptedSamEncoder

    encoder = PromptedSamEncoder(_tiny_sam_encoder(), num_tokens=2)
    apply_model_switches(encoder, cfg.model)
    assert encoder.grad_checkpointing


def _tiny_sam_encoder():
    from tests.test_sam import tiny_encoder

    return tiny_encoder(32, 2, patch_size=8, embed_dim=32, depth=2)


def test_compile_switch_compiles_the_encoder_or_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    cfg, model = _segmenter([])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(images)

    def broken_compile(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("no compiler here")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg.model.compile = True
    apply_model_switches(model, cfg.model)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        first = model(images)
        second = model(images)
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    warnings = [r for r in caplog.records if "compile" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()


def test_compile_switch_runs_the_encoder_through_torch_compile(monkeypatch, caplog) -> None:
    """A real torch.compile (Dynamo capture; a recording backend instead of a C++ toolchain):
    the encoder's graphs are captured and run, the outputs equal the eager model's, no fallback."""
    import functools

    cfg, model = _segmenter([])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(images)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    cfg.model.compile = True
    apply_model_switches(model, cfg.model)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        compiled = model(images)
    assert graphs, "torch.compile captured no graph: the encoder ran eagerly"
    assert sum(node.op.startswith("call") for graph in graphs for node in graph.graph.nodes) > 10  # the blocks' operations
    torch.testing.assert_close(compiled, reference)
    assert not [r for r in caplog.records if "compile" in r.getMessage()]
    torch._dynamo.reset()


def test_channels_last_switch_keeps_outputs() -> None:
    cfg, model = _segmenter([])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(images)
    cfg.model.channels_last = True
    apply_model_switches(model, cfg.model)
    conv = model.decoder.stem[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["grad_checkpointing", "compile", "channels_last"])
def test_switches_are_in_every_model_config(key: str) -> None:
    from tests.test_training import _options

    for option in _options("model"):
        cfg = compose_config([f"model={option}"])
        assert cfg.model[key] is False, (option, key)


# -- bf16 autocast through every attention path ----------------------------------------------------


@pytest.mark.parametrize("family, method", [("timm", "vpt_deep"), ("timm", "vpt_shallow"), ("timm", "lora"), ("sam", "vpt_deep"), ("sam", "vpt_shallow")])
def test_bf16_autocast_reaches_attention_and_losses_stay_fp32(monkeypatch, family: str, method: str) -> None:
    """Under trainer=gpu's bf16-mixed autocast, every scaled_dot_product_attention gets bf16
    inputs (no silent fp32 path), and the segmentation loss is computed in fp32."""
    import torch.nn.functional as F

    from vpt.tasks.segmentation import dice_loss

    seen: list[tuple[torch.dtype, ...]] = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    options = {"num_tokens": 3} if method.startswith("vpt") else {}
    if family == "timm":
        model = _deep() if method == "vpt_deep" else apply_method(
            timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=2, num_classes=5), method, **options)
    else:
        model = apply_method(_tiny_sam_encoder(), method, **options)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    logits = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    assert dice_loss(logits, torch.randint(0, 4, (2, 8, 8))).dtype == torch.float32


@pytest.mark.slow
def test_benchmark_script_writes_its_tables(tmp_path) -> None:
    """The benchmark runs end to end (tiny stand-ins) and writes its section, keeping others."""
    import subprocess
    import sys

    from tests.test_training import REPO

    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- benchmark:cuda-vit_b -->\nkept\n<!-- /benchmark:cuda-vit_b -->\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--tiny", "--repeats", "1", "--backbones", "vit_b",
         "sam_vit_b", "--methods", "vpt_deep", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "kept" in text and "<!-- benchmark:tiny-vit_b-sam_vit_b-inference -->" in text
    for row in ("naive concatenation (reference)", "segment-anything's own attention (reference)",
                "dense-bias attention (reference)", "frozen backbone alone", "kept keys/values (default)"):
        assert row in text, row
    assert "error" not in text.lower()


def test_benchmark_inference_table_keeps_other_sections(tmp_path) -> None:
    import subprocess
    import sys

    from tests.test_training import REPO

    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- benchmark:cpu-sam_vit_b -->\nkept\n<!-- /benchmark:cpu-sam_vit_b -->\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--tiny", "--repeats", "1", "--no-training",
         "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "kept" in text and text.count("<!-- benchmark:tiny-inference -->") == 1
    assert "| frozen backbone alone |" in text and "kept keys/values (default)" in text


def test_sam_inference_keeps_deep_prompt_keys_values(monkeypatch) -> None:
    import vpt.prompts.sam as prompted_sam

    torch.manual_seed(0)
    model = apply_method(_tiny_sam_encoder(), "vpt_deep", num_tokens=3).eval()
    images = torch.randn(2, 3, 32, 32)
    model.cache_prompt_keys_values = False
    with torch.no_grad():
        reference = model(images)
    model.cache_prompt_keys_values = True
    calls: list[int] = []
    original = prompted_sam._project

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prompted_sam, "_project", counting)
    with torch.no_grad():
        first, second = model(images), model(images[:1])
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, reference[:1], rtol=0, atol=1e-5)  # another batch size: GEMM order
    assert len(calls) == len(model.image_encoder.blocks), "one projection per block, reused by the next batch"
    with torch.no_grad():
        model.prompt_embeddings.add_(torch.randn_like(model.prompt_embeddings))
        changed = model(images)
    model.cache_prompt_keys_values = False
    with torch.no_grad():
        torch.testing.assert_close(changed, model(images), rtol=0, atol=1e-6)
    assert not torch.allclose(changed, reference)
    # Training (gradients) never reuses them.
    model.cache_prompt_keys_values = True
    model.train()
    calls.clear()
    model(images).sum().backward()
    assert len(calls) == len(model.image_encoder.blocks) and model.prompt_embeddings.grad.abs().sum() > 0
