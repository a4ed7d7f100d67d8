"""Segmentation quality features: multi-level decoder, 2.5D context, native resolution with tiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.test_training import compose_config, run_cli
from vpt import apply_method
from vpt.data.medical import VolumeSegmentationDataModule
from vpt.data.medical.io import write_volume
from vpt.data.medical.slicing import SliceGeometry, context_indices, context_stack, tile_origins
from vpt.errors import ConfigError
from vpt.heads import MultiLevelDecoder, PatchTokenDecoder, evenly_spaced_blocks
from vpt.inference.tiling import slice_logits, to_original_grid
from vpt.models import build_segmenter
from vpt.models.segmenters import VitSegmenter
from vpt.tasks import build_task


def _vit(img_size, patch: int, depth: int = 4, prefix_tokens: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch, embed_dim=48, depth=depth,
        num_heads=2, num_classes=0, reg_tokens=prefix_tokens - 1,
    )


# -- multi-level decoder ----------------------------------------------------------------------


def test_evenly_spaced_blocks_read_the_last_block_and_spread_the_rest() -> None:
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_blocks(6, 2) == [2, 5]
    with pytest.raises(ConfigError, match="decoder_levels"):
        evenly_spaced_blocks(4, 5)


@pytest.mark.parametrize(
    "img_size, patch, method",
    [((42, 70), 14, "vpt_deep"), ((40, 56), 8, "vpt_shallow"), ((36, 36), 4, "lora"), ((56, 56), 8, "linear")],
)
def test_multilevel_segmenter_gives_logits_at_odd_input_sizes(img_size, patch, method) -> None:
    """Grids of 3x5, 5x7, 9x9 and 7x7 patches (odd, non-square): logits at the input size."""
    vit = _vit(img_size, patch)
    options = {"num_tokens": 3} if method.startswith("vpt") else {}
    encoder = apply_method(vit, method, **options)
    decoder = MultiLevelDecoder(48, 5, evenly_spaced_blocks(4, 4), hidden_dim=16, stem_dim=8)
    model = VitSegmenter(encoder, decoder)
    images = torch.randn(2, 3, *img_size)
    logits = model(images)
    assert logits.shape == (2, 5, *img_size)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in decoder.parameters())


@pytest.mark.parametrize("deep", [True, False])
def test_decoder_sees_patch_grids_only_never_prompts(deep: bool) -> None:
    """The grids the decoder gets are the blocks' patch tokens (prefix and prompts removed),
    equal to a plain reference run of the blocks with prompts concatenated."""
    vit = _vit((24, 32), 8, depth=4, prefix_tokens=2)  # a class token and a register token
    encoder = apply_method(vit, "vpt_deep" if deep else "vpt_shallow", num_tokens=5)
    encoder.eval()
    images = torch.randn(2, 3, 24, 32)
    seen: list[torch.Tensor] = []
    decoder = MultiLevelDecoder(48, 3, [1, 3], hidden_dim=8, stem_dim=4)
    decoder.register_forward_pre_hook(lambda module, args: seen.extend(args[0]))
    VitSegmenter(encoder, decoder).eval()(images)
    assert [tuple(grid.shape) for grid in seen] == [(2, 48, 3, 4)] * 2

    # Reference: the naive prompt insertion, block by block, prompts and prefix sliced off.
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        prefix, tokens = vit.num_prefix_tokens, 5
        expected = []
        if not deep:
            x = torch.cat([x[:, :prefix], encoder.prompt_embeddings[0].expand(2, -1, -1), x[:, prefix:]], dim=1)
        for index, block in enumerate(vit.blocks):
            if deep:
                joined = torch.cat([x[:, :prefix], encoder.prompt_embeddings[index].expand(2, -1, -1), x[:, prefix:]], dim=1)
                x = torch.cat([block(joined)[:, :prefix], block(joined)[:, prefix + tokens :]], dim=1)
                patches = x[:, prefix:]
            else:
                x = block(x)
                patches = x[:, prefix + tokens :]
            if index in (1, 3):
                expected.append(patches.transpose(1, 2).reshape(2, 48, 3, 4))
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_light_decoder_is_kept_and_multilevel_is_the_default() -> None:
    base = ["experiment=quickstart"]
    model, _ = build_segmenter(compose_config(base), 4)
    assert isinstance(model.decoder, MultiLevelDecoder)
    assert model.decoder.blocks == evenly_spaced_blocks(4, 4)
    light, _ = build_segmenter(compose_config([*base, "task.decoder=light"]), 4)
    assert isinstance(light.decoder, PatchTokenDecoder)
    with pytest.raises(ConfigError, match="task.decoder"):
        build_segmenter(compose_config([*base, "task.decoder=unet"]), 4)
    # A run folder's config from before the key existed (config_version 1): migrated explicitly
    # to the light decoder its weights belong to; a current config without the key is refused.
    from vpt.config_version import CONFIG_VERSION, migrate_run_config

    old_run = compose_config(base)
    OmegaConf.set_struct(old_run, False)
    del old_run.task["decoder"]
    del old_run["config_version"]
    migrated = migrate_run_config(old_run, "old/config.yaml")
    assert migrated.config_version == CONFIG_VERSION and "decoder" not in old_run.task
    assert isinstance(build_segmenter(migrated, 4)[0].decoder, PatchTokenDecoder)
    current = compose_config(base)
    assert current.config_version == CONFIG_VERSION
    assert isinstance(build_segmenter(migrate_run_config(current, "new/config.yaml"), 4)[0].decoder, MultiLevelDecoder)
    old_run.config_version = CONFIG_VERSION
    with pytest.raises(ConfigError, match="task.decoder is not set"):
        build_segmenter(old_run, 4)
    old_run.config_version = CONFIG_VERSION + 1
    with pytest.raises(ConfigError, match="newer vpt"):
        migrate_run_config(old_run, "future/config.yaml")


# -- 2.5D context -----------------------------------------------------------------------------


def test_context_indices_clamp_at_the_edges() -> None:
    assert context_indices(0, 5, 1) == [0, 0, 1]
    assert context_indices(2, 5, 1) == [1, 2, 3]
    assert context_indices(4, 5, 1) == [3, 4, 4]
    assert context_indices(3, 5, 0) == [3]
    assert context_indices(0, 1, 1) == [0, 0, 0]
    volume = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    assert context_stack(volume, 4, 1)[0, 0].tolist() == [3.0, 4.0, 4.0]
    assert context_stack(volume, 4, 0).shape == (2, 3)
    with pytest.raises(ConfigError, match="context_slices"):
        SliceGeometry.from_options((32, 32), context_slices=2)


def _write_ramp_dataset(root: Path, cases: int = 4, depth: int = 6, side: int = 16) -> None:
    """nnU-Net cases whose slice z has intensity z (so a channel names its slice) and whose
    label of slice z is a square of class 1 + z % 3 (so a mask names its slice too)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in range(cases):
        image = np.repeat(np.arange(depth, dtype=np.float32)[:, None, None], side, 1).repeat(side, 2)
        label = np.zeros((depth, side, side), np.uint8)
        for z in range(depth):
            label[z, 4:12, 4:12] = 1 + z % 3
        write_volume(root / "imagesTr" / f"case_{case:03d}_0000.nii.gz", image, spacing=(2.0, 1.0, 1.0))
        write_volume(root / "labelsTr" / f"case_{case:03d}.nii.gz", label, spacing=(2.0, 1.0, 1.0))
    names = {"background": 0, "a": 1, "b": 2, "c": 3}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": names, "numTraining": cases, "file_ending": ".nii.gz",
    }))


