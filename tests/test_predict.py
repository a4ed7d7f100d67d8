"""vpt-predict: unlabelled volumes, DICOM series and 2D images in, outputs on the input's grid out."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_training import compose_config, run_cli
from vpt.cli.train import train
from vpt.data.classification import read_rgb
from vpt.data.medical.io import read_volume
from vpt.data.medical.transforms import build_segmentation_transforms, to_model_input
from vpt.data.medical.windowing import window_ct
from vpt.data.synthetic_shapes import generate_shapes
from vpt.errors import ConfigError, DataError
from vpt.inference import PREDICTIONS_CSV, LoadedRun, load_run, predict

# The phantom crop every volume test uses: few slices (fast), and three different sides so a
# transposed axis cannot pass.
_CROP = (slice(12, 20), slice(8, 88), slice(None))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished segmentation run (CT phantoms) and a classification run, trained in-process."""
    tmp = tmp_path_factory.mktemp("predict_runs")
    seg = compose_config([
        "experiment=quickstart", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "num_preview_images=0",
        f"task.data.root={tmp / 'phantoms'}",
    ])
    train(seg, run_dir=tmp / "seg")
    cls = compose_config([
        "experiment=quickstart_classification", "trainer.max_epochs=1", "task.data.samples_per_class=8",
        "num_preview_images=0", "trainer.enable_progress_bar=false",
    ])
    train(cls, run_dir=tmp / "cls")
    return {"seg": tmp / "seg", "cls": tmp / "cls", "phantoms": tmp / "phantoms"}


@pytest.fixture(scope="module")
def seg_run(runs) -> LoadedRun:
    return load_run(run_dir=runs["seg"], device="cpu")


@pytest.fixture(scope="module")
def phantom(runs) -> np.ndarray:
    """A cropped phantom CT, float32 HU (z, y, x) = (8, 80, 96)."""
    path = sorted((runs["phantoms"] / "imagesTr").glob("*_0000.nii.gz"))[0]
    return np.ascontiguousarray(read_volume(path)[0][_CROP])


def _reference_slices(run: LoadedRun, volume: np.ndarray) -> torch.Tensor:
    """The run's test-time preprocessing written out plainly: CT window, slices z-1, z, z+1
    (edges repeated) as channels, resize, normalise."""
    saved = run.preprocessing  # what the run saved; equal to its data module's (test below)
    assert saved is not None and saved.context_slices == 1 and saved.patch_size is None
    unit = window_ct(volume, *saved.window)
    padded = np.concatenate([unit[:1], unit, unit[-1:]])
    planes = [np.stack([padded[z], padded[z + 1], padded[z + 2]], axis=-1) for z in range(len(unit))]
    transform = build_segmentation_transforms(saved.image_size, train=False)
    return torch.stack([to_model_input(transform(image=s)["image"], saved.mean, saved.std) for s in planes])


def _reference_labels(run: LoadedRun, volume: np.ndarray) -> np.ndarray:
    return run.parts.module.predict_volume(_reference_slices(run, volume), volume.shape[1:]).numpy()


@torch.no_grad()
def _reference_probabilities(run: LoadedRun, volume: np.ndarray) -> np.ndarray:
    """(z, y, x, C) softmax of the logits resized to the slice size."""
    logits = run.parts.model(_reference_slices(run, volume))
    resized = F.interpolate(logits.float(), size=volume.shape[1:], mode="bilinear", align_corners=False)
    return resized.softmax(dim=1).permute(0, 2, 3, 1).numpy()


