"""Training patches from the preprocessed cache: sampling, augmentation, multi-process loading.

* Cases are opened memory-mapped (``np.load(..., mmap_mode="r")``); a patch reads only its box.
* A share ``foreground_share`` of the patches is centred on a lesion voxel drawn from the case's
  ``_fg.npy`` (plus a random shift of up to ``max_shift_voxels`` per axis, the GDFL paper's
  translation); the rest are centred anywhere in a uniformly chosen case, lesion-free cases
  included. The share is kept exactly over the stream of samples (error diffusion: sample i is a
  lesion patch when floor((i+1)·p) > floor(i·p)) instead of being drawn at random, so small runs
  see the share they ask for.
* Patches that leave the array are padded with the background value 0 (PET 0 SUV, CT 0 = air
  after the [-1024, 1024] HU → [0, 1] scaling; label 0).
* With augmentation on, a larger box is read first (big enough for the largest rotation and
  scaling) and batchgenerators' ``SpatialTransform`` resamples the final patch from its centre.
* Loading runs in a ``torch.utils.data.DataLoader`` over an endless ``IterableDataset`` that
  yields whole batches: ``num_workers=0`` runs in the calling process (tests), N > 0 uses N
  processes and pinned memory on CUDA.
* Every batch has its own random stream, seeded from (seed, rank, global batch index): the
  batches do not depend on the number of workers (the DataLoader hands out batches round-robin,
  in order), DDP ranks draw different patches, and a run resumed at epoch e (``start_batch =
  e x iterations_per_epoch``) sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json
from autopetseg.training.config import AugmentationConfig

logger = logging.getLogger(__name__)

BACKGROUND_VALUE = 0.0  # PET 0 SUV and CT 0 (= -1024 HU after scaling) both mean "nothing there"


@dataclass
class CachedCase:
    """One preprocessed case, arrays memory-mapped."""

    case_id: str
    image: np.ndarray  # float32 (C, z, y, x)
    seg: np.ndarray  # uint8 (z, y, x)
    foreground_zyx: np.ndarray  # int (K, 3) lesion voxel coordinates; K may be 0
    spacing_zyx: tuple[float, float, float]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0


def load_cached_case(data_dir: str | Path, case_id: str) -> CachedCase:
    """Open ``<data_dir>/<case_id>{.npy,_seg.npy,_fg.npy,.json}`` memory-mapped."""
    data_dir = Path(data_dir)
    props_path = data_dir / f"{case_id}.json"
    if not props_path.is_file():
        raise InputError("case is not in the preprocessed cache (properties file missing)", case_id, props_path)
    props = read_json(props_path)
    paths = {k: data_dir / f"{case_id}{suffix}" for k, suffix in (("image", ".npy"), ("seg", "_seg.npy"), ("fg", "_fg.npy"))}
    for path in paths.values():
        if not path.is_file():
            raise InputError("cache file missing", case_id, path)
    image = np.load(paths["image"], mmap_mode="r")
    seg = np.load(paths["seg"], mmap_mode="r")
    fg = np.asarray(np.load(paths["fg"]), dtype=np.int64).reshape(-1, 3)
    if image.ndim != 4 or seg.shape != image.shape[1:]:
        raise InputError(f"image {image.shape} and label {seg.shape} do not match", case_id, paths["image"])
    return CachedCase(case_id, image, seg, fg, tuple(float(s) for s in props["spacing_zyx"]))


def extract_patch(array: np.ndarray, center_zyx: Sequence[int], size_zyx: Sequence[int], pad_value: float = BACKGROUND_VALUE) -> np.ndarray:
    """The box of ``size_zyx`` around ``center_zyx`` from the last three axes of ``array``.

    The box starts at ``center - size // 2``; the part outside the array is filled with
    ``pad_value``. Leading axes (channels) are kept. Reads only the overlap (cheap on memmaps).
    """
    spatial = array.shape[-3:]
    start = np.asarray(center_zyx, dtype=np.int64) - np.asarray(size_zyx, dtype=np.int64) // 2
    stop = start + np.asarray(size_zyx, dtype=np.int64)
    src_lo = np.clip(start, 0, spatial)
    src_hi = np.clip(stop, 0, spatial)
    out = np.full(array.shape[:-3] + tuple(int(s) for s in size_zyx), pad_value, dtype=array.dtype)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        src = (...,) + tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))
        dst = (...,) + tuple(slice(int(a), int(b)) for a, b in zip(dst_lo, dst_hi))
        out[dst] = array[src]
    return out


def augmentation_input_size(patch_size: Sequence[int], aug: AugmentationConfig) -> list[int]:
    """Box to read before the spatial transform so that rotation and scaling find data, not padding.

    Rotation by θ about z widens y and x by |cos θ| + |sin θ|; scaling by s > 1 samples s times
    the patch; elastic jitter moves points by up to alpha voxels.
    """
    if not aug.enabled:
        return [int(p) for p in patch_size]
    theta = max(abs(a) for a in aug.rotation_axial_rad) if aug.p_rotation > 0 else 0.0
    rot = abs(math.cos(theta)) + abs(math.sin(theta))
    scale = max(aug.scale_range) if aug.p_scale > 0 else 1.0
    scale = max(scale, 1.0)
    margin = 2 * math.ceil(max(aug.elastic_alpha)) if aug.p_elastic > 0 else 0
    factors = [scale, scale * rot, scale * rot]
    return [int(math.ceil(p * f)) + margin for p, f in zip(patch_size, factors)]


def build_augmentation(aug: AugmentationConfig, patch_size: Sequence[int]):
    """batchgenerators ``Compose`` of the GDFL paper's random transforms (see ``AugmentationConfig``).

    Operates on dicts {"data": (B, C, z, y, x) float32, "seg": (B, 1, z, y, x) float32}; spatial
    transforms move image and label together, intensity transforms act on both channels.
    """
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import GammaTransform
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

    transforms = [
        SpatialTransform(
            patch_size=tuple(int(p) for p in patch_size),
            patch_center_dist_from_border=None,
            do_elastic_deform=aug.p_elastic > 0,
            alpha=aug.elastic_alpha,
            sigma=aug.elastic_sigma,
            do_rotation=aug.p_rotation > 0,
            angle_x=aug.rotation_axial_rad,  # batchgenerators' first spatial axis = our z: axial rotation
            angle_y=(0.0, 0.0),
            angle_z=(0.0, 0.0),
            do_scale=aug.p_scale > 0,
            scale=aug.scale_range,
            border_mode_data="constant",
            border_cval_data=BACKGROUND_VALUE,
            order_data=aug.data_interpolation_order,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=0,
            random_crop=False,  # the centre was chosen by the sampler
            p_el_per_sample=aug.p_elastic,
            p_scale_per_sample=aug.p_scale,
            p_rot_per_sample=aug.p_rotation,
        ),
        GammaTransform(aug.gamma_range, invert_image=False, per_channel=True, retain_stats=True, p_per_sample=aug.p_gamma),
        GaussianNoiseTransform(noise_variance=aug.noise_variance, p_per_sample=aug.p_noise),
    ]
    if aug.mirror_axes:
        transforms.append(MirrorTransform(axes=tuple(aug.mirror_axes)))
    return Compose(transforms)


class PatchSampler:
    """Draws training patches (image, label) from cached cases; see the module docstring."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        read_size_zyx: Sequence[int],
        foreground_share: float,
        max_shift_voxels: int,
        rng: np.random.Generator,
    ):
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.read_size = [int(s) for s in read_size_zyx]
        self.foreground_share = float(foreground_share)
        self.max_shift = int(max_shift_voxels)
        self.rng = rng
        self.lesion_cases = [i for i, c in enumerate(self.cases) if len(c.foreground_zyx) > 0]
        if self.foreground_share > 0 and not self.lesion_cases:
            logger.warning("no training case has lesion voxels; all patches are sampled uniformly")
        self._count = 0

    def _next_is_foreground(self) -> bool:
        i, p = self._count, self.foreground_share
        self._count += 1
        return bool(self.lesion_cases) and math.floor((i + 1) * p) > math.floor(i * p)

    def seek(self, sample_index: int, rng: np.random.Generator) -> None:
        """Continue the stream at global sample ``sample_index`` with random generator ``rng``."""
        self._count = int(sample_index)
        self.rng = rng

    def sample(self) -> tuple[np.ndarray, np.ndarray, bool, str]:
        """(image (C, *read_size), label (*read_size) uint8, lesion-centred?, case_id)."""
        foreground = self._next_is_foreground()
        if foreground:
            case = self.cases[self.lesion_cases[self.rng.integers(len(self.lesion_cases))]]
            voxel = case.foreground_zyx[self.rng.integers(len(case.foreground_zyx))]
            center = voxel + self.rng.integers(-self.max_shift, self.max_shift + 1, size=3)
        else:
            case = self.cases[self.rng.integers(len(self.cases))]
            center = self.rng.integers(0, np.asarray(case.seg.shape))
        image = extract_patch(case.image, center, self.read_size)
        seg = extract_patch(case.seg, center, self.read_size, pad_value=0)
        return image, seg, foreground, case.case_id

    def sample_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        samples = [self.sample() for _ in range(batch_size)]
        return {
            "data": np.stack([s[0] for s in samples]).astype(np.float32, copy=False),
            "seg": np.stack([s[1] for s in samples])[:, None].astype(np.float32),
            "foreground": np.asarray([s[2] for s in samples]),
            "case_ids": [s[3] for s in samples],
        }


