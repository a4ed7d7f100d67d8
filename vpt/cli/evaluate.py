"""Evaluate a finished run, or a trained-weights file plus its backbone, on one split.

    vpt-evaluate run_dir=outputs/2026-11-22/10-00-00 [split=test] [KEY=VALUE ...]
    vpt-evaluate weights=prompts.safetensors model.checkpoint=vit_b.npz task.data.root=...

Arguments are ``key=value`` pairs like Hydra overrides. ``run_dir``, ``weights``, ``split``
(train/val/test, or all: every labelled case of a segmentation data set, for a folder of
a few cases) and ``output`` belong to this tool; every other key overrides the run's
resolved config (for example another data folder or backbone weights path). Results go to
a new folder ``<run_dir>/evaluation/<split>-<time>/metrics.json`` (or ``output=``), never
over an existing file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from omegaconf import OmegaConf

from vpt.assets import register_resolvers
from vpt.cli.console import quiet_console
from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError
from vpt.inference.loading import config_and_weights as _config_and_weights
from vpt.methods import load_trained_weights
from vpt.atomic import atomic_write_text
from vpt.runs import write_json
from vpt.training import check_accelerator
from vpt.tasks import build_task

__all__ = ["evaluate", "main"]

register_resolvers()

_logger = logging.getLogger("vpt.evaluate")

_OWN_KEYS = ("run_dir", "weights", "split", "output")
_SPLITS = ("train", "val", "test", "all")  # all: every labelled case (segmentation)


def _warn_if_classes_differ(trained: Any, evaluated: Any, weights_path: Path) -> None:
    """The evaluation data's class names should be the ones the weights were trained on."""
    if trained is None or evaluated is None or list(trained) == list(evaluated):
        return
    _logger.warning(
        "The evaluation data's classes %s differ from the classes %s was trained on %s; scores compare "
        "class indices, so check task.data (or the data set's dataset.json).",
        list(evaluated), weights_path, list(trained),
    )


def evaluate(
    run_dir: Optional[str] = None,
    weights: Optional[str] = None,
    split: str = "test",
    output: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Rebuild the run's model, load its trained weights, and score one split.

    Returns:
        Metrics keyed ``{split}/...``, also written to ``metrics.json`` in the output folder.
    """
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}.")
    cfg, weights_path = _config_and_weights(run_dir, weights)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    volume_task = cfg.task.name in ("segmentation", "interactive_segmentation")
    if split == "all":
        if not volume_task:
            raise ConfigError("split=all scores every labelled case of a segmentation data set; for classification pick train, val or test.")
        # Every case is scored, so nothing needs carving out (a one-case folder is fine).
        cfg = OmegaConf.merge(cfg, {"task": {"data": {"val_fraction": 0.0, "test_fraction": 0.0}}})
    if output:
        out_dir = Path(output)
    else:
        base = Path(run_dir) if run_dir else weights_path.parent
        out_dir = base / "evaluation" / f"{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / "metrics.json").exists():
        raise ConfigError(f"{out_dir / 'metrics.json'} already exists; pass another output=<folder>.")

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_accelerator({"accelerator": trainer_cfg.get("accelerator", "auto")})
    L.seed_everything(cfg.get("seed", 0), verbose=False)
    parts = build_task(cfg)
    trained = load_trained_weights(parts.model, weights_path)
    _warn_if_classes_differ(trained.get("class_names"), parts.metadata.get("class_names"), weights_path)
    trainer = L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision=trainer_cfg.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=trainer_cfg.get("enable_progress_bar", True),
    )
    parts.datamodule.prepare_data()
    parts.datamodule.setup("test" if split == "test" else "fit")
    # Segmentation is scored per volume: its test loader yields whole cases.
    volumes = {"volumes": True} if volume_task else {}
    results = trainer.test(parts.module, dataloaders=parts.datamodule.dataloader(split, **volumes), verbose=False)
    metrics = {key.replace("test/", f"{split}/", 1): value for key, value in (results[0] if results else {}).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    extras = parts.module.write_report(out_dir, parts.datamodule, 0)
    metrics.update({key.replace("test/", f"{split}/", 1): value for key, value in extras.items()})
    metrics.update({"weights": str(weights_path), "split": split})
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"Wrote {out_dir / 'metrics.json'}")
    return metrics


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``vpt-evaluate key=value ...``); returns nothing, since a console
    script exits with what ``main`` returns (call :func:`evaluate` for the metrics)."""
    own = {k: None for k in _OWN_KEYS}
    overrides = []
    for key, value in key_value_arguments(argv, "vpt-evaluate", __doc__):
        if key in own:
            own[key] = value
        else:
            overrides.append(f"{key}={value}")
    quiet_console()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    evaluate(own["run_dir"], own["weights"], own["split"] or "test", own["output"], overrides)


if __name__ == "__main__":
    main()
