"""Typed run configs (vpt/config_schema.py): every shipped config fits its schema, a key that is
not a setting or a value of the wrong type is one sentence before anything is written, and a
config that leaves a key out gets the schema's default, the one place it is stated."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_training import compose_config, run_cli
from vpt.config_schema import TASK_SCHEMAS, ModelConfig, SegmentationTaskConfig, typed_run_config
from vpt.errors import ConfigError

_CONFIGS = Path(__file__).resolve().parents[1] / "vpt" / "configs"


@pytest.mark.parametrize("task", sorted(path.stem for path in (_CONFIGS / "task").glob("*.yaml")))
def test_every_task_config_fits_its_schema_and_keeps_its_values(task: str) -> None:
    cfg = compose_config([f"task={task}", "task.data.root=/somewhere"] if task == "volume_seg" else [f"task={task}"])
    typed = typed_run_config(cfg)
    schema = TASK_SCHEMAS[cfg.task.name]
    assert OmegaConf.get_type(typed.task) is schema
    written = OmegaConf.to_container(cfg.task, resolve=False)
    kept = OmegaConf.to_container(typed.task, resolve=False)
    assert {key: kept[key] for key in written} == written  # what the YAML picks is what the run gets


@pytest.mark.parametrize("model", sorted(path.stem for path in (_CONFIGS / "model").glob("*.yaml")))
def test_every_model_config_fits_the_model_schema(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    typed = typed_run_config(cfg)
    assert OmegaConf.get_type(typed.model) is ModelConfig
    assert OmegaConf.to_container(typed.model)["name"] == cfg.model.name


def test_a_key_left_out_gets_the_schema_default_and_the_run_records_it(tmp_path: Path) -> None:
    """A hand-written or older config without eval_batch_size / nsd_tolerance / the loss still
    builds, with the defaults stated in the schema (NSD's is the metric's own default)."""
    from vpt.metrics.segmentation import DEFAULT_NSD_TOLERANCE
    from vpt.tasks import build_task

    cfg = compose_config(["experiment=quickstart", f"task.data.root={tmp_path / 'phantoms'}", "num_preview_images=0"])
    with_gaps = OmegaConf.to_container(cfg, resolve=False)
    for key in ("eval_batch_size", "nsd_tolerance", "loss", "image_stem", "decoder_levels"):
        del with_gaps["task"][key]
    parts = build_task(OmegaConf.create(with_gaps))
    assert SegmentationTaskConfig.nsd_tolerance == DEFAULT_NSD_TOLERANCE
    assert parts.module.eval_batch_size == SegmentationTaskConfig.eval_batch_size
    assert parts.module.nsd_tolerance == DEFAULT_NSD_TOLERANCE
    typed = typed_run_config(OmegaConf.create(with_gaps))
    assert typed.task.loss.ce_weight == 0.2 and typed.task.loss.dice_weight == 0.8 and typed.task.decoder_levels == 4


def test_a_key_that_is_not_a_setting_is_one_sentence_before_anything_is_written(tmp_path: Path) -> None:
    from vpt.cli.train import train

    cfg = compose_config(["experiment=quickstart", "+task.decoder_dims=64"])
    with pytest.raises(ConfigError, match=r"task\.decoder_dims .* is not a setting of task; use one of .*decoder_dim"):
        train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"task\.eval_batch_size .* wrong type .*'many'"):
        train(compose_config(["experiment=quickstart", "task.eval_batch_size=many"]), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model\.pretrained .* wrong type"):
        typed_run_config(compose_config(["model.pretrained=perhaps"]))
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_an_unknown_task_key_in_one_line(tmp_path: Path) -> None:
    result = run_cli(["experiment=quickstart", "+task.image_stems=false", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1 and "task.image_stems" in errors[0] and "image_stem" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_a_task_of_ones_own_without_a_schema_is_left_as_it_is() -> None:
    cfg = OmegaConf.create({"model": {"name": "vit_micro"}, "task": {"name": "counting", "anything": 3}})
    typed = typed_run_config(cfg)
    assert typed.task.anything == 3 and typed.model.family == "timm"


def test_evaluate_and_predict_overrides_are_typed_too(tmp_path: Path) -> None:
    """Overrides given to a read-back run config go through the schema: one sentence, nested keys named."""
    from vpt.config_schema import with_overrides

    cfg = typed_run_config(compose_config(["experiment=quickstart"]))
    with pytest.raises(ConfigError, match=r"task\.loss\.focal in the overrides is not a setting of task\.loss; use one of ce_weight, dice_weight"):
        with_overrides(cfg, ["task.loss.focal=1"], "the overrides")
    with pytest.raises(ConfigError, match=r"task\.eval_batch_size .* wrong type"):
        with_overrides(cfg, ["task.eval_batch_size=abc"], "the overrides")
    assert with_overrides(cfg, ["task.data.root=/elsewhere"], "the overrides").task.data.root == "/elsewhere"
