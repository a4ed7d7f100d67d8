"""SAM: building at any input size, checkpoint adaptation, and PromptedSamEncoder against a plain reference.

The encoders are tiny, but their grids mimic real SAM: at 1024, 512 and 256 pixels SAM has
64, 32 and 16 patches on a side and windows of 14, i.e. about 4.6, 2.3 and 1.1 windows per
side with padding each time; here grids of 14, 7 and 4 with windows of 3 give the same.
Relative-position tables and position embeddings are randomised (the package zero-inits
them), so a bias in the wrong place changes the numbers. Every weights file is written by
the test itself.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Block, add_decomposed_rel_pos

from vpt.backbones.sam import SAM_BUILDERS, build_sam, load_sam_checkpoint
from vpt.errors import CheckpointError, ConfigError, WeightsUnavailableError
from vpt.prompts.sam import PromptedSamEncoder

WINDOW = 3
# name -> (img_size, grid): grid / WINDOW as for SAM's 64, 32, 16 patches / window 14.
GRIDS = {"1024_style": (224, 14), "512_style": (112, 7), "256_style": (64, 4)}

# Filled by Payload.__setstate__: non-empty means a test file was unpickled, i.e. code ran.
_UNPICKLED: list[str] = []


class Payload:
    """An arbitrary object; unpickling it would run __setstate__ (stand-in for malicious code)."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state: dict) -> None:
        _UNPICKLED.append("ran")
        self.__dict__.update(state)


def randomise_positions(module: torch.nn.Module, seed: int = 0) -> None:
    """Give position embeddings and rel-pos tables values, which the package initialises to zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def tiny_encoder(
    img_size: int,
    window_size: int = WINDOW,
    *,
    patch_size: int = 16,
    embed_dim: int = 16,
    depth: int = 3,
    global_attn_indexes: tuple[int, ...] = (1,),
    position_seed: int = 0,
) -> ImageEncoderViT:
    """A random SAM encoder with 2 heads, random position embedding and rel-pos tables; by
    default three blocks (windowed, global, windowed) of width 16."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        out_chans=8,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )
    randomise_positions(encoder, seed=position_seed)
    return encoder


def tiny_sam(img_size: int, **overrides: object) -> torch.nn.Module:
    """A random-init sam_tiny (the random-init warning is expected and silenced here)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sam = build_sam("sam_tiny", pretrained=False, img_size=img_size, **overrides)
    randomise_positions(sam)
    return sam


# --- a plain reference of the prompted attention ------------------------------------------


def reference_attention(
    block: Block, window: torch.Tensor, prompts: Optional[torch.Tensor], prompts_as_queries: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T * scale + bias) v for one window (h, w, C) of normalised tokens.

    Prompts (T, C), normalised, lead the keys; the rel-pos bias (the package's own
    ``add_decomposed_rel_pos``) fills only the grid-query x grid-key part.
    """
    attn = block.attn
    height, width, dim = window.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    grid = window.reshape(height * width, dim)
    tokens = 0 if prompts is None else prompts.shape[0]
    sequence = grid if prompts is None else torch.cat([prompts, grid])
    query, key, value = (
        part.reshape(-1, heads, head_dim).transpose(0, 1) for part in attn.qkv(sequence).chunk(3, dim=-1)
    )  # each (heads, S, head_dim)
    if not prompts_as_queries:
        query = query[:, tokens:]
    scores = (query @ key.transpose(-2, -1)) * attn.scale
    grid_bias = add_decomposed_rel_pos(
        torch.zeros(heads, height * width, height * width),
        query[:, query.shape[1] - height * width:],
        attn.rel_pos_h,
        attn.rel_pos_w,
        (height, width),
        (height, width),
    )
    bias = torch.zeros_like(scores)
    bias[:, query.shape[1] - height * width:, tokens:] = grid_bias
    out = torch.softmax(scores + bias, dim=-1) @ value
    out = attn.proj(out.transpose(0, 1).reshape(-1, dim))
    prompt_out = out[:tokens] if prompts_as_queries and tokens else None
    return out[out.shape[0] - height * width:].reshape(height, width, dim), prompt_out


