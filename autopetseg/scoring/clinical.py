"""The numbers clinicians read from a lesion mask: TMTV, TLG, SUVmax, SUVmean, lesion count, Dmax."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from autopetseg.scoring.metrics import bounding_box, label_lesions


@dataclass(frozen=True)
class DmaxSettings:
    """How Dmax avoids comparing every pair of lesion voxels.

    Up to ``brute_force_max_points`` candidate points are compared pairwise directly; above it
    only the vertices of their convex hull are (the farthest pair of a point set is always a pair
    of hull vertices). ``pair_chunk`` bounds the memory of one block of pairwise distances.
    """

    brute_force_max_points: int = 2048
    pair_chunk: int = 1024


DMAX_SETTINGS = DmaxSettings()


def _max_pairwise_distance(points: np.ndarray, chunk: int) -> float:
    """Largest Euclidean distance between any two rows of ``points`` (n, 3), in blocks of rows."""
    best_sq = 0.0
    for start in range(0, len(points), chunk):
        block = points[start : start + chunk]
        diff = block[:, None, :] - points[None, :, :]
        best_sq = max(best_sq, float(np.einsum("ijk,ijk->ij", diff, diff).max()))
    return math.sqrt(best_sq)


def _line_extremes(mask: np.ndarray) -> np.ndarray:
    """Indices (n, 3) of the first and last lesion voxel of every x-line (fixed z, y).

    Every other voxel of a line lies between these two, so it is never an end of the farthest
    pair, and whole-body masks shrink to at most two points per line.
    """
    has_voxel = mask.any(axis=2)
    z, y = np.nonzero(has_voxel)
    first_x = np.argmax(mask, axis=2)[z, y]
    last_x = mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2)[z, y]
    return np.concatenate([np.stack([z, y, first_x], axis=1), np.stack([z, y, last_x], axis=1)])


def max_lesion_distance_mm(mask: np.ndarray, spacing_zyx, settings: DmaxSettings = DMAX_SETTINGS) -> float:
    """Dmax: the largest distance (mm) between the centres of any two lesion voxels, over all lesions.

    Distances between voxel centres in the image's own axes scaled by the spacing (a rotation
    of the axes, the image direction, changes no distance): one voxel gives 0, two face
    neighbours along z give the z spacing. ``nan`` for an empty mask.

    Exact: candidates are the two ends of every x-line; when there are many, only their convex
    hull's vertices are compared (``DmaxSettings``). A flat or collinear candidate set, which
    Qhull cannot build a 3D hull of, is retried with joggled input ('QJ'), which keeps every
    true hull vertex among the vertices it returns.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    box = bounding_box(mask)
    if box is None:
        return math.nan
    offsets = np.array([s.start for s in box])
    points = (_line_extremes(mask[box]) + offsets) * np.asarray(spacing_zyx, dtype=np.float64)
    points = np.unique(points, axis=0)
    if len(points) > settings.brute_force_max_points:
        try:
            hull = ConvexHull(points)
        except QhullError:
            hull = ConvexHull(points, qhull_options="QJ")
        points = points[hull.vertices]
    return _max_pairwise_distance(points, settings.pair_chunk)


def clinical_numbers(mask: np.ndarray, suv: np.ndarray, spacing_zyx) -> dict:
    """``tmtv_ml``, ``tlg``, ``suvmax``, ``suvmean``, ``lesion_count``, ``dmax_mm`` of a lesion mask.

    - TMTV = lesion voxels × voxel volume (ml); TLG = Σ SUV × voxel volume over the mask
      (= SUVmean × TMTV);
    - SUVmax and SUVmean over the mask's voxels;
    - lesion count = 18-connected components (the challenge's connectivity);
    - Dmax: ``max_lesion_distance_mm``.
    An empty mask gives TMTV = TLG = 0 and lesion count 0, and ``nan`` for SUVmax, SUVmean and
    Dmax (undefined without a lesion; JSON writers turn ``nan`` into null).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    suv = np.asarray(suv)
    if mask.shape != suv.shape:
        raise ValueError(f"mask shape {mask.shape} differs from SUV shape {suv.shape}")
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    values = suv[mask].astype(np.float64, copy=False)
    if values.size == 0:
        return {"tmtv_ml": 0.0, "tlg": 0.0, "suvmax": math.nan, "suvmean": math.nan, "lesion_count": 0, "dmax_mm": math.nan}
    box = bounding_box(mask)
    _, lesion_count = label_lesions(mask[box])
    return {
        "tmtv_ml": values.size * voxel_ml,
        "tlg": float(values.sum()) * voxel_ml,
        "suvmax": float(values.max()),
        "suvmean": float(values.mean()),
        "lesion_count": lesion_count,
        "dmax_mm": max_lesion_distance_mm(mask, spacing_zyx),
    }
