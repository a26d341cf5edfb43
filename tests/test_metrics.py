"""Challenge metrics, detection and clinical numbers on hand-built masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from autopetseg.scoring.clinical import DmaxSettings, clinical_numbers, max_lesion_distance_mm
from autopetseg.scoring.metrics import (
    aggregate,
    case_metrics,
    detection,
    dice,
    false_negative_volume,
    false_positive_volume,
    label_lesions,
    lesion_wise_dice,
)

from _metrics_helpers import random_blobs, reference_case

SHAPE = (16, 18, 20)


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# DSC / FPV / FNV
# ---------------------------------------------------------------------------------------------


def test_false_positive_blob_far_from_lesion():
    voxel_ml = 2.0 * 2.0 * 2.0 / 1000.0
    gt = empty()
    gt[1:4, 1:4, 1:4] = 1  # 27 voxels
    pred = gt.copy()
    pred[10:12, 12:14, 13:18] = 1  # 2*2*5 = 20 voxels, far away
    result = case_metrics(gt, pred, voxel_ml)
    assert result["gt_positive"] is True
    assert result["fpv_ml"] == pytest.approx(20 * voxel_ml)
    assert result["fnv_ml"] == 0.0
    assert result["dsc"] == pytest.approx(2 * 27 / (27 + 47))


def test_missed_lesion_counts_whole_lesion_as_false_negative():
    voxel_ml = 0.027
    gt = empty()
    gt[1:4, 1:4, 1:4] = 1  # found (27)
    gt[9:13, 10:12, 10:15] = 1  # missed (4*2*5 = 40)
    pred = empty()
    pred[2:3, 2:3, 2:3] = 1  # one voxel inside the first lesion is enough to "find" it
    result = case_metrics(gt, pred, voxel_ml)
    assert result["fnv_ml"] == pytest.approx(40 * voxel_ml)
    assert result["fpv_ml"] == 0.0
    assert result["dsc"] == pytest.approx(2 * 1 / (67 + 1))
    assert false_negative_volume(gt, pred, voxel_ml) == pytest.approx(40 * voxel_ml)


def test_empty_ground_truth_excluded_from_dsc_and_fnv_but_counted_in_fpv():
    voxel_ml = 0.008
    positive_gt = empty()
    positive_gt[2:5, 2:5, 2:5] = 1
    positive_pred = positive_gt.copy()
    negative_gt = empty()
    negative_pred = empty()
    negative_pred[5:7, 5:7, 5:8] = 1  # 12 voxels predicted in a lesion-free case

    negative = case_metrics(negative_gt, negative_pred, voxel_ml)
    assert negative["gt_positive"] is False
    assert math.isnan(negative["dsc"]) and math.isnan(negative["fnv_ml"])
    assert negative["fpv_ml"] == pytest.approx(12 * voxel_ml)

    positive = case_metrics(positive_gt, positive_pred, voxel_ml)
    summary = aggregate([positive, negative])
    assert summary["n_cases"] == 2 and summary["n_positive"] == 1
    assert summary["mean_dsc"] == pytest.approx(1.0)  # the lesion-free case does not pull it to 0.5
    assert summary["mean_fpv_ml"] == pytest.approx(12 * voxel_ml / 2)
    assert summary["mean_fnv_ml"] == 0.0

    only_negative = aggregate([negative])
    assert math.isnan(only_negative["mean_dsc"]) and math.isnan(only_negative["mean_fnv_ml"])
    # The plain formula: 0/0 is nan, an empty ground truth against a prediction is 0.
    assert math.isnan(dice(empty(), empty()))
    assert dice(negative_gt, negative_pred) == 0.0


def test_corner_touching_voxels_are_two_components_edge_touching_one():
    corner = empty()
    corner[5, 5, 5] = corner[6, 6, 6] = 1
    edge = empty()
    edge[5, 5, 5] = edge[6, 6, 5] = 1
    face = empty()
    face[5, 5, 5] = face[6, 5, 5] = 1
    assert label_lesions(corner)[1] == 2
    assert label_lesions(edge)[1] == 1
    assert label_lesions(face)[1] == 1

    # The corner neighbour of a lesion voxel is its own component: a false positive.
    gt = empty()
    gt[5, 5, 5] = 1
    assert false_positive_volume(gt, corner, 1.0) == 1.0
    assert false_positive_volume(gt, edge, 1.0) == 0.0
    # ... and a lesion touched only at a corner is missed.
    only_corner = empty()
    only_corner[6, 6, 6] = 1
    assert false_negative_volume(gt, only_corner, 1.0) == 1.0


def test_anisotropic_voxel_volume_scales_volumes():
    spacing_zyx = (3.0, 2.0, 4.0)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    gt = empty()
    pred = empty()
    pred[3:5, 3:6, 3:7] = 1  # 24 voxels
    assert false_positive_volume(gt, pred, voxel_ml) == pytest.approx(24 * 0.024)
    assert clinical_numbers(pred, np.ones(SHAPE), spacing_zyx)["tmtv_ml"] == pytest.approx(24 * 0.024)


def test_identical_to_challenge_loop_on_random_masks():
    rng = np.random.default_rng(20240611)
    shape = (20, 22, 24)
    voxel_ml = 0.0123
    for trial in range(12):
        gt = random_blobs(rng, shape, threshold=rng.uniform(1.0, 2.2))
        pred = random_blobs(rng, shape, threshold=rng.uniform(1.0, 2.2))
        if trial == 0:
            gt[:] = 0  # lesion-free case
        if trial == 1:
            pred[:] = 0  # nothing predicted
        if trial == 2:
            pred = gt.copy()
            pred[np.nonzero(rng.random(shape) < 0.3)] = 0  # fragments of the lesions
        mine = case_metrics(gt, pred, voxel_ml)
        dsc, fpv, fnv = reference_case(gt, pred, voxel_ml)
        # Exact equality, not approximate: the same integer counts times the same voxel volume.
        assert mine["fpv_ml"] == fpv
        if math.isnan(dsc):
            assert math.isnan(mine["dsc"]) and math.isnan(mine["fnv_ml"])
        else:
            assert mine["dsc"] == dsc
            assert mine["fnv_ml"] == fnv
        assert mine["gt_positive"] == bool(gt.any())


def test_scipy_18_neighbourhood_matches_cc3d():
    cc3d = pytest.importorskip("cc3d")
    rng = np.random.default_rng(3)
    mask = (rng.random((14, 15, 16)) < 0.25).astype(np.uint8)  # sparse: many diagonal contacts
    ours, n_ours = label_lesions(mask)
    theirs = cc3d.connected_components(mask.astype(int), connectivity=18)
    assert n_ours == int(theirs.max())
    # Same partition: each of our labels maps to exactly one of theirs and back.
    pairs = np.unique(np.stack([ours[mask > 0], theirs[mask > 0]]), axis=1)
    assert pairs.shape[1] == n_ours


# ---------------------------------------------------------------------------------------------
# Detection (SUVmax rule) and lesion-wise Dice
# ---------------------------------------------------------------------------------------------


def test_detection_requires_the_suvmax_voxel():
    gt = empty()
    gt[2:5, 2:5, 2:5] = 1
    suv = np.ones(SHAPE, dtype=np.float32)
    suv[2:5, 2:5, 2:5] = 4.0
    suv[3, 4, 2] = 9.0  # the lesion's SUVmax voxel

    most_but_peak = gt.copy()
    most_but_peak[3, 4, 2] = 0
    result = detection(gt, most_but_peak, suv)
    # Covers 26 of 27 voxels but not the peak: a missed lesion; touching it, it is no FP either.
    assert result == {"tp": 0, "fp": 0, "fn": 1, "f1": 0.0}

    peak_only = empty()
    peak_only[3, 4, 2] = 1
    far_blob = empty()
    far_blob[10:12, 12:14, 14:16] = 1
    result = detection(gt, peak_only | far_blob, suv)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["f1"] == pytest.approx(1 / (1 + 0.5))


def test_detection_counts_lesions_and_components():
    gt = empty()
    gt[1:3, 1:3, 1:3] = 1  # lesion A, found
    gt[1:3, 8:10, 1:3] = 1  # lesion B, missed
    gt[8:10, 1:3, 8:10] = 1  # lesion C, found
    suv = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)  # SUVmax = last voxel in raster order
    pred = empty()
    pred[2, 2, 2] = 1  # A's last voxel
    pred[9, 2, 9] = 1  # C's last voxel
    pred[13, 13, 13] = pred[14, 14, 14] = 1  # two FPs touching only at a corner
    result = detection(gt, pred, suv)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 2, 1)
    assert result["f1"] == pytest.approx(2 / (2 + 1.5))

    assert math.isnan(detection(empty(), empty(), suv)["f1"])  # nothing to find, nothing found
    assert detection(empty(), pred, suv) == {"tp": 0, "fp": 4, "fn": 0, "f1": 0.0}


def test_lesion_wise_dice_per_lesion():
    gt = empty()
    gt[1:3, 1:3, 1:3] = 1  # A: 8 voxels, predicted exactly
    gt[1:3, 8:10, 1:3] = 1  # B: 8 voxels, half covered by a 8-voxel component
    gt[8:10, 1:3, 8:10] = 1  # C: missed
    pred = empty()
    pred[1:3, 1:3, 1:3] = 1
    pred[2:4, 8:10, 1:3] = 1  # 4 voxels inside B, 4 outside
    pred[12:14, 12:14, 12:14] = 1  # FP elsewhere: belongs to no lesion
    scores = lesion_wise_dice(gt, pred)
    np.testing.assert_allclose(scores, [1.0, 2 * 4 / (8 + 8), 0.0])
    assert lesion_wise_dice(empty(), pred).size == 0

    # One predicted component bridging two lesions counts fully in both.
    two = empty()
    two[5, 5, 2:4] = 1
    two[5, 5, 6:8] = 1
    bridge = empty()
    bridge[5, 5, 2:8] = 1
    np.testing.assert_allclose(lesion_wise_dice(two, bridge), [2 * 2 / (2 + 6)] * 2)


# ---------------------------------------------------------------------------------------------
# Clinical numbers
# ---------------------------------------------------------------------------------------------


def test_clinical_numbers_of_a_box():
    spacing_zyx = (2.0, 3.0, 4.0)
    voxel_ml = 0.024
    mask = empty()
    mask[2:6, 3:8, 4:10] = 1  # 4 x 5 x 6 = 120 voxels
    suv = np.full(SHAPE, 0.5, dtype=np.float32)
    suv[2:6, 3:8, 4:10] = 3.0
    suv[3, 4, 5] = 10.0
    numbers = clinical_numbers(mask, suv, spacing_zyx)
    assert numbers["tmtv_ml"] == pytest.approx(120 * voxel_ml)
    assert numbers["tlg"] == pytest.approx((119 * 3.0 + 10.0) * voxel_ml)
    assert numbers["suvmax"] == pytest.approx(10.0)
    assert numbers["suvmean"] == pytest.approx((119 * 3.0 + 10.0) / 120)
    assert numbers["lesion_count"] == 1
    # Opposite corners' centres: 3, 4 and 5 voxels apart.
    assert numbers["dmax_mm"] == pytest.approx(math.sqrt((3 * 2.0) ** 2 + (4 * 3.0) ** 2 + (5 * 4.0) ** 2))


def test_dmax_of_two_separated_voxels_and_empty_mask():
    spacing_zyx = (2.5, 1.0, 0.8)
    mask = empty()
    mask[1, 2, 3] = 1
    mask[7, 9, 4] = 1
    numbers = clinical_numbers(mask, np.ones(SHAPE), spacing_zyx)
    assert numbers["lesion_count"] == 2
    assert numbers["dmax_mm"] == pytest.approx(math.sqrt((6 * 2.5) ** 2 + 7.0**2 + 0.8**2))

    single = empty()
    single[4, 4, 4] = 1
    assert max_lesion_distance_mm(single, spacing_zyx) == 0.0

    nothing = clinical_numbers(empty(), np.ones(SHAPE), spacing_zyx)
    assert nothing["tmtv_ml"] == 0.0 and nothing["tlg"] == 0.0 and nothing["lesion_count"] == 0
    assert math.isnan(nothing["suvmax"]) and math.isnan(nothing["suvmean"]) and math.isnan(nothing["dmax_mm"])


def _brute_force_dmax(mask: np.ndarray, spacing_zyx) -> float:
    points = np.argwhere(mask) * np.asarray(spacing_zyx)
    best = 0.0
    for start in range(0, len(points), 512):
        diff = points[start : start + 512, None, :] - points[None, :, :]
        best = max(best, float((diff**2).sum(-1).max()))
    return math.sqrt(best)


@pytest.mark.parametrize("density", [0.002, 0.04])
def test_dmax_hull_path_matches_all_pairs(density):
    rng = np.random.default_rng(11)
    spacing_zyx = (3.0, 1.5, 2.0)
    mask = rng.random((30, 34, 30)) < density
    small_threshold = DmaxSettings(brute_force_max_points=50)  # force the convex-hull path
    expected = _brute_force_dmax(mask, spacing_zyx)
    assert max_lesion_distance_mm(mask, spacing_zyx, small_threshold) == pytest.approx(expected, rel=1e-12)
    assert max_lesion_distance_mm(mask, spacing_zyx) == pytest.approx(expected, rel=1e-12)


def test_dmax_flat_mask_uses_joggled_hull():
    spacing_zyx = (2.0, 1.0, 1.0)
    mask = np.zeros((5, 40, 40), dtype=bool)
    mask[2, 3:37, 5:30] = True  # a single plane: Qhull cannot build a 3D hull without joggling
    expected = math.hypot(33 * 1.0, 24 * 1.0)
    assert max_lesion_distance_mm(mask, spacing_zyx, DmaxSettings(brute_force_max_points=10)) == pytest.approx(expected)
