"""The run folder's pictures: which slices and images are shown, their titles, the charts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from vpt.data.medical import VolumeSegmentationDataModule
from vpt.data.medical.io import read_volume_geometry, write_volume
from vpt.data.medical.orientation import DisplayOrientation, display_orientation
from vpt.runs import (
    MAX_PICTURE_PIXELS,
    OVERLAY_ROWS_PER_CASE,
    choose_covering_slices,
    choose_one_per_class,
    model_input_slice,
    overlay_row,
    overlay_rows,
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


def test_missed_organs_get_the_first_slices() -> None:
    truth, prediction = _case()
    # One row only: the spleen, missed in the whole case, beats the slices with more organs.
    assert choose_covering_slices(truth, prediction, 1) == [9]


def test_overlay_rows_are_at_the_labels_native_size() -> None:
    truth, prediction = _case(size=20)
    image = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)  # the model's input size
    pictures = overlay_row(model_input_slice(image, [0.5] * 3, [0.25] * 3), truth[4], prediction[4])
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


def test_overlays_come_from_several_cases_a_few_rows_each_in_a_bounded_picture(tmp_path: Path) -> None:
    rows = overlay_rows(_MissesTheSpleen(), _Volumes(), 16, NAMES)
    cases = [title.split(" z=")[0] for title, _ in rows]
    assert sorted(set(cases)) == ["case_000", "case_001", "case_002"]
    assert max(cases.count(case) for case in set(cases)) <= OVERLAY_ROWS_PER_CASE
    # Nine rows of panels at their natural size would be ~2700 px tall.
    path = save_segmentation_overlays(_MissesTheSpleen(), _Volumes(), 16, tmp_path / "test_overlays.png", NAMES)
    assert path is not None
    with Image.open(path) as picture:
        assert max(picture.size) <= MAX_PICTURE_PIXELS and min(picture.size) > 300


# -- display orientation ----------------------------------------------------------------------

# Where a marker at the patient's anterior-left (axial, coronal: superior-left; sagittal:
# anterior-superior) must show in the usual radiological display: (top?, right?).
_EXPECTED_QUADRANT = {"axial": (True, True), "coronal": (True, True), "sagittal": (True, False)}
# The marker's position in LPS mm (x: +Left, y: +Posterior, z: +Superior), off the slice centre.
_MARKER = {"axial": (6.0, -4.0, 0.0), "coronal": (6.0, 0.0, 4.0), "sagittal": (0.0, -6.0, 4.0)}


def _directions() -> list[tuple[str, np.ndarray]]:
    """Stored index axes (x, y, z as columns, LPS) as real files have them."""
    axial_lps = np.eye(3)  # DICOM / ITK default
    axial_ras_identity = np.diag([-1.0, -1.0, 1.0])  # NIfTI with an identity RAS affine (MSD, our writer)
    axial_rows_anterior_up = np.diag([1.0, -1.0, 1.0])  # rows stored posterior to anterior (dcm2niix-like)
    axial_transposed = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # x index runs anterior
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # rows inferior, slices anterior
    coronal_upside_down = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return [
        ("axial", axial_lps), ("axial", axial_ras_identity), ("axial", axial_rows_anterior_up),
        ("axial", axial_transposed), ("coronal", coronal), ("coronal", coronal_upside_down), ("sagittal", sagittal),
    ]


@pytest.mark.parametrize("plane, direction", _directions())
def test_a_marker_shows_in_its_anatomical_quadrant(plane: str, direction: np.ndarray) -> None:
    """A volume of 9 x 16 x 20 voxels (1 mm) centred at the origin, a marker voxel placed from its
    LPS position through the direction alone (index = direction^T . position + centre)."""
    shape = (9, 16, 20)  # (z, y, x) indices
    centre = (np.array(shape[::-1]) - 1) / 2  # (x, y, z) index of the origin
    index = np.rint(direction.T @ np.array(_MARKER[plane]) + centre).astype(int)
    volume = np.zeros(shape)
    volume[index[2], index[1], index[0]] = 1.0
    shown = display_orientation(tuple(direction.ravel())).apply(volume[index[2]])
    row, column = (int(value) for value in np.argwhere(shown == 1.0)[0])
    top, right = _EXPECTED_QUADRANT[plane]
    assert (row < (shown.shape[0] - 1) / 2) == top and (column > (shown.shape[1] - 1) / 2) == right


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_arrays_written_by_vpt_are_shown_as_drawn(tmp_path: Path, suffix: str) -> None:
    """write_volume claims one orientation in every format (row 0 anterior, column 0 the
    patient's right, as the phantoms are drawn), so its arrays are shown untouched."""
    path = write_volume(tmp_path / f"v{suffix}", np.zeros((2, 3, 4), np.int16), spacing=(2.0, 0.5, 0.7))
    assert display_orientation(read_volume_geometry(path).direction) == DisplayOrientation()


def _write_marked_mr_set(root: Path, depth: int = 60) -> tuple[int, int]:
    """nnU-Net MR cases stored as NIfTI with an identity RAS affine (row 0 posterior, column 0
    the patient's right): a body of dark tissue and, on every slice, a bright marker voxel
    and an organ (class 1) at the patient's anterior-left, from their RAS position.

    Returns:
        The marker's (row, column) as stored.
    """
    side_y, side_x = 24, 20
    rng = np.random.default_rng(0)
    affine = np.eye(4)  # RAS: index x runs to the patient's right, index y to anterior
    marker_ras = np.array([3.0, 18.0, 0.0, 1.0])  # left of the centre (x 0..19 runs to the right), anterior (high y)
    column, row = (int(value) for value in (np.linalg.inv(affine) @ marker_ras)[:2])
    for folder, case in (("Tr", "case_000"), ("Tr", "case_001"), ("Ts", "case_002")):
        image = rng.uniform(0.38, 0.42, size=(depth, side_y, side_x)).astype(np.float32)
        image[:, :2] = 1.0  # a bright posterior band sets the 99.5th percentile, so tissue is dark
        image[:, row, column] = 5.0
        label = np.zeros((depth, side_y, side_x), np.uint8)
        label[:, row - 1 : row + 2, column - 1 : column + 2] = 1
        label[depth // 2, 2:5, 2:5] = 2  # a small organ on one slice only
        (root / f"images{folder}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{folder}").mkdir(exist_ok=True)
        # nibabel indexes (x, y, z): the (z, y, x) arrays are transposed.
        nib.save(nib.Nifti1Image(image.T.copy(), affine), root / f"images{folder}" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.T.copy(), affine), root / f"labels{folder}" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1, "spot": 2}, "numTraining": 2,
        "file_ending": ".nii.gz",
    }))
    return row, column