def _rotation(x_deg: float, y_deg: float, z_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad([x_deg, y_deg, z_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _itk_volume(volume: np.ndarray, path: Path) -> sitk.Image:
    """Write a (z, y, x) volume with an oblique direction and a shifted origin."""
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-31.5, 17.25, 104.0))
    image.SetDirection(tuple(_rotation(10, -5, 25).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return image


def _assert_same_grid(written: sitk.Image, reference: sitk.Image) -> None:
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_oblique_shifted_nifti_aligns_voxel_for_voxel(runs, seg_run, phantom, tmp_path) -> None:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20, -15, 30) @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [12.5, -40.25, 7.0]
    source = nib.Nifti1Image(np.ascontiguousarray(phantom.transpose(2, 1, 0)), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=1)
    scan = tmp_path / "in" / "oblique.nii.gz"
    scan.parent.mkdir()
    nib.save(source, str(scan))

    written = predict(scan, tmp_path / "out", run_dir=runs["seg"], device="cpu", save_probabilities=True)
    mask_path, probability_path = tmp_path / "out" / "oblique.nii.gz", tmp_path / "out" / "oblique_probabilities.nii.gz"
    assert set(written) == {mask_path, probability_path}

    # The header: same grid, same qform and sform (never a rebuilt diagonal affine).
    original, mask = nib.load(str(scan)), nib.load(str(mask_path))
    assert mask.shape == original.shape
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
    np.testing.assert_allclose(mask.get_qform(), original.get_qform(), atol=1e-5)
    np.testing.assert_allclose(mask.get_sform(), original.get_sform(), atol=1e-5)
    np.testing.assert_allclose(mask.header.get_zooms(), original.header.get_zooms(), atol=1e-6)
    _assert_same_grid(sitk.ReadImage(str(mask_path)), sitk.ReadImage(str(scan)))
    assert mask.get_data_dtype() == np.uint8

    # The voxels: the labels testing would give, at the same (z, y, x) positions.
    labels = np.asarray(mask.dataobj).transpose(2, 1, 0)
    expected = _reference_labels(seg_run, read_volume(scan)[0])
    np.testing.assert_array_equal(labels, expected)

    # Probabilities: a vector image on the same grid, summing to 1, whose argmax is the mask.
    probability_image = sitk.ReadImage(str(probability_path))
    _assert_same_grid(probability_image, sitk.ReadImage(str(scan)))
    probabilities = sitk.GetArrayFromImage(probability_image)
    assert probabilities.dtype == np.float32 and probabilities.shape == (*labels.shape, len(seg_run.class_names))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    chosen = np.take_along_axis(probabilities, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    np.testing.assert_array_equal(chosen, probabilities.max(axis=-1))  # ties aside, argmax == mask
    reference = _reference_probabilities(seg_run, read_volume(scan)[0])
    # Labels of a barely trained model may be all background; the probabilities still vary
    # over the anatomy, so a shifted or flipped grid fails here.
    assert reference[..., 0].std() > 1e-3, "a constant prediction would not show a misalignment"
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)


def test_folder_of_volumes_keeps_each_format(runs, seg_run, phantom, tmp_path) -> None:
    folder = tmp_path / "in"
    inputs = {"case_a.nrrd": _itk_volume(phantom, folder / "case_a.nrrd"),
              "case_b.mha": _itk_volume(phantom[:5], folder / "case_b.mha")}
    predict(folder, tmp_path / "out", run_dir=runs["seg"], device="cpu", batch_size=3, progress=False)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["case_a.nrrd", "case_b.mha"]
    for name, image in inputs.items():
        written = sitk.ReadImage(str(tmp_path / "out" / name))
        _assert_same_grid(written, image)
        expected = _reference_labels(seg_run, sitk.GetArrayFromImage(image).astype(np.float32))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)


def _write_dicom_series(volume: np.ndarray, folder: Path) -> sitk.Image:
    """A CT series of 2D DICOM slices with position, orientation and spacing tags."""
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-30.0, 12.0, 100.0))
    direction = _rotation(0, 0, 17)
    image.SetDirection(tuple(direction.ravel()))
    folder.mkdir(parents=True)
    series = "1.2.826.0.1.3680043.2.1125.9.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # DICOM's orientation lists the row then the column direction cosines (ITK's columns).
    orientation = "\\".join(f"{value:.10f}" for value in (*direction[:, 0], *direction[:, 1]))
    for index in range(image.GetDepth()):
        piece = image[:, :, index]
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series}.{index + 1}",
            "0020|000d": f"{series}.0", "0020|000e": series, "0020|0013": str(index + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{value:.10f}" for value in image.TransformIndexToPhysicalPoint((0, 0, index))),
            "0028|0030": "0.8\\0.8", "0018|0050": "2.5", "0028|1052": "0", "0028|1053": "1",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(piece)
    return image


def test_dicom_series_gives_a_nifti_mask_with_the_series_geometry(runs, seg_run, phantom, tmp_path) -> None:
    volume = np.clip(phantom[:, :64, :64], -1024, 3000)
    image = _write_dicom_series(volume, tmp_path / "series_7")
    predict(tmp_path / "series_7", tmp_path / "out", run_dir=runs["seg"], device="cpu", progress=False)
    written = sitk.ReadImage(str(tmp_path / "out" / "series_7.nii.gz"))
    _assert_same_grid(written, image)
    expected = _reference_labels(seg_run, volume.astype(np.int16).astype(np.float32))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)