def reference_block(
    block: Block, x: torch.Tensor, prompts: Optional[torch.Tensor], shallow: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One block, sample by sample and window by window; prompts (B, T, C) or None."""
    batch, height, width, _ = x.shape
    size = block.window_size
    hidden = block.norm1(x)
    if size > 0:  # zero padding after the norm, as segment-anything's window_partition
        hidden = F.pad(hidden, (0, 0, 0, (-width) % size, 0, (-height) % size))
    step_h, step_w = (size, size) if size > 0 else (height, width)

    grids, new_prompts = [], []
    for b in range(batch):
        normed = block.norm1(prompts[b]) if prompts is not None else None
        rows, window_prompts = [], []
        for top in range(0, hidden.shape[1], step_h):
            row = []
            for left in range(0, hidden.shape[2], step_w):
                window = hidden[b, top:top + step_h, left:left + step_w]
                out, prompt_out = reference_attention(block, window, normed, shallow)
                row.append(out)
                window_prompts.append(prompt_out)
            rows.append(torch.cat(row, dim=1))
        grids.append(torch.cat(rows, dim=0)[:height, :width])
        if shallow and prompts is not None:
            carried = prompts[b] + torch.stack(window_prompts).mean(dim=0)
            new_prompts.append(carried + block.mlp(block.norm2(carried)))
    x = x + torch.stack(grids)
    x = x + block.mlp(block.norm2(x))
    return x, (torch.stack(new_prompts) if new_prompts else None)


def reference_forward(
    encoder: ImageEncoderViT, images: torch.Tensor, prompt_sets: list[torch.Tensor], deep: bool
) -> torch.Tensor:
    """VPT on SAM as specified; ``prompt_sets`` holds (B, T, C) per block (deep) or one set (shallow)."""
    x = encoder.patch_embed(images) + encoder.pos_embed
    carried = None if deep or not prompt_sets else prompt_sets[0]
    for index, block in enumerate(encoder.blocks):
        if deep:
            x, _ = reference_block(block, x, prompt_sets[index] if prompt_sets else None, shallow=False)
        else:
            x, carried = reference_block(block, x, carried, shallow=True)
    return encoder.neck(x.permute(0, 3, 1, 2))


def shared_prompt_sets(model: PromptedSamEncoder, batch: int) -> list[torch.Tensor]:
    if model.prompt_embeddings is None:
        return []
    return [prompts.unsqueeze(0).expand(batch, -1, -1) for prompts in model.prompt_embeddings]


def forward_and_grads(fn, model: PromptedSamEncoder, images: torch.Tensor, target: torch.Tensor):
    """Output and gradients w.r.t. prompt_embeddings and the images of ``(fn(images) * target).sum()``."""
    images = images.clone().requires_grad_(True)
    inputs = [images] + ([model.prompt_embeddings] if model.prompt_embeddings is not None else [])
    out = fn(images)
    grads = torch.autograd.grad((out * target).sum(), inputs)
    return out.detach(), grads


def assert_matches(model: PromptedSamEncoder, images: torch.Tensor, prompt_sets_fn=None) -> None:
    torch.manual_seed(3)
    target = torch.randn(images.shape[0], 8, images.shape[-2] // 16, images.shape[-1] // 16)
    out, grads = forward_and_grads(model, model, images, target)
    sets = shared_prompt_sets(model, images.shape[0]) if prompt_sets_fn is None else prompt_sets_fn()
    ref, ref_grads = forward_and_grads(
        lambda x: reference_forward(model.image_encoder, x, sets, model.deep), model, images, target
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, grad, ref_grad in zip(("images", "prompt_embeddings"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def images_for(img_size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


# --- PromptedSamEncoder ---------------------------------------------------------------------


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_without_tokens_equals_the_package_encoder(grid: str) -> None:
    img_size, _ = GRIDS[grid]
    encoder = tiny_encoder(img_size)
    model = PromptedSamEncoder(encoder, num_tokens=0).eval()
    images = images_for(img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), encoder(images), rtol=1e-5, atol=1e-5)
    assert model.prompt_embeddings is None


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_reference_forward_and_gradients(grid: str, deep: bool) -> None:
    img_size, _ = GRIDS[grid]
    model = PromptedSamEncoder(tiny_encoder(img_size), num_tokens=3, deep=deep).train()
    with torch.no_grad():  # larger than the init, so misplaced prompts show clearly
        model.prompt_embeddings.mul_(20)
    assert_matches(model, images_for(img_size))


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_per_sample_prompts_stay_with_their_sample(deep: bool) -> None:
    """With dropout every sample has its own prompts; each window must get its own sample's."""
    img_size = GRIDS["512_style"][0]
    model = PromptedSamEncoder(tiny_encoder(img_size), num_tokens=3, deep=deep, dropout=0.5).train()
    used: list[torch.Tensor] = []
    draw = model.prompts

    def recording(index: int, batch: int) -> torch.Tensor:
        prompts = draw(index, batch)
        used.append(prompts.detach())
        return prompts

    model.prompts = recording  # type: ignore[method-assign]
    images = images_for(img_size, batch=3)
    out = model(images)
    assert len(used) == (3 if deep else 1)
    assert used[0].shape == (3, 3, 16) and not torch.equal(used[0][0], used[0][1])
    ref = reference_forward(model.image_encoder, images, used, deep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_prompts_change_the_output() -> None:
    img_size = GRIDS["512_style"][0]
    model = PromptedSamEncoder(tiny_encoder(img_size), num_tokens=3).eval()
    images = images_for(img_size)
    with torch.no_grad():
        plain = model.image_encoder(images)
        prompted = model(images)
    assert (plain - prompted).abs().max() > 1e-3


def test_shapes_and_training_surface() -> None:
    encoder = tiny_encoder(64)
    deep = PromptedSamEncoder(encoder, num_tokens=5, deep=True)
    shallow = PromptedSamEncoder(tiny_encoder(64), num_tokens=5, deep=False)
    assert deep.prompt_embeddings.shape == (3, 5, 16)
    assert shallow.prompt_embeddings.shape == (1, 5, 16)
    bound = (6.0 / (3 * 16 * 16 + 16)) ** 0.5
    assert deep.prompt_embeddings.abs().max() <= bound
    assert deep(images_for(64)).shape == (2, 8, 4, 4)
    assert [name for name, p in deep.named_parameters() if p.requires_grad] == ["prompt_embeddings"]
    names = dict(deep.named_parameters())
    assert deep.no_weight_decay() and all(name in names for name in deep.no_weight_decay())
    with pytest.raises(ConfigError, match="model.img_size"):
        deep(images_for(32))
    with pytest.raises(ConfigError, match="ImageEncoderViT"):
        PromptedSamEncoder(torch.nn.Linear(2, 2), num_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_tokens"):
        PromptedSamEncoder(tiny_encoder(64), num_tokens=-1)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_training_changes_only_prompts_and_holds_eval_mode(deep: bool) -> None:
    model = PromptedSamEncoder(tiny_encoder(64), num_tokens=2, deep=deep, dropout=0.1)
    frozen = {key: value.clone() for key, value in model.image_encoder.state_dict().items()}
    prompts_before = model.prompt_embeddings.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    model.train()
    assert model.training and not any(module.training for module in model.image_encoder.modules())
    for _ in range(3):
        optimizer.zero_grad()
        model(images_for(64)).pow(2).mean().backward()
        optimizer.step()
    for key, value in model.image_encoder.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert not torch.equal(model.prompt_embeddings, prompts_before)
    model.eval()
    assert not model.training and not model.image_encoder.training


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    img_size = GRIDS["256_style"][0]
    model = PromptedSamEncoder(tiny_encoder(img_size), num_tokens=2, deep=False).train()
    images = images_for(img_size)
    target = torch.randn(2, 8, 4, 4)
    out, grads = forward_and_grads(model, model, images, target)
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = forward_and_grads(model, model, images, target)
    torch.testing.assert_close(out_ckpt, out)
    for grad, grad_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(grad_ckpt, grad)


# --- build_sam ---------------------------------------------------------------------------------


def test_sam_tiny_trains_end_to_end_through_its_parts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vpt.backbones.sam"):
        sam = build_sam("sam_tiny", pretrained=False, img_size=64)
    assert sum("random-init" in r.getMessage() for r in caplog.records) == 1
    assert sam.prompt_encoder.image_embedding_size == (4, 4)
    assert sam.prompt_encoder.input_image_size == (64, 64)
    encoder = PromptedSamEncoder(sam.image_encoder, num_tokens=2).train()

    image = images_for(64, batch=1)
    embeddings = encoder(image)
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[8.0, 8.0, 40.0, 48.0]]), masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    assert embeddings.shape == (1, 32, 4, 4) and low_res.shape == (1, 1, 16, 16) and iou.shape == (1, 1)
    masks = sam.postprocess_masks(low_res, (64, 64), (64, 64))
    target = torch.zeros_like(masks)
    target[..., 8:48, 8:40] = 1
    F.binary_cross_entropy_with_logits(masks, target).backward()

    assert encoder.prompt_embeddings.grad is not None and encoder.prompt_embeddings.grad.abs().sum() > 0
    assert sam.mask_decoder.output_upscaling[0].weight.grad is not None
    assert all(p.grad is None for p in sam.image_encoder.parameters())


@pytest.mark.parametrize("variant", ["sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"])
def test_variants_follow_img_size(variant: str) -> None:
    with torch.device("meta"):
        sam = build_sam(variant, pretrained=False, img_size=512)
    encoder = sam.image_encoder
    width = {"sam_vit_l": 1024, "sam_vit_h": 1280}.get(variant, 768)
    assert encoder.pos_embed.shape == (1, 32, 32, width)
    global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
    assert len(global_blocks) == 4 and global_blocks[-1] == len(encoder.blocks) - 1
    assert encoder.blocks[global_blocks[0]].attn.rel_pos_h.shape[0] == 63
    assert encoder.blocks[0].attn.rel_pos_h.shape[0] == 27  # window 14, whatever the input
    assert sam.prompt_encoder.image_embedding_size == (32, 32)
    assert sam.image_encoder.img_size == 512


def test_bad_names_sizes_and_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown SAM variant 'sam_vit_x'.*sam_vit_b"):
        build_sam("sam_vit_x", pretrained=False)
    with pytest.raises(ConfigError, match="multiple of its patch size 16"):
        build_sam("sam_tiny", pretrained=False, img_size=100)
    with pytest.raises(ConfigError, match="rejected the arguments.*window_size"):
        build_sam("sam_tiny", pretrained=False, img_size=64, windowsize=3)


@pytest.mark.parametrize(
    ("variant", "filename"), [("sam_vit_b", "sam_vit_b_01ec64.pth"), ("medsam_vit_b", "medsam_vit_b.pth")]
)
def test_pretrained_without_checkpoint_names_model_checkpoint(variant: str, filename: str) -> None:
    with pytest.raises(WeightsUnavailableError, match=rf"model\.checkpoint=/path/{filename}.*model\.pretrained=false"):
        build_sam(variant)
    assert set(SAM_BUILDERS) >= {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "sam_tiny"}


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch",
    [{}, {"encoder_depth": 24, "encoder_global_attn_indexes": (5, 11, 17, 23)}],
    ids=["sam_tiny", "vit_l_layout"],  # in the second, windowed block 15 has a global index's digit
)
def test_checkpoint_at_1024_style_size_loads_at_512_style_size(tmp_path: Path, arch: dict) -> None:
    source = tiny_sam(128, **arch)
    saved = {key: value.clone() for key, value in source.state_dict().items()}
    path = tmp_path / "sam_tiny_128.pth"
    torch.save(saved, path)

    model = tiny_sam(64, **arch)
    report = load_sam_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(saved)
    loaded = model.state_dict()

    pos_embed = loaded["image_encoder.pos_embed"]
    assert pos_embed.shape == (1, 4, 4, 32)
    expected = F.interpolate(saved["image_encoder.pos_embed"].permute(0, 3, 1, 2), (4, 4), mode="bicubic")
    torch.testing.assert_close(pos_embed, expected.permute(0, 2, 3, 1))

    global_indexes = arch.get("encoder_global_attn_indexes", (1, 3))
    for index, block in enumerate(model.image_encoder.blocks):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{index}.attn.rel_pos_{axis}"
            if index in global_indexes:
                assert saved[key].shape == (15, 16) and loaded[key].shape == (7, 16), key
                expected = F.interpolate(saved[key].t()[None], 7, mode="linear")[0].t()
                torch.testing.assert_close(loaded[key], expected)
            else:
                assert block.window_size == 3 and torch.equal(loaded[key], saved[key]), key
    for key, value in saved.items():  # everything else is copied as it is
        if key != "image_encoder.pos_embed" and "rel_pos" not in key:
            assert torch.equal(loaded[key], value), key
    assert model.image_encoder(images_for(64, batch=1)).shape == (1, 32, 4, 4)


