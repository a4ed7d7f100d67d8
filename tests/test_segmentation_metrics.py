"""Segmentation metrics: hand-computed cases, and MONAI's DiceMetric / compute_hausdorff_distance
as the reference for the definitions (surfaces, percentile, empty cases, spacing)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from vpt.errors import ConfigError, DataError
from vpt.metrics.segmentation import SliceDice, slice_dice, summarize_volume_scores, volume_scores

monai_metrics = pytest.importorskip("monai.metrics")

NAN = float("nan")
SPACING = (2.5, 0.8, 0.8)


def one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``(1, C, *spatial)`` float one-hot, the layout MONAI's metrics take."""
    tensor = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes)
    return tensor.movedim(-1, 0)[None].float()


def monai_scores(
    pred: np.ndarray, target: np.ndarray, num_classes: int, spacing=None
) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's Dice (ignore_empty=True) and HD95 per foreground class, ``(num_classes - 1,)`` each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about every empty class
        dice_metric = monai_metrics.DiceMetric(include_background=False, ignore_empty=True)
        dice = dice_metric(one_hot(pred, num_classes), one_hot(target, num_classes))
        hd95 = monai_metrics.compute_hausdorff_distance(
            one_hot(pred, num_classes),
            one_hot(target, num_classes),
            include_background=False,
            percentile=95,
            spacing=None if spacing is None else list(spacing),
        )
    return dice[0].double().numpy(), hd95[0].double().numpy()


def ours(
    pred: np.ndarray, target: np.ndarray, num_classes: int, spacing=None
) -> tuple[np.ndarray, np.ndarray]:
    scores = volume_scores(pred, target, num_classes, spacing)
    assert sorted(scores) == list(range(1, num_classes))
    return (
        np.array([scores[c]["dice"] for c in range(1, num_classes)]),
        np.array([scores[c]["hd95"] for c in range(1, num_classes)]),
    )


def assert_matches_monai(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing=None) -> None:
    dice, hd95 = ours(pred, target, num_classes, spacing)
    reference_dice, reference_hd95 = monai_scores(pred, target, num_classes, spacing)
    np.testing.assert_allclose(dice, reference_dice, atol=1e-4, rtol=0, equal_nan=True)
    np.testing.assert_allclose(hd95, reference_hd95, atol=1e-4, rtol=0, equal_nan=True)


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
    assert (scores["pred_voxels"], scores["target_voxels"]) == (1000, 1000)
    assert_matches_monai(pred, target, 2, spacing)


def test_stray_voxel_far_away_barely_moves_hd95() -> None:
    target = cube((32, 32, 32), (10, 10, 10), 10)
    pred = target.copy()
    pred[0, 0, 0] = 1  # one stray voxel, sqrt(3) * 10 voxels from the cube's corner

    scores = volume_scores(pred, target, num_classes=2)[1]

    # 1 of 489 surface distances is non-zero: the 95th percentile is 0 (the maximum is 17.3).
    assert scores["hd95"] == 0.0
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


# ----------------------------------------------------------------------------------------------
# Empty cases


@pytest.mark.parametrize(
    "pred_present, target_present, expected_dice",
    [
        (False, False, NAN),  # organ absent: not scored
        (True, False, NAN),  # false positive: nan as in MONAI's ignore_empty=True; counted apart
        (False, True, 0.0),  # missed organ
    ],
)
def test_empty_cases(pred_present: bool, target_present: bool, expected_dice: float) -> None:
    organ = cube((16, 16, 16), (4, 4, 4), 5)
    pred = organ if pred_present else np.zeros_like(organ)
    target = organ if target_present else np.zeros_like(organ)

    scores = volume_scores(pred, target, num_classes=2, spacing=SPACING)[1]

    np.testing.assert_equal(scores["dice"], expected_dice)
    assert math.isnan(scores["hd95"])
    assert scores["pred_voxels"] == 125 * pred_present
    assert scores["target_voxels"] == 125 * target_present
    assert_matches_monai(pred, target, 2, SPACING)


def test_three_organs_one_missed_one_false_positive() -> None:
    target = np.zeros((20, 24, 24), dtype=np.int64)
    pred = np.zeros_like(target)
    target[2:8, 2:10, 2:10] = 1
    pred[2:8, 2:10, 4:12] = 1  # organ 1: found, shifted by 2 in x
    target[10:16, 12:20, 12:20] = 2  # organ 2: missed
    pred[12:18, 2:6, 14:20] = 3  # organ 3: predicted where there is none

    scores = volume_scores(torch.as_tensor(pred), torch.as_tensor(target), num_classes=4)

    assert scores[1]["dice"] == pytest.approx(2 * 6 * 8 * 6 / (2 * 384))
    assert scores[1]["hd95"] == pytest.approx(2.0)
    assert scores[2]["dice"] == 0.0 and math.isnan(scores[2]["hd95"])
    assert math.isnan(scores[3]["dice"]) and math.isnan(scores[3]["hd95"])
    assert scores[3]["pred_voxels"] == 6 * 4 * 6 and scores[3]["target_voxels"] == 0
    assert_matches_monai(pred, target, 4)

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
    assert_matches_monai(pred, target, 4, spacing)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)], ids=["pixels", "mm"])
def test_random_blobs_2d_match_monai(seed: int, spacing) -> None:
    rng = np.random.default_rng(100 + seed)
    target = random_labels(rng, (64, 64), num_classes=5, sigma=3.0)
    pred = perturb(rng, target, num_classes=5)
    assert_matches_monai(pred, target, 5, spacing)


def test_random_blobs_with_absent_classes_match_monai() -> None:
    rng = np.random.default_rng(7)
    target = random_labels(rng, (16, 32, 32), num_classes=3, sigma=3.0)
    pred = perturb(rng, target, num_classes=3)
    pred[pred == 2] = 0  # class 2 missed
    target[target == 1] = 0  # class 1 absent from the truth, present in the prediction
    assert_matches_monai(pred, target, 5, SPACING)  # classes 3, 4 absent from both


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


def case(dice: float, hd95: float, pred_voxels: int, target_voxels: int) -> dict[str, float]:
    return {"dice": dice, "hd95": hd95, "pred_voxels": pred_voxels, "target_voxels": target_voxels}


def test_summary_means_counts_and_unit() -> None:
    per_case = {
        "a": {1: case(0.8, 4.0, 100, 100), 2: case(0.0, NAN, 0, 50)},  # organ 2 missed
        "b": {1: case(0.6, 2.0, 90, 110), 2: case(0.9, 1.0, 40, 50)},
        "c": {1: case(NAN, NAN, 30, 0), 2: case(NAN, NAN, 0, 0)},  # organ 1 false positive, 2 absent
    }

    summary = summarize_volume_scores(per_case, unit="voxels")

    assert summary["cases"] == 3 and summary["hd95_unit"] == "voxels"
    assert summary["organs"]["1"] == {
        "class_index": 1, "dice": pytest.approx(0.7), "hd95": pytest.approx(3.0),
        "cases": 2, "missed": 0, "false_positive": 1,
    }
    assert summary["organs"]["2"] == {
        "class_index": 2, "dice": pytest.approx(0.45), "hd95": pytest.approx(1.0),
        "cases": 2, "missed": 1, "false_positive": 0,
    }
    assert summary["dice"] == pytest.approx((0.7 + 0.45) / 2)
    assert summary["hd95"] == pytest.approx((3.0 + 1.0) / 2)


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
    expected = np.mean([per_case[c][1]["dice"] for c in ("case_0", "case_1")])
    assert summary["organs"]["liver"]["dice"] == pytest.approx(expected)


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