def test_2d_images_give_mask_and_overlay_pngs(runs, seg_run, phantom, tmp_path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    grey = (window_ct(phantom[4], -125, 275) * 255).astype(np.uint8)  # (80, 96)
    Image.fromarray(grey).save(folder / "grey.png")
    colour = np.stack([grey[:70, :50], grey[5:75, 10:60], grey[10:80, 20:70]], axis=-1)  # (70, 50, 3)
    Image.fromarray(colour).save(folder / "colour.png")
    predict(folder, tmp_path / "out", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    datamodule = seg_run.preprocessing
    transform = build_segmentation_transforms(datamodule.image_size, train=False)
    for name, picture in (("grey", grey), ("colour", colour)):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        overlay = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png"))
        assert mask.dtype == np.uint8 and mask.shape == picture.shape[:2]
        assert overlay.shape == (*picture.shape[:2], 3)
        unit = read_rgb(folder / f"{name}.png").astype(np.float32) / 255.0
        unit = unit[..., 0] if name == "grey" else unit
        slices = to_model_input(transform(image=unit)["image"], datamodule.mean, datamodule.std)[None]
        expected = seg_run.parts.module.predict_volume(slices, picture.shape[:2])[0].numpy()
        np.testing.assert_array_equal(mask, expected)
        with np.load(tmp_path / "out" / f"{name}_probabilities.npz") as stored:
            probabilities = stored["probabilities"]
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
        chosen = np.take_along_axis(probabilities, mask[..., None].astype(np.int64), axis=-1)[..., 0]
        np.testing.assert_array_equal(chosen, probabilities.max(axis=-1))


def test_classification_writes_a_csv_of_probabilities(runs, tmp_path) -> None:
    images, _ = generate_shapes(num_classes=4, samples_per_class=1, size=32, seed=5)
    folder = tmp_path / "shapes"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"shape_{index}.png")
    written = predict(folder, tmp_path / "out", run_dir=runs["cls"], device="cpu", batch_size=3, progress=False)
    assert written == [tmp_path / "out" / PREDICTIONS_CSV]
    with open(written[0], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    run = load_run(run_dir=runs["cls"], device="cpu")
    datamodule = run.preprocessing
    assert images.shape[1:3] == tuple(datamodule.image_size)  # no resize: a plain reference
    mean, std = np.asarray(datamodule.mean, np.float32), np.asarray(datamodule.std, np.float32)
    assert len(rows) == len(images)
    assert list(rows[0]) == ["path", "predicted", *run.class_names]
    for row in rows:
        probabilities = np.array([float(row[name]) for name in run.class_names])
        assert abs(probabilities.sum() - 1.0) < 1e-5
        # The reference: the planted pixels scaled to [0, 1], normalised by hand, through the model.
        pixels = images[int(Path(row["path"]).stem.split("_")[1])].astype(np.float32) / 255.0
        x = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            expected = torch.softmax(run.parts.model(x), dim=-1)[0].numpy()
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
        assert row["predicted"] == run.class_names[int(expected.argmax())]


def test_an_existing_output_is_never_overwritten(runs, phantom, tmp_path) -> None:
    scan = tmp_path / "in" / "case.nii.gz"
    _itk_volume(phantom, scan)
    taken = tmp_path / "out" / "case.nii.gz"
    taken.parent.mkdir()
    taken.write_bytes(b"an earlier result")
    with pytest.raises(ConfigError, match=r"case\.nii\.gz already exists.*output="):
        predict(scan, tmp_path / "out", run_dir=runs["seg"], device="cpu", save_probabilities=True)
    assert taken.read_bytes() == b"an earlier result"
    assert sorted(path.name for path in taken.parent.iterdir()) == ["case.nii.gz"]  # no probabilities either


def test_inputs_that_cannot_work_are_one_sentence(runs, tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist; pass input="):
        predict(tmp_path / "missing", tmp_path / "out", run_dir=runs["seg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no volumes"):
        predict(tmp_path / "empty", tmp_path / "out", run_dir=runs["seg"])
    (tmp_path / "two").mkdir()
    for name in ("a.png", "a.jpg"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "two" / name)
    with pytest.raises(DataError, match="would both write"):
        predict(tmp_path / "two", tmp_path / "out", run_dir=runs["seg"])
    with pytest.raises(DataError, match="classifies 2D images"):
        predict(runs["phantoms"] / "imagesTr", tmp_path / "out", run_dir=runs["cls"])
    with pytest.raises(ConfigError, match="device=cuda:99"):
        predict(tmp_path / "two" / "a.png", tmp_path / "out", run_dir=runs["seg"], device="cuda:99")


def test_cli_predicts_and_reports_a_missing_input_in_one_line(runs, phantom, tmp_path) -> None:
    scan = tmp_path / "in" / "small.mha"
    image = _itk_volume(phantom[:3], scan)
    ok = run_cli([f"run_dir={runs['seg']}", f"input={scan}", f"output={tmp_path / 'out'}", "device=cpu"],
                 cwd=tmp_path, script="scripts/predict.py")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "Traceback" not in ok.stderr
    _assert_same_grid(sitk.ReadImage(str(tmp_path / "out" / "small.mha")), image)

    missing = run_cli([f"run_dir={runs['seg']}", f"input={tmp_path / 'nowhere'}", f"output={tmp_path / 'out2'}"],
                      cwd=tmp_path, script="scripts/predict.py")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1 and "nowhere does not exist" in errors[0], missing.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_one_line_and_no_mask_is_written(runs, phantom, tmp_path, suffix) -> None:
    """ITK reads a truncated NIfTI file as if the missing slices were zeros; predict must refuse
    it (naming the file) before writing a mask for it or for any other scan of the folder."""
    folder = tmp_path / "in"
    _itk_volume(phantom, folder / f"intact{suffix}")
    _itk_volume(phantom, tmp_path / f"whole{suffix}")
    data = (tmp_path / f"whole{suffix}").read_bytes()
    (folder / f"truncated{suffix}").write_bytes(data[: len(data) * 2 // 3])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"truncated{suffix}"))).shape == phantom.shape  # ITK says nothing

    result = run_cli([f"run_dir={runs['seg']}", f"input={folder}", f"output={tmp_path / 'out'}", "device=cpu"],
                     cwd=tmp_path, script="scripts/predict.py")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1 and f"truncated{suffix}" in errors[0] and "truncated" in errors[0] and "intact copy" in errors[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # The library call gives the same error.
    with pytest.raises(DataError, match="truncated"):
        predict(folder / f"truncated{suffix}", tmp_path / "out3", run_dir=runs["seg"], device="cpu")


def test_several_prompt_files_predict_in_one_pass_as_each_alone(runs, tmp_path) -> None:
    """A prompt bank through vpt-predict: every task's CSV equals predicting with that run alone."""
    from vpt.cli.predict import main

    second = tmp_path / "cls2"
    train(compose_config(["experiment=quickstart_classification", "trainer.max_epochs=1", "task.data.samples_per_class=8",
                          "num_preview_images=0", "trainer.enable_progress_bar=false", "seed=7"]), run_dir=second)
    images, _ = generate_shapes(num_classes=4, samples_per_class=1, size=32, seed=9)
    folder = tmp_path / "shapes"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"shape_{index}.png")
    weights = [runs["cls"] / "prompts.safetensors", second / "prompts.safetensors"]
    main([f"weights={weights[0]}", f"weights={weights[1]}", f"input={folder}", f"output={tmp_path / 'bank'}",
          "device=cpu", "progress=false", "batch_size=3"])
    for run_folder in (runs["cls"], second):
        alone = predict(folder, tmp_path / f"alone_{run_folder.name}", run_dir=run_folder, device="cpu", progress=False)
        with open(alone[0], newline="", encoding="utf-8") as handle:
            expected = list(csv.DictReader(handle))
        with open(tmp_path / "bank" / f"predictions_{run_folder.name}.csv", newline="", encoding="utf-8") as handle:
            got = list(csv.DictReader(handle))
        assert [row["path"] for row in got] == [row["path"] for row in expected]
        for row_got, row_expected in zip(got, expected):
            assert row_got["predicted"] == row_expected["predicted"]
            for name in row_expected:
                if name not in ("path", "predicted"):
                    assert abs(float(row_got[name]) - float(row_expected[name])) < 1e-5


# -- a trained model without its training data ---------------------------------------------------


def test_the_saved_preprocessing_is_what_the_data_module_applies(runs) -> None:
    """preprocessing.json equals the weights' record, and the inputs the saved record makes of a
    test case's file are the tensors the run's test loader gave that case."""
    import json

    from omegaconf import OmegaConf

    from vpt.data.preprocessing import PREPROCESSING_FILE, Preprocessing
    from vpt.inference.segmentation import SegmentationPreprocessing
    from vpt.methods.trained_weights import read_trained_metadata
    from vpt.tasks import build_task

    for name in ("seg", "cls"):
        on_disk = json.loads((runs[name] / PREPROCESSING_FILE).read_text())
        assert read_trained_metadata(runs[name] / "prompts.safetensors")["preprocessing"] == on_disk
    saved = Preprocessing.from_dict(json.loads((runs["seg"] / PREPROCESSING_FILE).read_text()))
    assert saved.intensity == "raw" and saved.window == (-125.0, 275.0) and saved.context_slices == 1 and saved.sliced
    assert saved.class_names[0] == "background" and len(saved.class_names) == 9
    assert saved.orientation == "stored" and not saved.binary_255_as_1  # 9 classes: 255 is no class

    datamodule = build_task(OmegaConf.load(runs["seg"] / "config.yaml")).datamodule
    datamodule.setup("test")
    assert datamodule.preprocessing_record() == saved  # the object testing builds its inputs from
    assert datamodule.evaluation_inputs().geometry == datamodule.geometry  # and training its slices
    case = datamodule.cases("test")[0]
    loaded = datamodule.volume_dataset("test")[0]["image"]  # (D, 3, H, W), as testing scored it
    volume, spacing = read_volume(case.image)
    preprocessing = SegmentationPreprocessing.from_preprocessing(saved)
    unit = preprocessing.unit_volume(volume, case.case_id, str(case.image))
    made = preprocessing.volume_inputs(unit, 0, volume.shape[0], spacing=(spacing[1], spacing[2]))
    assert made.shape == loaded.shape
    torch.testing.assert_close(made, loaded, atol=2e-3, rtol=0)  # the training cache stores float16


def test_the_record_says_when_a_layout_was_already_in_unit_range(tmp_path) -> None:
    """2D folders (and Synapse slices) are only clipped in training: the record says so."""
    from tests.test_medical_data import write_folder2d
    from vpt.data.medical import VolumeSegmentationDataModule
    from vpt.data.preprocessing import Preprocessing

    write_folder2d(tmp_path / "folder")
    module = VolumeSegmentationDataModule(tmp_path / "folder", num_classes=3, image_size=8, val_fraction=0, test_fraction=0)
    metadata = {"input_size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": ["background", "a", "b"]}
    record = Preprocessing.from_datamodule("segmentation", module, metadata)
    assert record.intensity == "unit" and record.image_size == (8, 8) and record.num_classes == 3
    assert Preprocessing.from_dict(record.to_dict()) == record
    from vpt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not valid"):
        Preprocessing.from_dict({**record.to_dict(), "image_size": 224}, "bad.safetensors")
    with pytest.raises(CheckpointError, match="version"):
        Preprocessing.from_dict({**record.to_dict(), "version": 99}, "new.safetensors")
    with pytest.raises(CheckpointError, match="oriented 'RAS'"):
        Preprocessing.from_dict({**record.to_dict(), "orientation": "RAS"}, "other.safetensors")
    binary = Preprocessing.from_datamodule("segmentation", module, {**metadata, "class_names": ["background", "lesion"]})
    assert binary.binary_255_as_1 and Preprocessing.from_dict(binary.to_dict()) == binary


def test_predict_after_the_training_data_is_gone_equals_predict_before(runs, phantom, tmp_path) -> None:
    scan = tmp_path / "in" / "case.nii.gz"
    _itk_volume(phantom, scan)
    predict(scan, tmp_path / "before", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    data = runs["phantoms"]
    hidden = data.with_name("phantoms_moved_away")
    data.rename(hidden)
    try:
        predict(scan, tmp_path / "after", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
        # The weights file alone (its metadata holds the config and the preprocessing) does as well.
        predict(scan, tmp_path / "weights_only", weights=runs["seg"] / "prompts.safetensors", device="cpu", progress=False)
    finally:
        hidden.rename(data)
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "before" / "case.nii.gz")))
    for folder in ("after", "weights_only"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / "case.nii.gz"))), before)
    # The probabilities (this short run's labels are mostly background) are equal bit for bit too.
    scores = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "before" / "case_probabilities.nii.gz")))
    assert scores.std() > 0.01
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "after" / "case_probabilities.nii.gz"))), scores)


