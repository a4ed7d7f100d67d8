"""Semantic segmentation (multi-organ CT first) with a prompted frozen encoder.

Two model families share one LightningModule:

The network comes from the composition root (:mod:`vpt.models`): the encoder with the
configured method applied (:func:`vpt.apply_method`) and a decoder.

- ``model.family: sam`` — SAM's image encoder (:class:`PromptedSamEncoder`) and SAM's
  mask decoder answering every class at once (:class:`SamMulticlassDecoder`,
  no clicks). The prompt encoder stays frozen; the mask decoder trains unless
  ``task.train_decoder=false``.
- ``model.family: timm`` — a timm ViT (:class:`PromptedViT`) with the multi-level decoder
  (:class:`MultiLevelDecoder`, several blocks and the image; ``task.decoder=multilevel``)
  or the light one on the last block's patch tokens (:class:`PatchTokenDecoder`,
  ``task.decoder=light``).

Training sees 2D slices (or tiles; with ``task.data.context_slices=1`` the neighbouring
slices are the other two channels); the loss (cross-entropy + soft Dice, weights in the
task config) is computed at the model's input resolution, on logits upsampled bilinearly
from the decoder's output. Validation logs slice-level Dice. Testing predicts each test
volume slice by slice (whole slices, or overlapping tiles blended), brings the logits back
to the original slice grid, and scores the 3D label volume per organ (Dice, HD95 in mm when
the spacing is known) with :func:`vpt.metrics.volume_scores`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vpt.errors import DataError
from vpt.messages import log_setup
from vpt.metrics.segmentation import (
    DEFAULT_NSD_TOLERANCE,
    SliceDice,
    metric_definitions,
    summarize_volume_scores,
    volume_scores,
)
from vpt.tasks.base import OptimizationMixin, TrainableCheckpointMixin, check_finite_loss, init_task
from vpt.tasks.registry import TaskParts, register_prediction_builder, register_task

__all__ = ["SegmentationTask", "dice_loss", "build_segmentation", "check_data_folder", "check_training_splits"]

_logger = logging.getLogger(__name__)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over the foreground classes, averaged (as in TransUNet / SAMed).

    Args:
        logits: (B, C, H, W).
        labels: (B, H, W) class indices.
    """
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(labels, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1.0 - dice[1:].mean()


class SegmentationTask(TrainableCheckpointMixin, OptimizationMixin, L.LightningModule):
    """Slice-wise training, slice Dice validation, 3D volume testing.

    Args:
        model: Images (B, 3, H, W) -> logits (B, C, h, w) at any resolution.
        num_classes: Classes including background.
        class_names: Names, background first.
        optimizer: Optimiser settings.
        scheduler: Warm-up and cosine settings.
        ce_weight: Weight of cross-entropy in the loss.
        dice_weight: Weight of soft Dice in the loss.
        eval_batch_size: Slices per forward pass when predicting a test volume.
        nsd_tolerance: Tolerance of the Normalised Surface Dice, mm (voxels without spacing).
        geometry: How test slices become logits (tiles or whole slices); the data module's
            :class:`~vpt.data.medical.slicing.SliceGeometry`. None: whole slices.
        backbone_id: Names the frozen encoder; checkpoints of another are refused.
        hparams: The resolved config as plain containers.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        class_names: Optional[Sequence[str]] = None,
        optimizer: Optional[dict[str, Any]] = None,
        scheduler: Optional[dict[str, Any]] = None,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        eval_batch_size: int = 16,
        nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
        geometry: Optional[Any] = None,
        backbone_id: str = "",
        hparams: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        init_task(self, model, num_classes, class_names, optimizer, scheduler, backbone_id, hparams)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.eval_batch_size = eval_batch_size
        self.nsd_tolerance = float(nsd_tolerance)
        self.geometry = geometry
        self.train_dice = SliceDice(num_classes)
        self.val_dice = SliceDice(num_classes)
        self.case_scores: dict[str, dict[int, dict[str, float]]] = {}
        self.spacing_known = True
        self.report: dict[str, Any] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution, (B, C, H, W)."""
        logits = self.model(images)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), labels)
        return self.ce_weight * ce + self.dice_weight * dice_loss(logits, labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["mask"]
        logits = self(images)
        loss = self._loss(logits, labels)
        check_finite_loss(loss, self.global_step)
        self.train_dice.update(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/dice", self.train_dice.compute()["dice"])
        self.train_dice.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["mask"]
        logits = self(images)
        self.val_dice.update(logits, labels)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, sync_dist=True, batch_size=labels.shape[0])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_dice.compute()
        self.log("val/dice", scores["dice"], prog_bar=True)
        self.val_dice.reset()

    @torch.no_grad()
    def predict_volume(
        self, slices: torch.Tensor, out_size: tuple[int, int], valid_size: Optional[tuple[int, int]] = None
    ) -> torch.Tensor:
        """Label volume for one case.

        Args:
            slices: (D, 3, H, W) network-ready slices (the data module's test items): at the
                model's input size, or resampled slices for tiled prediction.
            out_size: (H0, W0) of the original label slices.
            valid_size: The part of each slice that is not padding (tiles), or None.

        Returns:
            (D, H0, W0) int64 labels: logits (whole-slice or blended tiles,
            :func:`vpt.inference.tiling.slice_logits`) cut to ``valid_size``, resized to the
            original size, then argmax.
        """
        from vpt.inference.tiling import slice_logits, to_original_grid

        labels = []
        for start in range(0, slices.shape[0], self.eval_batch_size):
            inputs = slices[start : start + self.eval_batch_size].to(self.device)
            logits = slice_logits(self.model, inputs, self.geometry, self.eval_batch_size)
            labels.append(to_original_grid(logits, out_size, valid_size).argmax(dim=1).cpu())
        return torch.cat(labels)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A test item is a whole volume (D x 3 x H x W, ~2 GB at 1024 px for 150 slices):
        # keep it on the host; predict_volume moves slices a chunk at a time.
        if self.trainer is not None and self.trainer.testing:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.case_scores = {}
        self.spacing_known = True

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        slices, label = batch["image"], batch["label"]
        if slices.ndim == 5:  # a batch of one case
            slices, label = slices[0], label[0]
        case = batch["case"][0] if isinstance(batch["case"], (list, tuple)) else batch["case"]
        spacing = batch.get("spacing")
        spacing_values: Optional[tuple[float, ...]] = None
        if spacing is not None:
            values = torch.as_tensor(spacing).reshape(-1)[-3:].tolist()
            if all(math.isfinite(v) for v in values):
                spacing_values = tuple(float(v) for v in values)
        if spacing_values is None:
            self.spacing_known = False
        valid = batch.get("valid_size")
        valid_size = tuple(int(v) for v in torch.as_tensor(valid).reshape(-1)[-2:].tolist()) if valid is not None else None
        prediction = self.predict_volume(slices, tuple(label.shape[-2:]), valid_size)
        self.case_scores[str(case)] = volume_scores(
            prediction.numpy(), label.cpu().numpy(), self.num_classes, spacing=spacing_values,
            nsd_tolerance=self.nsd_tolerance,
        )

    def on_test_epoch_end(self) -> None:
        unit = "mm" if self.spacing_known else "voxels"
        # With spacing missing for some cases, HD95 mixes units; report voxels then (said in the unit).
        summary = summarize_volume_scores(self.case_scores, self.class_names, unit=unit)
        self.report = {"summary": summary, "cases": self.case_scores}
        for key in ("dice", "hd95", "hd95_penalised", "nsd"):
            value = summary.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.log(f"test/{key}", float(value), batch_size=1)

    @torch.no_grad()
    def write_report(self, run_dir: Path, datamodule: L.LightningDataModule, num_pictures: int) -> dict[str, Any]:
        """Per-organ table for metrics.json; overlay pictures of test slices (``test_overlays.png``)
        and a per-organ Dice chart (``organ_dice.png``) unless ``num_pictures`` is 0."""
        from vpt.runs import save_organ_dice_chart, save_segmentation_overlays

        summary = self.report.get("summary", {})
        extras: dict[str, Any] = {
            "test/hd95_unit": summary.get("hd95_unit"),
            "test/nsd_tolerance": self.nsd_tolerance,
            "test/metric_definitions": metric_definitions(self.nsd_tolerance, summary.get("hd95_unit") or "mm"),
            "test/per_organ": summary.get("organs"),
            "test/cases": {case: {str(k): v for k, v in scores.items()} for case, scores in self.report.get("cases", {}).items()},
        }
        if num_pictures > 0:
            was_training = self.training
            self.eval()
            written = [
                save_segmentation_overlays(self, datamodule, num_pictures, run_dir / "test_overlays.png", self.class_names),
                save_organ_dice_chart(summary.get("organs") or {}, run_dir / "organ_dice.png"),
            ]
            self.train(was_training)
            extras["test/pictures"] = [path.name for path in written if path is not None]
        return extras


def check_data_folder(task_cfg: DictConfig) -> None:
    """A missing data folder (that will not be generated) stops with the two ways forward."""
    root = Path(str(task_cfg.data.get("root", "")))
    if not task_cfg.data.get("generate_phantoms", False) and not root.exists():
        raise DataError(
            f"Data folder {root} does not exist; prepare it as data/README.md explains (or set task.data.root), "
            "or train on generated CT phantoms with task=organ_seg_synthetic."
        )


def check_training_splits(task_cfg: DictConfig) -> None:
    """Before a training run writes anything: its data folder gives the train, validation and
    test splits a case each (it validates every epoch and ends with a test).

    Raises:
        DataError: missing folder or dataset.json problems, or an empty split (see
            ``check_split_sizes``); ConfigError: a required key left unset.
    """
    plan_segmentation_data(task_cfg, required_splits=("train", "val", "test"))


def plan_segmentation_data(task_cfg: DictConfig, required_splits: Optional[Sequence[str]] = None) -> list[str]:
    """The class names, and a check that the data folder can give every split a case, before
    any model is built (a large encoder takes minutes to load; a bad folder should not).

    Class names come from ``task.class_names`` when set, else from the data folder
    (``dataset.json`` ``labels``, either nnU-Net v2's or MSD's form).

    Raises:
        DataError: missing folder, no class names anywhere, or too few cases for the splits.
    """
    from vpt.data.registry import build_datamodule

    check_data_folder(task_cfg)
    names = task_cfg.class_names
    data_cfg = OmegaConf.to_container(task_cfg.data, resolve=True)
    probe = build_datamodule(data_cfg, num_classes=len(names) if names else None)  # type: ignore[arg-type]
    if hasattr(probe, "check_split_sizes"):
        probe.check_split_sizes(required=required_splits)
    if names:
        return [str(name) for name in names]
    log_setup(_logger, logging.INFO, "Classes from %s: %s.", data_cfg.get("root"), ", ".join(probe.class_names))  # type: ignore[union-attr]
    return list(probe.class_names)


@register_task("segmentation")
def build_segmentation(cfg: DictConfig) -> TaskParts:
    """Encoder (SAM or timm ViT) -> prompts -> decoder -> volume data -> :class:`SegmentationTask`."""
    from vpt.data.registry import build_datamodule
    from vpt.models import build_segmenter

    task_cfg = cfg.task
    class_names = plan_segmentation_data(task_cfg)
    num_classes = len(class_names)
    model, data = build_segmenter(cfg, num_classes)
    datamodule = build_datamodule(OmegaConf.to_container(task_cfg.data, resolve=True), num_classes=num_classes, **data)
    return _segmentation_parts(cfg, model, data, class_names, datamodule, getattr(datamodule, "geometry", None))


@register_prediction_builder("segmentation")
def build_segmentation_for_prediction(cfg: DictConfig, preprocessing: Any) -> TaskParts:
    """The run's model from its saved :class:`~vpt.data.preprocessing.Preprocessing`: no data read."""
    from vpt.models import build_segmenter

    class_names = list(preprocessing.class_names)
    model, data = build_segmenter(cfg, len(class_names))
    return _segmentation_parts(cfg, model, data, class_names, None, preprocessing.geometry())


def _segmentation_parts(cfg: DictConfig, model: Any, data: dict[str, Any], class_names: list[str], datamodule: Any, geometry: Any) -> TaskParts:
    task_cfg = cfg.task
    num_classes = len(class_names)
    family = cfg.model.family
    module = SegmentationTask(
        model,
        num_classes=num_classes,
        class_names=class_names,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        ce_weight=float(task_cfg.loss.ce_weight),
        dice_weight=float(task_cfg.loss.dice_weight),
        eval_batch_size=int(task_cfg.eval_batch_size),
        nsd_tolerance=float(task_cfg.nsd_tolerance),
        geometry=geometry,
        backbone_id=f"{cfg.model.name}@{cfg.model.img_size or 'default'}",
        hparams=OmegaConf.to_container(cfg, resolve=True),
    )
    metadata = {
        "task": "segmentation",
        "backbone": cfg.model.name,
        "family": family,
        "method": cfg.method.name,
        "num_classes": num_classes,
        "class_names": class_names,
        "input_size": list(data["image_size"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    return TaskParts(module=module, datamodule=datamodule, model=model, metadata=metadata)
