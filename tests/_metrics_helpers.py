"""The autoPET challenge's metric code written out plainly, as the reference the tests compare to.

Loop over connected components, one full-volume mask each, as the challenge's evaluation script
does: cc3d with connectivity=18 when installed, otherwise scipy's 18-neighbourhood.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _reference_components(mask: np.ndarray) -> np.ndarray:
    try:
        import cc3d
    except ImportError:
        return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 2))[0]
    return cc3d.connected_components(mask.astype(int), connectivity=18)


def _reference_untouched(mask: np.ndarray, other: np.ndarray):
    components = _reference_components(mask)
    count = 0
    for idx in range(1, int(components.max()) + 1):
        component = np.isin(components, idx)
        if (component * other).sum() == 0:
            count += component.sum()
    return count


def reference_case(gt: np.ndarray, pred: np.ndarray, voxel_ml) -> tuple[float, float, float]:
    """(DSC, FPV, FNV) as the challenge computes them; DSC and FNV nan for an empty ground truth."""
    gt = gt.astype(np.float64)
    pred = pred.astype(np.float64)
    fpv = 0 * voxel_ml if pred.sum() == 0 else _reference_untouched(pred, gt) * voxel_ml
    if gt.sum() == 0:
        return math.nan, float(fpv), math.nan
    fnv = _reference_untouched(gt, pred) * voxel_ml
    dsc = 2 * (gt * pred).sum() / (gt.sum() + pred.sum())
    return float(dsc), float(fpv), float(fnv)


def random_blobs(rng: np.random.Generator, shape, threshold: float) -> np.ndarray:
    """Irregular blobs of many sizes: smoothed noise above a threshold."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.2)
    return (field > threshold * field.std()).astype(np.uint8)
