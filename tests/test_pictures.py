"""The run folder's pictures: which slices and images are shown, their titles, the charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt.runs import (
    choose_covering_slices,
    choose_one_per_class,
    overlay_row,
    plot_curves,
    save_organ_dice_chart,
    save_segmentation_overlays,
    slice_dice,
    slice_title,
)

NAMES = ["background", "liver", "spleen", "kidney", "stomach"]


def _case(depth: int = 12, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Liver on every slice and found; spleen on slice 9 only and missed; a false-positive
    stomach on slice 2 only; kidney on slices 4-6, found."""
    truth = np.zeros((depth, size, size), dtype=np.int64)
    truth[:, 2:10, 2:10] = 1
    truth[9, 12:15, 12:15] = 2
    truth[4:7, 11:14, 1:4] = 3
    prediction = truth.copy()
    prediction[truth == 2] = 0
    prediction[2, 12:15, 12:15] = 4
    return truth, prediction


def _reference_dice(truth: np.ndarray, prediction: np.ndarray, organ: int) -> float:
    t, p = truth == organ, prediction == organ
    return float(2 * (t & p).sum() / (t.sum() + p.sum()))


def test_chosen_slices_show_every_organ_of_truth_and_prediction() -> None:
    truth, prediction = _case()
    for count in (3, 5):
        chosen = choose_covering_slices(truth, prediction, count)
        assert len(chosen) == count and chosen == sorted(chosen)
        shown = set().union(*(set(np.unique(truth[z])) | set(np.unique(prediction[z])) for z in chosen))
        assert {1, 2, 3, 4} <= shown  # the missed spleen (slice 9) and the false-positive stomach (slice 2)
    assert {2, 9} <= set(choose_covering_slices(truth, prediction, 3))


def test_titles_name_the_case_and_each_organs_slice_dice() -> None:
    truth, prediction = _case()
    prediction[5, 11:14, 1:3] = 0  # kidney half found on slice 5
    title = slice_title("case_003", 5, truth[5], prediction[5], NAMES)
    assert title.startswith("case_003 z=5 | ")
    for organ in (1, 3):
        assert f"{NAMES[organ]} {_reference_dice(truth[5], prediction[5], organ):.2f}" in title
    assert slice_dice(truth[5], prediction[5])[3] == pytest.approx(_reference_dice(truth[5], prediction[5], 3))
    assert "spleen 0.00 (missed)" in slice_title("case_003", 9, truth[9], prediction[9], NAMES)
    assert "stomach 0.00 (false positive)" in slice_title("case_003", 2, truth[2], prediction[2], NAMES)


def test_overlay_rows_are_at_the_labels_native_size() -> None:
    truth, prediction = _case(size=20)
    image = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)  # the model's input size
    pictures = overlay_row(image, truth[4], prediction[4], [0.5] * 3, [0.25] * 3)
    assert [picture.shape for picture in pictures] == [(20, 20, 3)] * 3
    assert all(0.0 <= picture.min() and picture.max() <= 1.0 for picture in pictures)


class _Volumes:
    """A test data module of three cases whose images (32 px) are larger than their labels (16 px)."""

    mean, std = [0.5] * 3, [0.25] * 3

    def test_dataloader(self) -> list[dict]:
        batches = []
        for number in range(3):
            truth, _ = _case()
            batches.append({"image": torch.zeros(1, truth.shape[0], 3, 32, 32), "label": torch.from_numpy(truth)[None],
                            "case": [f"case_{number:03d}"]})
        return batches


class _MissesTheSpleen:
    def predict_volume(self, slices: torch.Tensor, out_size: tuple[int, int], valid_size=None) -> torch.Tensor:
        return torch.from_numpy(_case()[1])


def test_overlays_come_from_several_cases(tmp_path: Path) -> None:
    path = save_segmentation_overlays(_MissesTheSpleen(), _Volumes(), 7, tmp_path / "test_overlays.png", NAMES)
    assert path is not None
    with Image.open(path) as picture:
        assert picture.size[0] > 0


def test_organ_dice_chart_is_written(tmp_path: Path) -> None:
    organs = {
        "liver": {"class_index": 1, "dice": 0.91, "cases": 3, "missed": 0},
        "spleen": {"class_index": 2, "dice": 0.2, "cases": 3, "missed": 2},
        "stomach": {"class_index": 4, "dice": float("nan"), "cases": 0, "missed": 0},
    }
    path = save_organ_dice_chart(organs, tmp_path / "organ_dice.png")
    with Image.open(path) as picture:
        picture.verify()
    assert save_organ_dice_chart({}, tmp_path / "none.png") is None


def test_curves_show_the_training_loss_of_short_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Epochs of 3 steps with log_every_n_steps=10: no per-step rows, only epoch-level ones.
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,lr-SGD/pg1,lr-SGD/pg2,step,test/dice,train/loss_epoch,val/loss\n"
        "0,,,2,,,0.9\n0,,,2,,1.2,\n1,,,5,,,0.7\n1,,,5,,0.8,\n1,,,5,0.5,,\n"
    )
    import matplotlib.axes

    drawn: list[str] = []
    plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(kwargs.get("label", ""))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    assert plot_curves(csv, tmp_path / "curves.png") is not None
    assert "train/loss (per epoch)" in drawn and "val/loss" in drawn
    assert "test/dice" not in drawn  # a final score, not a curve

    # Two parameter groups on one schedule: one learning-rate line.
    csv.write_text(
        "epoch,lr-SGD/pg1,lr-SGD/pg2,step,train/loss_step\n,0.1,0.1,0,\n,0.05,0.05,10,\n0,,,10,1.0\n"
    )
    drawn.clear()
    plot_curves(csv, tmp_path / "curves2.png")
    assert [label for label in drawn if label.startswith("lr")] == ["lr-SGD/pg1"]
    assert "train/loss (per step)" in drawn


@pytest.mark.parametrize("count", [3, 5, 8])
def test_classification_previews_cover_every_class(count: int) -> None:
    labels = [0, 0, 0, 0, 1, 1, 0, 2, 0, 3, 4]
    chosen = choose_one_per_class(labels, count)
    assert len(chosen) == count and len(set(chosen)) == count
    assert len({labels[i] for i in chosen}) == min(count, 5)


class _ImagesOfFiveClasses:
    """Batches of 4 images where class 4 comes last, after many images of class 0."""

    mean, std = [0.5] * 3, [0.25] * 3

    def test_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        labels = torch.tensor([0] * 10 + [1, 2, 3, 0, 0, 4])
        return [(torch.randn(4, 3, 8, 8), labels[i : i + 4]) for i in range(0, len(labels), 4)]


def test_classification_report_previews_every_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpt.tasks import classification

    shown: dict[str, list[int]] = {}

    def record(images, labels, predictions, class_names, mean, std, out_png):  # type: ignore[no-untyped-def]
        shown["labels"] = list(labels)
        return out_png

    monkeypatch.setattr(classification, "save_classification_preview", record)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    task = classification.ClassificationTask(model, num_classes=5, class_names=list("abcde"))
    extras = task.write_report(tmp_path, _ImagesOfFiveClasses(), 6)
    assert sorted(set(shown["labels"])) == [0, 1, 2, 3, 4] and len(shown["labels"]) == 6
    assert extras["test/pictures"] == ["test_predictions.png"]
    task.write_report(tmp_path, _ImagesOfFiveClasses(), 3)
    assert len(set(shown["labels"])) == 3