def test_another_base_encoder_is_refused_naming_both(runs, phantom, tmp_path) -> None:
    """The run trained on a random-init micro ViT (seeded); weights from another file, or another
    seed's random init, are another base encoder: refused before anything is written."""
    from safetensors.torch import save_file

    from vpt.errors import CheckpointError

    scan = tmp_path / "in" / "case.nii.gz"
    _itk_volume(phantom, scan)
    other = tmp_path / "other_micro_vit.safetensors"
    vit = timm_micro_vit()
    save_file({key: value.contiguous() for key, value in vit.state_dict().items()}, str(other))
    with pytest.raises(CheckpointError, match=r"trained on vit_tiny_patch16_224 from random init .*rebuilt base encoder is "
                       r"vit_tiny_patch16_224 from checkpoint other_micro_vit\.safetensors.*model\.checkpoint="):
        predict(scan, tmp_path / "out", run_dir=runs["seg"], overrides=[f"model.checkpoint={other}"], device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="fingerprint"):
        predict(scan, tmp_path / "out", run_dir=runs["seg"], overrides=["seed=12345"], device="cpu", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def timm_micro_vit() -> torch.nn.Module:
    """A model of the quickstart's micro ViT shape (model/vit_micro.yaml) with other weights."""
    import timm

    torch.manual_seed(99)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0)


