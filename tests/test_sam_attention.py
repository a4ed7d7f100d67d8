"""SAM attention with the relative-position bias folded into queries and keys.

``PromptedSamEncoder(attention="folded")`` (the default) must compute what the dense-bias
reference (``attention="bias"``) and segment-anything's own ``ImageEncoderViT.forward``
compute, forward and backward, and must do it without any (L, L) tensor. The encoders are
tiny, random, in float64 (so the tolerance can be 1e-10), with randomised position tables,
and their grids are chosen so that some windows pad the grid and some divide it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.test_sam import tiny_encoder as sam_tiny_encoder
from vpt.errors import ConfigError
from vpt.prompts.sam import PromptedSamEncoder

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}

# name -> ImageEncoderViT arguments. Windows of 3 pad grids of 4 and 8 and divide 6; a
# window of 4 on a grid of 4 is one window. Head widths 16 and 24.
ENCODERS = {
    "grid4_window3_padded": {"img_size": 32, "patch_size": 8, "window_size": 3, "global_attn_indexes": (1,)},
    "grid6_window3_divides": {"img_size": 48, "patch_size": 8, "window_size": 3, "global_attn_indexes": (1, 3)},
    "grid8_window3_padded_wide": {
        "img_size": 64, "patch_size": 8, "window_size": 3, "global_attn_indexes": (2,), "embed_dim": 48,
    },
    "grid4_patch16_one_window": {"img_size": 64, "patch_size": 16, "window_size": 4, "global_attn_indexes": (3,)},
}

# name -> (deep, dropout): prompts shared by the batch (no dropout) or drawn per sample.
PROMPTS = {
    "deep_shared": (True, 0.0),
    "shallow_shared": (False, 0.0),
    "deep_per_sample": (True, 0.3),
    "shallow_per_sample": (False, 0.3),
}


def tiny_encoder(
    img_size: int,
    patch_size: int,
    window_size: int,
    global_attn_indexes: tuple[int, ...],
    embed_dim: int = 32,
    depth: int = 4,
) -> ImageEncoderViT:
    """A random float64 SAM encoder, 2 heads, with random position embedding and rel-pos tables
    (the package initialises both to zero, which would hide a misplaced bias)."""
    encoder = sam_tiny_encoder(
        img_size, window_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        global_attn_indexes=global_attn_indexes, position_seed=1,
    )
    return encoder.double()


def train_rel_pos_tables(encoder: ImageEncoderViT) -> list[torch.nn.Parameter]:
    """Unfreeze the rel-pos tables (as the ``full`` method trains them); returns them in block order."""
    tables = [parameter for name, parameter in encoder.named_parameters() if "rel_pos" in name]
    for table in tables:
        table.requires_grad_(True)
    return tables


def images_for(img_size: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, img_size, img_size, generator=generator, dtype=torch.float64)


def output_and_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, inputs: list[torch.Tensor], seed: int = 5
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``forward(images)`` and the gradients of a random projection of it w.r.t. the images and ``inputs``.

    The seed is set before the forward, so prompt dropout draws the same masks each call.
    """
    images = images.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = forward(images)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * target).sum(), [images, *inputs])
    return out.detach(), list(grads)


def assert_same(
    out: torch.Tensor, grads: list[torch.Tensor], ref: torch.Tensor, ref_grads: list[torch.Tensor], names: list[str]
) -> None:
    torch.testing.assert_close(out, ref, **TOLERANCE, msg=lambda m: f"output: {m}")
    assert len(grads) == len(ref_grads) == len(names)
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert ref_grad.abs().max() > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


# --- the same numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["folded", "bias"])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_without_prompts_equals_segment_anything_forward_and_gradients(name: str, attention: str) -> None:
    encoder = tiny_encoder(**ENCODERS[name])
    model = PromptedSamEncoder(encoder, num_tokens=0, attention=attention).eval()
    tables = train_rel_pos_tables(encoder)
    images = images_for(encoder.img_size)

    out, grads = output_and_gradients(model, images, tables)
    ref, ref_grads = output_and_gradients(encoder, images, tables)
    names = ["images"] + [n for n, p in encoder.named_parameters() if "rel_pos" in n]
    assert_same(out, grads, ref, ref_grads, names)


@pytest.mark.parametrize("prompts", sorted(PROMPTS))
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_folded_equals_dense_bias_forward_and_gradients(name: str, prompts: str) -> None:
    deep, dropout = PROMPTS[prompts]
    encoder = tiny_encoder(**ENCODERS[name])
    folded = PromptedSamEncoder(encoder, num_tokens=3, deep=deep, dropout=dropout).double().train()
    dense = PromptedSamEncoder(encoder, num_tokens=3, deep=deep, dropout=dropout, attention="bias").double().train()
    assert folded.attention == "folded" and dense.attention == "bias"
    with torch.no_grad():  # larger than the init, so prompts that take a bias, or miss a scale, show clearly
        folded.prompt_embeddings.mul_(20)
    dense.load_state_dict(folded.state_dict())
    tables = train_rel_pos_tables(encoder)
    images = images_for(encoder.img_size)

    out, grads = output_and_gradients(folded, images, [folded.prompt_embeddings, *tables])
    ref, ref_grads = output_and_gradients(dense, images, [dense.prompt_embeddings, *tables])
    names = ["images", "prompt_embeddings"] + [n for n, p in encoder.named_parameters() if "rel_pos" in n]
    assert_same(out, grads, ref, ref_grads, names)

    if dropout > 0:  # the masks really differ per sample, so (B, T, C) prompts were exercised
        torch.manual_seed(5)
        drawn = folded.prompts(0, 2)
        assert drawn.shape[0] == 2 and not torch.equal(drawn[0], drawn[1])


