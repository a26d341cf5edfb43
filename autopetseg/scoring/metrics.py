"""Segmentation and detection metrics, to the autoPET challenge's definitions.

Challenge metrics (autoPET evaluation code, Ahamed et al. §2.6 eqs. 3-5):

- ``DSC = 2|G ∩ P| / (|G| + |P|)``
- ``FPV = v · Σ_l |P_l| δ(|P_l ∩ G|)``: voxels of the predicted connected components that touch
  no ground-truth voxel, times the voxel volume ``v`` in ml;
- ``FNV = v · Σ_l |G_l| δ(|G_l ∩ P|)``: voxels of the ground-truth components that touch no
  predicted voxel.

Components use 18-connectivity (face and edge neighbours, not corner neighbours), as the
challenge's ``cc3d.connected_components(..., connectivity=18)``; here
``scipy.ndimage.label`` with ``generate_binary_structure(3, 2)``, the same neighbourhood.

Lesion-free cases (empty ground truth) follow the challenge's per-case convention: DSC and FNV
are undefined (``nan``) and left out of their means; FPV is defined and counted. So
``aggregate`` gives mean DSC and mean FNV over lesion-positive cases and mean FPV over all
cases, which is ``nanmean`` over each column, as the challenge computes it.

Masks may be any dtype: a non-zero voxel is a lesion voxel. Instead of the challenge's loop over
components with one full-volume mask each, every function labels once and counts per component
with ``np.bincount``; the numbers are identical (the tests check it against the loop).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# 18-connectivity: neighbours sharing a face or an edge (cc3d's connectivity=18).
LESION_CONNECTIVITY = ndimage.generate_binary_structure(3, 2)


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"masks must be 3D (z, y, x), got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_same_shape(*arrays: np.ndarray) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays must have the same shape, got {sorted(shapes)}")


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box (slices) holding every non-zero voxel of all masks; ``None`` when all are empty.

    Components never leave the box of their mask, so labelling inside it gives the same
    components as labelling the whole volume, much faster on whole-body images.
    """
    union = masks[0] if len(masks) == 1 else np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """18-connected components of a mask: (labels int32 with 0 = background, count)."""
    labels, count = ndimage.label(_binary(mask), structure=LESION_CONNECTIVITY)
    return labels, int(count)


def _component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxels per label (index 0 left at 0). Counting only the labelled voxels: ``bincount`` over a
    whole-body volume would cast every background voxel to int64 first."""
    sizes = np.bincount(labels[labels > 0], minlength=count + 1)
    return sizes


def _touched(labels: np.ndarray, count: int, other: np.ndarray) -> np.ndarray:
    """Boolean per label (index 0 = background): does the component share a voxel with ``other``?"""
    touched = np.zeros(count + 1, dtype=bool)
    touched[labels[other]] = True
    touched[0] = False
    return touched


def _untouched_component_voxels(mask: np.ndarray, other: np.ndarray) -> int:
    """Voxels of ``mask``'s components that share no voxel with ``other``."""
    box = bounding_box(mask)
    if box is None:
        return 0
    labels, count = label_lesions(mask[box])
    sizes = _component_sizes(labels, count)
    touched = _touched(labels, count, other[box])
    return int(sizes[1:][~touched[1:]].sum())


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """``2|G ∩ P| / (|G| + |P|)``; ``nan`` when both masks are empty (0/0).

    This is the plain formula: an empty ground truth with a non-empty prediction gives 0.
    ``case_metrics`` applies the challenge's convention on top (DSC undefined, ``nan``, for every
    lesion-free case), so such cases stay out of the mean DSC and count only through FPV.
    """
    gt, pred = _binary(gt), _binary(pred)
    _check_same_shape(gt, pred)
    denominator = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if denominator == 0:
        return math.nan
    return 2 * int(np.count_nonzero(gt & pred)) / denominator


