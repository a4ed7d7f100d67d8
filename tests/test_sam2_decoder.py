"""SAM2's own mask decoder on Hiera (``task.decoder=sam2``, issue 16).

The official checkpoint layout is not guessed here: ``tests/data/sam2_decoder_keys.json``
lists the names and shapes the ``sam2`` package (1.1.0) gives the neck, prompt encoder, mask
decoder and ``no_mem_embed`` of a SAM2.1 model whose trunk has the widths of
``model=sam2_hiera_micro``. The tests write checkpoints with those names and random values.

The wiring SAM2's image predictor does (FPN with top-down only into the stride-16 level,
the stride-32 level dropped, ``conv_s0``/``conv_s1`` on the stride-4/8 levels, ``no_mem_embed``
on the stride-16 map, random-Fourier positions at cell centres) is written out plainly
in :func:`reference_logits` from the official tensors; the two-way transformer and mask head are
transformers' own ``Sam2MaskDecoder.forward``, whose mask tokens 0-3 are our classes 0-3.
When the ``sam2`` package is importable, the decoder is also compared with it directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.models.hieradet_sam2 import HieraDet

from vpt.errors import CheckpointError, ConfigError
from vpt.heads.sam2_decoder import Sam2DecoderParts, Sam2MulticlassDecoder, sam2_decoder_state

REPO = Path(__file__).resolve().parents[1]
KEYS: dict[str, list[int]] = json.loads((REPO / "tests" / "data" / "sam2_decoder_keys.json").read_text())["keys"]
WIDTHS = [16, 32, 64, 128]  # model=sam2_hiera_micro's stages


def official_decoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under SAM2's own names and shapes (norm weights near 1, so the forward is tame)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in KEYS.items():
        tensor = 0.1 * torch.randn(*shape, generator=generator)
        if ("norm" in key or "output_upscaling.1" in key or "mask_downscaling.1" in key or "mask_downscaling.4" in key) and key.endswith("weight"):
            tensor = tensor + 1.0
        state[key] = tensor
    return state


def loaded_parts(state: dict[str, torch.Tensor], image_size: int = 64) -> Sam2DecoderParts:
    parts = Sam2DecoderParts(WIDTHS, image_size=image_size)
    parts.load_official({"model": state}, source="test")
    return parts.double()


def stage_grids(batch: int = 2, size: int = 64, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, width, size // stride, size // stride, generator=generator, dtype=torch.float64)
        for width, stride in zip(WIDTHS, (4, 8, 16, 32))
    ]


def reference_positions(gaussian: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SAM2's random-Fourier encoding of each grid cell's centre, written out cell by cell: (C, h, w)."""
    position = torch.empty(2 * gaussian.shape[1], height, width, dtype=torch.float64)
    for row in range(height):
        for col in range(width):
            xy = torch.tensor([(col + 0.5) / width, (row + 0.5) / height], dtype=torch.float64)
            angles = 2 * math.pi * ((2 * xy - 1) @ gaussian)
            position[:, row, col] = torch.cat([angles.sin(), angles.cos()])
    return position


