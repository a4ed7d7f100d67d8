"""Evaluate a finished run, or a trained-weights file plus its backbone, on one split.

    vpt-evaluate run_dir=outputs/2026-11-22/10-00-00 [split=test] [checkpoint=last] [KEY=VALUE ...]
    vpt-evaluate weights=prompts.safetensors model.checkpoint=vit_b.npz task.data.root=...
    vpt-evaluate checkpoint=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt

Arguments are ``key=value`` pairs like Hydra overrides. ``run_dir``, ``weights``,
``checkpoint``, ``split`` (train/val/test, or all: every labelled case of a segmentation
data set, for a folder of a few cases) and ``output`` belong to this tool; every other key
overrides the run's resolved config (for example another data folder or backbone weights
path).

What is scored: the run's trained weights (``prompts.safetensors``, the weights its test
scored) unless ``checkpoint=`` names a Lightning checkpoint instead: ``best`` (the run's
``checkpoints/best.ckpt``, the best validation epoch), ``last`` (``checkpoints/last.ckpt``,
the end of training) or the path of a ``.ckpt`` file (read with ``weights_only=True``;
without ``run_dir`` the run config stored in the checkpoint rebuilds the model).

Results go to a new folder ``<run_dir>/evaluation/<split>-<time>/metrics.json``
(``<split>-<checkpoint>-<time>`` for a checkpoint; or ``output=``), never over an existing
file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from vpt.assets import register_resolvers
from vpt.cli.console import quiet_console
from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import CheckpointError, ConfigError
from vpt.messages import rebuilding_a_run
from vpt.atomic import atomic_write_text
from vpt.runs import write_json

__all__ = ["evaluate", "main"]

register_resolvers()

_logger = logging.getLogger("vpt.evaluate")

_OWN_KEYS = ("run_dir", "weights", "checkpoint", "split", "output")
_SPLITS = ("train", "val", "test", "all")  # all: every labelled case (segmentation)
_RUN_CHECKPOINTS = ("best", "last")  # checkpoint=best|last: <run_dir>/checkpoints/<name>.ckpt


def _warn_if_classes_differ(trained: Any, evaluated: Any, weights_path: Path) -> None:
    """The evaluation data's class names should be the ones the weights were trained on."""
    if trained is None or evaluated is None or list(trained) == list(evaluated):
        return
    _logger.warning(
        "The evaluation data's classes %s differ from the classes %s was trained on %s; scores compare "
        "class indices, so check task.data (or the data set's dataset.json).",
        list(evaluated), weights_path, list(trained),
    )


def _checkpoint_path(checkpoint: str, run_dir: Optional[str]) -> Path:
    """The ``.ckpt`` file ``checkpoint=`` names: ``best``/``last`` of ``run_dir``, or a path.

    Raises:
        ConfigError: ``best``/``last`` without ``run_dir``, or a trained-weights file.
        CheckpointError: the run has no such checkpoint.
    """
    if checkpoint in _RUN_CHECKPOINTS:
        if not run_dir:
            raise ConfigError(
                f"checkpoint={checkpoint} names a checkpoint of a run folder; pass run_dir=<the run folder> too, "
                "or checkpoint=<path of a .ckpt>."
            )
        path = Path(run_dir) / "checkpoints" / f"{checkpoint}.ckpt"
        if not path.is_file():
            other = "last" if checkpoint == "best" else "best"
            raise CheckpointError(
                f"{run_dir} has no checkpoints/{checkpoint}.ckpt"
                f"{' (no validation score chose a best epoch)' if checkpoint == 'best' else ''}; pass checkpoint={other}, "
                "or leave checkpoint= out to score the run's trained weights."
            )
        return path
    path = Path(checkpoint).expanduser()
    if path.suffix == ".safetensors":
        raise ConfigError(f"{path} is a trained-weights file, not a Lightning checkpoint; pass it as weights={path}.")
    return path


def _config_of_checkpoint(checkpoint: dict[str, Any], path: Path) -> DictConfig:
    """The run config stored in a vpt checkpoint (``vpt-train`` saves the resolved config)."""
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict) or not isinstance(saved.get("task"), dict) or not isinstance(saved.get("model"), dict):
        raise ConfigError(f"Checkpoint {path} carries no run config; pass run_dir=<the run folder it was trained in> too.")
    from vpt.config_version import migrate_run_config

    return migrate_run_config(OmegaConf.create(saved), str(path))


def _new_evaluation_folder(run_dir: Optional[str], weights_path: Path, split: str, checkpoint: Optional[str]) -> Path:
    """A folder no evaluation has written yet: ``<run>/evaluation/<split>[-<checkpoint>]-<time>[-<n>]``."""
    if run_dir:
        base = Path(run_dir)
    else:
        # A checkpoint sits in <run>/checkpoints/; its evaluations go beside the run's own.
        base = weights_path.parent.parent if weights_path.parent.name == "checkpoints" else weights_path.parent
    label = ""
    if checkpoint:
        label = "-" + (checkpoint if checkpoint in _RUN_CHECKPOINTS else Path(checkpoint).stem)
    stem = base / "evaluation" / f"{split}{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, number = stem, 1
    while folder.exists():  # two evaluations in one second
        number += 1
        folder = stem.with_name(f"{stem.name}-{number}")
    return folder