@pytest.mark.parametrize("cache", [True, False])
def test_context_channels_are_the_neighbours_and_match_the_mask(tmp_path, cache: bool) -> None:
    _write_ramp_dataset(tmp_path / "ramp")
    datamodule = VolumeSegmentationDataModule(
        tmp_path / "ramp", layout="nnunet", image_size=16, window=(0.0, 5.0), mean=(0, 0, 0), std=(1, 1, 1),
        augment=False, val_fraction=0.25, test_fraction=0.25, context_slices=1, empty_slice_fraction=1.0,
        cache=cache, cache_dir=tmp_path / "cache",
    )
    datamodule.setup()
    dataset = datamodule.dataset("train")
    seen = set()
    for item in dataset:
        z = int(item["slice"])
        channels = [round(float(item["image"][c, 8, 8]) * 5) for c in range(3)]
        assert channels == [max(z - 1, 0), z, min(z + 1, 5)]
        assert int(item["mask"][8, 8]) == 1 + z % 3  # the mask is the middle channel's slice
        seen.add(z)
    assert seen == set(range(6))
    test_item = datamodule.volume_dataset("test")[0]
    assert test_item["image"].shape == (6, 3, 16, 16)
    planes = (test_item["image"][:, :, 8, 8] * 5).round().tolist()
    assert planes == [[max(z - 1, 0), z, min(z + 1, 5)] for z in range(6)]