def reference_logits(state: dict[str, torch.Tensor], parts: Sam2DecoderParts, grids: list[torch.Tensor]) -> torch.Tensor:
    """SAM2's image-predictor wiring written out, then transformers' decoder forward for tokens 0-3."""
    official = {key: tensor.double() for key, tensor in state.items()}

    def lateral(level: int) -> torch.Tensor:  # convs.0 reads the coarsest stage
        index = 3 - level
        return F.conv2d(grids[level], official[f"image_encoder.neck.convs.{index}.conv.weight"], official[f"image_encoder.neck.convs.{index}.conv.bias"])

    stride32 = lateral(3)
    # SAM2 upsamples the top-down path in float32 (so does transformers' neck).
    stride16 = lateral(2) + F.interpolate(stride32.float(), scale_factor=2.0, mode="nearest").double()
    stride8, stride4 = lateral(1), lateral(0)  # no top-down into levels 0 and 1 (fpn_top_down_levels=[2, 3])
    high_s0 = F.conv2d(stride4, official["sam_mask_decoder.conv_s0.weight"], official["sam_mask_decoder.conv_s0.bias"])
    high_s1 = F.conv2d(stride8, official["sam_mask_decoder.conv_s1.weight"], official["sam_mask_decoder.conv_s1.bias"])
    embedding = stride16 + official["no_mem_embed"].reshape(1, -1, 1, 1)
    batch, channels, height, width = embedding.shape

    gaussian = official["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    position = reference_positions(gaussian, height, width)
    dense = official["sam_prompt_encoder.no_mask_embed.weight"].reshape(1, -1, 1, 1).expand(batch, -1, height, width)
    sparse = torch.zeros(batch, 1, 0, channels, dtype=torch.float64)

    decoder = parts.mask_decoder.train()  # training mode: no stability-based mask choice
    common = dict(
        image_embeddings=embedding, image_positional_embeddings=position.unsqueeze(0).expand(batch, -1, -1, -1),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, high_resolution_features=[high_s0, high_s1],
    )
    single = decoder(multimask_output=False, **common)[0][:, 0]  # mask token 0
    multi = decoder(multimask_output=True, **common)[0][:, 0]  # mask tokens 1-3
    return torch.cat([single, multi], dim=1)


def test_every_official_decoder_tensor_loads_into_its_own_place() -> None:
    state = official_decoder_state()
    outside = {"image_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(3), "memory_encoder.out_proj.weight": torch.zeros(2)}
    parts_state, ignored = sam2_decoder_state({"model": {**state, **outside}})
    assert sorted(ignored) == sorted(outside)

    parts = Sam2DecoderParts(WIDTHS, image_size=64)
    report = parts.load_official({"model": {**state, **outside}}, source="test")
    assert report.missing == [] and report.unexpected == []
    own = parts.state_dict()
    assert set(own) == set(parts_state)
    # Random values are distinct, so each official tensor must be found in exactly one place.
    for key, tensor in state.items():
        if ".point_embeddings." in key:
            continue
        places = [name for name, value in own.items() if value.shape == tensor.shape and torch.equal(value, tensor)]
        assert len(places) == 1, (key, places)
    rows = torch.cat([state[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    assert torch.equal(own["prompt_encoder.point_embed.weight"], rows)
    # Names whose meaning matters, spelled out (a swap of two same-shaped tensors would pass above).
    for official_key, ours in {
        "sam_mask_decoder.transformer.layers.1.norm3.weight": "mask_decoder.transformer.layers.1.layer_norm3.weight",
        "sam_mask_decoder.transformer.layers.0.self_attn.out_proj.weight": "mask_decoder.transformer.layers.0.self_attn.o_proj.weight",
        "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight": "mask_decoder.transformer.layers.0.mlp.proj_out.weight",
        "sam_mask_decoder.output_hypernetworks_mlps.2.layers.1.weight": "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
        "sam_mask_decoder.output_hypernetworks_mlps.2.layers.2.bias": "mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",
        "sam_mask_decoder.output_upscaling.3.weight": "mask_decoder.upscale_conv2.weight",
        "sam_prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
        "image_encoder.neck.convs.3.conv.weight": "neck.convs.3.weight",
    }.items():
        assert torch.equal(own[ours], state[official_key]), official_key


def test_wrong_or_incomplete_decoder_checkpoints_are_refused() -> None:
    state = official_decoder_state()
    state["sam_mask_decoder.conv_s0.weight"] = torch.zeros(32, 255, 1, 1)
    with pytest.raises(CheckpointError, match=r"mask_decoder\.conv_s0\.weight"):
        Sam2DecoderParts(WIDTHS, image_size=64).load_official({"model": state})
    trunk_only = {"image_encoder.trunk.pos_embed": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="sam_mask_decoder"):
        sam2_decoder_state({"model": trunk_only})
    incomplete = official_decoder_state()
    del incomplete["sam_mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="iou_token"):
        Sam2DecoderParts(WIDTHS, image_size=64).load_official({"model": incomplete})


def test_decoder_matches_sam2_predictor_wiring_and_transformers_decoding() -> None:
    state = official_decoder_state(seed=2)
    parts = loaded_parts(state)
    grids = stage_grids()
    expected = reference_logits(state, parts, grids)
    head = Sam2MulticlassDecoder(loaded_parts(state), num_classes=4).double()
    got = head(grids)
    assert got.shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_class_tokens_cycle_sam2_mask_tokens_and_all_train() -> None:
    state = official_decoder_state(seed=3)
    head = Sam2MulticlassDecoder(loaded_parts(state), num_classes=6).double()
    tokens = state["sam_mask_decoder.mask_tokens.weight"].double()
    for i in range(6):
        assert torch.equal(head.class_tokens[i], tokens[i % 4])
    # Class 4 starts as class 0 but its token and MLP are its own tensors.
    assert head.class_mlps[4] is not head.class_mlps[0]
    logits = head(stage_grids())
    torch.testing.assert_close(logits[:, 4], logits[:, 0])
    logits.logsumexp(dim=1).mean().backward()
    for name, parameter in head.named_parameters():
        if name.startswith(("neck.", "class_", "transformer.", "upscale_", "conv_s", "no_mem_embed", "iou_token", "obj_score_token")):
            assert parameter.grad is not None, name


def micro_hiera_checkpoint(path: Path, seed: int = 5) -> tuple[dict[str, torch.Tensor], HieraDet]:
    """An official-layout SAM2 file for model=sam2_hiera_micro: trunk + decoder parts."""
    torch.manual_seed(seed)
    hiera = HieraDet(
        embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), q_pool=3, window_spec=(4, 4, 2, 3), global_att_blocks=(4,),
        global_pos_size=(4, 4), num_classes=0,
    )
    state = official_decoder_state(seed)
    for key, tensor in hiera.state_dict().items():
        if key.startswith("head."):
            continue
        state["image_encoder.trunk." + key.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")] = tensor.clone()
    state["memory_attention.layers.0.norm1.weight"] = torch.ones(4)
    torch.save({"model": state}, path)
    return state, hiera


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "vpt" / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def test_hiera_family_builds_sam2_decoder_from_one_official_file(tmp_path: Path) -> None:
    from vpt.families import family_named

    path = tmp_path / "sam2.1_hiera_micro.pt"
    state, hiera = micro_hiera_checkpoint(path)
    cfg = compose(["model=sam2_hiera_micro", "task=organ_seg_synthetic", "method=vpt_deep", "task.decoder=sam2",
                   f"model.checkpoint={path}"])
    model, data = family_named("hiera").build_segmenter(cfg, num_classes=3)
    assert data["image_size"] == (64, 64)
    decoder = model.decoder
    assert isinstance(decoder, Sam2MulticlassDecoder)
    assert torch.equal(decoder.class_tokens[1], state["sam_mask_decoder.mask_tokens.weight"][1])
    assert torch.equal(decoder.neck.convs[0].weight, state["image_encoder.neck.convs.0.conv.weight"])
    for key, tensor in hiera.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.encoder.trunk.state_dict()[key], tensor), key
    # vpt_deep trains the prompts and the decoder, never the trunk.
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all(name.startswith("decoder.") or "prompt" in name for name in trained)
    assert any("prompt" in name for name in trained)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 16, 16)

    frozen = compose(["model=sam2_hiera_micro", "task=organ_seg_synthetic", "method=vpt_deep", "task.decoder=sam2",
                      f"model.checkpoint={path}", "task.train_decoder=false"])
    model, _ = family_named("hiera").build_segmenter(frozen, num_classes=3)
    assert not any(parameter.requires_grad for parameter in model.decoder.parameters())

    with pytest.raises(ConfigError, match="task.decoder=multilevel or task.decoder=sam2"):
        family_named("hiera").build_segmenter(compose(["model=sam2_hiera_micro", "task=organ_seg_synthetic", "task.decoder=light"]), 3)


def sam2_package_modules() -> tuple[Any, Any, Any, torch.Tensor, dict[str, torch.Tensor]]:
    """SAM2's own mask decoder, prompt encoder and FPN neck (the ``sam2`` package; the calling
    test is skipped without it) with perturbed random weights, a ``no_mem_embed``, and all of
    them saved in SAM2's checkpoint layout."""
    from hydra.core.global_hydra import GlobalHydra

    was_initialised = GlobalHydra.instance().is_initialized()
    pytest.importorskip("sam2")
    if not was_initialised:  # importing sam2 initialises a global Hydra of its own
        GlobalHydra.instance().clear()
    from sam2.modeling.backbones.image_encoder import FpnNeck
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.prompt_encoder import PromptEncoder
    from sam2.modeling.sam.transformer import TwoWayTransformer

    torch.manual_seed(0)
    mask_decoder = MaskDecoder(
        transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256, use_high_res_features=True,
        iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True,
    )
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16)
    neck = FpnNeck(
        PositionEmbeddingSine(num_pos_feats=256), d_model=256, backbone_channel_list=WIDTHS[::-1], fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    with torch.no_grad():
        for module in (mask_decoder, prompt_encoder, neck):
            for parameter in module.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    no_mem = torch.randn(1, 1, 256)
    state = {"no_mem_embed": no_mem}
    for prefix, module in (("sam_mask_decoder", mask_decoder), ("sam_prompt_encoder", prompt_encoder), ("image_encoder.neck", neck)):
        state.update({f"{prefix}.{key}": value for key, value in module.state_dict().items()})
    return mask_decoder, prompt_encoder, neck, no_mem, state


def test_matches_the_sam2_package_when_installed() -> None:
    """The strongest check, run where ``sam2`` is importable (``pip install sam2`` with
    ``SAM2_BUILD_CUDA=0``): SAM2's own modules with random weights, saved in their layout."""
    mask_decoder, prompt_encoder, neck, no_mem, state = sam2_package_modules()
    assert {key: list(value.shape) for key, value in state.items()} == KEYS

    parts = Sam2DecoderParts(WIDTHS, image_size=64)
    parts.load_official({"model": state})
    head = Sam2MulticlassDecoder(parts, num_classes=4).eval()
    grids = [grid.float() for grid in stage_grids()]
    with torch.no_grad():
        features, _ = neck(grids)  # highest resolution first; SAM2 drops the last (scalp=1)
        high_res = [mask_decoder.conv_s0(features[0]), mask_decoder.conv_s1(features[1])]
        embedding = features[2] + no_mem.reshape(1, -1, 1, 1)
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 4, 4)
        expected, *_ = mask_decoder.predict_masks(
            embedding, prompt_encoder.get_dense_pe(), torch.zeros(2, 0, 256), dense, repeat_image=False, high_res_features=high_res
        )
        torch.testing.assert_close(head(grids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["organ_seg_synthetic", "organ_seg_interactive_synthetic"])
def test_cli_trains_hiera_with_sam2_decoder_and_the_run_reloads(task: str, tmp_path: Path) -> None:
    from tests.test_training import run_cli
    from vpt.inference.loading import load_run

    path = tmp_path / "sam2.1_hiera_micro.pt"
    state, hiera = micro_hiera_checkpoint(path)
    run_dir = tmp_path / "run"
    decoder = ["task.decoder=sam2"] if task == "organ_seg_synthetic" else []
    result = run_cli(
        ["model=sam2_hiera_micro", f"task={task}", "method=vpt_deep", *decoder,
         f"model.checkpoint={path}", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "trainer.enable_progress_bar=false", "num_preview_images=1", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/dice" in metrics and metrics["model_config"] == "sam2_hiera_micro"
    assert metrics["trainable_params"] < metrics["total_params"]

    if task == "organ_seg_interactive_synthetic":
        # Prompts come from the ground truth, so such a run is scored, not reloaded to predict.
        assert metrics["test/per_organ"] and (run_dir / "test_prompts.png").is_file()
        return
    run = load_run(run_dir=run_dir, device="cpu")
    model = run.parts.model
    # The trained decoder came back (training moved the class tokens off SAM2's), on the checkpoint's trunk.
    assert isinstance(model.decoder, Sam2MulticlassDecoder)
    assert not torch.equal(model.decoder.class_tokens[0], state["sam_mask_decoder.mask_tokens.weight"][0])
    for key, tensor in hiera.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.encoder.trunk.state_dict()[key], tensor), key


# --- interactive segmentation (box / point prompts) -------------------------------------------


def interactive_task(tmp_path: Path, checkpoint: Path, extra: tuple[str, ...] = ()):
    import warnings

    from vpt.tasks import build_task

    cfg = compose(["model=sam2_hiera_micro", "task=organ_seg_interactive_synthetic", "method=vpt_deep", "method.num_tokens=2",
                   f"model.checkpoint={checkpoint}", f"task.data.root={tmp_path / 'phantoms'}", *extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_task(cfg)


def test_interactive_hiera_decodes_each_prompt_on_its_own_slice_and_trains_prompts_and_decoder(tmp_path: Path) -> None:
    import warnings

    from vpt.data.medical.prompt_geometry import ground_truth_prompts
    from vpt.heads.sam2_decoder import Sam2SingleMaskDecoder

    path = tmp_path / "sam2.pt"
    state, _ = micro_hiera_checkpoint(path)
    parts = interactive_task(tmp_path, path)
    model = parts.model.eval()
    assert isinstance(model.decoder, Sam2SingleMaskDecoder)
    assert torch.equal(model.decoder.sam2_prompt_encoder.point_embed.weight[2], state["sam_prompt_encoder.point_embeddings.2.weight"][0])

    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[0, 10:30, 12:40] = 1
    labels[0, 40:60, 40:60] = 2
    labels[1, 20:50, 5:25] = 3
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for kind in ("box", "point"):
        prompts = ground_truth_prompts(labels, kind)
        given = {"boxes": prompts.boxes} if kind == "box" else {"points": prompts.points}
        with torch.no_grad():
            together = model(images, prompts.image_index, **given)
        assert together.shape == (prompts.count, 16, 16)
        first = torch.zeros(1, dtype=torch.long)
        for row in range(prompts.count):
            image = int(prompts.image_index[row])
            one = {key: value[row : row + 1] for key, value in given.items()}
            with torch.no_grad():
                alone = model(images[image : image + 1], first, **one)
                other = model(images[1 - image : 2 - image], first, **one)
            torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(together[row], other[0], atol=1e-3)

    module = parts.module.train()
    with torch.no_grad():
        for gate in model.encoder.prompt_gates:  # one per block; open them so the prompts get gradients at once
            gate.fill_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        module.training_step({"image": images, "mask": labels}, 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.prompt_embeddings)
    for name in ["mask_decoder.mask_tokens.weight", "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
                 "mask_decoder.upscale_conv1.weight", "mask_decoder.conv_s0.weight", "neck.convs.0.weight", "no_mem_embed"]:
        grad = model.decoder.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.trunk.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.decoder.sam2_prompt_encoder.parameters())
    # Heads nothing reads (IoU, object score, masks 1-3) stay frozen: no trainable tensor without a gradient.
    trainable_without_grad = [name for name, p in model.decoder.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable_without_grad == []
    assert not model.decoder.mask_decoder.iou_prediction_head.proj_in.weight.requires_grad
    assert not model.decoder.mask_decoder.output_hypernetworks_mlps[1].proj_in.weight.requires_grad


def reference_sparse_prompts(state: dict[str, torch.Tensor], points: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """SAM2's point embedding written out: pixel centre (+0.5), divided by the input size,
    random-Fourier features, plus the label's learned embedding; label -1 (padding) is the
    "not a point" embedding alone."""
    gaussian = state["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].double()
    rows = []
    for (x, y), label in zip(points.tolist(), labels.tolist()):
        if label == -1:
            rows.append(state["sam_prompt_encoder.not_a_point_embed.weight"][0].double())
            continue
        xy = torch.tensor([(x + 0.5) / size, (y + 0.5) / size], dtype=torch.float64)
        angles = 2 * math.pi * ((2 * xy - 1) @ gaussian)
        rows.append(torch.cat([angles.sin(), angles.cos()]) + state[f"sam_prompt_encoder.point_embeddings.{label}.weight"][0].double())
    return torch.stack(rows)


def test_interactive_prompts_are_embedded_as_sam2s_predictor_does() -> None:
    """A box is its two corners labelled 2 and 3 plus a padding point; clicks are label 1 plus
    a padding point; coordinates are input pixels of the model.img_size square. The masks
    then equal transformers' decoder fed those embeddings (mask token 0)."""
    from vpt.heads.sam2_decoder import Sam2SingleMaskDecoder, image_features

    state = official_decoder_state(seed=4)
    decoder = Sam2SingleMaskDecoder(loaded_parts(state)).double().train()
    grids = stage_grids(batch=2)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 33.0]], dtype=torch.float64)
    clicks = torch.tensor([[[12.0, 20.0], [15.0, 22.0]], [[40.0, 30.0], [41.0, 50.0]]], dtype=torch.float64)
    cases = {
        "box": ({"boxes": boxes}, [reference_sparse_prompts(state, torch.cat([b.reshape(2, 2), torch.zeros(1, 2)]),
                                                            torch.tensor([2, 3, -1]), 64) for b in boxes]),
        "point": ({"points": clicks}, [reference_sparse_prompts(state, torch.cat([c, torch.zeros(1, 2)]),
                                                                torch.tensor([1, 1, -1]), 64) for c in clicks]),
    }
    with torch.no_grad():
        embedding, high_res = image_features(decoder.neck, decoder.mask_decoder.conv_s0, decoder.mask_decoder.conv_s1,
                                             decoder.no_mem_embed, grids)
        position = reference_positions(state["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].double(), 4, 4)
        dense = state["sam_prompt_encoder.no_mask_embed.weight"].double().reshape(1, -1, 1, 1).expand(2, -1, 4, 4)
        for kind, (given, sparse_rows) in cases.items():
            expected = decoder.mask_decoder(
                image_embeddings=embedding, image_positional_embeddings=position.unsqueeze(0).expand(2, -1, -1, -1),
                sparse_prompt_embeddings=torch.stack(sparse_rows).unsqueeze(1), dense_prompt_embeddings=dense,
                multimask_output=False, high_resolution_features=high_res,
            )[0][:, 0, 0]
            torch.testing.assert_close(decoder(grids, **given), expected, rtol=1e-9, atol=1e-9, msg=kind)
            # One neck pass per image, prompts indexed after it: the same masks.
            rows = torch.tensor([1, 0, 1])
            picked = {key: value[[1, 0, 1]] for key, value in given.items()}
            torch.testing.assert_close(decoder(grids, rows=rows, **picked), expected[[1, 0, 1]], rtol=1e-9, atol=1e-9)


def test_interactive_matches_the_sam2_package_when_installed() -> None:
    """SAM2's own prompt encoder and mask decoder on a box (as its image predictor passes one:
    two corner points labelled 2 and 3) and on clicks, against Sam2SingleMaskDecoder."""
    from vpt.heads.sam2_decoder import Sam2SingleMaskDecoder

    mask_decoder, prompt_encoder, neck, no_mem, state = sam2_package_modules()
    parts = Sam2DecoderParts(WIDTHS, image_size=64)
    parts.load_official({"model": state})
    ours = Sam2SingleMaskDecoder(parts).eval()
    mask_decoder.eval()

    grids = [grid.float() for grid in stage_grids()]
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 33.0]])
    points = torch.tensor([[[12.0, 20.0], [15.0, 22.0]], [[40.0, 30.0], [41.0, 50.0]]])
    with torch.no_grad():
        features, _ = neck(grids)
        high_res = [mask_decoder.conv_s0(features[0]), mask_decoder.conv_s1(features[1])]
        embedding = features[2] + no_mem.reshape(1, -1, 1, 1)
        box_points = (boxes.reshape(-1, 2, 2), torch.tensor([[2, 3]]).repeat(2, 1))
        click_points = (points, torch.ones(2, 2, dtype=torch.int64))
        for given, official_points in (({"boxes": boxes}, box_points), ({"points": points}, click_points)):
            sparse, dense = prompt_encoder(points=official_points, boxes=None, masks=None)
            expected, *_ = mask_decoder(
                image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False, high_res_features=high_res,
            )
            torch.testing.assert_close(ours(grids, **given), expected[:, 0], rtol=1e-4, atol=1e-4)