# -- a shareable model folder (vpt-export) ----------------------------------------------------------


def test_export_then_predict_from_the_folder_equals_the_run(runs, phantom, tmp_path) -> None:
    """vpt-export writes the folder; vpt-predict model=DIR (the CLI, with the training data moved
    away) writes the same voxels as predicting from the run folder."""
    import json

    from vpt.cli.export import main as export_main

    scan = tmp_path / "in" / "case.nii.gz"
    _itk_volume(phantom, scan)
    export_main([f"run_dir={runs['seg']}", f"output={tmp_path / 'model'}"])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model" / "model.safetensors")).keys() == load_file(str(runs["seg"] / "prompts.safetensors")).keys()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["format"] == "vpt.model" and config["task"] == "segmentation"
    assert config["preprocessing"] == json.loads((runs["seg"] / "preprocessing.json").read_text())

    predict(scan, tmp_path / "from_run", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    data = runs["phantoms"]
    hidden = data.with_name("phantoms_away_for_export")
    data.rename(hidden)
    try:
        result = run_cli([f"model={tmp_path / 'model'}", f"input={scan}", f"output={tmp_path / 'from_model'}",
                          "save_probabilities=true", "device=cpu", "progress=false"], cwd=tmp_path, script="scripts/predict.py")
    finally:
        hidden.rename(data)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("case.nii.gz", "case_probabilities.nii.gz"):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_model" / name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_run" / name))),
        )


