"""Segmentation metrics: hand-computed cases, and MONAI's DiceMetric / compute_hausdorff_distance /
SurfaceDiceMetric as the reference for the definitions (surfaces, percentile, tolerance, empty
cases, spacing). The penalised HD95 of an empty mask is ours: it is checked against a plain
computation of the volume's diagonal."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

import vpt.metrics
from vpt.errors import ConfigError, DataError
from vpt.metrics.segmentation import (
    DEFAULT_NSD_TOLERANCE,
    METRIC_DEFINITIONS,
    SliceDice,
    metric_definitions,
    slice_dice,
    summarize_volume_scores,
    volume_scores,
)

monai_metrics = pytest.importorskip("monai.metrics")

NAN = float("nan")
SPACING = (2.5, 0.8, 0.8)


def one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``(1, C, *spatial)`` float one-hot, the layout MONAI's metrics take."""
    tensor = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes)
    return tensor.movedim(-1, 0)[None].float()


def monai_scores(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing=None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> dict[str, np.ndarray]:
    """MONAI's Dice (ignore_empty=True), HD95 and NSD per foreground class, ``(num_classes - 1,)`` each."""
    spacing = None if spacing is None else list(spacing)
    y_pred, y = one_hot(pred, num_classes), one_hot(target, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about every empty class
        dice_metric = monai_metrics.DiceMetric(include_background=False, ignore_empty=True)
        dice = dice_metric(y_pred, y)
        hd95 = monai_metrics.compute_hausdorff_distance(
            y_pred, y, include_background=False, percentile=95, spacing=spacing
        )
        nsd_metric = monai_metrics.SurfaceDiceMetric(
            class_thresholds=[nsd_tolerance] * (num_classes - 1), include_background=False
        )
        nsd = nsd_metric(y_pred, y, spacing=spacing)
    return {
        "dice": dice[0].double().numpy(),
        "hd95": hd95[0].double().numpy(),
        "nsd": nsd[0].double().numpy(),
    }


def ours(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing=None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> dict[str, np.ndarray]:
    scores = volume_scores(pred, target, num_classes, spacing, nsd_tolerance=nsd_tolerance)
    assert sorted(scores) == list(range(1, num_classes))
    keys = ("dice", "hd95", "hd95_penalised", "nsd")
    return {key: np.array([scores[c][key] for c in range(1, num_classes)]) for key in keys}


def diagonal(shape: tuple[int, ...], spacing=None) -> float:
    """The penalty, computed plainly: the length of the volume's diagonal in mm (or voxels)."""
    spacing = spacing or (1.0,) * len(shape)
    return math.sqrt(sum((size * step) ** 2 for size, step in zip(shape, spacing)))


def assert_matches_monai(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing=None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> None:
    """Dice, HD95 and NSD as MONAI gives them; the penalised HD95 is MONAI's HD95 where both
    masks are non-empty and the diagonal where exactly one is."""
    scores = ours(pred, target, num_classes, spacing, nsd_tolerance)
    reference = monai_scores(pred, target, num_classes, spacing, nsd_tolerance)
    for key in ("dice", "hd95", "nsd"):
        np.testing.assert_allclose(scores[key], reference[key], atol=1e-4, rtol=0, equal_nan=True, err_msg=key)

    pred_present = np.array([(pred == c).any() for c in range(1, num_classes)])
    target_present = np.array([(target == c).any() for c in range(1, num_classes)])
    penalised = np.where(pred_present != target_present, diagonal(pred.shape, spacing), reference["hd95"])
    np.testing.assert_allclose(scores["hd95_penalised"], penalised, atol=1e-4, rtol=0, equal_nan=True)
    # Where one mask is empty, MONAI's HD95 is nan and its NSD 0; both empty, both are nan.
    one_empty = pred_present != target_present
    assert np.isnan(reference["hd95"][one_empty]).all() and (reference["nsd"][one_empty] == 0).all()
    assert np.isnan(scores["hd95_penalised"][~pred_present & ~target_present]).all()


def cube(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    labels[tuple(slice(s, s + size) for s in start)] = 1
    return labels


# ----------------------------------------------------------------------------------------------
# Hand-computed cases


@pytest.mark.parametrize(
    "axis, spacing, expected_hd95",
    [
        (0, None, 3.0),
        (0, SPACING, 3 * 2.5),  # a shift along z costs 2.5 mm per voxel
        (1, SPACING, 3 * 0.8),  # along y, 0.8 mm
        (2, None, 3.0),
    ],
)
def test_shifted_cubes(axis: int, spacing, expected_hd95: float) -> None:
    # Two 10^3 cubes, one shifted by 3 voxels. The 100 voxels of the leading face of each are
    # 3 voxels straight from the other cube's face; every other surface voxel is nearer (the
    # side faces overlap at 0), and those 100 of 488 surface voxels hold the 95th percentile.
    start = [10, 10, 10]
    target = cube((32, 32, 32), tuple(start), 10)
    start[axis] += 3
    pred = cube((32, 32, 32), tuple(start), 10)

    scores = volume_scores(pred, target, num_classes=2, spacing=spacing)[1]

    assert scores["dice"] == pytest.approx(2 * 700 / 2000)  # overlap 7 x 10 x 10
    assert scores["hd95"] == pytest.approx(expected_hd95)
    assert scores["hd95_penalised"] == scores["hd95"]  # both masks non-empty: no penalty
    assert (scores["pred_voxels"], scores["target_voxels"]) == (1000, 1000)
    assert 0.0 < scores["nsd"] < 1.0  # at the default 1 mm (voxel) the leading faces miss
    for tolerance in (DEFAULT_NSD_TOLERANCE, 0.8, 2.0, 2.5, expected_hd95):
        assert_matches_monai(pred, target, 2, spacing, nsd_tolerance=tolerance)
    # Within the shift every surface voxel is matched: the shift is the largest distance.
    assert volume_scores(pred, target, 2, spacing, nsd_tolerance=expected_hd95)[1]["nsd"] == 1.0


def test_stray_voxel_far_away_barely_moves_hd95() -> None:
    target = cube((32, 32, 32), (10, 10, 10), 10)
    pred = target.copy()
    pred[0, 0, 0] = 1  # one stray voxel, sqrt(3) * 10 voxels from the cube's corner

    scores = volume_scores(pred, target, num_classes=2)[1]

    # 1 of 489 surface distances is non-zero: the 95th percentile is 0 (the maximum is 17.3).
    assert scores["hd95"] == 0.0 and scores["hd95_penalised"] == 0.0
    # NSD: every surface voxel is matched but the stray one (976 of the 488 + 489).
    assert scores["nsd"] == pytest.approx(976 / 977)
    assert scores["dice"] == pytest.approx(2000 / 2001)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deprecation inside MONAI
        hausdorff = monai_metrics.compute_hausdorff_distance(one_hot(pred, 2), one_hot(target, 2))
    assert hausdorff.item() == pytest.approx(math.sqrt(3) * 10)  # the plain maximum is large
    assert_matches_monai(pred, target, 2)


@pytest.mark.parametrize("stray_voxels, expected_hd95", [(3, 16.0), (2, 0.15 * 16.0)])
def test_hd95_is_the_larger_directed_percentile(stray_voxels: int, expected_hd95: float) -> None:
    # A 10x10 square (36 surface pixels) and the same square plus a short line 16 pixels below it.
    # Prediction -> truth: 36 zeros and `stray_voxels` sixteens; truth -> prediction: all zeros.
    # With 3 strays the directed 95th percentile is 16 while the percentile of the pooled 75
    # distances is 0; with 2 it interpolates: index 0.95 * 37 = 35.15 -> 0.15 * 16.
    target = np.zeros((40, 40), dtype=np.int64)
    target[5:15, 5:15] = 1
    pred = target.copy()
    pred[30, 5 : 5 + stray_voxels] = 1

    assert volume_scores(pred, target, num_classes=2)[1]["hd95"] == pytest.approx(expected_hd95)
    swapped = volume_scores(target, pred, num_classes=2)[1]["hd95"]
    assert swapped == pytest.approx(expected_hd95)  # symmetric
    assert_matches_monai(pred, target, 2)


def surface_from_definition(mask: np.ndarray, diagonal_neighbours: bool = False) -> np.ndarray:
    """Pixels of a 2D mask with a background neighbour (outside the image counts as background)."""
    padded = np.pad(mask, 1)
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if diagonal_neighbours:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    height, width = mask.shape
    has_background_neighbour = np.zeros_like(mask)
    for dy, dx in offsets:
        has_background_neighbour |= ~padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    return mask & has_background_neighbour


def hd95_from_definition(
    pred: np.ndarray, target: np.ndarray, diagonal_neighbours: bool = False
) -> float:
    """Larger directed 95th percentile, by brute-force pairwise distances between 2D surfaces."""
    pred_points = np.argwhere(surface_from_definition(pred, diagonal_neighbours)).astype(float)
    target_points = np.argwhere(surface_from_definition(target, diagonal_neighbours)).astype(float)
    pairwise = np.linalg.norm(pred_points[:, None] - target_points[None], axis=-1)
    return max(np.percentile(pairwise.min(axis=1), 95), np.percentile(pairwise.min(axis=0), 95))


def test_surface_counts_face_neighbours_only() -> None:
    # A 5x5 plus with 3-wide arms: its four inner elbow pixels touch background only across a
    # corner, so they are surface with a 3x3 structuring element and interior with the cross
    # (face-neighbour) element that MONAI uses. Measured from one pixel above the plus, that
    # changes HD95 (5.228 with the cross, 5.171 with 3x3).
    target = np.zeros((9, 9), dtype=bool)
    target[2:7, 3:6] = True
    target[3:6, 2:7] = True
    pred = np.zeros_like(target)
    pred[1, 3] = True

    expected = hd95_from_definition(pred, target)
    assert abs(expected - hd95_from_definition(pred, target, diagonal_neighbours=True)) > 0.05

    assert volume_scores(pred, target, num_classes=2)[1]["hd95"] == pytest.approx(expected)
    assert_matches_monai(pred.astype(np.int64), target.astype(np.int64), 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_2d_blobs_match_brute_force_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = random_labels(rng, (40, 40), num_classes=2, sigma=3.0) == 1
    pred = perturb(rng, target.astype(np.int64), num_classes=2) == 1
    expected = hd95_from_definition(pred, target)
    assert volume_scores(pred, target, num_classes=2)[1]["hd95"] == pytest.approx(expected)


def nsd_from_definition(pred: np.ndarray, target: np.ndarray, tolerance: float) -> float:
    """Surface pixels of both 2D masks within ``tolerance`` of the other surface, by brute force."""
    pred_points = np.argwhere(surface_from_definition(pred)).astype(float)
    target_points = np.argwhere(surface_from_definition(target)).astype(float)
    pairwise = np.linalg.norm(pred_points[:, None] - target_points[None], axis=-1)
    matched = np.sum(pairwise.min(axis=1) <= tolerance) + np.sum(pairwise.min(axis=0) <= tolerance)
    return matched / (len(pred_points) + len(target_points))


@pytest.mark.parametrize(
    "tolerance, expected_nsd",
    [
        (0.0, 4 / 9),
        (0.5, 4 / 9),
        (1.0, 5 / 9),
        (1.999, 5 / 9),
        (2.0, 1.0),  # a distance equal to the tolerance counts: `<` would give 5/9
        (50.0, 1.0),
    ],
)
def test_nsd_of_shifted_squares_by_hand(tolerance: float, expected_nsd: float) -> None:
    # Two 10x10 squares (36 surface pixels each), one 2 rows lower. From each surface: 16 pixels
    # lie on the shared side columns (distance 0), 4 are 1 away (next to a corner of the other
    # square) and 16 are 2 away (the leading row, and the trailing row's middle 6 pixels, whose
    # nearest surface pixels of the other square are 2 rows on).
    target = np.zeros((20, 20), dtype=np.int64)
    target[2:12, 2:12] = 1
    pred = np.zeros_like(target)
    pred[4:14, 2:12] = 1

    scores = volume_scores(pred, target, num_classes=2, nsd_tolerance=tolerance)[1]

    assert scores["nsd"] == pytest.approx(expected_nsd, abs=1e-12)
    assert scores["nsd"] == pytest.approx(nsd_from_definition(pred == 1, target == 1, tolerance))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deprecation inside MONAI
        reference = monai_metrics.compute_surface_dice(one_hot(pred, 2), one_hot(target, 2), [tolerance])
    assert scores["nsd"] == pytest.approx(reference.item(), abs=1e-6)


def test_nsd_counts_a_distance_equal_to_the_tolerance_despite_float_rounding() -> None:
    # Shifted 3 voxels along y at 0.8 mm, every surface voxel lies within 2.4 mm of the other
    # surface, but in float64 the leading faces are 13 * 0.8 - 10 * 0.8 = 2.4000000000000004 mm
    # away. MONAI keeps distances in float32, where that is 2.4: all are matched.
    target = cube((32, 32, 32), (10, 10, 10), 10)
    pred = cube((32, 32, 32), (10, 13, 10), 10)

    at_shift = volume_scores(pred, target, 2, SPACING, nsd_tolerance=2.4)[1]["nsd"]
    just_below = volume_scores(pred, target, 2, SPACING, nsd_tolerance=2.39)[1]["nsd"]

    assert at_shift == 1.0
    assert just_below < 0.8  # the two leading faces (100 of 488 voxels each) and more drop out
    assert_matches_monai(pred, target, 2, SPACING, nsd_tolerance=2.4)
    assert_matches_monai(pred, target, 2, SPACING, nsd_tolerance=2.39)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0, 3.5])
def test_random_2d_blobs_nsd_match_brute_force_definition(seed: int, tolerance: float) -> None:
    rng = np.random.default_rng(seed)
    target = random_labels(rng, (40, 40), num_classes=2, sigma=3.0) == 1
    pred = perturb(rng, target.astype(np.int64), num_classes=2) == 1
    expected = nsd_from_definition(pred, target, tolerance)
    assert volume_scores(pred, target, 2, nsd_tolerance=tolerance)[1]["nsd"] == pytest.approx(expected)


def test_bad_nsd_tolerance() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.int64)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="tolerance"):
            volume_scores(labels, labels, 2, nsd_tolerance=bad)


# ----------------------------------------------------------------------------------------------
# Empty cases


# The diagonal of a 16^3 volume at SPACING: sqrt(40^2 + 12.8^2 + 12.8^2) mm.
DIAGONAL_16 = math.sqrt((16 * 2.5) ** 2 + 2 * (16 * 0.8) ** 2)


@pytest.mark.parametrize(
    "pred_present, target_present, expected_dice, expected_penalised, expected_nsd",
    [
        (False, False, NAN, NAN, NAN),  # organ absent: not scored
        # false positive: Dice nan as in MONAI's ignore_empty=True (counted apart), the rest penalised
        (True, False, NAN, DIAGONAL_16, 0.0),
        (False, True, 0.0, DIAGONAL_16, 0.0),  # missed organ
    ],
)
def test_empty_cases(
    pred_present: bool, target_present: bool, expected_dice: float, expected_penalised: float, expected_nsd: float
) -> None:
    organ = cube((16, 16, 16), (4, 4, 4), 5)
    pred = organ if pred_present else np.zeros_like(organ)
    target = organ if target_present else np.zeros_like(organ)

    scores = volume_scores(pred, target, num_classes=2, spacing=SPACING)[1]

    np.testing.assert_equal(scores["dice"], expected_dice)
    assert math.isnan(scores["hd95"])  # MONAI's value, kept: nan whenever a mask is empty
    np.testing.assert_allclose(scores["hd95_penalised"], expected_penalised, rtol=1e-12, equal_nan=True)
    np.testing.assert_equal(scores["nsd"], expected_nsd)
    assert scores["pred_voxels"] == 125 * pred_present
    assert scores["target_voxels"] == 125 * target_present
    assert_matches_monai(pred, target, 2, SPACING)


@pytest.mark.parametrize("spacing", [None, SPACING, (1.0, 1.0, 1.0)], ids=["voxels", "mm", "1mm"])
def test_penalty_is_the_diagonal_of_the_volume(spacing) -> None:
    target = np.zeros((24, 30, 40), dtype=np.int64)
    target[3:6, 4:9, 5:12] = 1  # missed
    pred = np.zeros_like(target)
    pred[10:12, 10:12, 10:12] = 2  # false positive

    scores = volume_scores(pred, target, 3, spacing)

    expected = math.sqrt(sum((n * s) ** 2 for n, s in zip(target.shape, spacing or (1, 1, 1))))
    assert scores[1]["hd95_penalised"] == pytest.approx(expected)
    assert scores[2]["hd95_penalised"] == pytest.approx(expected)
    assert scores[1]["hd95_penalised"] == pytest.approx(diagonal(target.shape, spacing))
    # No distance between two voxels of the volume is as long: the worst found organ scores less.
    far = np.zeros_like(target)
    far[0, 0, 0] = far[-1, -1, -1] = 1
    corner = np.zeros_like(target)
    corner[0, 0, 0] = 1
    worst_found = volume_scores(far, corner, 2, spacing)[1]["hd95_penalised"]
    assert worst_found < expected


def test_volume_shape_gives_a_crop_the_penalty_of_the_whole_volume() -> None:
    # How the interactive task scores an organ: a slab of slices holding all of it.
    volume = np.zeros((40, 32, 32), dtype=np.int64)
    volume[12:18, 8:20, 8:20] = 1
    missed = np.zeros_like(volume)
    slab = slice(12, 18)

    whole = volume_scores(missed, volume, 2, SPACING)[1]
    cropped = volume_scores(missed[slab], volume[slab], 2, SPACING, volume_shape=volume.shape)[1]
    unaware = volume_scores(missed[slab], volume[slab], 2, SPACING)[1]

    np.testing.assert_equal(cropped, whole)
    assert unaware["hd95_penalised"] < whole["hd95_penalised"]  # the slab's own diagonal
    with pytest.raises(DataError, match="volume_shape"):
        volume_scores(missed, volume, 2, volume_shape=(39, 32, 32))
    with pytest.raises(DataError, match="volume_shape"):
        volume_scores(missed, volume, 2, volume_shape=(40, 32))


def test_three_organs_one_missed_one_false_positive() -> None:
    target = np.zeros((20, 24, 24), dtype=np.int64)
    pred = np.zeros_like(target)
    target[2:8, 2:10, 2:10] = 1
    pred[2:8, 2:10, 4:12] = 1  # organ 1: found, shifted by 2 in x
    target[10:16, 12:20, 12:20] = 2  # organ 2: missed
    pred[12:18, 2:6, 14:20] = 3  # organ 3: predicted where there is none

    scores = volume_scores(torch.as_tensor(pred), torch.as_tensor(target), num_classes=4)

    penalty = math.sqrt(20**2 + 24**2 + 24**2)
    assert scores[1]["dice"] == pytest.approx(2 * 6 * 8 * 6 / (2 * 384))
    assert scores[1]["hd95"] == pytest.approx(2.0) and scores[1]["hd95_penalised"] == pytest.approx(2.0)
    assert scores[2]["dice"] == 0.0 and math.isnan(scores[2]["hd95"])
    assert scores[2]["hd95_penalised"] == pytest.approx(penalty) and scores[2]["nsd"] == 0.0
    assert math.isnan(scores[3]["dice"]) and math.isnan(scores[3]["hd95"])
    assert scores[3]["hd95_penalised"] == pytest.approx(penalty) and scores[3]["nsd"] == 0.0
    assert scores[3]["pred_voxels"] == 6 * 4 * 6 and scores[3]["target_voxels"] == 0
    for tolerance in (1.0, 2.0):
        assert_matches_monai(pred, target, 4, nsd_tolerance=tolerance)

    names = ["background", "liver", "spleen", "kidney"]
    organs = (summary := summarize_volume_scores({"case": scores}, class_names=names))["organs"]
    counts = {
        name: (organ["cases"], organ["missed"], organ["false_positive"]) for name, organ in organs.items()
    }
    assert counts == {"liver": (1, 0, 0), "spleen": (1, 1, 0), "kidney": (0, 0, 1)}
    assert organs["spleen"]["dice"] == 0.0 and math.isnan(organs["spleen"]["hd95"])
    assert math.isnan(organs["kidney"]["dice"])
    assert summary["dice"] == pytest.approx((scores[1]["dice"] + 0.0) / 2)  # the kidney has no Dice
    assert summary["hd95"] == pytest.approx(2.0)  # only the liver has an HD95
    # Penalised HD95 and NSD count the missed spleen and the false-positive kidney.
    assert organs["spleen"]["hd95_penalised"] == organs["kidney"]["hd95_penalised"] == pytest.approx(penalty)
    assert organs["spleen"]["nsd"] == organs["kidney"]["nsd"] == 0.0
    assert summary["hd95_penalised"] == pytest.approx((2.0 + 2 * penalty) / 3)
    assert summary["nsd"] == pytest.approx(scores[1]["nsd"] / 3)


# ----------------------------------------------------------------------------------------------
# Random blobs against MONAI


def random_labels(
    rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, sigma: float
) -> np.ndarray:
    """Smooth random blobs of every class, some touching the image border."""
    fields = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(num_classes)]
    )
    fields[0] += 0.05  # a little more background
    return fields.argmax(axis=0)


