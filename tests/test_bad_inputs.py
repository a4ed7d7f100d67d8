"""Bad inputs through vpt-train: one line on stderr, exit code 2, no traceback, and nothing
written or changed (issue 15). Checked before anything is built: Trainer values Lightning
would refuse, splits left empty, required keys, typos, a resume file that is no checkpoint,
a dataset.json that names only the background. A run that fails after its checks keeps its
folder and its train.log ends with the error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_training import run_cli
from tests.test_volume_seg import FAST, write_dataset
from vpt.errors import ConfigError, DataError

NAMES = {"background": 0, "anterior": 1, "posterior": 2}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], cwd: Path) -> str:
    """Run vpt-train, expect a refusal; return its one error line."""
    result = run_cli(args, cwd=cwd)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "+task" not in errors[0] and "To append" not in result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("bad") / "Dataset001_Blobs", cases=6, names=NAMES)


def test_refused_runs_write_no_run_folder(dataset: Path, tmp_path: Path) -> None:
    """Each refusal in one vpt-train process per case would take minutes; the cases that are
    refused before torch loads share the cheap path, the rest are checked once each."""
    base = ["task=volume_seg", f"task.data.root={dataset}", *FAST]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint\n")
    cases = {
        "max_epochs=0": (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "1 or more"]),
        "max_epochs=-3": (["trainer.max_epochs=-3"], ["trainer.max_epochs=-3"]),
        "text ckpt": ([f"ckpt_path={text_file}"], ["notes.txt", "not a checkpoint"]),
        "test_fraction=0": (["task.data.test_fraction=0"], ["task.data.test_fraction=0", "test split", "at least"]),
        "val_fraction=0": (["task.data.val_fraction=0"], ["task.data.val_fraction=0", "val split", "at least"]),
        "typo": (["task.data.rooot=/x"], ["task.data.rooot", "did you mean task.data.root?"]),
        "group typo": (["method=vpt_dep"], ["method=vpt_dep", "did you mean method=vpt_deep?"]),
    }
    for name, (extra, words) in cases.items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_").replace("=", "")
        args = [*base, *extra, f"hydra.run.dir={run_dir}"]
        if name == "max_epochs=0":
            args.remove("trainer.max_epochs=1")
        line = _refused(args, tmp_path)
        for word in words:
            assert word in line, (name, line)
        assert not run_dir.exists(), (name, sorted(run_dir.rglob("*")))
    assert not (tmp_path / "runs").exists()  # Hydra's parent folders go too


def test_a_required_key_is_named_whatever_the_parent_config_says(tmp_path: Path) -> None:
    # organ_seg, which volume_seg extends, defaults to data/synapse: that must not win.
    line = _refused(["task=volume_seg", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert "task.data.root must be given" in line and "synapse" not in line
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_an_existing_folder_as_it_was(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.md").write_text("my notes")
    before = _digest(run_dir)
    _refused(["task=volume_seg", f"task.data.root={dataset}", *FAST, "trainer.max_epochs=-1", f"hydra.run.dir={run_dir}"], tmp_path)
    assert _digest(run_dir) == before


def test_split_advice_fits_the_split_that_is_empty(tmp_path: Path) -> None:
    from vpt.data.medical import VolumeSegmentationDataModule

    two = write_dataset(tmp_path / "Dataset002_Two", cases=2, names=NAMES)
    six = write_dataset(tmp_path / "Dataset003_Six", cases=6, names=NAMES)
    all_splits = ("train", "val", "test")

    def message(root: Path, **fractions: float) -> str:
        module = VolumeSegmentationDataModule(root=str(root), layout="nnunet", cache=False, **fractions)
        with pytest.raises(DataError) as caught:
            module.check_split_sizes(required=all_splits)
        return str(caught.value)

    # Two cases cannot make three splits: raising fractions would not help.
    text = message(two, val_fraction=0.3, test_fraction=0.3)
    assert "has 2 labelled" in text and "add cases" in text and "raise" not in text
    # A zero fraction: name it and the smallest value that gives a case.
    text = message(six, val_fraction=0.2, test_fraction=0.0)
    assert "task.data.test_fraction=0.0" in text and "at least 0.17" in text
    # Too few cases with a large validation share: still "add cases", never "raise".
    text = message(two, val_fraction=0.6, test_fraction=0.3)
    assert "add cases" in text and "raise" not in text
    # Enough of everything: no error; and scoring every case (split=all) needs no val/test.
    VolumeSegmentationDataModule(root=str(six), layout="nnunet", cache=False, val_fraction=0.2, test_fraction=0.2).check_split_sizes(required=all_splits)
    VolumeSegmentationDataModule(root=str(two), layout="nnunet", cache=False, val_fraction=0.0, test_fraction=0.0).check_split_sizes()


def test_trainer_values_lightning_would_refuse_are_one_sentence() -> None:
    from vpt.training import check_trainer_values

    good = {"max_epochs": 3, "max_steps": -1, "precision": "bf16-mixed", "devices": 1, "accumulate_grad_batches": 2,
            "limit_train_batches": 0.5, "val_check_interval": 1.0, "gradient_clip_val": None}
    check_trainer_values(good)
    check_trainer_values({"max_epochs": -1, "max_steps": 100})  # steps-limited training is fine
    bad = {
        "max_epochs": [0, -3, 2.5, "ten"],
        "max_steps": [0, -2],
        "precision": ["17", "fp16"],
        "accumulate_grad_batches": [0],
        "limit_train_batches": [0, -1, 1.5],
        "val_check_interval": [0, 1.5],
        "gradient_clip_val": [-1.0],
        "devices": [0, "many"],
        "check_val_every_n_epoch": [0],
    }
    for key, values in bad.items():
        for value in values:
            with pytest.raises(ConfigError, match=rf"trainer\.{key}=.* is not valid; use "):
                check_trainer_values({**good, key: value})
    with pytest.raises(ConfigError, match="max_epochs"):
        check_trainer_values({"max_epochs": -1, "max_steps": -1})  # would never stop


def test_a_dataset_json_without_foreground_classes_says_so(dataset: Path, tmp_path: Path) -> None:
    from vpt.data.medical.integrity import check_dataset
    from vpt.data.medical.layouts import class_names_from_dataset_json

    root = write_dataset(tmp_path / "Dataset005_NoLabels", cases=3, names=NAMES)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 3}))
    with pytest.raises(DataError, match="declares only the background.*add each foreground class"):
        class_names_from_dataset_json(root / "dataset.json")
    # vpt-check-data still names the values the labels hold.
    texts = " ".join(problem.message for problem in check_dataset(root))
    assert "only the background" in texts and "value(s) 1" in texts and "2" in texts


def test_a_failed_run_keeps_its_folder_and_train_log_ends_with_the_error(tmp_path: Path) -> None:
    """A broken test case is found by reading every case after the model is built: the run
    folder is in use by then, so it stays, and its log says why the run stopped."""
    import SimpleITK as sitk

    root = write_dataset(tmp_path / "Dataset006_Broken", cases=4, names=NAMES, test_cases=1)
    broken = root / "imagesTs" / "case_004_0000.nii.gz"
    image = sitk.ReadImage(str(broken))
    array = sitk.GetArrayFromImage(image)
    array[1, 2, 3] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(broken))
    run_dir = tmp_path / "run"
    line = _refused(["task=volume_seg", f"task.data.root={root}", *FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    assert "case_004" in line
    log = (run_dir / "train.log").read_text().strip().splitlines()
    assert log and "case_004" in log[-1] and "vpt: error:" in log[-1]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "prompts.safetensors").exists()