def test_without_context_every_channel_is_the_slice(tmp_path) -> None:
    _write_ramp_dataset(tmp_path / "ramp")
    datamodule = VolumeSegmentationDataModule(
        tmp_path / "ramp", layout="nnunet", image_size=16, window=(0.0, 5.0), mean=(0, 0, 0), std=(1, 1, 1),
        augment=False, val_fraction=0.25, test_fraction=0.25, context_slices=0, empty_slice_fraction=1.0,
        cache_dir=tmp_path / "cache",
    )
    datamodule.setup()
    for item in datamodule.dataset("train"):
        assert [round(float(item["image"][c, 8, 8]) * 5) for c in range(3)] == [int(item["slice"])] * 3


# -- native resolution: resampling and tiles ---------------------------------------------------


def test_tile_origins_cover_the_slice() -> None:
    assert tile_origins(32, 32) == [0]
    assert tile_origins(20, 32) == [0]
    assert tile_origins(70, 32) == [0, 32, 38]
    assert tile_origins(64, 32) == [0, 32]


def test_resampling_round_trip_keeps_labels_aligned() -> None:
    """Labels taken to a coarser (and a finer) pixel size and their logits brought back to
    the original grid land where they were: per-organ centroids within a pixel, Dice > 0.9."""
    rng = np.random.default_rng(0)
    label = np.zeros((75, 90), np.uint8)
    label[10:40, 12:30] = 1
    label[50:70, 40:85] = 2
    label[20:30, 60:66] = 3  # small: 10 x 6 pixels
    for target in (1.6, 0.5):
        geometry = SliceGeometry.from_options((32, 32), spacing=target)
        resampled = geometry.network_label(label, (0.8, 0.8))
        valid = geometry.resampled_size(label.shape, (0.8, 0.8))
        assert valid == (round(75 * 0.8 / target), round(90 * 0.8 / target))
        logits = torch.from_numpy(np.eye(4, dtype=np.float32)[resampled]).permute(2, 0, 1)[None]
        logits = logits + 0.01 * torch.from_numpy(rng.standard_normal(logits.shape).astype(np.float32))
        back = to_original_grid(logits, label.shape, valid).argmax(1)[0].numpy()
        assert back.shape == label.shape
        for organ in (1, 2, 3):
            truth, got = np.argwhere(label == organ), np.argwhere(back == organ)
            assert np.abs(truth.mean(0) - got.mean(0)).max() < 1.0, (target, organ)
            dice = 2 * ((label == organ) & (back == organ)).sum() / ((label == organ).sum() + (back == organ).sum())
            assert dice > 0.9, (target, organ, dice)
        # The image goes through the same grid as its label.
        image = geometry.network_plane(label.astype(np.float32), (0.8, 0.8))
        assert image.shape == resampled.shape
        assert (np.abs(image - resampled) < 0.5).mean() > 0.95


