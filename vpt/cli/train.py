"""Train: ``vpt-train model=... method=... task=... trainer=... [experiment=...]``.

CLI -> Hydra config -> checks (run folder, accelerator, resume checkpoint) -> task builder
(backbone, method, data) -> Lightning Trainer -> run folder with the resolved config,
checkpoints, trained weights, CSV log, metrics.json and pictures.

The test scores the checkpoint ``task.test_checkpoint`` names: ``best`` (the best validation
epoch, when validation chose one) or ``last`` (the weights at the end of training); the
trained-weights file holds the weights that were tested.

Nothing is written before the checks pass, so a refused run leaves a run folder exactly
as it was (Hydra's own ``.hydra/`` record included: vpt writes it after the checks).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vpt.assets import register_resolvers
from vpt.atomic import atomic_write_text
from vpt.cli.console import quiet_console
from vpt.cli.errors import exit_on_user_error, record_in_log_files, run_folder_in_use
from vpt.errors import ConfigError
from vpt.runs import check_run_dir, plot_curves, write_json

__all__ = ["train", "main", "trainer_overrides"]

register_resolvers()

_logger = logging.getLogger("vpt.train")

TRAINED_WEIGHTS = "prompts.safetensors"


def _run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


def _write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's ``.hydra/{config,hydra,overrides}.yaml``, written only once the run is allowed
    (``hydra.output_subdir`` is null in ``train.yaml`` so Hydra does not write them first)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = run_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})))
    atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))


def _prepare_resume(cfg: DictConfig) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """Read and check ``cfg.ckpt_path`` (if any) before anything is built or written."""
    if not cfg.get("ckpt_path"):
        return None, None
    from vpt.training import check_resume_fits, load_checkpoint_file

    path = str(Path(str(cfg.ckpt_path)).expanduser()) if "://" not in str(cfg.ckpt_path) else str(cfg.ckpt_path)
    checkpoint = load_checkpoint_file(path)
    check_resume_fits(checkpoint, OmegaConf.to_container(cfg, resolve=True), path)  # type: ignore[arg-type]
    return checkpoint, path


def _say(text: str) -> None:
    """Print ``text`` for the reader and add it to the run's log file (``train.log``), which
    a print does not reach."""
    print(text, flush=True)
    if text.strip():
        record_in_log_files(text.strip("\n"), logging.INFO, name=_logger.name)


def _model_config_name(cfg: DictConfig) -> Optional[str]:
    """The ``model=`` config the run used (``vit_micro``), which ``cfg.model.name`` (the timm
    or SAM name it builds) does not say; known when Hydra composed the run."""
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("model")
    return str(choice) if choice else None


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train, test and write the run folder.

    Args:
        cfg: The composed config (``configs/train.yaml`` and its groups).
        run_dir: Where to write; Hydra's output folder by default.

    Returns:
        The final metrics (also in ``run_dir/metrics.json``).

    Raises:
        VptError: a refused run folder, a GPU trainer without a GPU, a resume checkpoint
            that is missing, unreadable or from another model/method/task, a
            ``task.test_checkpoint`` other than best/last (nothing written).
    """
    from vpt.config_schema import typed_run_config

    # Types and defaults from vpt/config_schema.py; the run folder's config.yaml records them.
    cfg = typed_run_config(cfg, "the composed config")
    # torch, Lightning and the backbones load here, not at import, so that --help is quick.
    import lightning as L
    import torch

    from vpt.data.preprocessing import Preprocessing
    from vpt.methods import applied_method, parameter_groups, parameter_table, save_trained_weights
    from vpt.methods.trained_weights import base_encoder_identity, check_base_encoder
    from vpt.metrics import format_organ_table
    from vpt.tasks import build_task, check_training_data
    from vpt.training import (
        WallTime,
        build_trainer,
        check_accelerator,
        check_test_checkpoint,
        check_trainer_values,
        warn_if_validation_cannot_choose,
    )

    run_dir = Path(run_dir or _run_dir(cfg))
    test_checkpoint = check_test_checkpoint(cfg.task.test_checkpoint)
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    # DDP's extra processes re-run this command into the folder the first one has checked
    # and started to write.
    launched_rank = int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0"))
    if launched_rank == 0:
        check_run_dir(run_dir, resuming=bool(cfg.get("ckpt_path")))
    check_accelerator(trainer_options)  # type: ignore[arg-type]
    check_trainer_values(trainer_options)  # type: ignore[arg-type]
    checkpoint, ckpt_path = _prepare_resume(cfg)
    resume_step = int(checkpoint.get("global_step", 0)) if checkpoint is not None else None
    # Splits that would leave training, validation or the final test without a case, and
    # required data keys left unset, stop the run here rather than after hours of training.
    check_training_data(cfg)

    # The checks passed: from here on the run folder is ours to write.
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if launched_rank == 0 and checkpoint is None:
            _write_hydra_record(run_dir, cfg)
    except OSError as error:
        raise ConfigError(f"Cannot write the run folder {run_dir} ({error.strerror}); choose a writable hydra.run.dir.") from None
    run_folder_in_use()  # an error from here on ends train.log
    started = time.time()
    quiet_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    if resume_step is not None:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    parts = build_task(cfg)
    # The base encoder as built, before training may cast it (bf16-true): stored with the weights.
    base_encoder = base_encoder_identity(cfg.model, parts.model)
    parts.module.base_encoder = base_encoder  # stored in every checkpoint
    if checkpoint is not None:
        # The checkpoint holds trained tensors only: on other base weights they would train on
        # silently as if nothing had changed.
        check_base_encoder(checkpoint.get("vpt_base_encoder"), base_encoder, ckpt_path)
        if launched_rank == 0:  # written once the resume is known to fit, so a refusal leaves the record
            _write_hydra_record(run_dir, cfg)
    if hasattr(parts.datamodule, "check_cases"):
        # Every case of every split is read once now, so that a broken test case (NaN
        # voxels, a label of another size or spacing) stops the run before training.
        parts.datamodule.prepare_data()
        parts.datamodule.setup("fit")
        parts.datamodule.check_cases()
    # What prediction will need besides the weights, resolved now (a failure stops the run
    # before training, not after it): saved with the weights and as preprocessing.json.
    preprocessing = None
    if parts.metadata.get("task") in ("segmentation", "classification"):
        preprocessing = Preprocessing.from_datamodule(parts.metadata["task"], parts.datamodule, parts.metadata)
    if test_checkpoint == "best" and launched_rank == 0:
        warn_if_validation_cannot_choose(parts.datamodule, cfg.monitor)
    counts = parameter_groups(parts.model)
    trainer, best_checkpoint = build_trainer(
        trainer_options,  # type: ignore[arg-type]
        run_dir,
        monitor=cfg.monitor,
        monitor_mode=cfg.monitor_mode,
        logger_config=OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None,  # type: ignore[arg-type]
        callback_config=OmegaConf.to_container(cfg.callbacks, resolve=True) if cfg.get("callbacks") else None,  # type: ignore[arg-type]
        resume_step=resume_step,
        preloaded={ckpt_path: checkpoint} if checkpoint is not None and ckpt_path else None,
        # A resumed run's time is the sum of its segments; the checkpoint holds the earlier ones.
        wall_time=WallTime(started, WallTime.earlier_segments(checkpoint)),
    )
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        _logger.info("Run folder: %s", run_dir.resolve())
        if resume_step is not None:
            _logger.info("Resuming %s at step %d (epoch %d).", ckpt_path, resume_step, int(checkpoint.get("epoch", 0)) + 1)  # type: ignore[union-attr]
        model_config = _model_config_name(cfg)
        backbone = f"{model_config} ({cfg.model.name})" if model_config and model_config != cfg.model.name else cfg.model.name
        _say(f"\nTrainable parameters ({cfg.method.name} on {backbone}):\n{parameter_table(parts.model)}\n")

    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
    best = best_checkpoint.best_model_path or None
    if best and not Path(best).is_file():
        best = None
    tested = "best" if test_checkpoint == "best" and best else "last"
    if test_checkpoint == "best" and not best and trainer.is_global_zero:
        _logger.info("No validation score chose a best epoch; testing the weights at the end of training.")
    # ckpt_path=None tests the module as training left it: the weights last.ckpt holds.
    results = trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=best if tested == "best" else None, verbose=False)

    metrics: dict[str, Any] = dict(results[0]) if results else {}
    if not trainer.is_global_zero:
        return metrics
    # The model now holds the weights that were tested (trainer.test loaded best.ckpt into it).
    extra: dict[str, Any] = {"base_encoder": base_encoder}
    if preprocessing is not None:
        preprocessing.write(run_dir)
        extra["preprocessing"] = preprocessing.to_dict()
    save_trained_weights(
        parts.model,
        run_dir / TRAINED_WEIGHTS,
        metadata={**parts.metadata, **extra, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    report_extras = parts.module.write_report(run_dir, parts.datamodule, cfg.num_preview_images)
    plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    best_score = best_checkpoint.best_model_score
    segments = next(callback for callback in trainer.callbacks if isinstance(callback, WallTime)).segments()
    method = applied_method(parts.model)
    metrics.update(report_extras)
    metrics.update(
        {
            f"best/{cfg.monitor}": float(best_score) if best_score is not None else None,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "resumed_from": {"checkpoint": ckpt_path, "step": resume_step} if ckpt_path else None,
            "trainable_params": counts["total"][0],
            "total_params": counts["total"][1],
            "trained_weights": TRAINED_WEIGHTS,
            "best_checkpoint": os.path.relpath(best, run_dir) if best else None,
            "tested_checkpoint": tested,
            "model_config": _model_config_name(cfg),
            # The options the method used (a sweep's options of other methods left out).
            "method_options": dict(method.method_options) if method is not None else None,
            "wall_time_s": round(sum(segments), 1),
            "wall_time_segments_s": segments,
        }
    )
    write_json(run_dir / "metrics.json", metrics)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float))
    table = format_organ_table(metrics.get("test/per_organ"), metrics.get("test/hd95_unit"))
    tested_weights = "the best validation epoch (checkpoints/best.ckpt)" if tested == "best" else "the end of training"
    _say(f"\n{table}\n" if table else "")
    _say(f"Finished: {summary}\nTested: the weights of {tested_weights}\nRun folder: {run_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@exit_on_user_error
def _hydra_entry(cfg: DictConfig) -> Optional[float]:
    metrics = train(cfg)
    value = metrics.get(f"best/{cfg.monitor}")
    return float(value) if value is not None else None


def trainer_overrides(argv: Sequence[str]) -> list[str]:
    """Let ``trainer.X=V`` set any ``lightning.Trainer`` argument and ``method.X=V`` any
    method's option, as the README promises.

    The composed config is a Hydra struct, which refuses keys the chosen config does not
    list (``trainer.num_nodes``, or ``method.num_tokens`` in a sweep over ``method=lora,...``)
    unless written ``+key``. Arguments naming a real Trainer argument or an option of some
    method become ``++key=V`` (add or override); the method drops, with a warning, options
    that belong to other methods. Anything else is left for Hydra to judge.
    """
    if not any(arg.lstrip("+").startswith(("trainer.", "method.")) for arg in argv):
        return list(argv)  # nothing to rewrite, and --help need not import torch for the answer
    from vpt.methods.registry import _known_options
    from vpt.training import TRAINER_ARGUMENTS

    known = {"trainer": TRAINER_ARGUMENTS, "method": _known_options()}
    rewritten = []
    for arg in argv:
        bare = arg[1:] if arg.startswith("+") and not arg.startswith("++") else arg
        head, _, rest = bare.partition(".")
        if head in known and "=" in rest and rest.split("=", 1)[0] in known[head]:
            arg = "++" + bare  # +key too: in a sweep, some jobs' configs already have the key
        rewritten.append(arg)
    return rewritten


@exit_on_user_error
def _check_command_line(argv: Sequence[str]) -> list[str]:
    from vpt.cli.config_check import check_overrides

    return check_overrides(argv)


def main() -> None:
    """Console entry point (``vpt-train``)."""
    argv = sys.argv[1:]
    if any(arg in ("-m", "--multirun") for arg in argv):
        # Each job of a sweep composes its own config: rewrite every Trainer argument and
        # method option up front (the first job composing says nothing of the others).
        argv = trainer_overrides(argv)
    # A mistyped key or config name is said here in one sentence (Hydra would advise +key=);
    # a Trainer argument or method option the config lacks becomes ++key= (imports torch
    # only then, so argument errors stay quick).
    sys.argv[1:] = _check_command_line(argv)
    quiet_console()
    _hydra_entry()


if __name__ == "__main__":
    main()
