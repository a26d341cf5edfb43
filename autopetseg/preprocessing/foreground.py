"""Sampled lesion voxel locations (``<case>_fg.npy``) for foreground-centred patch sampling.

Sampling is per connected lesion: the budget of ``max_samples`` locations is shared out evenly
among the lesions ("water filling": a lesion smaller than its share gives all its voxels and the
rest goes to the bigger ones), so a 10-voxel node is as likely to be picked as a 50 000-voxel
bulky mass when the loader first chooses a lesion and then a location. With more lesions than
``max_samples`` (never in practice), a random subset of lesions gets one location each.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ForegroundSampling:
    max_samples: int = 10_000
    # 18-connectivity, as the autoPET challenge counts lesions (FPV/FNV).
    connectivity: int = 2


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """A generator fixed by (seed, case): reproducible, and different from case to case."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def _water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Samples per component: equal shares of ``budget``, capped by each component's size."""
    take = np.zeros(sizes.size, dtype=np.int64)
    remaining = budget
    order = np.argsort(sizes, kind="stable")
    for rank, index in enumerate(order):  # one step per lesion, not per voxel
        share = remaining // (sizes.size - rank)
        take[index] = min(int(sizes[index]), share)
        remaining -= take[index]
    return take


def sample_foreground(seg: np.ndarray, rng: np.random.Generator, how: ForegroundSampling = ForegroundSampling()) -> tuple[np.ndarray, int]:
    """(K, 3) int32 (z, y, x) lesion locations in ``seg`` and the number of lesions found."""
    coords = np.argwhere(seg)
    if coords.shape[0] == 0:
        return np.zeros((0, 3), dtype=np.int32), 0
    lo = coords.min(axis=0)
    hi = coords.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    structure = ndimage.generate_binary_structure(3, how.connectivity)
    components, n = ndimage.label(seg[box], structure=structure)
    # argwhere and a boolean index walk the box in the same C order, so labels line up with coords.
    labels = components[components > 0] - 1
    sizes = np.bincount(labels, minlength=n)

    if n > how.max_samples:
        chosen = np.zeros(n, dtype=bool)
        chosen[rng.choice(n, size=how.max_samples, replace=False)] = True
        take = chosen.astype(np.int64)
    else:
        take = _water_fill(sizes, how.max_samples)

    # Random order within each lesion, then keep each lesion's first take[label] voxels.
    order = np.lexsort((rng.random(labels.size), labels))
    sorted_labels = labels[order]
    group_start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank_in_group = np.arange(labels.size) - group_start[sorted_labels]
    picked = order[rank_in_group < take[sorted_labels]]
    picked.sort()  # stable, readable output order (C order of the array)
    return coords[picked].astype(np.int32), int(n)
