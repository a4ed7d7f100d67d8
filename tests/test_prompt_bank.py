"""PromptBank: several tasks' prompts in one encoder pass equal each task run alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_vit
from vpt.errors import CheckpointError, ConfigError
from vpt.methods import apply_method, build_method
from vpt.methods.trained_weights import load_trained_weights, save_trained_weights
from vpt.prompts import PromptBank, PromptedViT

NUM_TOKENS = 4
CLASSES = (3, 5, 2)  # each task its own number of classes


@pytest.fixture
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_tiny_vit().eval()


def _save_task(
    backbone: torch.nn.Module, path: Path, method: str, num_classes: int, seed: int, backbone_name: str = "tiny", **options
) -> Path:
    torch.manual_seed(seed)
    model = build_method(method, copy.deepcopy(backbone), num_classes, **options)
    with torch.no_grad():  # random prompts and head stand in for training
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.5)
    return save_trained_weights(model, path, metadata={"backbone": backbone_name, "task": "classification"})


def _save_tasks(backbone: torch.nn.Module, folder: Path, method: str, **options) -> list[Path]:
    options.setdefault("num_tokens", NUM_TOKENS)
    return [
        _save_task(backbone, folder / f"task{index}.safetensors", method, classes, seed=10 + index, **options)
        for index, classes in enumerate(CLASSES)
    ]


def _alone(backbone: torch.nn.Module, path: Path, method: str, num_classes: int, images: torch.Tensor, **options) -> torch.Tensor:
    options.setdefault("num_tokens", NUM_TOKENS)
    model = build_method(method, copy.deepcopy(backbone), num_classes, **options)
    load_trained_weights(model, path)
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize(
    "method, options",
    [("vpt_deep", {}), ("vpt_shallow", {}), ("vpt_deep", {"project_dim": 16}), ("vpt_deep", {"gate": True})],
    ids=["deep", "shallow", "deep-projected", "deep-gated"],
)
def test_mixed_batch_and_forward_all_equal_each_task_alone(backbone, tmp_path, method, options) -> None:
    paths = _save_tasks(backbone, tmp_path, method, **options)
    bank = PromptBank.from_files(copy.deepcopy(backbone), paths)
    assert bank.task_names == ["task0", "task1", "task2"]

    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    task_ids = torch.tensor([0, 1, 2, 0, 2, 1])
    alone = [_alone(backbone, path, method, classes, images, **options) for path, classes in zip(paths, CLASSES)]

    with torch.no_grad():
        mixed = bank(images, task_ids)
        every = bank.forward_all(images)
    assert len(mixed) == len(images)
    for row, task in enumerate(task_ids.tolist()):
        assert mixed[row].shape == (CLASSES[task],)
        torch.testing.assert_close(mixed[row], alone[task][row], atol=1e-5, rtol=0)
    assert list(every) == bank.task_names
    for task, name in enumerate(bank.task_names):
        assert every[name].shape == (len(images), CLASSES[task])
        torch.testing.assert_close(every[name], alone[task], atol=1e-5, rtol=0)


def test_prompt_sets_of_own_prompts_equal_plain_forward(backbone) -> None:
    for method in ("vpt_deep", "vpt_shallow"):
        model = apply_method(copy.deepcopy(backbone), method, num_tokens=NUM_TOKENS).eval()
        images = torch.randn(3, 3, 32, 32)
        own = model.prompt_embeddings.unsqueeze(0).expand(3, -1, -1, -1)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(images, prompt_sets=own), model.forward_features(images))
        with pytest.raises(ConfigError, match="prompt_sets has shape"):
            model.forward_features(images, prompt_sets=own[:, :, :2])


def test_encoder_stays_frozen(backbone, tmp_path) -> None:
    paths = _save_tasks(backbone, tmp_path, "vpt_deep")
    bank = PromptBank.from_files(copy.deepcopy(backbone), paths)
    assert not any(param.requires_grad for param in bank.parameters())
    before = {name: tensor.clone() for name, tensor in bank.encoder.vit.state_dict().items()}
    bank.train()
    assert not bank.training and not bank.encoder.training
    logits = bank(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert all(not row.requires_grad for row in logits)
    assert not bank.encoder.vit.blocks[0].training  # trunk held in eval mode
    for name, tensor in bank.encoder.vit.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_prompted_vit_of_the_files_method_is_accepted(backbone, tmp_path) -> None:
    paths = _save_tasks(backbone, tmp_path, "vpt_shallow")
    wrapper = apply_method(copy.deepcopy(backbone), "vpt_shallow", num_tokens=NUM_TOKENS)
    bank = PromptBank.from_files(wrapper, paths, names=["a", "b", "c"])
    assert bank.encoder is wrapper and bank.task_index("c") == 2
    with pytest.raises(CheckpointError, match="deep=True"):
        PromptBank.from_files(apply_method(copy.deepcopy(backbone), "vpt_deep", num_tokens=NUM_TOKENS), paths)


def test_mismatched_files_are_refused(backbone, tmp_path) -> None:
    paths = _save_tasks(backbone, tmp_path, "vpt_deep")
    other_tokens = _save_task(backbone, tmp_path / "tokens.safetensors", "vpt_deep", 3, seed=1, num_tokens=2)
    other_method = _save_task(backbone, tmp_path / "lora.safetensors", "lora", 3, seed=1)
    shallow = _save_task(backbone, tmp_path / "shallow.safetensors", "vpt_shallow", 3, seed=1, num_tokens=NUM_TOKENS)
    other_backbone = _save_task(
        backbone, tmp_path / "vit_b.safetensors", "vpt_deep", 3, seed=1, backbone_name="vit_b", num_tokens=NUM_TOKENS
    )
    cases = [
        (other_tokens, "tokens.safetensors has num_tokens=2"),
        (other_method, "lora.safetensors was trained with method=lora"),
        (shallow, "shallow.safetensors was trained with method=vpt_shallow"),
        (other_backbone, "vit_b.safetensors was trained on backbone=vit_b"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            PromptBank.from_files(copy.deepcopy(backbone), [*paths, path])
    with pytest.raises(CheckpointError, match="backbone=tiny, not vit_b"):
        PromptBank.from_files(copy.deepcopy(backbone), paths, backbone="vit_b")
    wider = make_tiny_vit(embed_dim=64)
    with pytest.raises(CheckpointError, match="pass the backbone the file was trained on"):
        PromptBank.from_files(wider, paths)


def test_bad_task_ids_and_encoders_are_refused(backbone, tmp_path) -> None:
    bank = PromptBank.from_files(copy.deepcopy(backbone), _save_tasks(backbone, tmp_path, "vpt_deep"))
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"task_ids must lie in \[0, 3\)"):
        bank(images, torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="one task id per image"):
        bank(images, torch.tensor([0]))
    with pytest.raises(ConfigError, match="PromptedViT with prompts"):
        PromptBank(copy.deepcopy(backbone), [])
    assert isinstance(bank.encoder, PromptedViT)


def test_gated_and_ungated_files_do_not_share_a_bank(backbone, tmp_path) -> None:
    gated = _save_task(backbone, tmp_path / "gated.safetensors", "vpt_deep", 3, seed=1, num_tokens=NUM_TOKENS, gate=True)
    plain = _save_task(backbone, tmp_path / "plain.safetensors", "vpt_deep", 3, seed=2, num_tokens=NUM_TOKENS)
    with pytest.raises(CheckpointError, match="method.gate"):
        PromptBank.from_files(copy.deepcopy(backbone), [gated, plain])
