"""Training batches of whole volumes on one fixed grid (``3d_wholebody``; the multitask trainer).

* Each training case is resized once to the grid, as the ``whole_image`` inference strategy
  resizes at prediction time (trilinear, ``align_corners=False``): the image channels, and the
  lesion mask as a float, so that every grid voxel holds the share of it that is lesion (no
  lesion is lost on a coarse grid). The resized cases are kept in memory.
* A sample is a whole case. The cases are drawn in a new random order on every pass over them,
  so every case is seen once per pass (an epoch in the paper's sense).
* Augmentation (Liu et al. §IV-B3): a rotation about each of the three axes by an angle drawn from
  ±``rotation_deg`` and a scaling by one factor drawn from ``scale_range``, about the volume's
  centre, linear interpolation, zeros outside (batchgenerators' ``SpatialTransform``); the mask
  moves with the image as an extra data channel (linear, so it stays a share).
* A batch is {"data": float32 (B, C, *grid), "target": float32 (B, 1, *grid), "case_label": int64
  (B,) (``NO_CASE_LABEL`` where unknown)}. Batch k is drawn with generators seeded from (seed,
  rank, start_batch + k), as the patch loader does, so a resumed run continues the same stream
  and the stream does not depend on the number of workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autopetseg.training.data_loader import NO_CASE_LABEL, CachedCase, _limit_worker_threads


@dataclass
class WholeImageAugmentation:
    """Liu et al.: rotation ±8° about each axis and scaling 0.8-1.2, for every training image."""

    enabled: bool = True
    rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.8, 1.2)
    p_rotation: float = 1.0
    p_scale: float = 1.0

    def __post_init__(self):
        self.scale_range = tuple(float(v) for v in self.scale_range)
        if self.rotation_deg < 0 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"rotation_deg must be >= 0 and scale_range an increasing positive pair, got "
                             f"{self.rotation_deg}, {self.scale_range}")
        if not (0 <= self.p_rotation <= 1 and 0 <= self.p_scale <= 1):
            raise ValueError("p_rotation and p_scale must be probabilities")


@dataclass
class GridCase:
    """One case resized to the grid."""

    case_id: str
    image: np.ndarray  # float32 (C, *grid)
    lesion_share: np.ndarray  # float32 (*grid)
    case_label: int


def to_grid(volume: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """(C, z, y, x) → (C, *grid), trilinear as the ``whole_image`` strategy resizes."""
    x = torch.from_numpy(np.array(volume, dtype=np.float32))[None]  # a copy: the cache is memory-mapped read-only
    if list(x.shape[2:]) != list(grid):
        x = F.interpolate(x, size=[int(g) for g in grid], mode="trilinear", align_corners=False)
    return x[0].numpy()


def grid_case(case: CachedCase, grid: Sequence[int]) -> GridCase:
    image = to_grid(np.asarray(case.image), grid)
    share = to_grid(np.asarray(case.seg, dtype=np.float32)[None], grid)[0]
    label = NO_CASE_LABEL if case.case_label is None else int(case.case_label)
    return GridCase(case.case_id, image, share, label)


class WholeImageBatchStream(IterableDataset):
    """Endless augmented batches of whole cases (module doc)."""

    def __init__(self, cases: Sequence[GridCase], batch_size: int, aug: WholeImageAugmentation, seed: int,
                 rank: int = 0, start_batch: int = 0):
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.grid = list(self.cases[0].image.shape[1:])
        if any(list(c.image.shape[1:]) != self.grid for c in self.cases):
            raise ValueError("all cases must be on one grid")
        self.batch_size = int(batch_size)
        self.aug = aug
        self.seed, self.rank, self.start_batch = int(seed), int(rank), int(start_batch)

    def _order(self, data_pass: int) -> np.ndarray:
        """The case order of one pass over the data (the same in every worker)."""
        return np.random.default_rng([self.seed, self.rank, data_pass, 7]).permutation(len(self.cases))

    def case_at(self, sample: int) -> GridCase:
        n = len(self.cases)
        return self.cases[int(self._order(sample // n)[sample % n])]

    def _transform(self):
        from batchgenerators.transforms.spatial_transforms import SpatialTransform

        angle = (-math.radians(self.aug.rotation_deg), math.radians(self.aug.rotation_deg))
        return SpatialTransform(
            patch_size=tuple(self.grid), patch_center_dist_from_border=None, do_elastic_deform=False,
            do_rotation=self.aug.p_rotation > 0 and self.aug.rotation_deg > 0, angle_x=angle, angle_y=angle,
            angle_z=angle, do_scale=self.aug.p_scale > 0, scale=self.aug.scale_range, border_mode_data="constant",
            border_cval_data=0.0, order_data=1, border_mode_seg="constant", border_cval_seg=0, order_seg=0,
            random_crop=False, p_scale_per_sample=self.aug.p_scale, p_rot_per_sample=self.aug.p_rotation)

    def batch(self, index: int, transform=None) -> dict[str, torch.Tensor]:
        """Global batch ``index`` of the stream."""
        state = np.random.SeedSequence([self.seed, self.rank, int(index)]).generate_state(2)
        np.random.seed(int(state[0]))  # batchgenerators draws from numpy's and Python's global generators
        random.seed(int(state[1]))
        cases = [self.case_at(index * self.batch_size + i) for i in range(self.batch_size)]
        data = np.stack([np.concatenate([c.image, c.lesion_share[None]]) for c in cases])
        if transform is not None:
            data = transform(data=data, seg=None)["data"]
        return {
            "data": torch.from_numpy(np.ascontiguousarray(data[:, :-1], dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(np.clip(data[:, -1:], 0.0, 1.0), dtype=np.float32)),
            "case_label": torch.tensor([c.case_label for c in cases], dtype=torch.int64),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        transform = self._transform() if self.aug.enabled else None
        index = self.start_batch + worker
        while True:
            yield self.batch(index, transform)
            index += n_workers


def make_whole_image_loader(cases: Sequence[GridCase], batch_size: int, aug: WholeImageAugmentation, seed: int,
                            rank: int = 0, num_workers: int = 0, pin_memory: bool = False,
                            start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of whole-image batches from global batch ``start_batch`` on."""
    stream = WholeImageBatchStream(cases, batch_size, aug, seed, rank, start_batch)
    return iter(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                           worker_init_fn=_limit_worker_threads if num_workers > 0 else None))
