"""No edge artefact: shifting a slice shifts the segmentation the same way, border columns included.

An untrained model on real MR once predicted a lesion stripe along the left edge of every
slice. The cause was zero padding in the decoders' 3x3 convolutions: on normalised inputs
a zero border is a bright frame (MR background is about -2 after the ImageNet mean/std),
and on feature maps it is a value no interior cell has. These tests take content away from
the borders on a uniform background, roll it, and ask for the rolled prediction. A network
that treats its border like its interior passes to float precision; zero padding fails in
the outer columns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vpt
from vpt.heads import PatchTokenDecoder
from vpt.models import build_segmenter

CONFIG_DIR = Path(vpt.__file__).resolve().parent / "configs"
# Equivariance is exact in real arithmetic; in float32 only the order of the sums in
# GroupNorm's statistics and the convolutions changes, ~1e-6 on logits of order 1.
TOLERANCE = 1e-4


def _quickstart_segmenter(size: int, classes: int = 3) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The quickstart network (micro ViT, patch 4, VPT-deep, multi-level decoder with image
    stem), random init, at ``size`` pixels, with its normalisation ``(1, 3, 1, 1)`` each."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", f"model.img_size={size}"])
    torch.manual_seed(0)
    model, data = build_segmenter(cfg, classes)
    # The learned position embedding is the one thing that may tell positions apart; without
    # it a ViT is equivariant to whole-patch shifts (attention does not see token order).
    model.encoder.vit.pos_embed.data.zero_()
    mean, std = (torch.tensor(data[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    return model.eval(), mean, std


def _slice_with_a_central_object(size: int, margin: int, channels: int = 3) -> torch.Tensor:
    """(1, channels, size, size) in [0, 1]: background 0 (as MR and windowed CT), random
    tissue in the centre, ``margin`` pixels clear of every border."""
    generator = torch.Generator().manual_seed(1)
    image = torch.zeros(1, channels, size, size)
    inner = size - 2 * margin
    tissue = torch.rand(1, channels, inner, inner, generator=generator)
    image[..., margin : margin + inner, margin : margin + inner] = tissue
    return image


def _roll(tensor: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    return torch.roll(tensor, shifts=shift, dims=(-2, -1))


@pytest.mark.parametrize("shift", [(0, 8), (0, -8), (8, 0)])
def test_shifted_slice_gives_the_shifted_prediction_border_included(shift: tuple[int, int]) -> None:
    """Quickstart segmenter at 96 px, object 32 px from the borders, shifted by 8 px (two patches,
    which the half-resolution pyramid level also steps in whole cells): every logit, the
    border columns and rows included, is the shifted one."""
    size = 96
    model, mean, std = _quickstart_segmenter(size)
    image = _slice_with_a_central_object(size, margin=32)
    with torch.no_grad():
        logits = model((image - mean) / std)
        shifted = model((_roll(image, shift) - mean) / std)
    expected = _roll(logits, shift)
    difference = (shifted - expected).abs()
    border = torch.zeros(size, size, dtype=torch.bool)
    border[:, :4] = border[:, -4:] = border[:4, :] = border[-4:, :] = True
    assert difference[..., border].max() <= TOLERANCE, f"border logits off by {difference[..., border].max():.3g}"
    assert difference.max() <= TOLERANCE, f"logits off by {difference.max():.3g}"
    # The border of a background slice predicts what the background inside predicts.
    margin_logits = logits[0, 1] - logits[0, 0]
    assert (margin_logits[:, :4] - margin_logits[:, 12:16]).abs().max() <= TOLERANCE


def test_light_decoder_shifts_with_its_tokens() -> None:
    """The light decoder on a 12 x 12 patch grid, uniform tokens with a random 4 x 4 centre,
    shifted by one cell: the logits (4 cells each) shift by 4, border included."""
    torch.manual_seed(0)
    decoder = PatchTokenDecoder(embed_dim=16, num_classes=3, hidden_dim=32).eval()
    grid = torch.full((1, 16, 12, 12), 0.3)
    grid[..., 4:8, 4:8] = torch.randn(1, 16, 4, 4)

    def decode(cells: torch.Tensor) -> torch.Tensor:
        return decoder(cells.flatten(2).transpose(1, 2), (12, 12))

    with torch.no_grad():
        logits, shifted = decode(grid), decode(_roll(grid, (0, 1)))
    assert (shifted - _roll(logits, (0, 4))).abs().max() <= TOLERANCE