class _PixelModel(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel only, so tiles blended with
    any weights equal the whole-slice forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def test_tiles_reproduce_the_whole_slice_forward() -> None:
    model = _PixelModel()
    geometry = SliceGeometry.from_options((16, 16), patch_size=16, tile_overlap=0.5)
    slices = torch.randn(3, 3, 40, 52)  # 2.5 x 3.25 tiles
    tiled = slice_logits(model, slices, geometry, batch_size=4)
    assert tiled.shape == (3, 4, 40, 52)
    torch.testing.assert_close(tiled, model(slices), rtol=1e-5, atol=1e-5)
    # A slice of exactly one tile: tiled prediction is the plain forward.
    one = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(slice_logits(model, one, geometry, 4), model(one), rtol=1e-6, atol=1e-6)
    # Tiles larger than the model's input: each is resized to the model and its logits back
    # (lossless for an image constant per channel).
    wide = SliceGeometry.from_options((8, 8), patch_size=16)
    flat = torch.randn(2, 3, 1, 1).expand(2, 3, 40, 40)
    torch.testing.assert_close(slice_logits(model, flat, wide, 4), model(flat), rtol=1e-5, atol=1e-5)


def test_tiles_blend_a_real_segmenter_where_the_tiles_agree() -> None:
    """A ViT segmenter on a slice of one tile: tiled = whole; on a larger slice, the blended
    logits inside each tile's centre equal that tile's own forward (weights normalised)."""
    vit = _vit((16, 16), 4)
    model = VitSegmenter(apply_method(vit, "vpt_deep", num_tokens=2), MultiLevelDecoder(48, 3, [1, 3], 8, 4)).eval()
    geometry = SliceGeometry.from_options((16, 16), patch_size=16, tile_overlap=0.0)
    with torch.no_grad():
        slices = torch.randn(1, 3, 32, 32)
        tiled = slice_logits(model, slices, geometry, batch_size=4)
        for top in (0, 16):
            for left in (0, 16):
                tile = slices[..., top : top + 16, left : left + 16]
                torch.testing.assert_close(tiled[..., top : top + 16, left : left + 16], model(tile), rtol=1e-4, atol=1e-5)


def test_spacing_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="task.data.spacing"):
        SliceGeometry.from_options((32, 32), spacing=[1.0, 0.0])
    with pytest.raises(ConfigError, match="task.data.patch_size"):
        SliceGeometry.from_options((32, 32), patch_size=4)
    with pytest.raises(ConfigError, match="tile_overlap"):
        SliceGeometry.from_options((32, 32), patch_size=32, tile_overlap=1.0)
    geometry = SliceGeometry.from_options((32, 32), spacing=1.5)
    assert geometry.tiled and geometry.patch_size == (32, 32) and geometry.spacing == (1.5, 1.5)
    assert not SliceGeometry.from_options((32, 32)).tiled


def test_tiled_datamodule_crops_trains_and_tiles_validation(tmp_path) -> None:
    _write_ramp_dataset(tmp_path / "ramp", side=30)
    datamodule = VolumeSegmentationDataModule(
        tmp_path / "ramp", layout="nnunet", image_size=16, window=(0.0, 5.0), val_fraction=0.25,
        test_fraction=0.25, context_slices=1, spacing=0.5, patch_size=24, empty_slice_fraction=1.0,
        cache_dir=tmp_path / "cache",
    )
    datamodule.setup()
    train_item = datamodule.dataset("train", train=True)[0]
    assert train_item["image"].shape == (3, 16, 16) and train_item["mask"].shape == (16, 16)
    val = datamodule.dataset("val")
    # 30 px at 1 mm -> 60 px at 0.5 mm -> tiles of 24 at 0, 24, 36 per axis: 9 per slice.
    assert len(val) == 6 * 9
    test_item = datamodule.volume_dataset("test")[0]
    assert test_item["image"].shape == (6, 3, 60, 60)
    assert test_item["valid_size"].tolist() == [60, 60]