def test_folded_gradients_reach_every_trained_encoder_weight() -> None:
    """With the whole encoder trained (method ``full``), every weight's gradient is the reference's."""
    encoder = tiny_encoder(**ENCODERS["grid8_window3_padded_wide"])
    folded = PromptedSamEncoder(encoder, num_tokens=2, deep=False, backbone_eval=False).double().train()
    dense = PromptedSamEncoder(encoder, num_tokens=2, deep=False, backbone_eval=False, attention="bias").double().train()
    dense.load_state_dict(folded.state_dict())
    encoder.requires_grad_(True)
    names = [name for name, parameter in folded.named_parameters() if parameter.requires_grad]
    assert len(names) > 20 and "prompt_embeddings" in names
    images = images_for(encoder.img_size)

    out, grads = output_and_gradients(folded, images, [folded.get_parameter(name) for name in names])
    ref, ref_grads = output_and_gradients(dense, images, [dense.get_parameter(name) for name in names])
    assert_same(out, grads, ref, ref_grads, ["images", *names])


# --- no (L, L) tensor --------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op, self.shape = tensor.numel(), str(func), tuple(tensor.shape)
        return out


# name -> (encoder arguments, number of attention windows per image). The grid is 16 x 16, so
# L * L is larger than the images or any activation; windows of 12 pad it to 2 x 2 windows.
LARGE_GRIDS = {
    "global": ({"img_size": 128, "patch_size": 8, "window_size": 0, "global_attn_indexes": (), "depth": 2}, 1),
    "windowed": ({"img_size": 128, "patch_size": 8, "window_size": 12, "global_attn_indexes": (), "depth": 2}, 4),
}


@pytest.mark.parametrize(
    ("prompts", "checkpointing"),
    [("none", False), ("deep", False), ("shallow", False), ("deep", True)],
    ids=["no_prompts", "deep", "shallow", "deep_checkpointed"],
)
@pytest.mark.parametrize("grid", sorted(LARGE_GRIDS))
def test_folded_attention_has_no_mask_and_no_length_squared_tensor(
    grid: str, prompts: str, checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments, windows = LARGE_GRIDS[grid]
    encoder = tiny_encoder(**arguments)
    batch, heads = 2, 2
    side = arguments["window_size"] or arguments["img_size"] // arguments["patch_size"]
    # One (heads, L, L) score matrix per attention window of the batch: what a dense bias costs.
    length_squared = batch * windows * heads * side**4
    images = images_for(encoder.img_size, batch=batch)
    assert images.numel() < length_squared / 2, "the grid is too small for the check to mean anything"

    masks: list[object] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args: object, **kwargs: object) -> torch.Tensor:
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)

    def largest_tensors(attention: str) -> tuple[LargestTensor, int]:
        tokens = 0 if prompts == "none" else 4
        model = PromptedSamEncoder(encoder, num_tokens=tokens, deep=prompts != "shallow", attention=attention).double().train()
        model.set_grad_checkpointing(checkpointing)
        train_rel_pos_tables(encoder)
        saved: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        masks.clear()
        with LargestTensor() as largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(images.clone().requires_grad_(True)).square().sum().backward()
        assert masks, "scaled_dot_product_attention was not called"
        return largest, max(saved)

    folded, folded_saved = largest_tensors("folded")
    assert all(mask is None for mask in masks), "the folded path passed an attention mask"
    assert folded.numel < length_squared, f"{folded.op} made a {folded.shape} tensor, an (L, L) one"
    assert folded_saved < length_squared, "autograd saved an (L, L) tensor"

    # The dense-bias reference does make one: the check above would see it.
    dense, dense_saved = largest_tensors("bias")
    assert any(mask is not None for mask in masks)
    assert dense.numel >= length_squared
    if not checkpointing:  # checkpoint keeps what the blocks save behind its own hooks
        assert dense_saved >= length_squared


# --- the switch ------------------------------------------------------------------------------------


def test_unknown_attention_form_is_a_config_error() -> None:
    encoder = tiny_encoder(**ENCODERS["grid4_window3_padded"])
    with pytest.raises(ConfigError, match="attention must be one of.*got 'dense'.*attention='folded'"):
        PromptedSamEncoder(encoder, num_tokens=2, attention="dense")
