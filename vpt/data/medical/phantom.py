"""A generated abdominal CT phantom with the 8 Synapse organs: the offline stand-in for real CT.

Each case is a small CT volume in Hounsfield units with a label map in Synapse's organ order
(:data:`~vpt.data.medical.layouts.SYNAPSE_CLASS_NAMES`), so everything downstream (the
window, slice sampling, 3D Dice and HD95) runs exactly as on real data, in seconds, with
nothing to download.

The anatomy is drawn in the radiological convention of axial CT: anterior at the top of the
image (small ``y``), the patient's right on the image's left (small ``x``), and slice index
``z`` growing towards the head. Intensities follow contrast-enhanced portal-venous CT:

================  ==============  ================================================
structure         HU              where
================  ==============  ================================================
air               -1000           outside the body, bowel gas, stomach fundus
subcutaneous fat  about -100      ring under the skin; mixed into the abdomen
muscle / bowel    30 to 50        body wall; between the organs
bone              300 to 700      vertebra (cortex brighter) and ribs, at the back
aorta             about 180       tube anterior to the spine, slightly left
liver             about 60        large, right (image left), upper abdomen
spleen            about 50        left, posterior
kidneys           35 / 140        medulla / enhanced cortex, both sides, posterior
stomach           about 15        left anterior, with an air pocket
gallbladder       about 8         small, under the liver
pancreas          about 45        elongated, head right to tail left, anterior to the aorta
================  ==============  ================================================

Every case varies organ sizes, positions and in-plane rotations, deforms the whole anatomy
with a smooth random displacement field and roughens each organ surface, then adds a slight
blur and correlated noise (about 15 HU). Small organs (gallbladder, pancreas) are absent
from many slices, as in real scans. The field of view is scaled down to keep cases small:
the default 96 x 96 x 0.8 mm is a 77 mm wide "abdomen".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from vpt.data.medical.io import write_volume
from vpt.data.medical.layouts import SYNAPSE_CLASS_NAMES
from vpt.errors import ConfigError, DataError
from vpt.messages import log_setup

__all__ = [
    "PHANTOM_CLASS_NAMES",
    "PHANTOM_MARKER",
    "DEFAULT_PHANTOM_SHAPE",
    "DEFAULT_PHANTOM_SPACING",
    "generate_phantom",
    "write_phantom_dataset",
]

_logger = logging.getLogger(__name__)

PHANTOM_CLASS_NAMES = SYNAPSE_CLASS_NAMES
DEFAULT_PHANTOM_SHAPE = (32, 96, 96)
DEFAULT_PHANTOM_SPACING = (2.5, 0.8, 0.8)
# Written last by write_phantom_dataset: its presence with matching parameters means "complete".
PHANTOM_MARKER = "vpt_phantoms.json"
# Bump when the generator changes, so folders of older phantoms are regenerated.
# 2: the NIfTI header claims the orientation the anatomy is drawn in (pictures are turned by it).
_GENERATOR_VERSION = 2
_MIN_SIDE = 8

_LABEL = {name: index for index, name in enumerate(SYNAPSE_CLASS_NAMES)}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], feature: Sequence[float]) -> np.ndarray:
    """Smooth random field of unit standard deviation.

    Random weights on a coarse grid are spread by Gaussian bumps along each axis: a separable
    sum that costs a few small matrix products, where filtering a full-size noise volume
    with wide Gaussians would take most of the generation time.

    Args:
        rng: Random generator.
        shape: Output shape ``(D, H, W)``.
        feature: Width of the bumps in voxels per axis: the size of the features.

    Returns:
        float32 array of ``shape`` with mean about 0 and standard deviation 1.
    """
    bases = []
    for side, width in zip(shape, feature):
        width = max(float(width), 0.5)
        # Control points reach past both ends so the field has no quiet border.
        centres = np.arange(-2.0 * width, side + 2.0 * width, width, dtype=np.float32)
        positions = np.arange(side, dtype=np.float32)[:, None]
        bases.append(np.exp(-0.5 * ((positions - centres[None, :]) / width) ** 2).astype(np.float32))
    weights = rng.standard_normal(tuple(basis.shape[1] for basis in bases)).astype(np.float32)
    field = np.einsum("ai,bj,ck,ijk->abc", *bases, weights, optimize=True)
    return ((field - field.mean()) / max(float(field.std()), 1e-6)).astype(np.float32)


class _Anatomy:
    """Normalised, deformed coordinates of one case and the primitive shapes drawn in them.

    Coordinates run from -1 to 1 along every axis (``z`` inferior to superior, ``y``
    anterior to posterior, ``x`` patient right to left); a shape's level function is below 1
    inside it.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> None:
        self.rng = rng
        self.shape = shape
        axes = [np.linspace(-1.0, 1.0, side, dtype=np.float32) for side in shape]
        z, y, x = np.meshgrid(*axes, indexing="ij")
        # Features of about a quarter of the field of view bend the anatomy without tearing it.
        feature = [side / 5.0 for side in shape]
        self.z = z + 0.06 * _smooth_noise(rng, shape, feature)
        self.y = y + 0.04 * _smooth_noise(rng, shape, feature)
        self.x = x + 0.04 * _smooth_noise(rng, shape, feature)
        # Surface roughness: finer than the displacement, shared by the organs at different gains.
        self.roughness = _smooth_noise(rng, shape, [side / 10.0 for side in shape])

    def ellipsoid(
        self,
        center: Sequence[float],
        radii: Sequence[float],
        angle: float = 0.0,
        rough: float = 0.12,
    ) -> np.ndarray:
        """Level function of a rough ellipsoid rotated in the axial plane.

        Args:
            center: ``(z, y, x)`` centre in normalised coordinates.
            radii: ``(z, along, across)`` semi-axes; ``along`` lies on the image's y axis
                before the rotation.
            angle: In-plane rotation in degrees.
            rough: Gain of the surface roughness.

        Returns:
            float32 ``(D, H, W)``, below 1 inside.
        """
        cz, cy, cx = center
        rz, ry, rx = radii
        cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        dy, dx = self.y - cy, self.x - cx
        along = (cos * dy - sin * dx) / ry
        across = (sin * dy + cos * dx) / rx
        return along**2 + across**2 + ((self.z - cz) / rz) ** 2 - rough * self.roughness

    def jitter(
        self, center: Sequence[float], radii: Sequence[float], angle: float
    ) -> tuple[list[float], list[float], float]:
        """Per-case variation of an organ: shifted centre, scaled radii, turned a little."""
        rng = self.rng
        center = [center[0] + rng.normal(0, 0.08), center[1] + rng.normal(0, 0.03), center[2] + rng.normal(0, 0.03)]
        radii = [r * rng.uniform(0.85, 1.15) for r in radii]
        return center, radii, angle + rng.normal(0, 8.0)