class PatchBatchStream(IterableDataset):
    """Endless stream of augmented batches {"data": float32 (B,C,z,y,x), "target": int64 (B,1,z,y,x)}.

    Batch k of the stream (global index ``start_batch + k``) is drawn with numpy's and Python's
    global generators (batchgenerators uses both) and the sampler's generator, all seeded from
    (seed, rank, start_batch + k); with W workers, worker w makes batches w, w + W, ... which the
    DataLoader returns in order, so the stream is the same for any number of workers.
    """

    def __init__(
        self,
        cases,
        patch_size,
        batch_size,
        foreground_share,
        aug: AugmentationConfig,
        seed: int,
        rank: int = 0,
        start_batch: int = 0,
    ):
        self.cases = list(cases)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.foreground_share = foreground_share
        self.aug = aug
        self.seed = int(seed)
        self.rank = int(rank)
        self.start_batch = int(start_batch)

    def batch_seeds(self, batch_index: int) -> tuple[int, int, int]:
        """(numpy global seed, Python ``random`` seed, sampler seed) of global batch ``batch_index``."""
        state = np.random.SeedSequence([self.seed, self.rank, int(batch_index)]).generate_state(3)
        return int(state[0]), int(state[1]), int(state[2])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        read_size = augmentation_input_size(self.patch_size, self.aug)
        sampler = PatchSampler(
            self.cases, read_size, self.foreground_share, self.aug.max_shift_voxels, np.random.default_rng(0)
        )
        transform = build_augmentation(self.aug, self.patch_size) if self.aug.enabled else None
        index = self.start_batch + worker
        while True:
            numpy_seed, python_seed, sampler_seed = self.batch_seeds(index)
            np.random.seed(numpy_seed)
            random.seed(python_seed)
            sampler.seek(index * self.batch_size, np.random.default_rng(sampler_seed))
            batch = sampler.sample_batch(self.batch_size)
            if transform is not None:
                batch.update(transform(data=batch["data"], seg=batch["seg"]))
            yield {
                "data": torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(np.rint(batch["seg"]), dtype=np.int64)),
                "foreground": torch.from_numpy(batch["foreground"]),
            }
            index += n_workers


def make_train_loader(
    cases: Sequence[CachedCase],
    patch_size: Sequence[int],
    batch_size: int,
    foreground_share: float,
    aug: AugmentationConfig,
    seed: int,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    start_batch: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of training batches, from global batch ``start_batch`` on (see ``PatchBatchStream``)."""
    stream = PatchBatchStream(cases, patch_size, batch_size, foreground_share, aug, seed, rank, start_batch)
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_limit_worker_threads if num_workers > 0 else None,
    )
    return iter(loader)


def _limit_worker_threads(_worker_id: int) -> None:
    # Workers do numpy/scipy work; torch threads in each of them would oversubscribe the cores.
    torch.set_num_threads(1)
