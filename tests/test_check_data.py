"""vpt-check-data: every planted problem of a data set folder is reported at once, with its
case, kind and level; a clean folder reports nothing.

Every file is written under pytest's tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from vpt.cli.check_data import main
from vpt.data.medical.integrity import LEVELS, PROBLEM_LEVELS, Problem, check_dataset, examine_dataset
from vpt.errors import DataError

REPO = Path(__file__).resolve().parents[1]
# (z, y, x) sizes and spacings that differ on every axis, so a swapped axis cannot pass.
SHAPE = (3, 4, 5)
SPACING = (2.5, 0.8, 0.6)
ORIGIN = (10.0, -20.0, 30.0)  # (x, y, z) mm
LABELS_V2 = {"background": 0, "liver": 1, "tumour": 2}


def write_itk(
    path: Path,
    array: np.ndarray,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = ORIGIN,
    direction: tuple[float, ...] | None = None,
) -> None:
    """Write a (z, y, x) volume with SimpleITK, which lets origin and direction be set."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(spacing)))
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def organ_label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[1, 1:3, 1:4] = 1
    label[1, 2, 2] = 2
    return label


def write_case(root: Path, case: str, label: np.ndarray | None = None, image: np.ndarray | None = None,
               msd: bool = False, **label_geometry: object) -> None:
    """One nnU-Net v2 case (``<case>_0000``), or an MSD one (``<case>``); image HU = 100 * label."""
    label = organ_label() if label is None else label
    image = (100.0 * organ_label()).astype(np.float32) if image is None else image
    write_itk(root / "imagesTr" / f"{case}{'' if msd else '_0000'}.nii.gz", image)
    write_itk(root / "labelsTr" / f"{case}.nii.gz", label, **label_geometry)  # type: ignore[arg-type]


def write_dataset_json(root: Path, num_training: int, **extra: object) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"labels": LABELS_V2, "channel_names": {"0": "CT"}, "numTraining": num_training, "file_ending": ".nii.gz"}
    data.update(extra)
    (root / "dataset.json").write_text(json.dumps(data))


def write_clean(root: Path) -> None:
    write_dataset_json(root, num_training=2)
    for case in ("good_a", "good_b"):
        write_case(root, case)


# What the planted folder must report: (case, kind, level), and nothing else.
PLANTED = {
    (None, "num_training_mismatch", "warning"),
    ("missing", "missing_label", "error"),
    ("extra", "extra_label", "error"),
    ("size", "size_mismatch", "error"),
    ("spacing", "spacing_mismatch", "error"),
    ("origin", "origin_mismatch", "warning"),
    ("flipped", "direction_mismatch", "warning"),
    ("badvalue", "unknown_label_value", "error"),
    ("nan", "non_finite_image", "error"),
    ("empty", "empty_label", "warning"),
}


