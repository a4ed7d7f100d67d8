"""The on-disk cache of preprocessed cases (vpt.data.medical.cache) and its use by the data module."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vpt.data.medical import datamodule as datamodule_module
from vpt.data.medical.datamodule import VolumeSegmentationDataModule
from vpt.data.medical.phantom import write_phantom_dataset

SMALL_PHANTOM = (12, 40, 40)


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num_cases=6, seed=0, shape=SMALL_PHANTOM)


@pytest.fixture()
def phantom_root(phantom_source: Path, tmp_path: Path) -> Path:
    """A private copy, so a test may change its files."""
    return Path(shutil.copytree(phantom_source, tmp_path / "phantoms"))


@pytest.fixture()
def build_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Case ids whose cache entry was built (read, checked and scaled from the sources)."""
    built: list[str] = []
    original = datamodule_module._CasePreprocessor.__call__

    def counting(self, case):  # type: ignore[no-untyped-def]
        built.append(case.case_id)
        return original(self, case)

    monkeypatch.setattr(datamodule_module._CasePreprocessor, "__call__", counting)
    return built


def make_module(root: Path, **overrides: object) -> VolumeSegmentationDataModule:
    options: dict[str, object] = {
        "image_size": 32, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2, "empty_slice_fraction": 0.5,
        "seed": 3,
    }
    options.update(overrides)
    return VolumeSegmentationDataModule(root, **options)  # type: ignore[arg-type]


def cache_files(module: VolumeSegmentationDataModule) -> dict[Path, int]:
    cache = module.volume_cache()
    assert cache is not None
    return {path: path.stat().st_mtime_ns for path in sorted(cache.folder.iterdir())}


def batches(module: VolumeSegmentationDataModule, count: int = 3) -> list[dict]:
    torch.manual_seed(0)  # the training loader shuffles with torch's global generator
    taken = []
    for batch in module.train_dataloader():
        taken.append(batch)
        if len(taken) == count:
            break
    taken.extend(module.val_dataloader())
    return taken


def test_entries_are_written_once_and_reused(phantom_root: Path, build_count: list[str]) -> None:
    first = make_module(phantom_root)
    first.check_cases()
    all_ids = sorted(case.case_id for case in first.cases("all"))
    assert sorted(build_count) == all_ids, "each case is built once, test cases by check_cases"
    written = cache_files(first)
    assert first.volume_cache().folder.parent == phantom_root / ".vpt_cache"  # type: ignore[union-attr]
    assert len(written) == 3 * len(all_ids), "image, label and manifest per case"
    manifest = json.loads(next(path for path in written if path.suffix == ".json").read_text())
    assert {"settings", "sources", "image_shape", "label_shape", "spacing", "slice_numbers"} <= set(manifest)

    build_count.clear()
    second = make_module(phantom_root)
    second.check_cases()
    batches(second)
    next(iter(second.test_dataloader()))
    assert build_count == [], "a second data module reuses every entry"
    assert cache_files(second) == written, "nothing rewritten"


def test_training_slices_are_memory_mapped(phantom_root: Path) -> None:
    module = make_module(phantom_root)
    dataset = module.dataset("train", train=True)
    from vpt.data.medical.slice_sources import CachedSlice

    for record in dataset.records:
        assert isinstance(record.source, CachedSlice), "no slice array held in memory"
    cached = dataset.records[0].source.cached
    assert isinstance(cached.image(), np.memmap) and isinstance(cached.label(), np.memmap)
    assert cached.image().dtype == np.float16 and cached.label().dtype == np.uint8
    assert cached.image().shape == cached.label().shape == SMALL_PHANTOM
    assert float(cached.image().min()) >= 0.0 and float(cached.image().max()) <= 1.0


def test_batches_equal_with_and_without_cache(phantom_root: Path) -> None:
    cached, plain = make_module(phantom_root), make_module(phantom_root, cache=False)
    assert plain.volume_cache() is None
    for with_cache, without in zip(batches(cached), batches(plain), strict=True):
        assert torch.equal(with_cache["image"], without["image"])
        assert torch.equal(with_cache["mask"], without["mask"])
        assert with_cache["case"] == without["case"]
        assert torch.equal(with_cache["slice"], without["slice"])
    volume_cached = next(iter(cached.test_dataloader()))
    volume_plain = next(iter(plain.test_dataloader()))
    assert torch.equal(volume_cached["label"], volume_plain["label"])
    assert torch.equal(volume_cached["spacing"], volume_plain["spacing"])
    # The cache stores [0, 1] in float16 (training slices are float16 either way); test volumes
    # without the cache stay float32, so they agree to float16 precision after normalisation.
    assert torch.allclose(volume_cached["image"], volume_plain["image"], atol=5e-3)


def test_another_window_is_another_entry(phantom_root: Path, build_count: list[str]) -> None:
    first = make_module(phantom_root)
    first.dataset("train")
    built_first = len(build_count)
    other = make_module(phantom_root, window=(-100.0, 200.0))
    other.dataset("train")
    assert len(build_count) == 2 * built_first, "every training case built again"
    assert other.volume_cache().folder != first.volume_cache().folder  # type: ignore[union-attr]
    assert other.volume_cache().folder.parent == first.volume_cache().folder.parent  # type: ignore[union-attr]
    case = other.cases("train")[0]
    window_a = first.volume_cache().entry(case).image()  # type: ignore[union-attr]
    window_b = other.volume_cache().entry(case).image()  # type: ignore[union-attr]
    assert not np.array_equal(window_a, window_b)


def test_changed_source_file_rebuilds_its_entry(phantom_root: Path, build_count: list[str]) -> None:
    make_module(phantom_root).dataset("train")
    case = make_module(phantom_root).cases("train")[0]
    assert case.label is not None
    stat = case.label.stat()
    os.utime(case.label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    build_count.clear()
    make_module(phantom_root).dataset("train")
    assert build_count == [case.case_id], "only the changed case is rebuilt"


def test_corrupt_entry_is_rebuilt(phantom_root: Path, build_count: list[str]) -> None:
    module = make_module(phantom_root)
    reference = batches(module)
    case = module.cases("train")[0]
    image_file, label_file, manifest_file = module.volume_cache().paths(case.case_id)  # type: ignore[union-attr]
    image_file.write_bytes(image_file.read_bytes()[:100])  # truncated
    build_count.clear()
    again = make_module(phantom_root)
    for rebuilt, expected in zip(batches(again), reference, strict=True):
        assert torch.equal(rebuilt["image"], expected["image"]) and torch.equal(rebuilt["mask"], expected["mask"])
    assert build_count == [case.case_id]

    manifest_file.write_text("{not json")
    label_file.unlink()
    build_count.clear()
    make_module(phantom_root).dataset("train")
    assert build_count == [case.case_id]


def test_unwritable_cache_dir_falls_back_to_temp(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level("INFO", logger="vpt.data.medical.cache"):
        module = make_module(phantom_root, cache_dir=blocker / "cache")
        module.dataset("train")
    folder = module.volume_cache().folder  # type: ignore[union-attr]
    assert system_temp in folder.parents
    assert any("cannot be written" in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(os.name != "posix", reason="folder modes are POSIX")
def test_read_only_root_falls_back_to_temp(phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_unprivileged) -> None:
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    phantom_root.chmod(0o555)

    def falls_back() -> None:
        module = make_module(phantom_root)
        next(iter(module.train_dataloader()))
        assert system_temp in module.volume_cache().folder.parents  # type: ignore[union-attr]
        assert not (phantom_root / ".vpt_cache").exists()

    try:
        as_unprivileged(falls_back)
    finally:
        phantom_root.chmod(0o755)
