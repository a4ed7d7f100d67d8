"""Image classification with a prompted (or linear / fully tuned) backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vpt.metrics.classification import (
    CLASSIFICATION_METRIC_DEFINITIONS,
    class_support,
    classification_metrics,
    per_class_accuracy,
    per_class_report,
)
from vpt.runs import choose_one_per_class, save_classification_preview
from vpt.tasks.base import OptimizationMixin, TrainableCheckpointMixin, check_finite_loss, init_task
from vpt.tasks.registry import TaskParts, register_prediction_builder, register_task

__all__ = ["ClassificationTask", "TrainableCheckpointMixin", "build_classification"]

_logger = logging.getLogger(__name__)


class ClassificationTask(TrainableCheckpointMixin, OptimizationMixin, L.LightningModule):
    """Cross-entropy training of ``model`` with VPT's optimiser and schedule.

    Args:
        model: Maps images (B, 3, H, W) to logits (B, num_classes).
        num_classes: Number of classes.
        class_names: Names for the per-class report.
        optimizer: Optimiser settings (see :class:`~vpt.tasks.optim.OptimizerConfig`).
        scheduler: Warm-up and cosine settings.
        label_smoothing: Cross-entropy label smoothing.
        backbone_id: Names the frozen backbone; a checkpoint of another backbone is refused.
        hparams: The run's resolved config as plain containers (saved in checkpoints;
            plain data keeps ``torch.load(weights_only=True)`` working).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        class_names: Optional[Sequence[str]] = None,
        optimizer: Optional[dict[str, Any]] = None,
        scheduler: Optional[dict[str, Any]] = None,
        label_smoothing: float = 0.0,
        backbone_id: str = "",
        hparams: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        init_task(self, model, num_classes, class_names, optimizer, scheduler, backbone_id, hparams)
        self.label_smoothing = label_smoothing
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_per_class = per_class_accuracy(num_classes)
        self.test_support = class_support(num_classes)
        self.per_class_result: dict[str, float] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        check_finite_loss(loss, self.global_step)
        self.train_metrics.update(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=labels.shape[0])
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_metrics.update(logits, labels)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, sync_dist=True, batch_size=labels.shape[0])
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=labels.shape[0])

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_metrics.update(logits, labels)
        self.test_per_class.update(logits, labels)
        self.test_support.update(logits, labels)
        self.log("test/loss", self._loss(logits, labels), sync_dist=True, batch_size=labels.shape[0])
        self.log_dict(self.test_metrics, batch_size=labels.shape[0])

    def on_test_epoch_end(self) -> None:
        self.per_class_result = per_class_report(self.test_per_class.compute(), self.test_support.compute(), self.class_names)
        self.test_per_class.reset()
        self.test_support.reset()

    @torch.no_grad()
    def write_report(self, run_dir: Path, datamodule: L.LightningDataModule, num_pictures: int) -> dict[str, Any]:
        """Per-class accuracy for metrics.json and a picture of test predictions.

        Returns:
            Extra entries for metrics.json.
        """
        extras: dict[str, Any] = {
            "test/acc_per_class": dict(self.per_class_result),
            "test/metric_definitions": dict(CLASSIFICATION_METRIC_DEFINITIONS),
        }
        if num_pictures <= 0:
            return extras
        # Keep only what the chooser can pick (each class's first image and the first
        # num_pictures), and stop once every class, or num_pictures of them, has been met.
        images, labels = [], []
        wanted_classes = min(self.num_classes, num_pictures)
        seen: set[int] = set()
        for batch_images, batch_labels in datamodule.test_dataloader():
            for image, label in zip(batch_images, batch_labels.tolist()):
                if label not in seen or len(labels) < num_pictures:
                    images.append(image.clone())  # not a view keeping the whole batch alive
                    labels.append(label)
                    seen.add(label)
            if len(seen) >= wanted_classes and len(labels) >= num_pictures:
                break
        if not labels:
            return extras
        chosen = choose_one_per_class(labels, num_pictures)
        images_t = torch.stack([images[i] for i in chosen])
        labels_t = [labels[i] for i in chosen]
        was_training = self.training
        self.eval()
        predictions = self(images_t.to(self.device)).argmax(dim=1).cpu()
        self.train(was_training)
        mean, std = datamodule.mean, datamodule.std
        save_classification_preview(
            images_t.numpy(), labels_t, predictions.tolist(), self.class_names, mean, std,
            run_dir / "test_predictions.png",
        )
        extras["test/pictures"] = ["test_predictions.png"]
        return extras


def _backbone_id(model_cfg: Any) -> str:
    return f"{model_cfg.name}@{model_cfg.img_size or 'default'}"


@register_task("classification")
def build_classification(cfg: DictConfig) -> TaskParts:
    """Backbone -> method -> data -> :class:`ClassificationTask` from the resolved config."""
    from vpt.data.registry import build_datamodule
    from vpt.models import build_classifier, build_classifier_encoder

    vit, data = build_classifier_encoder(cfg)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.task.data, resolve=True), **data)
    num_classes, class_names = datamodule.num_classes, datamodule.class_names
    model = build_classifier(cfg, vit, num_classes)
    return _classification_parts(cfg, model, data, list(class_names), datamodule)


@register_prediction_builder("classification")
def build_classification_for_prediction(cfg: DictConfig, preprocessing: Any) -> TaskParts:
    """The run's model from its saved :class:`~vpt.data.preprocessing.Preprocessing`: no data read."""
    from vpt.models import build_classifier, build_classifier_encoder

    vit, data = build_classifier_encoder(cfg)
    model = build_classifier(cfg, vit, preprocessing.num_classes)
    return _classification_parts(cfg, model, data, list(preprocessing.class_names), None)


def _classification_parts(cfg: DictConfig, model: Any, data: dict[str, Any], class_names: list[str], datamodule: Any) -> TaskParts:
    model_cfg = cfg.model
    num_classes = len(class_names)
    module = ClassificationTask(
        model,
        num_classes=num_classes,
        class_names=class_names,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        label_smoothing=float(cfg.task.label_smoothing),
        backbone_id=_backbone_id(model_cfg),
        hparams=OmegaConf.to_container(cfg, resolve=True),
    )
    metadata = {
        "task": "classification",
        "backbone": model_cfg.name,
        "method": cfg.method.name,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "input_size": [3, *data["image_size"]],
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    return TaskParts(module=module, datamodule=datamodule, model=model, metadata=metadata)