def test_the_model_card_names_the_runs_metrics_classes_and_base(runs, tmp_path) -> None:
    import json

    from vpt.inference.export import export_model
    from vpt.methods.trained_weights import read_trained_metadata

    folder = export_model(runs["seg"], tmp_path / "card_model")
    card = (folder / "README.md").read_text()
    metrics = json.loads((runs["seg"] / "metrics.json").read_text())
    scalars = {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)}
    assert {"test/dice", "test/nsd"} <= set(scalars)
    for key, value in scalars.items():
        assert f"| {key} | {value:.4f} |" in card, key
    for organ in metrics["test/per_organ"]:
        assert f"| {organ} |" in card
    base = read_trained_metadata(runs["seg"] / "prompts.safetensors")["base_encoder"]
    assert base["fingerprint"] in card and "vit_tiny_patch16_224" in card and "random initialisation" in card
    assert f"trained parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,}" in card
    assert f"vpt-predict model={folder.name}" in card and "CT window" in card
    assert card.startswith("---\nlibrary_name: vpt\n")


def test_export_never_overwrites_and_refuses_what_is_not_a_run(runs, tmp_path) -> None:
    from vpt.inference.export import export_model, load_pretrained

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        export_model(runs["seg"], taken)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is not a finished vpt run"):
        export_model(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="holds no model.safetensors"):
        load_pretrained(taken)


def test_load_pretrained_gives_the_runs_classifier(runs, tmp_path) -> None:
    import vpt
    from vpt.inference.export import export_model

    folder = export_model(runs["cls"], tmp_path / "cls_model")
    loaded = vpt.load_pretrained(folder, device="cpu")
    run = load_run(run_dir=runs["cls"], device="cpu")
    assert loaded.class_names == run.class_names == ["disk", "square", "triangle", "cross"]
    assert loaded.preprocessing == run.preprocessing and loaded.parts.datamodule is None
    images = torch.randn(3, 3, *loaded.preprocessing.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.parts.model(images), run.parts.model(images))


def test_an_old_version_run_still_evaluates_and_predicts(runs, phantom, tmp_path) -> None:
    """A run saved before config_version, task.decoder and the saved preprocessing existed
    (light decoder): its config is migrated explicitly, and it evaluates and predicts as before."""
    import json

    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vpt.cli.evaluate import evaluate

    cfg = compose_config([
        "experiment=quickstart", "task.decoder=light", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "num_preview_images=0",
        f"task.data.root={runs['phantoms']}",
    ])
    trained = train(cfg, run_dir=tmp_path / "old")
    scan = tmp_path / "in" / "case.nii.gz"
    _itk_volume(phantom, scan)
    predict(scan, tmp_path / "new_format", run_dir=tmp_path / "old", device="cpu", progress=False)

    # Rewrite the run as an old version wrote it.
    config = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del config["config_version"], config["task"]["decoder"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config))
    weights = tmp_path / "old" / "prompts.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for key in ("preprocessing", "base_encoder"):
        del metadata[key]
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    (tmp_path / "old" / "preprocessing.json").unlink()

    metrics = evaluate(run_dir=str(tmp_path / "old"), output=str(tmp_path / "eval"))
    assert metrics["test/dice"] == pytest.approx(trained["test/dice"], abs=1e-6)
    predict(scan, tmp_path / "old_format", run_dir=tmp_path / "old", device="cpu", progress=False)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "old_format" / "case.nii.gz"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "new_format" / "case.nii.gz"))),
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_the_training_and_prediction_readers_give_the_same_arrays_and_geometry(phantom, tmp_path, suffix) -> None:
    """Training (vpt.data.medical.io.read_volume_with_geometry) and prediction (read_input_volume)
    read through one function: for an oblique, shifted volume in each format they agree voxel for
    voxel and on the geometry ITK wrote, and a NIfTI and an NRRD of the same volume read the same."""
    from vpt.data.medical.io import read_volume_with_geometry
    from vpt.inference.inputs import find_inputs
    from vpt.inference.volumes import read_input_volume, volume_array

    path = tmp_path / f"case{suffix}"
    written = _itk_volume(phantom, path)
    array, geometry = read_volume_with_geometry(path)
    (item,) = find_inputs(path)
    image = read_input_volume(item)
    np.testing.assert_array_equal(volume_array(image, item), array)
    np.testing.assert_array_equal(array, phantom)
    np.testing.assert_allclose(geometry.spacing, tuple(reversed(image.GetSpacing())), atol=1e-5)
    np.testing.assert_allclose(geometry.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geometry.direction, image.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(geometry.origin, written.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geometry.direction, written.GetDirection(), atol=1e-5)


def test_push_to_hub_uploads_the_written_folder_or_refuses_before_writing(runs, tmp_path, monkeypatch) -> None:
    """No network here: a stand-in HfApi records the calls; without huggingface_hub nothing is written."""
    import sys
    import types

    from vpt.inference.export import export_model

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("upload_folder", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=RecordingApi))
    export_model(runs["seg"], tmp_path / "hub_model", push_to_hub="someone/organs")
    assert calls == [("create_repo", "someone/organs", True),
                     ("upload_folder", ["README.md", "config.json", "model.safetensors"], "someone/organs")]
    class FailingApi(RecordingApi):
        def upload_folder(self, folder_path, repo_id):
            raise RuntimeError("401 Client Error: Unauthorized")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FailingApi))
    with pytest.raises(ConfigError, match=r"Wrote .*uploading it to someone/organs failed .*401.*huggingface-cli login"):
        export_model(runs["seg"], tmp_path / "upload_fails", push_to_hub="someone/organs")
    assert (tmp_path / "upload_fails" / "model.safetensors").is_file()  # the folder stays written
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when it is not installed
    with pytest.raises(ConfigError, match="pip install huggingface_hub"):
        export_model(runs["seg"], tmp_path / "not_written", push_to_hub="someone/organs")
    assert not (tmp_path / "not_written").exists()


