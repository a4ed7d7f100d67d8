"""Write the real-data sets of the transfer benchmark from files that PyPI packages ship.

    pip install -e ".[benchmark]"      # nilearn (MNI brain template), scikit-learn (digits)
    python scripts/prepare_transfer_data.py [--out data/transfer]

Two sets, both real images, no download beyond the two packages:

- ``Dataset501_MNIBrainTissue`` (nnU-Net v2 layout, ``task=volume_seg``): the ICBM 2009a
  nonlinear symmetric MNI152 T1 template (a real MR image: the average of 152 scans,
  1 mm, skull-stripped) with tissue labels from the template's own grey/white matter
  probability maps: 1 = CSF (brain voxels that are neither), 2 = grey matter, 3 = white
  matter (the larger probability wins, p >= 0.5 of 255 counts). The axial range with brain
  is cut into 12 slabs of 10 slices; whole slabs are cases, so test anatomy is never seen
  in training. Slabs 3, 7 and 10 (counted from the feet) are the test split (imagesTs /
  labelsTs), the rest train (validation is carved out of them by task.data.val_fraction).
- ``digits`` (image-folder layout, ``task=image_folder``): scikit-learn's copy of the UCI
  optical-recognition handwritten digits (1,797 real 8x8 scans of 43 writers' digits),
  written as 8-bit PNGs: ``train/`` 20 images per class (few-shot, as VTAB-1k), ``val/``
  10 per class, ``test/`` 50 per class, drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_mni_tissue", "write_digits", "main"]

SLABS = 12
SLAB_SLICES = 10
TEST_SLABS = (3, 7, 10)


def _require(module: str, extra: str = "benchmark") -> object:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        sys.exit(f"{module} is not installed; run `pip install -e \".[{extra}]\"` (it ships the images).")


def tissue_labels(t1: np.ndarray, grey: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Labels from the template and its probability maps (0-255): 0 outside the brain,
    1 CSF, 2 grey matter, 3 white matter."""
    labels = np.zeros(t1.shape, np.uint8)
    labels[t1 > 0] = 1
    tissue = np.maximum(grey, white) >= 127.5
    labels[tissue & (grey >= white)] = 2
    labels[tissue & (white > grey)] = 3
    return labels


def write_mni_tissue(out: Path) -> Path:
    """The MNI brain-tissue set in nnU-Net v2 layout under ``out``; returns its folder."""
    nib = _require("nibabel", "benchmark")
    nilearn = _require("nilearn")
    source = Path(nilearn.__file__).parent / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    image = nib.load(source / name.format("t1"))
    t1 = np.asarray(image.get_fdata(), np.float32)
    grey = np.asarray(nib.load(source / name.format("gm")).get_fdata(), np.float32)
    white = np.asarray(nib.load(source / name.format("wm")).get_fdata(), np.float32)
    labels = tissue_labels(t1, grey, white)

    with_brain = np.flatnonzero((labels > 1).any(axis=(0, 1)))
    centre = (with_brain[0] + with_brain[-1]) // 2
    start = int(centre - SLABS * SLAB_SLICES // 2)
    folder = out / "Dataset501_MNIBrainTissue"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    train_cases = 0
    for slab in range(SLABS):
        z0 = start + slab * SLAB_SLICES
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, z0]) + image.affine[:3, 3]
        split = "Ts" if slab in TEST_SLABS else "Tr"
        case = f"mni_slab{slab:02d}"
        t1_slab = np.ascontiguousarray(t1[:, :, z0 : z0 + SLAB_SLICES])
        label_slab = np.ascontiguousarray(labels[:, :, z0 : z0 + SLAB_SLICES])
        nib.save(nib.Nifti1Image(t1_slab, affine), folder / f"images{split}" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label_slab, affine), folder / f"labels{split}" / f"{case}.nii.gz")
        train_cases += split == "Tr"
    dataset = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3},
        "numTraining": train_cases,
        "file_ending": ".nii.gz",
        "name": "MNIBrainTissue",
        "description": "ICBM 2009a MNI152 T1 template (nilearn) in 12 axial slabs; tissue labels from its GM/WM maps.",
        "licence": "ICBM 2009a template: free use with acknowledgement (see nilearn's documentation).",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def write_digits(out: Path, train: int = 20, val: int = 10, test: int = 50, seed: int = 0) -> Path:
    """The digits set in image-folder layout (train/val/test/<digit>/*.png); returns its folder."""
    datasets = _require("sklearn.datasets")
    from PIL import Image

    digits = datasets.load_digits()
    rng = np.random.default_rng(seed)
    folder = out / "digits"
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == digit))
        chosen = {"train": indices[:train], "val": indices[train : train + val], "test": indices[train + val : train + val + test]}
        for split, picks in chosen.items():
            target = folder / split / str(digit)
            target.mkdir(parents=True, exist_ok=True)
            for index in picks:
                # 0-16 grey levels, ink bright: scaled to 8 bits.
                pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
                Image.fromarray(pixels).save(target / f"{index:04d}.png")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/transfer"), help="folder to write the sets into")
    args = parser.parse_args(argv)
    print(f"Wrote {write_mni_tissue(args.out)}")
    print(f"Wrote {write_digits(args.out)}")


if __name__ == "__main__":
    main()