def perturb(rng: np.random.Generator, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A plausible prediction: the labels with smooth boundary noise and a few stray voxels."""
    noisy = random_labels(rng, labels.shape, num_classes, sigma=2.0)
    keep = ndimage.gaussian_filter(rng.standard_normal(labels.shape), 2.0) > -0.05
    pred = np.where(keep, labels, noisy)
    strays = rng.integers(0, pred.size, size=5)
    pred.flat[strays] = rng.integers(0, num_classes, size=5)
    return pred


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [None, SPACING], ids=["voxels", "mm"])
def test_random_blobs_3d_match_monai(seed: int, spacing) -> None:
    rng = np.random.default_rng(seed)
    target = random_labels(rng, (20, 36, 36), num_classes=4, sigma=3.0)
    pred = perturb(rng, target, num_classes=4)
    # 1.6 and 2.5 mm equal distances on the grid (2 x 0.8, 1 x 2.5): the `<=` edge is exercised.
    for tolerance in (1.0, 1.6, 2.5):
        assert_matches_monai(pred, target, 4, spacing, nsd_tolerance=tolerance)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)], ids=["pixels", "mm"])
def test_random_blobs_2d_match_monai(seed: int, spacing) -> None:
    rng = np.random.default_rng(100 + seed)
    target = random_labels(rng, (64, 64), num_classes=5, sigma=3.0)
    pred = perturb(rng, target, num_classes=5)
    for tolerance in (1.0, 1.4, 2.6):
        assert_matches_monai(pred, target, 5, spacing, nsd_tolerance=tolerance)


def test_random_blobs_with_absent_classes_match_monai() -> None:
    rng = np.random.default_rng(7)
    target = random_labels(rng, (16, 32, 32), num_classes=3, sigma=3.0)
    pred = perturb(rng, target, num_classes=3)
    pred[pred == 2] = 0  # class 2 missed
    target[target == 1] = 0  # class 1 absent from the truth, present in the prediction
    assert_matches_monai(pred, target, 5, SPACING)  # classes 3, 4 absent from both
    scores = volume_scores(pred, target, 5, SPACING)
    assert scores[1]["hd95_penalised"] == scores[2]["hd95_penalised"] == pytest.approx(diagonal(pred.shape, SPACING))
    assert all(math.isnan(scores[c]["hd95_penalised"]) and math.isnan(scores[c]["nsd"]) for c in (3, 4))


def test_accepts_tensors_and_whole_number_floats() -> None:
    rng = np.random.default_rng(3)
    target = random_labels(rng, (12, 24, 24), num_classes=3, sigma=2.0)
    pred = perturb(rng, target, num_classes=3)
    expected = volume_scores(pred, target, 3, SPACING)
    from_tensors = volume_scores(torch.as_tensor(pred), torch.as_tensor(target).float(), 3, SPACING)
    np.testing.assert_equal(from_tensors, expected)


# ----------------------------------------------------------------------------------------------
# Input errors


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 8, 8\).*\(4, 8, 9\)"):
        volume_scores(np.zeros((4, 8, 8), int), np.zeros((4, 8, 9), int), num_classes=2)


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_labels_name_the_bad_value(bad: int) -> None:
    target = np.zeros((4, 8, 8), dtype=np.int64)
    pred = target.copy()
    pred[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"label {bad} .*outside \\[0, 3\\)"):
        volume_scores(pred, target, num_classes=3)
    with pytest.raises(DataError, match=f"label {bad}"):
        volume_scores(target, pred, num_classes=3)


def test_other_bad_inputs() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.int64)
    with pytest.raises(DataError, match="one per axis"):
        volume_scores(labels, labels, 2, spacing=(1.0, 1.0))
    with pytest.raises(DataError, match="positive"):
        volume_scores(labels, labels, 2, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="non-integer"):
        volume_scores(labels + 0.5, labels, 2)
    with pytest.raises(DataError, match=r"\(2, 4, 8, 8\)"):
        volume_scores(np.zeros((2, 4, 8, 8), int), np.zeros((2, 4, 8, 8), int), 2)
    with pytest.raises(ConfigError):
        volume_scores(labels, labels, 1)


# ----------------------------------------------------------------------------------------------
# Summary


PENALTY = 100.0


def case(
    dice: float, hd95: float, pred_voxels: int, target_voxels: int, nsd: float | None = None
) -> dict[str, float]:
    """Scores as volume_scores gives them, the penalised HD95 and (unless given) NSD following
    the empty-case rules."""
    one_empty = (pred_voxels > 0) != (target_voxels > 0)
    both_empty = pred_voxels == 0 and target_voxels == 0
    if nsd is None:
        nsd = NAN if both_empty else 0.0 if one_empty else 0.5
    penalised = PENALTY if one_empty else hd95
    return {
        "dice": dice, "hd95": hd95, "hd95_penalised": penalised, "nsd": nsd,
        "pred_voxels": pred_voxels, "target_voxels": target_voxels,
    }


def test_summary_means_counts_and_unit() -> None:
    per_case = {
        "a": {1: case(0.8, 4.0, 100, 100, nsd=0.9), 2: case(0.0, NAN, 0, 50)},  # organ 2 missed
        "b": {1: case(0.6, 2.0, 90, 110, nsd=0.7), 2: case(0.9, 1.0, 40, 50, nsd=0.8)},
        "c": {1: case(NAN, NAN, 30, 0), 2: case(NAN, NAN, 0, 0)},  # organ 1 false positive, 2 absent
    }

    summary = summarize_volume_scores(per_case, unit="voxels")

    assert summary["cases"] == 3 and summary["hd95_unit"] == "voxels"
    assert summary["organs"]["1"] == {
        "class_index": 1, "dice": pytest.approx(0.7), "hd95": pytest.approx(3.0),
        "hd95_penalised": pytest.approx((4.0 + 2.0 + PENALTY) / 3), "nsd": pytest.approx((0.9 + 0.7 + 0.0) / 3),
        "cases": 2, "missed": 0, "false_positive": 1,
    }
    assert summary["organs"]["2"] == {
        "class_index": 2, "dice": pytest.approx(0.45), "hd95": pytest.approx(1.0),
        "hd95_penalised": pytest.approx((PENALTY + 1.0) / 2), "nsd": pytest.approx((0.0 + 0.8) / 2),
        "cases": 2, "missed": 1, "false_positive": 0,
    }
    assert summary["dice"] == pytest.approx((0.7 + 0.45) / 2)
    assert summary["hd95"] == pytest.approx((3.0 + 1.0) / 2)
    assert summary["hd95_penalised"] == pytest.approx(((106.0 / 3) + 50.5) / 2)
    assert summary["nsd"] == pytest.approx((1.6 / 3 + 0.4) / 2)
    assert list(summary) == ["cases", "dice", "hd95", "hd95_penalised", "nsd", "hd95_unit", "organs"]


def test_missing_organs_worsen_the_penalised_hd95_not_the_plain_one() -> None:
    # MONAI #9095: ten cases, the organ found 2 voxels off in the easy ones and 5 off in the hard
    # ones. A model that misses the hard ones gets a *better* plain HD95 (they drop out of the
    # mean); its penalised HD95 and NSD get worse.
    def per_case(missed_hard: bool) -> dict[str, dict[int, dict[str, float]]]:
        cases = {}
        for index in range(10):
            target = cube((24, 24, 24), (6, 6, 6), 8)
            shift = 2 if index < 5 else 5
            pred = np.roll(target, shift, axis=2)
            if missed_hard and index >= 5:
                pred = np.zeros_like(target)
            cases[str(index)] = volume_scores(pred, target, 2, nsd_tolerance=2.0)
        return cases

    finds_all = summarize_volume_scores(per_case(False), unit="voxels")
    misses_hard = summarize_volume_scores(per_case(True), unit="voxels")

    assert misses_hard["hd95"] < finds_all["hd95"]  # the optimistic empty
    assert misses_hard["hd95_penalised"] > finds_all["hd95_penalised"]
    assert misses_hard["nsd"] < finds_all["nsd"]
    assert misses_hard["dice"] < finds_all["dice"]
    assert misses_hard["hd95_penalised"] == pytest.approx((5 * 2.0 + 5 * diagonal((24, 24, 24))) / 10)
    assert misses_hard["organs"]["1"]["missed"] == 5


def test_summary_of_real_scores_is_json_friendly() -> None:
    import json

    rng = np.random.default_rng(5)
    per_case = {}
    for name in ("case_0", "case_1"):
        target = random_labels(rng, (10, 20, 20), num_classes=3, sigma=2.0)
        per_case[name] = volume_scores(perturb(rng, target, 3), target, 3, SPACING)
    per_case["case_2"] = volume_scores(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 3)

    summary = summarize_volume_scores(per_case, class_names=["background", "liver", "spleen"])

    assert list(summary["organs"]) == ["liver", "spleen"] and summary["hd95_unit"] == "mm"
    assert json.loads(json.dumps(summary))["organs"]["liver"]["cases"] == 2
    for key in ("dice", "hd95", "hd95_penalised", "nsd"):
        expected = np.mean([per_case[c][1][key] for c in ("case_0", "case_1")])
        assert summary["organs"]["liver"][key] == pytest.approx(expected), key
    assert all(type(value) in (int, float) for value in per_case["case_0"][1].values())


def test_summary_with_nothing_measured_and_bad_arguments() -> None:
    empty = {"a": {1: case(NAN, NAN, 0, 0)}}
    summary = summarize_volume_scores(empty)
    assert math.isnan(summary["dice"]) and math.isnan(summary["hd95"])
    assert summary["organs"]["1"]["cases"] == 0
    with pytest.raises(ConfigError, match="unit"):
        summarize_volume_scores(empty, unit="cm")
    with pytest.raises(ConfigError, match="class_names"):
        summarize_volume_scores(empty, class_names=["background"])
    with pytest.raises(DataError, match="volume_scores"):
        summarize_volume_scores({"a": {1: {"dice": 0.5, "hd95": 1.0}}})
    with pytest.raises(DataError, match="hd95_penalised, nsd"):
        summarize_volume_scores({"a": {1: {"dice": 0.5, "hd95": 1.0, "pred_voxels": 1, "target_voxels": 1}}})
    assert math.isnan(summary["hd95_penalised"]) and math.isnan(summary["nsd"])


# ----------------------------------------------------------------------------------------------
# Metric definitions


def test_metric_definitions_state_unit_tolerance_and_empty_rules() -> None:
    import json

    assert set(METRIC_DEFINITIONS) == {"dice", "hd95", "hd95_penalised", "nsd"}
    # The tolerance the default definitions state is the one volume_scores applies when given none:
    # a square shifted by 2 voxels (1 mm each) is fully within 2 mm of the truth's surface, not within 1 mm.
    target = np.zeros((24, 24), np.int64)
    target[6:16, 6:16] = 1
    shifted = np.roll(target, 2, axis=1)

    def nsd(**tolerance: float) -> float:
        return volume_scores(shifted, target, 2, spacing=(1.0, 1.0), **tolerance)[1]["nsd"]

    assert f"tolerance of {DEFAULT_NSD_TOLERANCE:g} mm" in METRIC_DEFINITIONS["nsd"]
    assert nsd() == nsd(nsd_tolerance=1.0) < nsd(nsd_tolerance=2.0) == 1.0
    assert vpt.metrics.METRIC_DEFINITIONS is METRIC_DEFINITIONS
    assert {"METRIC_DEFINITIONS", "metric_definitions"} <= set(vpt.metrics.__all__)
    for text in METRIC_DEFINITIONS.values():
        assert "both empty" in text and text.endswith(".")
    for key in ("dice", "hd95", "hd95_penalised", "nsd"):
        assert "missed" in METRIC_DEFINITIONS[key] and "false-positive" in METRIC_DEFINITIONS[key]
    assert "in mm" in METRIC_DEFINITIONS["hd95"] and "diagonal" in METRIC_DEFINITIONS["hd95_penalised"]
    assert "1 mm" in METRIC_DEFINITIONS["nsd"] and "<=" in METRIC_DEFINITIONS["nsd"]

    in_voxels = metric_definitions(nsd_tolerance=2.5, hd95_unit="voxels")
    assert "2.5 voxels" in in_voxels["nsd"] and "in voxels" in in_voxels["hd95"]
    assert "mm" not in in_voxels["hd95"] + in_voxels["hd95_penalised"] + in_voxels["nsd"]
    assert json.loads(json.dumps(in_voxels)) == in_voxels
    with pytest.raises(ConfigError, match="unit"):
        metric_definitions(1.0, "cm")
    with pytest.raises(ConfigError, match="tolerance"):
        metric_definitions(-1.0, "mm")


# ----------------------------------------------------------------------------------------------
# Slice Dice


def numpy_dice(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> np.ndarray:
    pred, target = np.concatenate(preds), np.concatenate(targets)
    dice = np.full(num_classes, np.nan)
    for c in range(num_classes):
        total = np.sum(pred == c) + np.sum(target == c)
        if total:
            dice[c] = 2 * np.sum((pred == c) & (target == c)) / total
    return dice


def test_slice_dice_accumulates_over_batches() -> None:
    num_classes = 5  # class 4 never appears: nan
    generator = torch.Generator().manual_seed(0)
    metric = SliceDice(num_classes)
    preds, targets = [], []
    for _ in range(4):
        target = torch.randint(0, 4, (3, 16, 16), generator=generator)
        logits = torch.randn(3, num_classes, 16, 16, generator=generator)
        logits[:, 4] = -10.0
        logits += 3.0 * torch.nn.functional.one_hot(target, num_classes).movedim(-1, 1)  # mostly right
        metric.update(logits, target)
        preds.append(logits.argmax(1).numpy())
        targets.append(target.numpy())

    expected = numpy_dice(preds, targets, num_classes)
    result = metric.compute()

    np.testing.assert_allclose(result["per_class"].numpy(), expected, rtol=1e-6, equal_nan=True)
    assert result["dice"].item() == pytest.approx(np.nanmean(expected[1:]))
    assert 0.3 < result["dice"].item() < 1.0
    # The function on one batch, from labels or logits alike.
    np.testing.assert_allclose(
        slice_dice(torch.as_tensor(preds[0]), torch.as_tensor(targets[0]), num_classes).numpy(),
        numpy_dice(preds[:1], targets[:1], num_classes), rtol=1e-6, equal_nan=True,
    )

    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute()["per_class"]).all()


def test_slice_dice_states_add_across_processes() -> None:
    # Two processes' metrics merged with the metric's own reduction (sum), as DDP sync does.
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 3, (2, 8, 8), generator=generator),
                torch.randint(0, 3, (2, 8, 8), generator=generator)) for _ in range(2)]
    first, second, together = SliceDice(3), SliceDice(3), SliceDice(3)
    first.update(*batches[0])
    second.update(*batches[1])
    for batch in batches:
        together.update(*batch)
    first.merge_state(second)
    torch.testing.assert_close(
        first.compute()["per_class"], together.compute()["per_class"], equal_nan=True
    )


def test_slice_dice_rejects_bad_inputs() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(DataError, match="label 3"):
        slice_dice(target + 3, target, 3)
    with pytest.raises(DataError, match="label 3"):
        SliceDice(3).update(torch.randn(2, 3, 8, 8), target + 3)
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        slice_dice(torch.randn(2, 4, 8, 8), target, 3)
    with pytest.raises(DataError, match="integer"):
        slice_dice(target.float(), target, 3)