def test_a_prompt_bank_refuses_files_trained_on_other_base_weights(runs, tmp_path) -> None:
    """Same backbone name, other weights (another fingerprint): not one bank."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vpt.errors import CheckpointError
    from vpt.prompts import PromptBank

    source = runs["cls"] / "prompts.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    import json

    base = json.loads(metadata["base_encoder"])
    save_file(load_file(str(source)), str(tmp_path / "a.safetensors"), metadata=metadata)
    save_file(load_file(str(source)), str(tmp_path / "b.safetensors"), metadata={**metadata, "base_encoder": json.dumps({**base, "fingerprint": "0" * 64})})
    model = load_run(run_dir=runs["cls"], device="cpu").parts.model
    PromptBank.from_files(model, [tmp_path / "a.safetensors", source])  # same weights: one bank
    with pytest.raises(CheckpointError, match="another base encoder"):
        PromptBank.from_files(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_predicting_a_test_case_equals_its_test_time_prediction_in_every_format(runs, seg_run, tmp_path) -> None:
    """The data module's test volume (read from its file, preprocessed by the one evaluation
    object, uncached so nothing is float16) and vpt-predict on that file, on an oblique NRRD
    and an oblique NIfTI copy give the same labels voxel for voxel; a DICOM series and an
    NRRD of the same int16 volume do too."""
    from omegaconf import OmegaConf

    from vpt.tasks import build_task

    config = OmegaConf.load(runs["seg"] / "config.yaml")
    config.task.data.cache = False
    datamodule = build_task(config).datamodule
    datamodule.setup("test")
    case = datamodule.cases("test")[0]
    item = datamodule.volume_dataset("test")[0]
    shape = tuple(item["label"].shape[1:])
    test_time = seg_run.parts.module.predict_volume(item["image"], shape).numpy()
    with torch.no_grad():  # this short run mostly says background: its probabilities are compared too
        logits = F.interpolate(seg_run.parts.model(item["image"]).float(), size=shape, mode="bilinear", align_corners=False)
    test_scores = logits.softmax(dim=1).permute(0, 2, 3, 1).numpy()
    assert test_scores.std() > 0.01

    volume, _ = read_volume(case.image)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "as_stored.nii.gz").write_bytes(Path(case.image).read_bytes())
    _itk_volume(volume, folder / "oblique.nrrd")
    _itk_volume(volume, folder / "oblique.nii.gz")
    predict(folder, tmp_path / "out", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    for name in ("as_stored.nii.gz", "oblique.nrrd", "oblique.nii.gz"):
        np.testing.assert_array_equal(_labels(tmp_path / "out" / name), test_time, err_msg=name)
        stem, suffix = name.split(".", 1)
        scores = _labels(tmp_path / "out" / f"{stem}_probabilities.{suffix}")
        np.testing.assert_allclose(scores, test_scores, atol=1e-5, err_msg=name)

    whole = np.clip(np.rint(volume), -1024, 3000)
    series = tmp_path / "dicom" / "series_3"
    dicom = _write_dicom_series(whole, series)
    nrrd = tmp_path / "int16" / "same.nrrd"
    nrrd.parent.mkdir()
    sitk.WriteImage(dicom, str(nrrd))
    predict(series, tmp_path / "out_dicom", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    predict(nrrd, tmp_path / "out_nrrd", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    np.testing.assert_array_equal(_labels(tmp_path / "out_dicom" / "series_3.nii.gz"), _labels(tmp_path / "out_nrrd" / "same.nrrd"))
    np.testing.assert_array_equal(
        _labels(tmp_path / "out_dicom" / "series_3_probabilities.nii.gz"), _labels(tmp_path / "out_nrrd" / "same_probabilities.nrrd")
    )


def test_one_reader_refuses_the_same_files_in_training_check_data_and_predict(runs, phantom, tmp_path) -> None:
    """A NIfTI volume with a NaN voxel (ITK alone reads it as 0) and one with a sheared affine
    (ITK cannot place it): the training reader, vpt-check-data and vpt-predict refuse both,
    with the same reason."""
    from vpt.data.medical import read_volume_geometry, read_volume_with_geometry
    from vpt.data.medical.integrity import check_dataset

    with_nan = phantom.copy()
    with_nan[3, 10, 20] = np.nan
    nan_file = tmp_path / "nan" / "scan.nii.gz"
    nan_file.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(with_nan.transpose(2, 1, 0)), np.diag([-1.0, -1.0, 2.0, 1.0])), str(nan_file))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(nan_file)))).any()  # what ITK alone gives
    array, _ = read_volume_with_geometry(nan_file)
    assert np.isnan(array[3, 10, 20]) and np.isnan(array).sum() == 1
    np.testing.assert_array_equal(np.nan_to_num(array), np.nan_to_num(with_nan))
    with pytest.raises(DataError, match=r"scan.* 1 non-finite"):
        predict(nan_file, tmp_path / "out_nan", run_dir=runs["seg"], device="cpu", progress=False)
    # In a folder, the damaged scan stops the command before the good one's mask is written.
    folder = tmp_path / "folder"
    folder.mkdir()
    _itk_volume(phantom, folder / "a_good.nii.gz")
    (folder / "b_nan.nii.gz").write_bytes(nan_file.read_bytes())
    with pytest.raises(DataError, match=r"Case b_nan: image .*b_nan\.nii\.gz holds 1 non-finite voxel"):
        predict(folder, tmp_path / "out_folder", run_dir=runs["seg"], device="cpu", progress=False)
    assert not (tmp_path / "out_folder").exists() or not any((tmp_path / "out_folder").iterdir())

    sheared_file = tmp_path / "sheared" / "scan.nii.gz"
    sheared_file.parent.mkdir()
    affine = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(phantom.transpose(2, 1, 0)), affine), str(sheared_file))
    with pytest.raises(DataError, match="sheared"):
        read_volume_with_geometry(sheared_file)
    # With a qform beside the sheared sform, ITK alone places the voxels by the qform, silently.
    with_qform = tmp_path / "sheared" / "with_qform.nii.gz"
    image = nib.Nifti1Image(np.ascontiguousarray(phantom.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    nib.save(image, str(with_qform))
    assert sitk.ReadImage(str(with_qform)).GetSize() == phantom.shape[::-1]  # what ITK alone does
    for reader in (read_volume_with_geometry, read_volume_geometry):
        with pytest.raises(DataError, match="sheared"):
            reader(with_qform)
    with pytest.raises(DataError, match="sheared"):
        predict(sheared_file, tmp_path / "out_sheared", run_dir=runs["seg"], device="cpu", progress=False)
    assert not (tmp_path / "out_nan").exists() or not any((tmp_path / "out_nan").iterdir())

    # vpt-check-data and the data module read the same files through the same reader.
    from tests.test_medical_data import nnunet_module, write_case, write_dataset_json

    root = tmp_path / "Dataset001_Reader"
    write_dataset_json(root, {"background": 0, "organ": 1})
    label = (phantom > phantom.mean()).astype(np.uint8)
    write_case(root, "good", label, phantom)
    for name, source in (("nan", nan_file), ("sheared", sheared_file)):
        (root / "imagesTr").joinpath(f"{name}_0000.nii.gz").write_bytes(source.read_bytes())
        affine = nib.load(str(source)).affine
        nib.save(nib.Nifti1Image(np.ascontiguousarray(label.transpose(2, 1, 0)), affine), str(root / "labelsTr" / f"{name}.nii.gz"))
    problems = {(problem.case, problem.kind): problem.message for problem in check_dataset(root)}
    assert "1 NaN or inf voxel(s), the first at index (3, 10, 20)" in problems[("nan", "non_finite_image")]
    assert "sheared (non-orthonormal) affine" in problems[("sheared", "unreadable")]
    assert not any(case == "good" for case, _ in problems)
    with pytest.raises(DataError, match=r"Case nan: image .*nan_0000\.nii\.gz holds 1 non-finite"):
        nnunet_module(root, val_fraction=0.0, test_fraction=0.0, cache=False).check_cases(splits=("train",))


def test_a_4d_multichannel_scan_predicts_as_its_channel_0(runs, phantom, tmp_path) -> None:
    """An MSD test image (modalities on a 4th axis) is predicted from channel 0, as training
    reads such images; the mask is 3D on the scan's grid."""
    four_d = np.stack([phantom, np.zeros_like(phantom)], axis=-1).transpose(2, 1, 0, 3)  # (x, y, z, channel)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(four_d), affine), str(tmp_path / "in" / "multi.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(phantom.transpose(2, 1, 0)), affine), str(tmp_path / "in" / "single.nii.gz"))
    predict(tmp_path / "in", tmp_path / "out", run_dir=runs["seg"], device="cpu", save_probabilities=True, progress=False)
    multi = sitk.ReadImage(str(tmp_path / "out" / "multi.nii.gz"))
    assert multi.GetDimension() == 3 and multi.GetSize() == phantom.shape[::-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(multi), _labels(tmp_path / "out" / "single.nii.gz"))
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "multi_probabilities.nii.gz"), _labels(tmp_path / "out" / "single_probabilities.nii.gz"))