# -- the CLI on phantoms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["task.decoder=light", "task.data.context_slices=0"],
        ["task.decoder=multilevel"],
        ["task.decoder=multilevel", "task.data.spacing=1.6", "task.data.patch_size=32"],
    ],
    ids=["light-2d", "multilevel-2.5d", "multilevel-tiles"],
)
def test_cli_trains_and_scores_phantoms_with_each_decoder(tmp_path, options) -> None:
    run = run_cli(
        [
            "experiment=quickstart", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "num_preview_images=1",
            f"task.data.root={tmp_path / 'phantoms'}", f"hydra.run.dir={tmp_path / 'run'}", *options,
        ],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    import nibabel as nib

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # The decoder the option named is the one trained and saved.
    decoder = options[0].split("=")[1]
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").task.decoder == decoder
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(key.startswith("model.decoder.reassemble.") for key in state) == (decoder == "multilevel")
    # Scored on each held-out case's own label volume at its own grid (tiles and resampling undone):
    # every organ's target voxels are those of the label file.
    cases = metrics["test/cases"]
    assert cases
    for case, organs in cases.items():
        label = np.asarray(nib.load(tmp_path / "phantoms" / "labelsTr" / f"{case}.nii.gz").dataobj)
        assert {int(k): v["target_voxels"] for k, v in organs.items()} == {
            value: int((label == value).sum()) for value in range(1, len(organs) + 1)
        }
        assert sum(v["pred_voxels"] for v in organs.values()) <= label.size
    # The headline Dice is the mean of the organs' Dice.
    organ_dice = [v["dice"] for v in metrics["test/per_organ"].values() if v["dice"] is not None and not math.isnan(v["dice"])]
    assert metrics["test/dice"] == pytest.approx(sum(organ_dice) / len(organ_dice), abs=1e-6)
    assert (tmp_path / "run" / "test_overlays.png").is_file()


def test_predict_uses_the_test_pipeline_with_context_spacing_and_tiles(tmp_path) -> None:
    """A run trained at 1.6 mm on 32 px tiles with 2.5D context: ``vpt-predict`` on a test
    case's file writes the labels and probabilities testing computes for that case (same
    context, resampling, tiles and return to the original grid)."""
    import SimpleITK as sitk

    from vpt.cli.train import train
    from vpt.inference import load_run, predict
    from vpt.inference.tiling import slice_logits, to_original_grid

    cfg = compose_config([
        "experiment=quickstart", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "num_preview_images=0",
        f"task.data.root={tmp_path / 'phantoms'}", "task.data.spacing=1.6", "task.data.patch_size=32",
        "task.data.cache=false",  # test volumes read in float32 from the files, as vpt-predict reads them
    ])
    train(cfg, run_dir=tmp_path / "run")
    run = load_run(run_dir=tmp_path / "run", device="cpu")
    datamodule = build_task(run.config).datamodule  # the training pipeline, as testing used it
    assert datamodule.geometry.tiled and datamodule.geometry.context_slices == 1
    datamodule.setup()
    case = datamodule.cases("test")[0]
    item = datamodule.volume_dataset("test")[0]
    # 96 px at 0.8 mm -> 48 px at 1.6 mm: tiles of 32 overlap; the label stays at 96.
    assert item["image"].shape[-2:] == (48, 48) and item["label"].shape[-2:] == (96, 96)

    predict(case.image, tmp_path / "out", run_dir=tmp_path / "run", device="cpu", save_probabilities=True, progress=False)
    name = case.image.name
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / name)))
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / name.replace(".nii.gz", "_probabilities.nii.gz"))))

    module = run.parts.module.eval()
    valid = tuple(item["valid_size"].tolist())
    expected = module.predict_volume(item["image"], (96, 96), valid).numpy()
    np.testing.assert_array_equal(labels, expected)
    with torch.no_grad():
        logits = slice_logits(module.model, item["image"], datamodule.geometry, 8)
        reference = to_original_grid(logits, (96, 96), valid).softmax(1).permute(0, 2, 3, 1).numpy()
    assert reference[..., 0].std() > 1e-3
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
