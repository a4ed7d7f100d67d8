"""The encoder seam (issue 16): every method on every family through vpt.apply_method, a toy
family registered in this test working with every method without touching vpt's other
modules, SAM2 Hiera checkpoints in the official layout, and the CLI on phantoms with
model=sam2_hiera_micro."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from timm.models.hieradet_sam2 import HieraDet
from torch import nn

import vpt
from tests.conftest import make_tiny_vit
from tests.test_training import run_cli
from vpt.errors import CheckpointError, ConfigError
from vpt.families import EncoderFamily, family_of, register_family
from vpt.families import base as family_registry

REPO = Path(__file__).resolve().parents[1]

# What each method may train inside the encoder (parameter names of the wrapped model).
TRAINS = {
    "linear": None,
    "vpt_deep": r"prompt",
    "lora": r"lora_",
    "adapter": r"adapter",
    "bitfit": r"\.bias$",
    "partial": None,  # checked separately: the last block's tensors
    "full": r".",
}
METHODS = list(TRAINS)


def micro_hiera() -> HieraDet:
    return HieraDet(
        embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), q_pool=3, window_spec=(4, 4, 2, 3),
        global_att_blocks=(4,), global_pos_size=(4, 4), num_classes=0,
    )


def tiny_sam_encoder() -> nn.Module:
    from vpt.backbones.sam import build_sam_tiny

    return build_sam_tiny(img_size=64).image_encoder


ENCODERS = {
    "timm": (lambda: make_tiny_vit(num_classes=0), 32),
    "sam": (tiny_sam_encoder, 64),
    "hiera": (micro_hiera, 64),
}


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_features(images) if hasattr(model, "forward_features") else model(images)


def _check_only_method_tensors_train(model: nn.Module, method: str, blocks: list[nn.Module]) -> None:
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    pattern = TRAINS[method]
    if method == "linear":
        assert trainable == [], trainable
    elif method == "partial":
        last = {id(p) for p in blocks[-1].parameters()}
        assert trainable and all(id(p) in last for n, p in model.named_parameters() if p.requires_grad)
    else:
        assert trainable, f"{method} trains nothing"
        assert all(re.search(pattern, name) for name in trainable), [n for n in trainable if not re.search(pattern, n)]
        if method != "full":
            assert frozen, "the encoder's own tensors stay frozen"
            assert not any(re.search(pattern, name) for name in frozen if method in ("vpt_deep", "lora", "adapter"))


@pytest.mark.parametrize("family", list(ENCODERS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_family_trains_only_its_tensors(family: str, method: str) -> None:
    torch.manual_seed(0)
    build, size = ENCODERS[family]
    encoder = build()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = _features(encoder.eval(), images)
    options: dict[str, Any] = {"num_tokens": 2} if method == "vpt_deep" else {}
    model = vpt.apply_method(encoder, method, **options)
    assert family_of(model).name == family
    _check_only_method_tensors_train(model, method, family_of(model).blocks(model))
    model.eval()
    output = _features(model, images)
    assert output.shape == reference.shape
    if method in ("linear", "lora", "adapter", "bitfit", "partial", "full"):
        # Zero-initialised updates (LoRA B, adapter up) or untouched weights: outputs unchanged.
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    if method != "linear":
        output.float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "the method's tensors get gradients"


def test_vpt_shallow_on_hiera_is_refused_naming_vpt_deep() -> None:
    with pytest.raises(ConfigError, match="vpt_deep"):
        vpt.apply_method(micro_hiera(), "vpt_shallow", num_tokens=2)


# -- a toy family, registered here: no vpt module knows it ----------------------------------


class ToyAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prompt_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if prompt_kv is not None:
            k, v = torch.cat([prompt_kv[0], k], 1), torch.cat([prompt_kv[1], v], 1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ToyAttention(dim)
        self.mlp = nn.Sequential()
        self.mlp.up = nn.Linear(dim, 2 * dim)  # the family's own MLP names: up / down
        self.mlp.act = nn.GELU()
        self.mlp.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompt_kv = None
        if prompts is not None:
            _, k, v = self.attn.qkv(self.norm1(prompts)).chunk(3, dim=-1)
            prompt_kv = (k, v)
        x = x + self.attn(self.norm1(x), prompt_kv)
        return x + self.mlp(self.norm2(x))


class ToyEncoder(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))

    def forward(self, images: torch.Tensor, prompts: Optional[nn.ParameterList] = None) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        for index, block in enumerate(self.blocks):
            batch = None if prompts is None else prompts[index].expand(x.shape[0], -1, -1)
            x = block(x, batch)
        return x


class ToyWrapper(nn.Module):
    def __init__(self, encoder: ToyEncoder, num_tokens: int, backbone_eval: bool = True) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.num_tokens, self.backbone_eval = num_tokens, backbone_eval
        dim = encoder.embed.out_channels
        self.prompt_embeddings = (
            nn.ParameterList(nn.Parameter(torch.randn(1, num_tokens, dim) * 0.1) for _ in encoder.blocks) if num_tokens else None
        )

    def train(self, mode: bool = True) -> "ToyWrapper":
        super().train(mode)
        if self.backbone_eval:
            self.encoder.eval()
            for module in self.encoder.modules():
                if getattr(module, "follows_train_mode", False):
                    module.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, self.prompt_embeddings)


class ToyFamily(EncoderFamily):
    name = "toy"
    wrapper = ToyWrapper
    tasks = ()
    mlp_layers = ("up", "down")
    shallow_prompts = False

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, ToyEncoder)

    def wrap(self, encoder, num_tokens=0, deep=True, dropout=0.0, project_dim=None, backbone_eval=True, gate=False):
        self.check_prompts(num_tokens, deep, project_dim)
        return ToyWrapper(encoder, num_tokens, backbone_eval)

    def inner(self, wrapped: nn.Module) -> nn.Module:
        return wrapped.encoder


@pytest.fixture
def toy_family():
    register_family(ToyFamily())
    yield
    family_registry._FAMILIES.pop("toy")


@pytest.mark.parametrize("method", METHODS)
def test_a_family_file_is_enough_for_every_method(toy_family, method: str) -> None:
    torch.manual_seed(0)
    encoder = ToyEncoder()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = encoder(images)
    options: dict[str, Any] = {"num_tokens": 3} if method == "vpt_deep" else {}
    if method == "lora":
        options = {"targets": ["q", "v", "fc1", "fc2"]}  # fc1/fc2 mean the family's up/down
    model = vpt.apply_method(encoder, method, **options)
    _check_only_method_tensors_train(model, method, list(encoder.blocks))
    if method == "lora":
        names = [name for name, _ in model.named_parameters() if "lora_A" in name]
        assert any("mlp.up" in n for n in names) and any("mlp.down" in n for n in names) and any("attn.qkv.q" in n for n in names)
    output = model.eval()(images)
    if method != "vpt_deep":
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(output, reference)
    with pytest.raises(ConfigError, match="vpt_deep"):
        vpt.apply_method(ToyEncoder(), "vpt_shallow", num_tokens=2)


# -- SAM2 checkpoints ---------------------------------------------------------------------


def _official_layout(model: HieraDet) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("head."):
            continue
        key = key.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")
        state[f"image_encoder.trunk.{key}"] = tensor.clone()
    state["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    return state


def test_an_official_sam2_checkpoint_loads_with_equal_weights(tmp_path: Path) -> None:
    from vpt.families.hiera import load_hiera_checkpoint

    torch.manual_seed(1)
    source = micro_hiera()
    path = tmp_path / "sam2.1_hiera_micro.pt"
    torch.save({"model": _official_layout(source)}, path)
    target = micro_hiera()
    load_hiera_checkpoint(target, str(path))
    for key, tensor in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(tensor, target.state_dict()[key]), key

    state = _official_layout(source)
    state["image_encoder.trunk.blocks.1.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_hiera_checkpoint(micro_hiera(), str(tmp_path / "bad.pt"))


def test_no_module_outside_the_family_files_tests_a_family() -> None:
    """Family classes and names are asked of vpt.families, nowhere else."""
    allowed = {"families", "prompts", "backbones"}
    family_classes = r"(VisionTransformer|ImageEncoderViT|HieraDet|PromptedViT|PromptedSamEncoder|PromptedHiera)"
    offenders = []
    for path in (REPO / "vpt").rglob("*.py"):
        relative = path.relative_to(REPO / "vpt")
        if relative.parts[0] in allowed or relative.name == "bank.py":  # the bank serves PromptedViT files by design
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (
            rf"isinstance\([^)]*{family_classes}",
            r"family\s*[!=]=\s*['\"]",
            r"get\(['\"]family['\"][^)]*\)\s*[!=]=",
            r"['\"](sam|timm|hiera)['\"]\s*[!=]=\s*family",
        ):
            if re.search(pattern, text):
                offenders.append(f"{relative}: {pattern}")
    assert offenders == []


@pytest.mark.parametrize("method", ["vpt_deep", "lora"])
def test_cli_trains_a_hiera_model_on_phantoms(method: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        ["model=sam2_hiera_micro", "task=organ_seg_synthetic", f"method={method}", "trainer.max_epochs=1",
         "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
         "num_preview_images=1", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/dice" in metrics and metrics["model_config"] == "sam2_hiera_micro"
    assert metrics["method_options"] is not None and (run_dir / "prompts.safetensors").is_file()
    assert metrics["trainable_params"] < metrics["total_params"]


@pytest.mark.parametrize("family", list(ENCODERS))
def test_every_wrapper_shares_the_prompted_encoder_surface(family: str) -> None:
    from vpt.prompts import PromptedEncoder

    build, _ = ENCODERS[family]
    model = vpt.apply_method(build(), "adapter")
    assert isinstance(model, PromptedEncoder) and family_of(model).inner(model) is model.trunk
    model.train()
    adapters = [m for m in model.trunk.modules() if getattr(m, "follows_train_mode", False)]
    assert adapters and all(m.training for m in adapters), "what a method added follows train()"
    inside_adapters = {id(s) for a in adapters for s in a.modules()}
    frozen = [m for name, m in model.trunk.named_modules() if name and not name.startswith("head") and id(m) not in inside_adapters]
    assert frozen and not any(m.training for m in frozen), "the frozen trunk stays in eval mode"
    # timm's own exemptions (position embeddings, ...) under the wrapper's prefix; timm lists
    # tokens a model may lack (reg_token), so only the prefix and one real match are asked.
    names = {name for name, _ in model.named_parameters()}
    exempt = model.no_weight_decay()
    assert all(name.startswith(model.trunk_attribute + ".") for name in exempt) and exempt & names
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and isinstance(model.compile_target, str) and hasattr(model, model.compile_target)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_feature_levels_describe_the_grids_decoders_read(family: str) -> None:
    """Each level's width and stride are those of the grid the wrapper hands a decoder."""
    build, size = ENCODERS[family]
    encoder = build()
    levels = family_of(encoder).feature_levels(encoder)
    wrapped = vpt.apply_method(encoder, "vpt_deep", num_tokens=2)
    assert family_of(wrapped).feature_levels(wrapped) == levels  # raw or wrapped alike
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        if family == "timm":
            grids = wrapped.forward_intermediates(images, list(range(len(levels))))
        elif family == "hiera":
            grids = wrapped.forward_intermediates(images)
        else:
            grids = [wrapped(images)]
    assert len(grids) == len(levels)
    for grid, level in zip(grids, levels):
        assert grid.shape[1:] == (level.width, size // level.stride, size // level.stride)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_data_settings_name_the_input_size_and_normalisation(family: str) -> None:
    from omegaconf import OmegaConf

    build, size = ENCODERS[family]
    encoder = build()
    family_object = family_of(encoder)
    data = family_object.data_settings(vpt.apply_method(encoder, "linear"))
    expected_size = {"timm": (32, 32), "sam": (64, 64), "hiera": (1024, 1024)}[family]  # SAM2's size, not timm's 896
    assert tuple(data["image_size"]) == expected_size
    # All three publish ImageNet statistics in [0, 1] units (timm's tiny ViT: its AugReg 0.5s).
    expected_mean = (0.5, 0.5, 0.5) if family == "timm" else (0.485, 0.456, 0.406)
    assert data["mean"] == pytest.approx(expected_mean, abs=1e-3)
    assert all(0.0 < value < 1.0 for value in data["std"])
    # A model config's own normalisation wins (MedSAM: [0, 1] images, mean 0 and std 1).
    medsam_like = OmegaConf.create({"img_size": 512, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    configured = family_object.data_settings(encoder, medsam_like)
    assert configured["mean"] == (0.0, 0.0, 0.0) and configured["std"] == (1.0, 1.0, 1.0)
    if family == "hiera":  # the input size is the config's (MedSAM2: 512), even for timm's registered model
        import timm

        registered = timm.create_model("sam2_hiera_tiny", pretrained=False)
        assert family_object.data_settings(registered)["image_size"] == (1024, 1024)
        assert family_object.data_settings(registered, medsam_like)["image_size"] == (512, 512)


def test_each_family_loads_its_published_checkpoint_layout(tmp_path: Path) -> None:
    """load_checkpoint = our safe reader + the family's filter + a reported load."""
    from safetensors.torch import save_file

    from tests.test_hiera import official_layout
    from vpt.backbones.sam import build_sam_tiny

    # timm: a state dict as timm saves it, loaded into a differently initialised model.
    torch.manual_seed(0)
    source, target = make_tiny_vit(), make_tiny_vit()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "vit.safetensors")
    family_of(target).load_checkpoint(target, tmp_path / "vit.safetensors")
    for key, tensor in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.state_dict()[key], tensor), key

    # SAM: the whole model's state dict (as segment-anything's .pth), position tables resized to 32 px.
    sam_source, sam_target = build_sam_tiny(img_size=64), build_sam_tiny(img_size=32)
    torch.save(sam_source.state_dict(), tmp_path / "sam.pth")
    family_of(sam_target.image_encoder).load_checkpoint(sam_target, tmp_path / "sam.pth")
    assert torch.equal(sam_target.mask_decoder.iou_token.weight, sam_source.mask_decoder.iou_token.weight)
    assert sam_target.image_encoder.pos_embed.shape[1:3] == (2, 2)

    # Hiera: the official SAM2 layout (image_encoder.trunk.*, mlp.layers.0/1).
    hiera_source, hiera_target = micro_hiera().double(), micro_hiera().double()
    torch.save({"model": official_layout(hiera_source, with_head=False)}, tmp_path / "sam2.pt")
    family = family_of(hiera_target)
    report = family.load_checkpoint(hiera_target, tmp_path / "sam2.pt")
    assert report.missing == []
    for key, tensor in hiera_source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(hiera_target.state_dict()[key], tensor), key
    filtered = family.checkpoint_filter({"model": official_layout(hiera_source, with_head=False)}, hiera_target)
    assert "blocks.0.mlp.fc1.weight" in filtered and not any(".mlp.layers." in key for key in filtered)