def evaluate(
    run_dir: Optional[str] = None,
    weights: Optional[str] = None,
    split: str = "test",
    output: Optional[str] = None,
    overrides: Sequence[str] = (),
    checkpoint: Optional[str] = None,
) -> dict[str, Any]:
    """Rebuild the run's model, load its trained weights (or a checkpoint), and score one split.

    Args:
        run_dir: A finished run folder.
        weights: A trained-weights file, instead of the run's ``prompts.safetensors``.
        split: ``train``, ``val``, ``test`` or ``all`` (segmentation: every labelled case).
        output: The folder for ``metrics.json``; a new one under the run by default.
        overrides: ``key=value`` changes to the run's config.
        checkpoint: ``best``, ``last`` (the run's ``checkpoints/<name>.ckpt``) or the path
            of a ``.ckpt``, scored instead of the trained weights.

    Returns:
        Metrics keyed ``{split}/...``, also written to ``metrics.json`` in the output folder.

    Raises:
        ConfigError: a bad split, arguments that do not go together, an existing output.
        CheckpointError: weights or a checkpoint that are missing, unreadable or do not fit
            the run's model (nothing is written then).
    """
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}.")
    # torch, Lightning and the backbones load only for an evaluation that will run.
    import lightning as L

    from vpt.config_schema import with_overrides
    from vpt.inference.loading import config_and_weights as _config_and_weights
    from vpt.methods import load_trained_weights
    from vpt.methods.trained_weights import base_encoder_identity, check_base_encoder, read_trained_metadata
    from vpt.metrics import format_organ_table
    from vpt.tasks import build_task
    from vpt.training import check_accelerator, load_checkpoint_file, load_checkpoint_weights

    checkpoint_file: Optional[Path] = None
    saved: Optional[dict[str, Any]] = None
    if checkpoint:
        if weights:
            raise ConfigError("weights= and checkpoint= both name what to score; pass one of them.")
        checkpoint_file = _checkpoint_path(checkpoint, run_dir)
        # Read (and so checked) before anything is built or written.
        saved = load_checkpoint_file(checkpoint_file, use="evaluate")
    if checkpoint_file is None or saved is None:
        cfg, weights_path = _config_and_weights(run_dir, weights)
    else:
        cfg = _config_and_weights(run_dir, None)[0] if run_dir else _config_of_checkpoint(saved, checkpoint_file)
        weights_path = checkpoint_file
    if overrides:
        cfg = with_overrides(cfg, overrides, "the overrides")
    volume_task = cfg.task.name in ("segmentation", "interactive_segmentation")
    if split == "all":
        if not volume_task:
            raise ConfigError("split=all scores every labelled case of a segmentation data set; for classification pick train, val or test.")
        # Every case is scored, so nothing needs carving out (a one-case folder is fine).
        cfg = OmegaConf.merge(cfg, {"task": {"data": {"val_fraction": 0.0, "test_fraction": 0.0}}})
    if output:
        out_dir = Path(output)
        if (out_dir / "metrics.json").exists():
            raise ConfigError(f"{out_dir / 'metrics.json'} already exists; pass another output=<folder>.")
    else:
        out_dir = _new_evaluation_folder(run_dir, weights_path, split, checkpoint)

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_accelerator({"accelerator": trainer_cfg.get("accelerator", "auto")})
    L.seed_everything(cfg.seed, verbose=False)
    with rebuilding_a_run():  # the run's training said what its data and backbone are
        parts = build_task(cfg)
    if saved is not None:
        # A checkpoint names the base weights it was trained on (vpt-train stores their fingerprint).
        check_base_encoder(saved.get("vpt_base_encoder"), base_encoder_identity(cfg.model, parts.model), weights_path)
        load_checkpoint_weights(parts.module, saved, weights_path)
    else:
        # The trained tensors only mean something on the base encoder they were trained on.
        check_base_encoder(read_trained_metadata(weights_path).get("base_encoder"), base_encoder_identity(cfg.model, parts.model), weights_path)
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
    # Segmentation is scored per volume: its test loader yields whole cases.
    volumes = {"volumes": True} if volume_task else {}
    with rebuilding_a_run():
        parts.datamodule.prepare_data()
        parts.datamodule.setup("test" if split == "test" else "fit")
        loader = parts.datamodule.dataloader(split, **volumes)
    results = trainer.test(parts.module, dataloaders=loader, verbose=False)
    metrics = {key.replace("test/", f"{split}/", 1): value for key, value in (results[0] if results else {}).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    extras = parts.module.write_report(out_dir, parts.datamodule, 0)
    metrics.update({key.replace("test/", f"{split}/", 1): value for key, value in extras.items()})
    metrics.update({"weights": str(weights_path), "split": split, "checkpoint": checkpoint})
    if saved is not None:
        metrics.update({"checkpoint_epoch": saved.get("epoch"), "checkpoint_step": saved.get("global_step")})
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    table = format_organ_table(metrics.get(f"{split}/per_organ"), metrics.get(f"{split}/hd95_unit"))
    if table:
        print(f"\n{table}\n")
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
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet_console()  # after basicConfig: its console handler gets the filters too
    evaluate(own["run_dir"], own["weights"], own["split"] or "test", own["output"], overrides, own["checkpoint"])


if __name__ == "__main__":
    main()
