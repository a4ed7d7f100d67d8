"""The layout registry: vpt-check-data and the loaders see the same cases, because they ask the
same layout object to group the files (generated sets with planted problems, every layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_check_data import organ_label, write_case, write_dataset_json, write_itk
from tests.test_medical_data import write_folder2d, write_synapse
from vpt.data.medical import VolumeSegmentationDataModule
from vpt.data.medical.integrity import check_dataset, examine_dataset
from vpt.data.medical.layouts import (
    LAYOUT_REGISTRY,
    LAYOUTS,
    DatasetLayout,
    detect_layout,
    find_cases,
    get_layout,
    register_layout,
)
from vpt.data.medical.phantom import write_phantom_dataset
from vpt.errors import DataError

# Where each layout's loader roles come from, as (group of the checker) per role.
_GROUPS = {
    "nnunet": {"cases": "Tr", "test": "Ts", "unlabeled": "Ts"},
    "phantoms": {"cases": "Tr", "test": "Ts", "unlabeled": "Ts"},
    "synapse": {"cases": "train_npz", "test": "test_vol_h5"},
    "folder2d": {"cases": "images"},
}


def _nnunet_with_tolerated_problems(root: Path) -> None:
    """Problems a run works around: stray files, a label without image, an extra and a missing
    non-zero channel, an unlabelled test case beside labelled ones, an empty label, a wrong
    numTraining, an MSD-named case."""
    write_dataset_json(root, num_training=99)
    for case in ("a", "b", "two_channels", "empty"):
        write_case(root, case)
    write_case(root, "empty", label=np.zeros_like(organ_label()))
    write_itk(root / "imagesTr" / "two_channels_0001.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(root / "labelsTr" / "orphan_label.nii.gz", organ_label())
    write_itk(root / "imagesTr" / "msd_named.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(root / "labelsTr" / "msd_named.nii.gz", organ_label())
    (root / "imagesTr" / "notes.txt").write_text("scanner protocol")
    for case in ("t1", "t2"):
        write_itk(root / "imagesTs" / f"{case}_0000.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(root / "labelsTs" / "t1.nii.gz", organ_label())


def _synapse_with_tolerated_problems(root: Path) -> None:
    write_synapse(root, {"case0005": 3, "case0006": 2}, test_cases=("case0001", "case0002"))
    (root / "train_npz" / "readme.txt").write_text("TransUNet files")
    (root / "test_vol_h5" / "list.txt").write_text("case0001")


def _folder2d_with_tolerated_problems(root: Path) -> None:
    write_folder2d(root)
    Image.fromarray(np.zeros((10, 14), dtype=np.uint8)).save(root / "masks" / "no_image.png")
    (root / "images" / "Thumbs.db").write_bytes(b"\x00")


def _phantoms(root: Path) -> None:
    write_phantom_dataset(root, 3, seed=0, shape=(8, 16, 16))


_TOLERATED = {
    "nnunet": _nnunet_with_tolerated_problems,
    "synapse": _synapse_with_tolerated_problems,
    "folder2d": _folder2d_with_tolerated_problems,
    "phantoms": _phantoms,
}


def _loaded(layout: str, root: Path) -> set[tuple[str, str]]:
    index = find_cases(root)
    groups = _GROUPS[layout]
    return {(groups[role], case.case_id) for role in groups for case in getattr(index, role)}


@pytest.mark.parametrize("layout", sorted(_TOLERATED))
def test_check_data_and_the_loaders_see_the_same_cases(tmp_path: Path, layout: str) -> None:
    """Every case a loader uses is one the checker checked, in the same group; every case the
    checker found without an error is one the loaders use; the data module trains on them."""
    root = tmp_path / layout
    _TOLERATED[layout](root)
    assert detect_layout(root) == layout
    check = examine_dataset(root)
    assert check.layout == layout
    checked = set(check.case_ids)
    with_errors = {problem.case for problem in check.problems if problem.level == "error"}
    loaded = _loaded(layout, root)
    assert loaded <= checked
    assert {(group, case) for group, case in checked if case not in with_errors} <= loaded
    if layout != "phantoms":
        assert check.problems, "the set plants problems"
        assert loaded != checked or layout != "nnunet"  # the stray label is checked, not loaded
    module = VolumeSegmentationDataModule(root, num_classes=9 if layout == "synapse" else 3, image_size=8,
                                          val_fraction=0.0, test_fraction=0.0, cache=False, empty_slice_fraction=1.0)
    module.setup()
    assert {case.case_id for case in module.cases("train")} == {case for group, case in loaded if group in ("Tr", "train_npz", "images")}


def test_the_nnunet_groups_are_the_ones_planted(tmp_path: Path) -> None:
    """The sets above are not trivially equal: exactly these cases load, this one is only checked."""
    _nnunet_with_tolerated_problems(tmp_path)
    assert _loaded("nnunet", tmp_path) == {
        ("Tr", "a"), ("Tr", "b"), ("Tr", "two_channels"), ("Tr", "empty"), ("Tr", "msd_named"), ("Ts", "t1"), ("Ts", "t2"),
    }
    assert set(examine_dataset(tmp_path).case_ids) - _loaded("nnunet", tmp_path) == {("Tr", "orphan_label")}
    index = find_cases(tmp_path)
    assert [case.case_id for case in index.test] == ["t1"] and [case.case_id for case in index.unlabeled] == ["t2"]
    assert index.cases[[case.case_id for case in index.cases].index("two_channels")].image.name == "two_channels_0000.nii.gz"


def _nnunet_missing_label(root: Path) -> None:
    write_dataset_json(root, num_training=2)
    write_case(root, "a")
    write_itk(root / "imagesTr" / "lonely_0000.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))


def _nnunet_no_channel_zero(root: Path) -> None:
    write_dataset_json(root, num_training=2)
    write_case(root, "a")
    write_itk(root / "imagesTr" / "only_t2_0001.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(root / "labelsTr" / "only_t2.nii.gz", organ_label())


def _nnunet_duplicate(root: Path) -> None:
    write_dataset_json(root, num_training=1)
    write_case(root, "a")
    write_itk(root / "imagesTr" / "a_0000.mha", np.zeros(organ_label().shape, dtype=np.float32))


def _synapse_bad_name(root: Path) -> None:
    write_synapse(root, {"case0005": 2})
    (root / "train_npz" / "case0005_s3.npz").write_bytes((root / "train_npz" / "case0005_slice000.npz").read_bytes())


def _synapse_duplicate_slice(root: Path) -> None:
    write_synapse(root, {"case0005": 2})
    (root / "train_npz" / "case0005_slice0.npz").write_bytes((root / "train_npz" / "case0005_slice000.npz").read_bytes())


def _folder2d_missing_mask(root: Path) -> None:
    write_folder2d(root)
    (root / "masks" / "grey.png").unlink()


def _folder2d_duplicate(root: Path) -> None:
    write_folder2d(root)
    (root / "images" / "grey.jpg").write_bytes((root / "images" / "colour.jpg").read_bytes())


@pytest.mark.parametrize(
    "plant, kind",
    [
        (_nnunet_missing_label, "missing_label"),
        (_nnunet_no_channel_zero, "missing_channel"),
        (_nnunet_duplicate, "duplicate_case"),
        (_synapse_bad_name, "bad_file_name"),
        (_synapse_duplicate_slice, "duplicate_case"),
        (_folder2d_missing_mask, "missing_label"),
        (_folder2d_duplicate, "duplicate_case"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_problem_that_stops_a_run_is_the_one_check_data_reports(tmp_path: Path, plant, kind: str) -> None:
    plant(tmp_path)
    (problem,) = [problem for problem in check_dataset(tmp_path) if problem.level == "error"]
    assert problem.kind == kind
    with pytest.raises(DataError) as refused:
        find_cases(tmp_path)
    assert problem.message in str(refused.value)


def test_the_registry_names_each_layout_once_and_a_new_one_is_used_by_both(tmp_path: Path, monkeypatch) -> None:
    """A layout of one's own (here: one folder of <case>.npy image/label pairs) is detected,
    checked and loaded through the same object."""
    from vpt.data.medical.layouts import Case, CaseArrays, ScannedCase

    assert LAYOUTS == tuple(LAYOUT_REGISTRY) and set(LAYOUTS) == {"phantoms", "nnunet", "synapse", "folder2d"}
    assert {kind for layout in LAYOUT_REGISTRY.values() for kind in layout.kinds} == {
        "volume", "synapse_slices", "synapse_volume", "image2d"}
    with pytest.raises(ValueError, match="new name"):
        register_layout(get_layout("nnunet"))
    with pytest.raises(DataError, match="not known"):
        get_layout("decathlon")

    class NpyPairs(DatasetLayout):
        name, kinds, intensity = "npy_pairs", ("npy_pair",), "unit"

        def detect(self, root):
            return (root / "pairs.json").is_file()

        def class_names(self, root):
            return tuple(json.loads((root / "pairs.json").read_text())["classes"])

        def scan(self, root, findings):
            found = []
            for image in sorted(root.glob("*_image.npy")):
                case_id = image.name[: -len("_image.npy")]
                label = root / f"{case_id}_label.npy"
                if not label.is_file():
                    findings.add("missing_label", f"{image.name} has no {label.name}; add it.", case_id, image)
                found.append(ScannedCase("pairs", case_id, Case(case_id, image, label, kind="npy_pair") if label.is_file() else None))
            return found

        def check_case(self, root, findings, item, read_values):
            pass

        def load(self, case, label_only=False):
            label = np.load(case.label)
            return CaseArrays(None if label_only else np.load(case.image), label, None, np.arange(len(label)))

    monkeypatch.setitem(LAYOUT_REGISTRY, "npy_pairs", NpyPairs())
    (tmp_path / "pairs.json").write_text(json.dumps({"classes": ["background", "cell"]}))
    for case in ("x", "y"):
        np.save(tmp_path / f"{case}_image.npy", np.random.default_rng(0).random((2, 8, 8), dtype=np.float32))
        np.save(tmp_path / f"{case}_label.npy", (np.arange(128).reshape(2, 8, 8) % 2).astype(np.uint8))
    assert detect_layout(tmp_path) == "npy_pairs"
    assert [case.case_id for case in find_cases(tmp_path).cases] == ["x", "y"]
    assert examine_dataset(tmp_path).case_ids == (("pairs", "x"), ("pairs", "y"))
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0.5, test_fraction=0.0, cache=False)
    assert module.class_names == ["background", "cell"] and len(module.dataset("train")) == 2
    np.save(tmp_path / "z_image.npy", np.zeros((2, 8, 8), dtype=np.float32))
    assert [problem.kind for problem in check_dataset(tmp_path)] == ["missing_label"]
    with pytest.raises(DataError, match="z_image.npy has no z_label.npy"):
        find_cases(tmp_path)


def test_a_folder_of_official_test_cases_alone_still_loads_for_evaluation(tmp_path: Path) -> None:
    """imagesTr/ empty, imagesTs/ + labelsTs/ labelled: the checker says there is nothing to
    train on, the loaders still list the test cases (vpt-evaluate split=test scores them)."""
    write_dataset_json(tmp_path, num_training=0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    write_itk(tmp_path / "imagesTs" / "a_0000.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(tmp_path / "labelsTs" / "a.nii.gz", organ_label())
    assert [problem.kind for problem in check_dataset(tmp_path)] == ["no_cases"]
    index = find_cases(tmp_path)
    assert not index.cases and [case.case_id for case in index.test] == ["a"]


def test_a_layout_cannot_take_a_case_kind_another_loads() -> None:
    class Copycat(DatasetLayout):
        name, kinds = "copycat", ("volume",)

    with pytest.raises(ValueError, match="already loaded by layout 'nnunet'"):
        register_layout(Copycat())
    assert "copycat" not in LAYOUT_REGISTRY


def test_an_msd_folder_with_4d_multimodal_images_trains_on_channel_0(tmp_path: Path) -> None:
    """The Decathlon ships BrainTumour and Prostate with their modalities on a 4th axis; the
    loaders read channel 0 (what nnU-Net's conversion names _0000), the checker checks that."""
    import nibabel as nib

    from vpt.data.medical import load_case

    write_dataset_json(tmp_path, num_training=2, modality={"0": "T2", "1": "ADC"})
    rng = np.random.default_rng(0)
    volumes = {}
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("prostate_00", "prostate_01"):
        volume = rng.random((5, 4, 3, 2), dtype=np.float32)  # (x, y, z, channel), as nibabel stores it
        volumes[case] = volume
        nib.save(nib.Nifti1Image(volume, np.diag([0.6, 0.8, 2.5, 1.0])), str(tmp_path / "imagesTr" / f"{case}.nii.gz"))
        label = organ_label().transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(label, np.diag([0.6, 0.8, 2.5, 1.0])), str(tmp_path / "labelsTr" / f"{case}.nii.gz"))
    assert check_dataset(tmp_path) == []
    index = find_cases(tmp_path)
    assert [case.channel for case in index.cases] == [0, 0]
    arrays = load_case(index.cases[0])
    np.testing.assert_allclose(arrays.image, volumes["prostate_00"][..., 0].transpose(2, 1, 0))
    assert arrays.image.shape == arrays.label.shape == organ_label().shape
    module = VolumeSegmentationDataModule(tmp_path, image_size=8, val_fraction=0.5, test_fraction=0.0, cache=False)
    assert len(module.dataset("train")) > 0


def test_a_test_case_is_not_refused_for_a_training_case_of_the_same_name(tmp_path: Path) -> None:
    """imagesTr/a has only a label (an extra label: a stray file for the loaders), imagesTs/a
    misses a declared channel (a warning-free error the loaders tolerate for test cases): the
    loaders list Ts/a and do not stop on Tr/a's name."""
    write_dataset_json(tmp_path, num_training=1, channel_names={"0": "T2", "1": "ADC"})
    write_case(tmp_path, "b")
    write_itk(tmp_path / "imagesTr" / "b_0001.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(tmp_path / "labelsTr" / "a.nii.gz", organ_label())
    write_itk(tmp_path / "imagesTs" / "a_0000.nii.gz", np.zeros(organ_label().shape, dtype=np.float32))
    write_itk(tmp_path / "labelsTs" / "a.nii.gz", organ_label())
    kinds = {(problem.case, problem.kind) for problem in check_dataset(tmp_path)}
    assert ("a", "extra_label") in kinds and ("a", "missing_channel") in kinds
    index = find_cases(tmp_path)
    assert [case.case_id for case in index.cases] == ["b"] and [case.case_id for case in index.test] == ["a"]
