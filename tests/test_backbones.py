"""vpt.backbones: ViT building, safe checkpoint reading and reported weight loading.

Every weights file is written by the test into ``tmp_path`` from a tiny ViT, and the hub
is forced offline, so nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vpt.backbones import LoadReport, create_vit, load_vit_checkpoint, load_weights, read_state_dict, vit_data_config
from vpt.errors import CheckpointError, ConfigError, WeightsUnavailableError

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)

# Filled by Payload.__setstate__: non-empty means a test file was unpickled, i.e. code ran.
_UNPICKLED: list[str] = []


class Payload:
    """An arbitrary object; unpickling it would run __setstate__ (stand-in for malicious code)."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state: dict) -> None:
        _UNPICKLED.append("ran")
        self.__dict__.update(state)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty cache, so a hub access fails at once instead of hanging or hitting a cache."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # huggingface_hub reads these at import time; patch the live values too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))


def tiny_vit(**overrides: int) -> torch.nn.Module:
    """A random-init tiny ViT (the random-init warning is expected and silenced here)."""
    kwargs = {**TINY, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_vit(NAME, pretrained=False, **kwargs).eval()


def features(model: torch.nn.Module, img_size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, img_size, img_size, generator=generator)
    with torch.no_grad():
        return model.eval().forward_features(images)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- round trips -----------------------------------------------------------------------


def test_safetensors_round_trip_reproduces_features(tmp_path: Path) -> None:
    source = tiny_vit()
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))

    # pretrained=True must not matter: a checkpoint wins and the offline hub is never asked.
    loaded = create_vit(NAME, checkpoint=str(path), **TINY)

    assert torch.equal(features(loaded), features(source))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("layout", ["plain", "lightning_ddp"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_torch_round_trip_reproduces_features(tmp_path: Path, layout: str, suffix: str) -> None:
    source = tiny_vit()
    state = source.state_dict()
    if layout == "lightning_ddp":
        # Nested under a wrapper key, DDP prefix, and non-tensor entries next to it.
        payload = {"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 7, "global_step": 70}
    else:
        payload = state
    path = tmp_path / f"tiny{suffix}"
    torch.save(payload, path)

    loaded = create_vit(NAME, pretrained=False, checkpoint=path, **TINY)

    assert torch.equal(features(loaded), features(source))


def test_read_state_dict_unwraps_and_keeps_only_tensors(tmp_path: Path) -> None:
    weight = torch.arange(6.0).reshape(2, 3)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module.layer.weight": weight, "note": "text", "step": 3}, "epoch": 1}, path)

    state = read_state_dict(path)

    assert list(state) == ["layer.weight"]
    assert torch.equal(state["layer.weight"], weight)


def test_read_state_dict_prefers_dino_teacher(tmp_path: Path) -> None:
    path = tmp_path / "dino.pth"
    torch.save({"student": {"w": torch.zeros(1)}, "teacher": {"w": torch.ones(1)}}, path)

    assert torch.equal(read_state_dict(path)["w"], torch.ones(1))


def test_npz_round_trip_reproduces_features(tmp_path: Path) -> None:
    source = tiny_vit(num_classes=10)
    path = tmp_path / "tiny.npz"
    np.savez(path, **_to_jax_npz(source))

    loaded = create_vit(NAME, checkpoint=path, num_classes=10, **TINY)

    assert torch.equal(features(loaded), features(source))
    # Same head width, yet the checkpoint head is not loaded: vpt always trains a new head.
    assert not torch.equal(loaded.head.weight, source.head.weight)


def test_npz_report_lists_skipped_head(tmp_path: Path) -> None:
    source = tiny_vit(num_classes=10)
    path = tmp_path / "tiny.npz"
    np.savez(path, **_to_jax_npz(source))
    target = tiny_vit(num_classes=0)

    report = load_vit_checkpoint(target, path)

    assert sorted(report.skipped) == ["head/bias", "head/kernel"]
    assert torch.equal(features(target), features(source))


def test_npz_of_another_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.npz"
    np.savez(path, **_to_jax_npz(tiny_vit()))  # 2 blocks

    with pytest.raises(CheckpointError, match=r"deep\.npz.*not a JAX ViT \.npz that fits"):
        create_vit(NAME, checkpoint=path, **{**TINY, "depth": 3})


def _to_jax_npz(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The inverse of timm's ``_load_weights`` for the original (AugReg) JAX ViT layout."""
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    head_dim = dim // heads
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
    }
    if "head.weight" in state:
        out["head/kernel"] = state["head.weight"].T
        out["head/bias"] = state["head.bias"]
    for index in range(len(model.blocks)):
        block, jax = f"blocks.{index}.", f"Transformer/encoderblock_{index}/"
        attention = jax + "MultiHeadDotProductAttention_1/"
        qkv_weight = state[block + "attn.qkv.weight"].reshape(3, dim, dim)
        qkv_bias = state[block + "attn.qkv.bias"].reshape(3, heads, head_dim)
        for part, name in enumerate(("query", "key", "value")):
            out[f"{attention}{name}/kernel"] = qkv_weight[part].T.reshape(dim, heads, head_dim)
            out[f"{attention}{name}/bias"] = qkv_bias[part]
        out[attention + "out/kernel"] = state[block + "attn.proj.weight"].reshape(dim, heads, head_dim).transpose(1, 2, 0)
        out[attention + "out/bias"] = state[block + "attn.proj.bias"]
        for jax_norm, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{jax}{jax_norm}/scale"] = state[f"{block}{norm}.weight"]
            out[f"{jax}{jax_norm}/bias"] = state[f"{block}{norm}.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{jax}MlpBlock_3/{dense}/kernel"] = state[f"{block}mlp.{fc}.weight"].T
            out[f"{jax}MlpBlock_3/{dense}/bias"] = state[f"{block}mlp.{fc}.bias"]
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


# --- adaptation: grid size and classifier head -----------------------------------------


def test_checkpoint_at_another_grid_size_gets_resized_pos_embed(tmp_path: Path) -> None:
    source = tiny_vit(img_size=48)  # 6x6 grid + cls -> 37 positions
    path = tmp_path / "grid48.safetensors"
    save_file(source.state_dict(), str(path))

    loaded = create_vit(NAME, checkpoint=path, **TINY)  # 4x4 grid + cls -> 17 positions

    assert loaded.pos_embed.shape == (1, 17, 48)
    # The class-token position is carried over, only the patch grid is resampled.
    assert torch.equal(loaded.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert features(loaded).shape == (2, 17, 48)


def test_head_of_another_num_classes_is_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tiny_vit(num_classes=10)
    path = tmp_path / "with_head.safetensors"
    save_file(source.state_dict(), str(path))
    target = tiny_vit(num_classes=5)
    fresh_head = target.head.weight.detach().clone()

    with caplog.at_level(logging.INFO, logger="vpt.backbones"):
        report = load_vit_checkpoint(target, path)

    assert isinstance(report, LoadReport)
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert report.missing == [] and report.unexpected == []
    assert target.head.weight.shape == (5, 48)
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(features(target), features(source))
    assert "2 skipped (head.bias, head.weight)" in str(report)  # safetensors returns keys sorted
    assert any("skipped" in record.getMessage() for record in caplog.records)


def test_head_is_skipped_for_a_feature_extractor(tmp_path: Path) -> None:
    source = tiny_vit(num_classes=10)
    path = tmp_path / "with_head.pth"
    torch.save(source.state_dict(), path)

    loaded = create_vit(NAME, checkpoint=path, num_classes=0, **TINY)

    assert isinstance(loaded.head, torch.nn.Identity)
    assert torch.equal(features(loaded), features(source))


# --- keys that do not line up ----------------------------------------------------------


def test_missing_keys_are_an_error_naming_them(tmp_path: Path) -> None:
    state = tiny_vit().state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path))

    with pytest.raises(CheckpointError, match=r"lacks 1 of the model's tensors \(blocks\.1\.mlp\.fc2\.weight\)"):
        create_vit(NAME, checkpoint=path, **TINY)


def test_missing_keys_only_warn_when_not_strict(caplog: pytest.LogCaptureFixture) -> None:
    source, target = tiny_vit(), tiny_vit()
    state = source.state_dict()
    del state["norm.bias"]

    with caplog.at_level(logging.WARNING, logger="vpt.backbones"):
        report = load_weights(target, state, strict_missing=False)

    assert report.missing == ["norm.bias"]
    assert "norm.bias" in caplog.text
    assert torch.equal(target.norm.weight, source.norm.weight)


def test_ignore_accepts_prefixes_and_regexes() -> None:
    source, target = tiny_vit(), tiny_vit()
    state = source.state_dict()
    original_block0 = target.blocks[0].attn.qkv.weight.detach().clone()

    report = load_weights(target, state, ignore=["norm.", r"blocks\.0\.attn\..*"])

    assert sorted(report.skipped) == [
        "blocks.0.attn.proj.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.weight",
        "norm.bias", "norm.weight",
    ]
    assert torch.equal(target.blocks[0].attn.qkv.weight, original_block0)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_mis_shaped_keys_are_an_error_naming_key_and_shapes_and_load_nothing(tmp_path: Path) -> None:
    wider = tiny_vit(embed_dim=64)
    path = tmp_path / "wider.safetensors"
    save_file(wider.state_dict(), str(path))
    target = tiny_vit()
    before = {key: value.clone() for key, value in target.state_dict().items()}

    with pytest.raises(CheckpointError) as caught:
        load_vit_checkpoint(target, path)

    message = str(caught.value)
    assert "cls_token: checkpoint (1, 1, 64) vs model (1, 1, 48)" in message
    assert "and " in message and "more" in message  # capped at five listed keys
    assert message.count(" vs model ") == 5
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was overwritten by a rejected checkpoint"


def test_unexpected_keys_warn_naming_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tiny_vit()
    state = {**source.state_dict(), "dist_token": torch.zeros(1, 1, 48), "extra.proj.weight": torch.zeros(3, 3)}
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    target = tiny_vit()

    with caplog.at_level(logging.WARNING, logger="vpt.backbones"):
        report = load_vit_checkpoint(target, path)

    assert sorted(report.unexpected) == ["dist_token", "extra.proj.weight"]
    warnings_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("extra.proj.weight" in m and "dist_token" in m for m in warnings_logged)
    assert torch.equal(features(target), features(source))


# --- unsafe, missing and unreadable files ----------------------------------------------


def test_pickled_objects_are_refused_and_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": tiny_vit().state_dict(), "payload": Payload()}, path)
    digest = sha256(path)
    _UNPICKLED.clear()

    with pytest.raises(CheckpointError, match="contains pickled Python objects.*re-save it as a plain state dict"):
        create_vit(NAME, checkpoint=path, **TINY)

    assert _UNPICKLED == [], "the payload was unpickled"
    assert sha256(path) == digest


def test_missing_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; check model\.checkpoint"):
        create_vit(NAME, checkpoint=tmp_path / "nope.safetensors", **TINY)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_unsupported_suffix_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x00" * 16)

    with pytest.raises(CheckpointError, match=r"unsupported suffix '\.onnx'.*\.safetensors, \.pth"):
        create_vit(NAME, checkpoint=path, **TINY)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.pth", b"definitely not a checkpoint" * 8),
        ("empty.pt", b""),
        ("garbage.safetensors", b"\xff" * 64),
    ],
)
def test_corrupt_files_are_a_checkpoint_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_state_dict(path)