def false_positive_volume(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> float:
    """Volume (ml) of predicted 18-connected components that touch no ground-truth voxel."""
    gt, pred = _binary(gt), _binary(pred)
    _check_same_shape(gt, pred)
    return _untouched_component_voxels(pred, gt) * voxel_ml


def false_negative_volume(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> float:
    """Volume (ml) of ground-truth 18-connected components that touch no predicted voxel.

    0 for an empty ground truth (the formula's value); ``case_metrics`` reports such cases as
    ``nan`` to keep them out of the mean, as the challenge does.
    """
    gt, pred = _binary(gt), _binary(pred)
    _check_same_shape(gt, pred)
    return _untouched_component_voxels(gt, pred) * voxel_ml


def case_metrics(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> dict:
    """The challenge's per-case numbers: ``dsc``, ``fpv_ml``, ``fnv_ml``, ``gt_positive``.

    For a lesion-free case (``gt_positive`` False) ``dsc`` and ``fnv_ml`` are ``nan`` (not
    scored) and ``fpv_ml`` is the volume of everything predicted.
    """
    gt, pred = _binary(gt), _binary(pred)
    _check_same_shape(gt, pred)
    gt_positive = bool(gt.any())
    fpv_ml = false_positive_volume(gt, pred, voxel_ml)
    if not gt_positive:
        return {"dsc": math.nan, "fpv_ml": fpv_ml, "fnv_ml": math.nan, "gt_positive": False}
    return {
        "dsc": dice(gt, pred),
        "fpv_ml": fpv_ml,
        "fnv_ml": false_negative_volume(gt, pred, voxel_ml),
        "gt_positive": True,
    }


def challenge_voxel_volume_ml(spacing_zyx) -> float:
    """Voxel volume (ml) computed the way the challenge computes it from a NIfTI header.

    The challenge reads ``pixdim`` (float32) and takes ``x * y * z / 1000`` in float32; this
    differs from the float64 product in the 8th digit for spacings such as 2.0364 mm. Using
    the same float32 value makes FPV/FNV bit-identical to the challenge's (voxel count times
    this volume, multiplied in float64).
    """
    z, y, x = (np.float32(s) for s in spacing_zyx)
    return float(x * y * z / np.float32(1000.0))


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def aggregate(case_results: list[dict]) -> dict:
    """Challenge means over cases: DSC and FNV over lesion-positive cases, FPV over all cases.

    ``mean_dsc``/``mean_fnv_ml`` are ``nan`` when no case has a lesion, ``mean_fpv_ml`` when
    there are no cases.
    """
    positive = [r for r in case_results if r["gt_positive"]]
    return {
        "mean_dsc": _mean_or_nan([r["dsc"] for r in positive]),
        "mean_fpv_ml": _mean_or_nan([r["fpv_ml"] for r in case_results]),
        "mean_fnv_ml": _mean_or_nan([r["fnv_ml"] for r in positive]),
        "n_cases": len(case_results),
        "n_positive": len(positive),
    }


def f1_score(tp: int, fp: int, fn: int) -> float:
    """``TP / (TP + (FP + FN) / 2)``; ``nan`` when there is nothing to score (no lesion, no prediction)."""
    denominator = tp + 0.5 * (fp + fn)
    return tp / denominator if denominator > 0 else math.nan


def suvmax_voxels(labels: np.ndarray, count: int, suv: np.ndarray) -> np.ndarray:
    """Flat index (into ``labels``) of each component's SUVmax voxel, components 1..count in order.

    Ties go to the first voxel in (z, y, x) raster order: a stable sort by (label, -SUV) keeps
    raster order among equal values.
    """
    flat = np.flatnonzero(labels)
    component = labels.ravel()[flat]
    order = np.lexsort((-suv.ravel()[flat], component))
    first_of_component = np.r_[True, component[order][1:] != component[order][:-1]]
    winners = flat[order][first_of_component]
    assert winners.size == count
    return winners


def detection(gt: np.ndarray, pred: np.ndarray, suv: np.ndarray) -> dict:
    """Lesion detection (Dzikunu et al., l1dfl paper): ``tp``, ``fp``, ``fn``, ``f1``.

    - A ground-truth lesion is an 18-connected component of ``gt``. It is a TP when the
      predicted mask contains the lesion's SUVmax voxel, otherwise an FN, even when the
      prediction covers the rest of it.
    - An FP is a predicted 18-connected component that touches no ground-truth voxel (a
      component touching a lesion but missing its SUVmax voxel is neither TP nor FP; the
      lesion counts as FN).
    - ``f1 = TP / (TP + (FP + FN) / 2)``; ``nan`` for a case with no lesion and no
      prediction (nothing to detect, nothing found): such cases are left out of mean F1.
    """
    gt, pred = _binary(gt), _binary(pred)
    suv = np.asarray(suv)
    _check_same_shape(gt, pred, suv)
    tp = 0
    n_lesions = 0
    gt_box = bounding_box(gt)
    if gt_box is not None:
        gt_labels, n_lesions = label_lesions(gt[gt_box])
        hottest = suvmax_voxels(gt_labels, n_lesions, suv[gt_box])
        tp = int(np.count_nonzero(pred[gt_box].ravel()[hottest]))
    fp = 0
    pred_box = bounding_box(pred)
    if pred_box is not None:
        pred_labels, n_pred = label_lesions(pred[pred_box])
        fp = int(np.count_nonzero(~_touched(pred_labels, n_pred, gt[pred_box])[1:]))
    fn = n_lesions - tp
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn)}


def lesion_wise_dice(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Dice of each ground-truth lesion with the predicted components that overlap it.

    For lesion ``G_l`` (an 18-connected component of ``gt``) let ``P*_l`` be the union of the
    predicted components sharing at least one voxel with it (the l1dfl paper's "any voxel
    overlap" matching); the value is ``2|G_l ∩ P*_l| / (|G_l| + |P*_l|)``, 0 for a missed
    lesion. A predicted component spanning two lesions counts fully in both. Returned as a
    float array, one value per lesion in label order (raster order of each lesion's first
    voxel); empty when ``gt`` is empty.
    """
    gt, pred = _binary(gt), _binary(pred)
    _check_same_shape(gt, pred)
    box = bounding_box(gt)
    if box is None:
        return np.zeros(0)
    # Predicted components touching a lesion may reach outside the lesions' box: label them in
    # the box of both masks.
    box = bounding_box(gt, pred)
    gt_labels, n_lesions = label_lesions(gt[box])
    pred_labels, n_pred = label_lesions(pred[box])
    lesion_sizes = _component_sizes(gt_labels, n_lesions)[1:]
    pred_sizes = _component_sizes(pred_labels, n_pred)
    both = (gt_labels > 0) & (pred_labels > 0)
    intersection = np.bincount(gt_labels[both], minlength=n_lesions + 1)[1:]
    # Unique (lesion, predicted component) pairs that overlap; each predicted component's size
    # is added once to every lesion it touches.
    pairs = np.unique(np.stack([gt_labels[both], pred_labels[both]]), axis=1)
    matched_pred_volume = np.bincount(pairs[0], weights=pred_sizes[pairs[1]], minlength=n_lesions + 1)[1:]
    return 2.0 * intersection / (lesion_sizes + matched_pred_volume)