def test_safetensors_checkpoint_round_trips_through_build_sam(tmp_path: Path) -> None:
    source = tiny_sam(64)
    path = tmp_path / "sam_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_sam("sam_tiny", checkpoint=path, img_size=64)
    assert model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_with_another_window_size_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "window4.pth"
    torch.save(tiny_sam(64, window_size=4).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.rel_pos_h: checkpoint \(7, 16\) vs model \(5, 16\)"):
        build_sam("sam_tiny", checkpoint=path, img_size=64)


def test_mis_shaped_decoder_key_is_a_checkpoint_error_and_loads_nothing(tmp_path: Path) -> None:
    state = tiny_sam(64).state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = tiny_sam(128)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"mask_decoder\.iou_token\.weight: checkpoint \(1, 8\) vs model \(1, 32\)"):
        load_sam_checkpoint(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": tiny_sam(64).state_dict(), "payload": Payload()}, path)
    _UNPICKLED.clear()
    with pytest.raises(CheckpointError, match="contains pickled Python objects"):
        build_sam("sam_tiny", checkpoint=path, img_size=64)
    assert _UNPICKLED == []


def test_missing_keys_are_a_checkpoint_error_naming_them(tmp_path: Path) -> None:
    state = {key: value for key, value in tiny_sam(64).state_dict().items() if not key.startswith("mask_decoder.")}
    path = tmp_path / "encoder_only.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lacks \d+ of the model's tensors \(mask_decoder\.transformer"):
        build_sam("sam_tiny", checkpoint=path, img_size=64)