def test_truncated_pth_is_a_checkpoint_error(tmp_path: Path) -> None:
    full = tmp_path / "full.pth"
    torch.save(tiny_vit().state_dict(), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[:200])

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(truncated)


# --- hub, random init, configuration ---------------------------------------------------


def test_offline_pretrained_raises_weights_unavailable_naming_the_fixes() -> None:
    with pytest.raises(WeightsUnavailableError) as caught:
        create_vit(NAME, pretrained=True, **TINY)

    message = str(caught.value)
    assert f"'{NAME}'" in message
    assert "model.checkpoint" in message and "model.pretrained=false" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_random_init_warns_loudly_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vpt.backbones"):
        create_vit(NAME, pretrained=False, **TINY)

    warned = [r for r in caplog.records if "random-init backbone: results will not reflect pretrained transfer" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_unknown_model_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown timm model 'vit_nonexistent_patch99'"):
        create_vit("vit_nonexistent_patch99", pretrained=False)
    with pytest.raises(ConfigError, match="Unknown timm model"):
        create_vit("vit_nonexistent_patch99", pretrained=True)  # no hub attempt either


@pytest.mark.parametrize("pretrained", [False, True])
def test_non_vit_model_is_a_config_error(pretrained: bool) -> None:
    # With pretrained=True offline, the config mistake still wins over "no weights".
    with pytest.raises(ConfigError, match="'resnet18' is a ResNet, not a VisionTransformer"):
        create_vit("resnet18", pretrained=pretrained)


def test_arguments_a_model_rejects_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'resnet18' rejected the arguments"):
        create_vit("resnet18", pretrained=False, img_size=32)


def test_vit_data_config_uses_the_models_own_size_and_normalisation() -> None:
    config = vit_data_config(tiny_vit())

    assert config["input_size"] == (32, 32)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)


def test_unreachable_hub_fails_fast_from_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No route to the hub: no retries with back-off, one sentence, huggingface_hub told to stay offline."""
    import time

    from huggingface_hub import constants

    import vpt.backbones.timm_vit as timm_vit

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm_vit, "hub_reachable", lambda timeout=3.0: False)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="model.checkpoint"):
        create_vit("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    assert constants.HF_HUB_OFFLINE is True
    assert time.monotonic() - started < 60  # hang guard only: the retries took ~50 s, this ~1 s


def test_hub_probe_reports_a_refused_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import vpt.backbones.timm_vit as timm_vit

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert timm_vit.hub_reachable(timeout=1.0) is False