def write_planted(root: Path) -> None:
    """The clean cases plus one case per problem, and a numTraining that counts none of them."""
    write_clean(root)
    write_dataset_json(root, num_training=99)
    write_itk(root / "imagesTr" / "missing_0000.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    write_itk(root / "labelsTr" / "extra.nii.gz", organ_label())
    write_case(root, "size", label=organ_label((3, 4, 6)))
    write_case(root, "spacing", spacing=(2.5, 0.8, 0.7))
    write_case(root, "origin", origin=(10.0, -20.0, 35.0))
    write_case(root, "flipped", direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    bad = organ_label()
    bad[0, 0, 0], bad[2, 3, 4] = 5, 7
    write_case(root, "badvalue", label=bad)
    nan_image = (100.0 * organ_label()).astype(np.float32)
    nan_image[2, 3, 4] = np.nan
    nan_image[0, 0, 0] = np.inf
    write_case(root, "nan", image=nan_image)
    write_case(root, "empty", label=np.zeros(SHAPE, dtype=np.uint8))


def reported(problems: list[Problem]) -> set[tuple[str | None, str, str]]:
    return {(problem.case, problem.kind, problem.level) for problem in problems}


def by_kind(problems: list[Problem], kind: str) -> Problem:
    (found,) = [problem for problem in problems if problem.kind == kind]
    return found


# -- the library ----------------------------------------------------------------------------


def test_every_planted_problem_is_reported(tmp_path: Path) -> None:
    write_planted(tmp_path)
    problems = check_dataset(tmp_path)
    assert reported(problems) == PLANTED
    assert len(problems) == len(PLANTED)  # each once
    assert all(problem.level == PROBLEM_LEVELS[problem.kind] for problem in problems)
    # Data set level problems first, then by case.
    assert problems[0].case is None and [p.case for p in problems[1:]] == sorted(p.case for p in problems[1:])
    assert by_kind(problems, "missing_label").file == "imagesTr/missing_0000.nii.gz"
    assert by_kind(problems, "extra_label").file == "labelsTr/extra.nii.gz"
    assert by_kind(problems, "num_training_mismatch").file == "dataset.json"
    assert "99" in by_kind(problems, "num_training_mismatch").message
    # The messages carry the numbers a user needs to find the voxels.
    assert "5, 7" in by_kind(problems, "unknown_label_value").message
    assert "2 NaN or inf" in by_kind(problems, "non_finite_image").message
    assert "(3, 4, 6)" in by_kind(problems, "size_mismatch").message
    assert "0.7" in by_kind(problems, "spacing_mismatch").message


def test_header_only_check_skips_voxel_problems(tmp_path: Path) -> None:
    write_planted(tmp_path)
    voxel_kinds = {"unknown_label_value", "non_finite_image", "empty_label"}
    expected = {entry for entry in PLANTED if entry[1] not in voxel_kinds}
    assert reported(check_dataset(tmp_path, read_values=False)) == expected


def test_clean_folder_reports_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_clean(tmp_path)
    assert check_dataset(tmp_path, layout="nnunet") == []
    main([str(tmp_path)])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "2 cases checked: 0 errors, 0 warnings"
    assert "ERROR" not in out and "WARNING" not in out


def test_the_summary_says_how_many_cases_were_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The count is every case present (clean or not, training and test), not the cases with problems."""
    write_dataset_json(tmp_path, num_training=5)
    for case in ("c1", "c2", "c3", "c4", "c5"):
        write_case(tmp_path, case)
    write_itk(tmp_path / "imagesTs" / "t1_0000.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    write_itk(tmp_path / "imagesTs" / "c1_0000.nii.gz", np.zeros(SHAPE, dtype=np.float32))  # a test case named like a training one
    report = examine_dataset(tmp_path)
    assert report.cases == 7 and report.layout == "nnunet"
    assert report.problems == check_dataset(tmp_path)
    main([str(tmp_path)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "7 cases checked: 0 errors, 0 warnings"
    # Header-only checks look at the same cases.
    assert examine_dataset(tmp_path, read_values=False).cases == 7


def test_warnings_alone_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_clean(tmp_path)
    write_dataset_json(tmp_path, num_training=4)  # 3 cases
    write_case(tmp_path, "empty", label=np.zeros(SHAPE, dtype=np.uint8))
    main([f"root={tmp_path}", "layout=auto"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "3 cases checked: 0 errors, 2 warnings in 1 case"
    assert sum(line.startswith("WARNING") for line in lines) == 2


def test_channels_files_and_labels(tmp_path: Path) -> None:
    """Incomplete and extra channels, stray and broken files, duplicates, fractional labels."""
    write_dataset_json(tmp_path, num_training=5, channel_names={"0": "T1", "1": "T2"})
    for case in ("full", "partial", "extra_channel", "soft", "broken"):
        write_case(tmp_path, case)
    write_itk(tmp_path / "imagesTr" / "full_0001.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    for channel in (1, 2):
        write_itk(tmp_path / "imagesTr" / f"extra_channel_{channel:04d}.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    write_itk(tmp_path / "imagesTr" / "soft_0001.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    write_itk(tmp_path / "labelsTr" / "soft.nii.gz", organ_label().astype(np.float32) * 0.5)
    write_itk(tmp_path / "imagesTr" / "broken_0001.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    (tmp_path / "labelsTr" / "broken.nii.gz").write_bytes(b"not a volume")
    (tmp_path / "imagesTr" / "notes.txt").write_text("acquired 2024")
    (tmp_path / "imagesTr" / "._full_0000.nii.gz").write_bytes(b"macOS copy")  # hidden: ignored, as the loaders do
    write_itk(tmp_path / "imagesTr" / "full_0001.mha", np.zeros(SHAPE, dtype=np.float32))
    problems = check_dataset(tmp_path)
    assert reported(problems) == {
        (None, "unknown_file", "warning"),
        ("full", "duplicate_case", "error"),
        ("partial", "missing_channel", "error"),
        ("extra_channel", "extra_channel", "warning"),
        ("soft", "non_integer_label", "error"),
        ("broken", "unreadable", "error"),
    }
    assert by_kind(problems, "missing_channel").file == "imagesTr/partial_0001.nii.gz"
    assert "extra_channel_0002.nii.gz" in by_kind(problems, "extra_channel").message
    assert "0.5" in by_kind(problems, "non_integer_label").message
    assert by_kind(problems, "unreadable").file == "labelsTr/broken.nii.gz"


def test_multichannel_volume_is_not_3d(tmp_path: Path) -> None:
    """An nnU-Net v2 channel file must hold one 3D channel: a 4D <case>_0000 is refused (no size
    mismatch on top); an MSD-named image may hold its modalities on a 4th axis (as the Decathlon
    ships BrainTumour and Prostate), of which channel 0 is read and checked."""
    write_clean(tmp_path)
    write_dataset_json(tmp_path, num_training=4)
    four_d = np.zeros((*SHAPE[::-1], 2), dtype=np.float32)  # nibabel's (x, y, z, channel)
    write_itk(tmp_path / "labelsTr" / "brats.nii.gz", organ_label())
    nib.save(nib.Nifti1Image(four_d, np.diag([*SPACING[::-1], 1.0])), str(tmp_path / "imagesTr" / "brats_0000.nii.gz"))
    # The label as the Decathlon stores it beside its image: the same affine.
    nib.save(nib.Nifti1Image(organ_label().transpose(2, 1, 0), np.diag([*SPACING[::-1], 1.0])), str(tmp_path / "labelsTr" / "prostate.nii.gz"))
    four_d[1, 1, 1, 1] = np.nan  # in channel 1, which nothing reads
    nib.save(nib.Nifti1Image(four_d, np.diag([*SPACING[::-1], 1.0])), str(tmp_path / "imagesTr" / "prostate.nii.gz"))
    problems = check_dataset(tmp_path)
    assert reported(problems) == {("brats", "not_3d", "error")}
    assert "(3, 4, 5, 2)" in problems[0].message
    four_d[1, 2, 0, 0] = np.nan  # in channel 0, which training reads
    nib.save(nib.Nifti1Image(four_d, np.diag([*SPACING[::-1], 1.0])), str(tmp_path / "imagesTr" / "prostate.nii.gz"))
    assert ("prostate", "non_finite_image", "error") in reported(check_dataset(tmp_path))


def test_dataset_json_problems(tmp_path: Path) -> None:
    write_clean(tmp_path)
    (tmp_path / "dataset.json").unlink()
    problems = check_dataset(tmp_path)
    assert reported(problems) == {(None, "missing_dataset_json", "error")}
    (tmp_path / "dataset.json").write_text('{"labels": {"liver": 1}}')  # no background
    problems = check_dataset(tmp_path)
    # Without valid labels only negative values could be judged; the other checks still run.
    assert reported(problems) == {(None, "invalid_dataset_json", "error")}
    assert "label 0" in problems[0].message
    (tmp_path / "dataset.json").write_text("{not json")
    assert reported(check_dataset(tmp_path)) == {(None, "invalid_dataset_json", "error")}


def test_msd_dataset_json(tmp_path: Path) -> None:
    """The Decathlon form: {"index": name} labels, "modality", images named like labels."""
    (tmp_path / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    msd = {
        "name": "Liver",
        "labels": {"0": "background", "1": "liver"},
        "modality": {"0": "CT"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in (0, 1)
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    liver = np.minimum(organ_label(), 1)
    for case in ("liver_0", "liver_1"):
        write_case(tmp_path, case, label=liver, msd=True)
    assert check_dataset(tmp_path) == []
    write_case(tmp_path, "liver_1", label=organ_label(), msd=True)  # value 2: a tumour MSD's json does not name
    write_itk(tmp_path / "imagesTr" / "liver_2.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    problems = check_dataset(tmp_path)
    assert reported(problems) == {
        (None, "num_training_mismatch", "warning"),
        ("liver_1", "unknown_label_value", "error"),
        ("liver_2", "missing_label", "error"),
    }
    assert "labelsTr/liver_2.nii.gz" in by_kind(problems, "missing_label").message


def test_test_split_is_checked(tmp_path: Path) -> None:
    write_clean(tmp_path)
    write_itk(tmp_path / "imagesTs" / "t1_0000.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    assert check_dataset(tmp_path) == []  # unlabelled test images are allowed without labelsTs/
    write_itk(tmp_path / "imagesTs" / "t2_0000.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    write_itk(tmp_path / "labelsTs" / "t2.nii.gz", organ_label((3, 4, 6)))
    write_itk(tmp_path / "labelsTs" / "t3.nii.gz", organ_label())
    assert reported(check_dataset(tmp_path)) == {
        ("t1", "unlabelled_test_case", "warning"),
        ("t2", "size_mismatch", "error"),
        ("t3", "extra_label", "error"),
    }


def test_synapse_and_folder2d(tmp_path: Path) -> None:
    synapse = tmp_path / "synapse"
    (synapse / "train_npz").mkdir(parents=True)
    image, label = np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8), dtype=np.float32)
    label[2:4, 2:4] = 1
    np.savez(synapse / "train_npz" / "case0005_slice000.npz", image=image, label=label)
    nan_image = image.copy()
    nan_image[0, 0] = np.nan
    np.savez(synapse / "train_npz" / "case0005_slice001.npz", image=nan_image, label=label * 9)
    np.savez(synapse / "train_npz" / "case0006_slice000.npz", image=image, label=np.zeros_like(label))
    np.savez(synapse / "train_npz" / "stray.npz", image=image, label=label)
    (synapse / "test_vol_h5").mkdir()
    with h5py.File(synapse / "test_vol_h5" / "case0001.npy.h5", "w") as data:
        data["image"], data["label"] = np.zeros((2, 8, 8), dtype=np.float32), np.full((2, 8, 8), 3, dtype=np.uint8)
    assert reported(check_dataset(synapse)) == {
        (None, "bad_file_name", "error"),
        ("case0005", "non_finite_image", "error"),
        ("case0005", "unknown_label_value", "error"),
        ("case0006", "empty_label", "warning"),
    }
    np.savez(synapse / "train_npz" / "case0006_slice001.npz", image=np.zeros((9, 8)), label=np.zeros((9, 8)))
    assert ("case0006", "size_mismatch", "error") in reported(check_dataset(synapse))
    assert examine_dataset(synapse).cases == 3  # case0005, case0006 and the test volume case0001; stray.npz is no case

    folder = tmp_path / "folder2d"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[2:4, 2:5] = 1
    for name in ("a", "b", "c", "d"):
        Image.fromarray(np.full((6, 7), 80, dtype=np.uint8)).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask).save(folder / "masks" / "a.png")
    Image.fromarray(mask * 3).save(folder / "masks" / "b.png")
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(folder / "masks" / "c.png")
    Image.fromarray(mask).save(folder / "masks" / "e.png")
    assert reported(check_dataset(folder)) == {
        ("b", "unknown_label_value", "error"),
        ("c", "size_mismatch", "error"),
        ("c", "empty_label", "warning"),
        ("d", "missing_label", "error"),
        ("e", "extra_label", "error"),
    }
    assert examine_dataset(folder).cases == 5


def test_levels_are_documented() -> None:
    assert set(PROBLEM_LEVELS.values()) <= set(LEVELS)
    assert PROBLEM_LEVELS["empty_label"] == "warning" and PROBLEM_LEVELS["size_mismatch"] == "error"


def test_folder_that_cannot_be_checked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="README"):
        check_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="Layout"):
        check_dataset(tmp_path / "empty", layout="nifti")
    # An explicit layout checks even a folder it cannot detect, and says what is missing.
    assert reported(check_dataset(tmp_path / "empty", layout="nnunet")) == {
        (None, "missing_dataset_json", "error"),
        (None, "missing_folder", "error"),
    }


# -- the command line -----------------------------------------------------------------------


def test_main_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "vpt-check-data DIR" in capsys.readouterr().out
    for argv in ([], ["a", "b"], ["root=a", "b"], ["colour=red", "a"], [str(tmp_path), "values=maybe"], ["--layout"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vpt: error: "), (argv, err)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_data.py"), *args],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO, timeout=300, check=False,
    )


def test_cli_reports_everything_and_exits_1(tmp_path: Path) -> None:
    write_planted(tmp_path / "set")
    result = run_cli(str(tmp_path / "set"))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    problem_lines = [line for line in lines if line.startswith(("ERROR", "WARNING"))]
    assert len(problem_lines) == len(PLANTED)
    for case, kind, level in PLANTED:
        assert any(
            line.startswith(level.upper()) and f" {kind}: " in line and (case is None or f" {case} " in line)
            for line in problem_lines
        ), (case, kind, level)
    # Grouped by case: a case's lines are adjacent.
    cases = [line.split()[1] for line in problem_lines]
    assert cases == sorted(cases, key=lambda case: (case != "-", case))
    errors = sum(level == "error" for _, _, level in PLANTED)
    cases_with_problems = len({case for case, _, _ in PLANTED if case is not None})
    cases_present = len({case for case, _, _ in PLANTED if case is not None} | {"good_a", "good_b"})
    assert lines[-1] == (
        f"{cases_present} cases checked: {errors} errors, {len(PLANTED) - errors} warnings in {cases_with_problems} cases"
    )
    assert "Traceback" not in result.stderr


def test_cli_missing_folder_exits_2(tmp_path: Path) -> None:
    result = run_cli(f"root={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpt: error: ") and "nowhere" in err[0]


def test_clean_copy_of_planted_folder(tmp_path: Path) -> None:
    """Removing the planted cases leaves a folder that checks clean: nothing else was wrong."""
    write_planted(tmp_path)
    for case, _, _ in PLANTED:
        for path in (tmp_path / "imagesTr").glob(f"{case}_0000.nii.gz") if case else ():
            path.unlink()
        if case:
            (tmp_path / "labelsTr" / f"{case}.nii.gz").unlink(missing_ok=True)
    write_dataset_json(tmp_path, num_training=2)
    assert check_dataset(tmp_path) == []
    shutil.rmtree(tmp_path / "labelsTr")
    assert ("good_a", "missing_label", "error") in reported(check_dataset(tmp_path))


# -- the checker and the loaders see the same cases -------------------------------------------------


def _loaded_case_ids(root: Path) -> set[str]:
    from vpt.data.medical.layouts import find_cases

    index = find_cases(root)
    return {case.case_id for case in (*index.cases, *index.test, *index.unlabeled)}


def _checked_case_ids(root: Path) -> set[str]:
    return {case_id for _, case_id in examine_dataset(root, read_values=False).case_ids}


def _nnunet_set(root: Path) -> None:
    from vpt.data.medical import write_phantom_dataset

    write_phantom_dataset(root, num_cases=5, shape=(8, 24, 24))
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    for number, labelled in ((90, True), (91, False)):
        image = sitk.ReadImage(str(root / "imagesTr" / "phantom_000_0000.nii.gz"))
        sitk.WriteImage(image, str(root / "imagesTs" / f"phantom_{number:03d}_0000.nii.gz"))
        if labelled:
            shutil.copy(root / "labelsTr" / "phantom_000.nii.gz", root / "labelsTs" / f"phantom_{number:03d}.nii.gz")


def _synapse_set(root: Path) -> None:
    (root / "train_npz").mkdir(parents=True)
    label = np.zeros((8, 8), dtype=np.float32)
    label[2:4, 2:4] = 1
    for case in (5, 6):
        for k in range(2):
            np.savez(root / "train_npz" / f"case{case:04d}_slice{k:03d}.npz", image=np.zeros((8, 8), np.float32), label=label)
    (root / "test_vol_h5").mkdir()
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "w") as data:
        data["image"], data["label"] = np.zeros((2, 8, 8), dtype=np.float32), np.ones((2, 8, 8), dtype=np.uint8)


def _folder2d_set(root: Path) -> None:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[2:4, 2:5] = 1
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((6, 7), 80, dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")


@pytest.mark.parametrize("writer", [_nnunet_set, _synapse_set, _folder2d_set], ids=["nnunet", "synapse", "folder2d"])
def test_check_data_and_the_loaders_list_the_same_cases(tmp_path: Path, writer) -> None:
    root = tmp_path / "set"
    writer(root)
    assert _checked_case_ids(root) == _loaded_case_ids(root) != set()
    # Problems at warning level (an empty label; an unknown file beside the cases) change neither list.
    if writer is _folder2d_set:
        Image.fromarray(np.zeros((6, 7), dtype=np.uint8)).save(root / "masks" / "c.png")
        (root / "images" / "notes.txt").write_text("not an image")
    elif writer is _synapse_set:
        np.savez(root / "train_npz" / "case0006_slice001.npz", image=np.zeros((8, 8), np.float32), label=np.zeros((8, 8), np.float32))
    else:
        (root / "imagesTr" / "README.txt").write_text("notes")
    check = examine_dataset(root, read_values=True)
    assert not [p for p in check.problems if p.level == "error"], check.problems
    assert _checked_case_ids(root) == _loaded_case_ids(root)


@pytest.mark.parametrize("writer", [_nnunet_set, _folder2d_set], ids=["nnunet", "folder2d"])
def test_a_case_the_loader_cannot_pair_is_an_error_of_the_checker(tmp_path: Path, writer) -> None:
    """Where the two could disagree (an image without its label), the checker reports an error
    for that case and the loader refuses the folder: neither silently drops the case."""
    root = tmp_path / "set"
    writer(root)
    if writer is _folder2d_set:
        (root / "masks" / "b.png").unlink()
        missing = "b"
    else:
        (root / "labelsTr" / "phantom_002.nii.gz").unlink()
        missing = "phantom_002"
    errors = {(p.case, p.kind) for p in examine_dataset(root, read_values=False).problems if p.level == "error"}
    assert (missing, "missing_label") in errors
    with pytest.raises(DataError, match=missing):
        _loaded_case_ids(root)
