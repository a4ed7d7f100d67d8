"""Train: ``vpt-train model=... method=... task=... trainer=... [experiment=...]``.

CLI -> Hydra config -> task builder (backbone, method, data) -> Lightning Trainer -> run
folder with the resolved config, checkpoints, prompt-only weights, CSV log, metrics.json and
pictures.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from vpt.assets import register_resolvers
from vpt.cli.errors import exit_on_user_error
from vpt.methods import parameter_groups, parameter_table, save_trained_weights
from vpt.runs import check_run_dir_is_free, plot_curves, write_json
from vpt.tasks import build_task

__all__ = ["train", "main"]

register_resolvers()

_logger = logging.getLogger("vpt.train")

TRAINED_WEIGHTS = "prompts.safetensors"


def _run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train, test and write the run folder.

    Args:
        cfg: The composed config (``configs/train.yaml`` and its groups).
        run_dir: Where to write; Hydra's output folder by default.

    Returns:
        The final metrics (also in ``run_dir/metrics.json``).
    """
    run_dir = Path(run_dir or _run_dir(cfg))
    check_run_dir_is_free(run_dir)
    # The CSV log shares the run folder with config.yaml and Hydra's files on purpose.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    parts = build_task(cfg)
    counts = parameter_groups(parts.model)
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.monitor,
        mode=cfg.monitor_mode,
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        **trainer_options,
        default_root_dir=str(run_dir),
        logger=CSVLogger(save_dir=str(run_dir), name="", version=""),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
    )
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        _logger.info("Run folder: %s", run_dir.resolve())
        print(f"\nTrainable parameters ({cfg.method.name} on {cfg.model.name}):\n{parameter_table(parts.model)}\n", flush=True)

    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path)
    best = checkpoint.best_model_path or None
    results = trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=best or None)

    metrics: dict[str, Any] = dict(results[0]) if results else {}
    if not trainer.is_global_zero:
        return metrics
    # The model now holds the weights that were tested (the best epoch's when validated).
    save_trained_weights(
        parts.model,
        run_dir / TRAINED_WEIGHTS,
        metadata={**parts.metadata, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    report_extras = parts.module.write_report(run_dir, parts.datamodule, cfg.num_preview_images)
    plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    best_score = checkpoint.best_model_score
    metrics.update(report_extras)
    metrics.update(
        {
            f"best/{cfg.monitor}": float(best_score) if best_score is not None else None,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "trainable_params": counts["total"][0],
            "total_params": counts["total"][1],
            "trained_weights": TRAINED_WEIGHTS,
            "best_checkpoint": os.path.relpath(best, run_dir) if best else None,
            "wall_time_s": round(time.time() - started, 1),
        }
    )
    write_json(run_dir / "metrics.json", metrics)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float))
    print(f"\nFinished: {summary}\nRun folder: {run_dir}", flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@exit_on_user_error
def _hydra_entry(cfg: DictConfig) -> Optional[float]:
    metrics = train(cfg)
    value = metrics.get(f"best/{cfg.monitor}")
    return float(value) if value is not None else None


def main() -> None:
    """Console entry point (``vpt-train``)."""
    _hydra_entry()


if __name__ == "__main__":
    main()
