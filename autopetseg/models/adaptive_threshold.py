"""L2SNet's adaptive threshold and optional component rules (Cai et al., autoPET 2023, §3.4).

A voxel is lesion when the segmenter's probability exceeds ``low`` (0.1) where the localizer's
cue exceeds ``cue_above`` (0.5), and ``high`` (0.5) elsewhere. ``AdaptiveThreshold.map`` gives
that threshold per voxel; ``low == high`` is the plain threshold (the ablation without it).

The released code adds rules on the connected components of the mask (named in the issue, not in
the paper): ``ComponentRules``, off by default. With ``enabled``, on the thresholded mask (26-
connectivity):

* a component without any voxel where the cue exceeds ``cue_above`` is reduced to its single
  most probable voxel when ``cueless_to_one_voxel`` (a detection kept, its volume dropped);
* a component (with cue) of fewer than ``min_voxels`` voxels is removed.

The cue matters only near voxels whose probability lies between the two thresholds
(``L2SSettings.cue_region``): the predictor runs the localizer on the coronal slices that hold such
voxels only.

The rules act on the lesion probability (removed voxels set to 0) on the segmenter's cache grid,
so the predictor's usual inversion and thresholding make the mask; a one-voxel component is then
as large as one cache voxel is on the PET grid.

Where the settings live: ``MethodSpec.notes`` of the ``cascade_l2s`` method (``method.json`` of the
model folder, so a trained model can be re-thresholded by editing it), under the keys
``"adaptive_threshold"`` and ``"components"`` (``L2SSettings.from_notes``; missing keys take the
defaults above).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AdaptiveThreshold:
    cue_above: float = 0.5  # the cue level above which the threshold is lowered (paper: 0.5)
    low: float = 0.1  # threshold under the cue (paper: 0.1)
    high: float = 0.5  # threshold elsewhere (paper: 0.5)

    def __post_init__(self):
        for name in ("cue_above", "low", "high"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"adaptive_threshold.{name} must be in [0, 1), got {getattr(self, name)}")

    def map(self, cue: np.ndarray) -> np.ndarray:
        """The threshold of every voxel (float32, the cue's shape)."""
        return np.where(np.asarray(cue) > self.cue_above, np.float32(self.low), np.float32(self.high)).astype(np.float32)


@dataclass(frozen=True)
class ComponentRules:
    enabled: bool = False
    cueless_to_one_voxel: bool = True
    min_voxels: int = 0

    def __post_init__(self):
        if self.min_voxels < 0:
            raise ValueError(f"components.min_voxels must be >= 0, got {self.min_voxels}")

    def apply(self, probability: np.ndarray, threshold: float | np.ndarray, cue: np.ndarray,
              cue_above: float) -> np.ndarray:
        """``probability`` with the voxels of removed (parts of) components set to 0 (a copy)."""
        from scipy import ndimage

        probability = np.array(probability, dtype=np.float32)
        if not self.enabled:
            return probability
        mask = probability > threshold
        labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
        if n == 0:
            return probability
        index = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(np.ones_like(mask, dtype=np.int64), labels, index)
        has_cue = ndimage.maximum(np.asarray(cue) > cue_above, labels, index).astype(bool)
        keep = np.ones(n + 1, dtype=bool)
        keep[0] = False
        keep[1:] &= ~has_cue | (sizes >= self.min_voxels)
        if self.cueless_to_one_voxel:
            keep[1:] &= has_cue  # the cue-less ones come back as one voxel below
            peaks = ndimage.maximum_position(probability, labels, index[~has_cue])
        else:
            peaks = []
        out = np.where(keep[labels], probability, np.float32(0.0))
        for peak in peaks:
            out[peak] = probability[peak]
        return out


@dataclass(frozen=True)
class L2SSettings:
    adaptive_threshold: AdaptiveThreshold = field(default_factory=AdaptiveThreshold)
    components: ComponentRules = field(default_factory=ComponentRules)

    @classmethod
    def from_notes(cls, notes: dict[str, Any] | None) -> "L2SSettings":
        notes = notes or {}
        return cls(AdaptiveThreshold(**notes.get("adaptive_threshold", {})), ComponentRules(**notes.get("components", {})))

    def to_notes(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cue_region(self, probability: np.ndarray, interpolated: tuple[bool, ...] = (True, True, True)) -> np.ndarray:
        """The voxels where the cue can change the mask (bool, the probability's shape); elsewhere
        ``combine`` gives the same mask whatever the cue.

        The mask is made on the PET grid: probability and threshold are interpolated linearly from
        the cache voxels around each PET voxel (2 along an ``interpolated`` axis, where the cache
        spacing differs from the PET's, 1 along the others) and compared. The interpolated threshold
        lies between min and max(low, high), so the cue matters only where the interpolated
        probability does too: next to (within one voxel along the interpolated axes) a voxel above
        the lower threshold and next to one not above the higher. The component rules read the cue
        on whole components above the threshold: with them, every voxel next to one above the lower.
        """
        from scipy import ndimage

        p = np.asarray(probability)
        low, high = sorted((self.adaptive_threshold.low, self.adaptive_threshold.high))
        if not self.components.enabled and low == high:
            return np.zeros(p.shape, dtype=bool)
        structure = np.zeros((3,) * p.ndim, dtype=bool)
        structure[tuple(slice(None) if along else slice(1, 2) for along in interpolated)] = True

        def near(mask: np.ndarray) -> np.ndarray:
            return ndimage.binary_dilation(mask, structure=structure) if any(interpolated) else mask

        if self.components.enabled:
            return near(p > low)
        return near(p > low) & near(p <= high)

    def combine(self, probability: np.ndarray, cue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lesion probability after the component rules, per-voxel threshold), both on the cue's grid."""
        threshold = self.adaptive_threshold.map(cue)
        probability = self.components.apply(probability, threshold, cue, self.adaptive_threshold.cue_above)
        return probability, threshold