class _MissesTheSpot:
    """Predicts the lesion where it is and never the spot (class 2)."""

    def __init__(self, datamodule: VolumeSegmentationDataModule) -> None:
        self.truth = datamodule.volume_dataset("test")[0]["label"]

    def predict_volume(self, slices: torch.Tensor, out_size: tuple[int, int], valid_size=None) -> torch.Tensor:
        assert tuple(self.truth.shape[-2:]) == tuple(out_size)
        return torch.where(self.truth == 2, 0, self.truth)


@pytest.mark.parametrize("cache", [True, False])
def test_overlays_of_real_volumes_show_the_datas_pixels_in_display_orientation(tmp_path: Path, cache: bool) -> None:
    """A 60-slice MR case: at most a few rows (the missed spot's slice among them), the image
    panel on the label's 24 x 20 grid (the network sees 16 x 16) with the marker sharp, and
    the marker at the top right (anterior, patient's left) in all three panels."""
    row, column = _write_marked_mr_set(tmp_path / "mr")
    datamodule = VolumeSegmentationDataModule(
        tmp_path / "mr", layout="nnunet", image_size=16, window=None, mean=(0.5,) * 3, std=(0.25,) * 3,
        augment=False, val_fraction=0.5, context_slices=1, cache=cache, cache_dir=tmp_path / "cache",
    )
    datamodule.setup()
    rows = overlay_rows(_MissesTheSpot(datamodule), datamodule, 16, ["background", "lesion", "spot"])
    assert 1 <= len(rows) <= OVERLAY_ROWS_PER_CASE
    assert any(title.startswith("case_002 z=30 ") and "spot 0.00 (missed)" in title for title, _ in rows)
    for _, (image, truth, prediction) in rows:
        assert image.shape == truth.shape == prediction.shape == (24, 20, 3)
        # Stored row 0 is posterior and column 0 the patient's right: both flipped for display.
        shown_row, shown_column = 23 - row, 19 - column
        assert shown_row < 12 and shown_column >= 10  # anterior (top), patient's left (right)
        gray = image[..., 0]
        assert gray[shown_row, shown_column] == pytest.approx(1.0)  # the data's own voxel, not resampled
        neighbours = gray[shown_row - 1 : shown_row + 2, shown_column - 1 : shown_column + 2].copy()
        neighbours[1, 1] = 0.0
        assert neighbours.max() < 0.9
        for overlay in (truth, prediction):
            assert not np.allclose(overlay[shown_row, shown_column], image[shown_row, shown_column])  # lesion colour


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
