"""What every vpt LightningModule shares: small checkpoints of trained tensors only, VPT's
optimiser and schedule, and a clear stop on a non-finite loss."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from vpt.errors import CheckpointError, VptError
from vpt.training.checkpoints import state_fit_problems
from vpt.tasks.optim import OptimizerConfig, SchedulerConfig, WarmupCosine, build_optimizer, scaled_lr

__all__ = ["TrainableCheckpointMixin", "OptimizationMixin", "check_finite_loss", "init_task"]

_logger = logging.getLogger(__name__)


class TrainableCheckpointMixin:
    """Keep only trained tensors in Lightning checkpoints.

    The frozen backbone is rebuilt from its own weights on resume, so checkpoints hold
    prompts, head and optimiser state: megabytes even for ViT-H instead of gigabytes. The
    loaded set is checked against the model's trainable set instead of loading non-strictly
    and hoping.
    """

    strict_loading = False
    model: nn.Module
    backbone_id: str
    #: The frozen base encoder's identity with its weights' fingerprint
    #: (:func:`vpt.methods.trained_weights.base_encoder_identity`), set by vpt-train and stored
    #: in every checkpoint, so resuming onto other base weights is refused.
    base_encoder: Optional[dict[str, Any]] = None

    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["vpt_backbone"] = self.backbone_id
        if self.base_encoder is not None:
            checkpoint["vpt_base_encoder"] = dict(self.base_encoder)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved_backbone = checkpoint.get("vpt_backbone")
        if saved_backbone is not None and saved_backbone != self.backbone_id:
            raise CheckpointError(
                f"This checkpoint was trained on backbone {saved_backbone!r} but the model is {self.backbone_id!r}; "
                "resume with the same model config."
            )
        state = checkpoint.get("state_dict", {})
        own = dict(self.named_parameters())  # type: ignore[attr-defined]
        problems = state_fit_problems(state, {key: own[key] for key in self._trainable_keys()})
        if problems:
            raise CheckpointError(
                f"The checkpoint {' and '.join(problems)}; resume with the method and task it was trained with."
            )
        # The schedule's length follows this run's trainer.max_epochs, not the checkpoint's:
        # LambdaLR would otherwise restore the old WarmupCosine (its total_steps) and the
        # added epochs would train at learning rate 0.
        for scheduler_state in checkpoint.get("lr_schedulers", []) or []:
            if isinstance(scheduler_state, dict) and "lr_lambdas" in scheduler_state:
                scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])


def init_task(
    module: Any,
    model: nn.Module,
    num_classes: int,
    class_names: Optional[Sequence[str]],
    optimizer: Optional[dict[str, Any]],
    scheduler: Optional[dict[str, Any]],
    backbone_id: str,
    hparams: Optional[dict[str, Any]],
) -> None:
    """The attributes every task module sets the same way (call after ``super().__init__()``)."""
    module.save_hyperparameters(hparams or {})
    module.model = model
    module.num_classes = num_classes
    module.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    module.optimizer_config = OptimizerConfig(**(optimizer or {}))
    module.scheduler_config = SchedulerConfig(**(scheduler or {}))
    module.backbone_id = backbone_id


class OptimizationMixin:
    """``configure_optimizers`` from ``optimizer_config`` / ``scheduler_config``: the learning
    rate scaled by the global batch (``base_lr x batch / 256``), linear warm-up, then cosine,
    stepped per iteration."""

    model: nn.Module
    optimizer_config: OptimizerConfig
    scheduler_config: SchedulerConfig

    def global_batch_size(self) -> int:
        trainer = self.trainer  # type: ignore[attr-defined]
        batch_size = trainer.datamodule.batch_size if trainer.datamodule is not None else 1
        return int(batch_size * trainer.world_size * trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = self.trainer  # type: ignore[attr-defined]
        lr = scaled_lr(self.optimizer_config.base_lr, self.global_batch_size())
        optimizer = build_optimizer(self.model, self.optimizer_config, lr)
        total_steps = max(1, int(trainer.estimated_stepping_batches))
        epochs = max(1, trainer.max_epochs or 1)
        warmup_steps = round(self.scheduler_config.warmup_epochs * total_steps / epochs)
        schedule = WarmupCosine(warmup_steps, total_steps, self.scheduler_config.min_lr_ratio)
        _logger.info(
            "Learning rate %.4g (base %.4g x global batch %d / 256), %d warm-up of %d steps.",
            lr, self.optimizer_config.base_lr, self.global_batch_size(), warmup_steps, total_steps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run restores the optimiser's learning rate as the checkpoint's schedule
        # left it; set it from this run's schedule at the restored step (a no-op for a new run).
        for config in self.trainer.lr_scheduler_configs:  # type: ignore[attr-defined]
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base_lr * factor(scheduler.last_epoch)


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """Stop with one sentence when the loss is NaN or infinite."""
    if not torch.isfinite(loss):
        raise VptError(
            f"The training loss became {loss.item()} at step {step}; lower optimizer.base_lr "
            "(or use trainer.gradient_clip_val=1.0) and check the inputs for NaN values."
        )