def _check_geometry(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(side) for side in shape)
    spacing = tuple(float(value) for value in spacing)
    if len(shape) != 3 or min(shape) < _MIN_SIDE:
        raise ConfigError(f"Phantom shape {shape} is too small; use (D, H, W) with every side {_MIN_SIDE} or more.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"Phantom spacing {spacing} is not valid; use three positive sizes in mm (z, y, x).")
    return shape, spacing  # type: ignore[return-value]


def generate_phantom(
    seed: int,
    shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
    spacing: Sequence[float] = DEFAULT_PHANTOM_SPACING,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one synthetic abdominal CT case.

    Args:
        seed: Seed of everything random; the same seed and shape give identical arrays.
        shape: ``(D, H, W)`` = ``(z, y, x)`` voxels.
        spacing: Voxel size in mm as ``(z, y, x)``; stored with the case, it does not change
            the drawing (the anatomy always fills the field of view).

    Returns:
        ``(image, label, spacing)``: image float32 ``(D, H, W)`` in HU, label uint8
        ``(D, H, W)`` with Synapse's organ indices 0-8, spacing ``(z, y, x)`` in mm.
    """
    shape, spacing = _check_geometry(shape, spacing)
    rng = np.random.default_rng(seed)
    anatomy = _Anatomy(rng, shape)
    y, x, z = anatomy.y, anatomy.x, anatomy.z

    # Body outline, subcutaneous fat and the muscular wall, each a scaled copy of the outline.
    body_y, body_x = rng.uniform(0.66, 0.76), rng.uniform(0.86, 0.94)
    outline = ((y - 0.02) / body_y) ** 2 + (x / body_x) ** 2 - 0.04 * anatomy.roughness
    fat_depth = rng.uniform(0.06, 0.12)
    body = outline <= 1.0
    inside_fat = outline <= (1.0 - fat_depth) ** 2
    cavity = outline <= (1.0 - fat_depth - 0.05) ** 2

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = -100.0
    hu[inside_fat] = 50.0
    # Between the organs: bowel and mesentery (about 30 HU) marbled with fat, plus gas pockets.
    mix = _smooth_noise(rng, shape, [side / 12.0 for side in shape])
    hu[cavity] = np.where(mix[cavity] > 0.6, -90.0, 30.0)
    gas = (_smooth_noise(rng, shape, [side / 16.0 for side in shape]) > 2.3) & cavity
    hu[gas] = -800.0

    # Spine: vertebral body (bright cortex, cancellous core) with discs between vertebrae, and
    # the posterior arch; ribs around the upper abdomen in the body wall.
    spine_y = rng.uniform(0.46, 0.52)
    radius = rng.uniform(0.11, 0.13)
    vertebra = ((y - spine_y) / radius) ** 2 + (x / radius) ** 2
    disc = np.mod((z + rng.uniform(0, 1)) / 0.55, 1.0) < 0.15
    arch_y = spine_y + radius + 0.06
    canal = ((y - arch_y) / 0.035) ** 2 + (x / 0.035) ** 2 <= 1.0
    arch = (((y - arch_y) / 0.06) ** 2 + (x / 0.07) ** 2 <= 1.0) & ~canal
    process = (np.abs(x) < 0.025) & (y > arch_y) & (y < arch_y + 0.12)
    canal &= body
    in_vertebra = (vertebra <= 1.0) & body
    hu[in_vertebra] = np.where(disc[in_vertebra], 90.0, np.where(vertebra[in_vertebra] > 0.7, 700.0, 350.0))
    hu[(arch | process) & body] = 600.0
    hu[canal] = 15.0
    # Ribs: cross-sections on an ellipse in the middle of the body wall, both sides, upper slices.
    wall = 1.0 - fat_depth - 0.025  # inside the fat, outside the cavity
    for angle in np.deg2rad(np.asarray([-60.0, -25.0, 10.0, 45.0]) + rng.normal(0, 5, 4)):
        for side in (-1.0, 1.0):
            rib_y = 0.02 + wall * body_y * np.sin(angle)
            rib_x = side * wall * body_x * np.cos(angle)
            rib = ((y - rib_y) ** 2 + (x - rib_x) ** 2 <= 0.035**2) & (z > 0.1) & body & ~cavity
            hu[rib] = 500.0
    bone = in_vertebra | ((arch | process | canal) & body)
    solid = cavity & ~bone

    label = np.zeros(shape, dtype=np.uint8)
    hu_organ = np.zeros(shape, dtype=np.float32)
    texture = _smooth_noise(rng, shape, [side / 16.0 for side in shape])

    def paint(name: str, mask: np.ndarray, values: np.ndarray | float) -> None:
        mask = mask & solid
        label[mask] = _LABEL[name]
        hu_organ[mask] = values[mask] if isinstance(values, np.ndarray) else values

    # Later organs overwrite earlier ones where they touch, so the order sets which organ
    # indents which (kidneys indent the liver; the aorta is never covered).
    center, radii, angle = anatomy.jitter((0.5, 0.28, 0.62), (0.3, 0.2, 0.1), -35.0)
    paint("spleen", anatomy.ellipsoid(center, radii, angle) <= 1.0, 50.0 + 4.0 * texture)

    center, radii, angle = anatomy.jitter((0.35, 0.0, -0.38), (0.75, 0.55, 0.42), 10.0)
    right_lobe = anatomy.ellipsoid(center, radii, angle)
    left_center, left_radii, left_angle = anatomy.jitter((0.65, -0.25, 0.05), (0.25, 0.18, 0.3), 0.0)
    left_lobe = anatomy.ellipsoid(left_center, left_radii, left_angle)
    paint("liver", (right_lobe <= 1.0) | (left_lobe <= 1.0), rng.uniform(55.0, 65.0) + 4.0 * texture)

    for name, x_center, z_center, turn in (("kidney_right", -0.36, -0.2, 25.0), ("kidney_left", 0.36, -0.1, -25.0)):
        center, radii, angle = anatomy.jitter((z_center, 0.38, x_center), (0.35, 0.14, 0.09), turn)
        level = anatomy.ellipsoid(center, radii, angle, rough=0.06)
        paint(name, level <= 1.0, np.where(level < 0.4, 35.0, 140.0) + 5.0 * texture)

    center, radii, angle = anatomy.jitter((-0.05, -0.2, -0.3), (0.2, 0.1, 0.08), 0.0)
    paint("gallbladder", anatomy.ellipsoid(center, radii, angle, rough=0.04) <= 1.0, 8.0)

    center, radii, angle = anatomy.jitter((0.5, -0.25, 0.35), (0.3, 0.2, 0.2), 0.0)
    stomach = anatomy.ellipsoid(center, radii, angle) <= 1.0
    # Gas rises to the anterior fundus of a supine patient; some stomachs hold none.
    air_level = center[1] - radii[1] * rng.uniform(0.3, 1.1)
    paint("stomach", stomach, np.where(y < air_level, -850.0, 15.0 + 3.0 * texture))

    center, radii, angle = anatomy.jitter((0.1, 0.15, 0.12), (0.15, 0.08, 0.35), 20.0)
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    along = (sin * (y - center[1]) + cos * (x - center[2])) / radii[2]
    across = (cos * (y - center[1]) - sin * (x - center[2])) / (radii[1] * (1.0 - 0.35 * np.clip(along, -1, 1)))
    pancreas = along**2 + across**2 + ((z - center[0]) / radii[0]) ** 2 - 0.12 * anatomy.roughness
    paint("pancreas", pancreas <= 1.0, 45.0 + 4.0 * texture)

    # The aorta runs the whole length, drifting a little left and forward as it descends.
    aorta_y = spine_y - radius - 0.07 + rng.normal(0, 0.01) - 0.02 * z
    aorta_x = 0.08 + rng.normal(0, 0.015) + 0.02 * z
    aorta_radius = rng.uniform(0.05, 0.065)
    paint("aorta", ((y - aorta_y) ** 2 + (x - aorta_x) ** 2) <= aorta_radius**2, rng.uniform(160.0, 200.0))

    organs = label > 0
    hu[organs] = hu_organ[organs]
    # Partial-volume blur across the thick slices and in plane, then correlated scanner noise.
    hu = ndimage.gaussian_filter(hu, (0.4, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.0, 0.7, 0.7))
    hu += rng.uniform(10.0, 20.0) * noise / max(float(noise.std()), 1e-6)
    return hu.astype(np.float32), label, spacing


def _case_seed(seed: int, index: int) -> int:
    """Independent seed of case ``index`` in the set of ``seed`` (no overlap between sets)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(
    root: str | Path,
    num_cases: int = 12,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
    spacing: Sequence[float] = DEFAULT_PHANTOM_SPACING,
) -> Path:
    """Write a set of phantom cases as an nnU-Net v2 raw data set, unless it is already there.

    Writes ``imagesTr/phantom_XXX_0000.nii.gz`` (HU as int16, spacing in the header),
    ``labelsTr/phantom_XXX.nii.gz`` (uint8), ``dataset.json`` with the 8 organ names, and last
    a marker file with the parameters. A folder whose marker matches is left as it is; one
    with phantoms of other parameters is rewritten; a folder that holds other data is refused.

    Args:
        root: Output folder (created).
        num_cases: Number of cases.
        seed: Seed of the set; case ``i`` gets its own seed derived from ``(seed, i)``.
        shape: ``(D, H, W)`` of every case.
        spacing: Voxel size in mm as ``(z, y, x)``.

    Returns:
        ``root``.
    """
    root = Path(root).expanduser()
    shape, spacing = _check_geometry(shape, spacing)
    if num_cases < 1:
        raise ConfigError(f"num_phantoms={num_cases} is not valid; generate at least 1 case.")
    params = {
        "generator": "vpt abdominal CT phantom",
        "version": _GENERATOR_VERSION,
        "num_cases": int(num_cases),
        "seed": int(seed),
        "shape": list(shape),
        "spacing": list(spacing),
    }
    names = [f"phantom_{index:03d}" for index in range(num_cases)]
    images = [root / "imagesTr" / f"{name}_0000.nii.gz" for name in names]
    labels = [root / "labelsTr" / f"{name}.nii.gz" for name in names]
    marker = root / PHANTOM_MARKER
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == params and all(path.is_file() for path in (*images, *labels)):
            log_setup(_logger, logging.INFO, "Phantom data set in %s is complete; not regenerating.", root)
            return root
        _remove_phantoms(root)
    elif (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
        raise DataError(
            f"Folder {root} already holds a data set that vpt did not generate; point the phantoms at an empty folder."
        )

    _logger.info("Writing %d phantom CT cases to %s.", num_cases, root)
    for index, (name, image_path, label_path) in enumerate(zip(names, images, labels)):
        image, label, _ = generate_phantom(_case_seed(seed, index), shape, spacing)
        # Real CT is stored as int16 HU; it also halves the files.
        _write_atomic(image_path, np.clip(np.rint(image), -1024, 3071).astype(np.int16), spacing)
        _write_atomic(label_path, label, spacing)
    dataset = {
        "name": "vpt_abdominal_ct_phantom",
        "description": "Synthetic abdominal CT phantoms with the 8 Synapse organs (vpt.data.medical.phantom).",
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in enumerate(PHANTOM_CLASS_NAMES)},
        "numTraining": int(num_cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    temporary = marker.with_name(marker.name + ".tmp")
    temporary.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, marker)
    return root


def _write_atomic(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """Write a volume under a temporary name and rename it, so no reader sees half a file."""
    temporary = path.with_name(".tmp_" + path.name)
    write_volume(temporary, array, spacing)
    os.replace(temporary, path)


def _remove_phantoms(root: Path) -> None:
    """Delete the files of an earlier phantom set (only files this module names)."""
    for pattern in ("imagesTr/phantom_*.nii.gz", "labelsTr/phantom_*.nii.gz", "dataset.json", PHANTOM_MARKER):
        for path in root.glob(pattern):
            path.unlink()
