"""Training patches from the preprocessed cache: sampling, augmentation, multi-process loading.

* Cases are opened memory-mapped (``np.load(..., mmap_mode="r")``); a patch reads only its box.
  A case may carry extra arrays (``CachedCase.extras``: a location cue, a weight map from an
  earlier stage; float (z, y, x) like the label) and a patient-level label (``case_label``).
* A share ``foreground_share`` of the patches is centred on a lesion voxel drawn from the case's
  ``_fg.npy`` (plus a random shift of up to ``max_shift_voxels`` per axis, the GDFL paper's
  translation); the rest are centred anywhere in a uniformly chosen case, lesion-free cases
  included. The share is kept exactly over the stream of samples (error diffusion: sample i is a
  lesion patch when floor((i+1)·p) > floor(i·p)) instead of being drawn at random, so small runs
  see the share they ask for.
* Image, label and extras are cut with the same box; what leaves the array is padded with 0 (PET
  0 SUV, CT 0 = air after the [-1024, 1024] HU → [0, 1] scaling; label 0; extras 0).
* 2D configurations (a patch size of 2 entries) take slices of the 3D arrays across
  ``slice_axis`` (0 = axial, 1 = coronal, 2 = sagittal); the patch covers the two other axes in
  array order. The lesion shift stays in-plane. With ``neighbours = k`` each image channel becomes
  2k+1 channels, the slices at offsets -k..k (channel c·(2k+1) + j + k); label and extras are the
  centre slice's.
* With augmentation on, a larger box is read first (big enough for the largest rotation and
  scaling) and batchgenerators' ``SpatialTransform`` resamples the final patch from its centre.
  Extras follow the image through the spatial transform and mirroring (as extra data channels,
  same interpolation order) but not through gamma and noise.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json
from autopetseg.training.config import AugmentationConfig

logger = logging.getLogger(__name__)

BACKGROUND_VALUE = 0.0  # PET 0 SUV and CT 0 (= -1024 HU after scaling) both mean "nothing there"
BATCH_KEYS = frozenset({"data", "target", "foreground", "case_label"})  # extras may not take these names
NO_CASE_LABEL = -1  # "case_label" of a case without a patient-level label


@dataclass
class CachedCase:
    """One preprocessed case, arrays memory-mapped."""

    case_id: str
    image: np.ndarray  # float32 (C, z, y, x)
    seg: np.ndarray  # uint8 (z, y, x)
    foreground_zyx: np.ndarray  # int (K, 3) lesion voxel coordinates; K may be 0
    spacing_zyx: tuple[float, float, float]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float (z, y, x), shape of seg
    case_label: int | None = None  # patient-level label (e.g. from clinical.csv); None: unknown

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0


def _check_extra_names(names) -> None:
    clash = sorted(set(names) & BATCH_KEYS)
    if clash:
        raise ValueError(f"extra arrays may not be named {clash}: the batch uses these keys")


def load_cached_case(
    data_dir: str | Path,
    case_id: str,
    extras: Mapping[str, str | Path] | None = None,
    case_label: int | None = None,
) -> CachedCase:
    """Open ``<data_dir>/<case_id>{.npy,_seg.npy,_fg.npy,.json}`` and the ``extras`` files memory-mapped.

    ``extras`` maps a name to a ``.npy`` file holding a float (z, y, x) array on the cache grid.
    """
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
    extras = dict(extras or {})
    _check_extra_names(extras)
    opened = {}
    for name, path in extras.items():
        path = Path(path)
        if not path.is_file():
            raise InputError(f"extra array {name!r} missing", case_id, path)
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise InputError(f"extra array {name!r} is not a readable .npy file ({err})", case_id, path) from err
        if array.shape != seg.shape or array.dtype.kind not in "biuf":
            raise InputError(
                f"extra array {name!r} is {array.dtype} {array.shape}; "
                f"expected a float array of the label's shape {seg.shape}",
                case_id,
                path,
            )
        opened[name] = array
    label = None if case_label is None else int(case_label)
    return CachedCase(case_id, image, seg, fg, tuple(float(s) for s in props["spacing_zyx"]), opened, label)


def extract_patch(array: np.ndarray, center_zyx: Sequence[int], size_zyx: Sequence[int], pad_value: float = BACKGROUND_VALUE) -> np.ndarray:
    """The box of ``size_zyx`` around ``center_zyx`` from the last three axes of ``array``, as a new
    array (never a view of a cached case).

    The box starts at ``center - size // 2``; the part outside the array is filled with
    ``pad_value``. Leading axes (channels) are kept. acvl-utils' ``crop_and_pad_nd`` reads only the
    overlap (cheap on memmaps).
    """
    start = [int(c) - int(s) // 2 for c, s in zip(center_zyx, size_zyx)]
    box = [[a, a + int(s)] for a, s in zip(start, size_zyx)]
    if any(hi <= 0 or lo >= n for (lo, hi), n in zip(box, array.shape[-3:])):  # acvl-utils gives zeros here
        return np.full(array.shape[:-3] + tuple(int(s) for s in size_zyx), pad_value, dtype=array.dtype)
    patch = crop_and_pad_nd(array, box, pad_value=pad_value)
    return patch if patch.flags.owndata and not isinstance(patch, np.memmap) else np.array(patch)


def check_patch_layout(patch_size: Sequence[int], slice_axis: int | None, neighbours: int) -> None:
    """A 3D patch takes no slice settings; a 2D one needs the axis its slices are taken across."""
    if len(patch_size) == 3:
        if slice_axis is not None or neighbours:
            raise ValueError("slice_axis and neighbours are for 2D patches only")
    elif len(patch_size) == 2:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"2D patches need slice_axis 0, 1 or 2, got {slice_axis!r}")
        if neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {neighbours}")
    else:
        raise ValueError(f"patch size must have 2 or 3 entries, got {list(patch_size)}")


def augmentation_input_size(patch_size: Sequence[int], aug: AugmentationConfig) -> list[int]:
    """Box to read before the spatial transform so that rotation and scaling find data, not padding.

    Rotation by θ (about z in 3D, in-plane in 2D) widens the rotated axes by |cos θ| + |sin θ|;
    scaling by s > 1 samples s times the patch; elastic jitter moves points by up to alpha voxels.
    """
    if not aug.enabled:
        return [int(p) for p in patch_size]
    theta = max(abs(a) for a in aug.rotation_axial_rad) if aug.p_rotation > 0 else 0.0
    rot = abs(math.cos(theta)) + abs(math.sin(theta))
    scale = max(aug.scale_range) if aug.p_scale > 0 else 1.0
    scale = max(scale, 1.0)
    margin = 2 * math.ceil(max(aug.elastic_alpha)) if aug.p_elastic > 0 else 0
    factors = [scale, scale * rot, scale * rot][-len(patch_size):]  # 2D: both axes are in the rotation plane
    return [int(math.ceil(p * f)) + margin for p, f in zip(patch_size, factors)]


def mirror_axes_in_plane(mirror_axes: Sequence[int], slice_axis: int | None) -> tuple[int, ...]:
    """``mirror_axes`` (array axes of (z, y, x)) as axes of the patch; a 2D patch drops the slice axis."""
    if slice_axis is None:
        return tuple(int(a) for a in mirror_axes)
    in_plane = [a for a in range(3) if a != slice_axis]
    return tuple(in_plane.index(a) for a in mirror_axes if a != slice_axis)


class Augmentation:
    """The GDFL paper's random transforms (see ``AugmentationConfig``) with batchgenerators.

    Order: spatial (rotation, scaling, elastic) → gamma → noise → mirroring. Image and label move
    together; the extras ride as extra data channels through the spatial transform and the
    mirroring only, which draw their random numbers per sample (not per channel), so extras do not
    change what the image and label see. Gamma (per channel) and noise act on the image channels;
    with 2k+1 neighbour slices per image channel, one gamma and one noise draw cover all slices of a
    channel, so the slices stay consistent with each other.
    """

    def __init__(self, aug: AugmentationConfig, patch_size: Sequence[int], slice_axis: int | None = None):
        from batchgenerators.transforms.color_transforms import GammaTransform
        from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
        from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

        self.spatial = SpatialTransform(
            patch_size=tuple(int(p) for p in patch_size),
            patch_center_dist_from_border=None,
            do_elastic_deform=aug.p_elastic > 0,
            alpha=aug.elastic_alpha,
            sigma=aug.elastic_sigma,
            do_rotation=aug.p_rotation > 0,
            # batchgenerators' first angle rotates about its first spatial axis: our z in 3D (axial
            # rotation), the in-plane rotation in 2D (where it is the only angle used).
            angle_x=aug.rotation_axial_rad,
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
        )
        self.gamma = GammaTransform(
            aug.gamma_range, invert_image=False, per_channel=True, retain_stats=True, p_per_sample=aug.p_gamma
        )
        self.noise = GaussianNoiseTransform(noise_variance=aug.noise_variance, p_per_sample=aug.p_noise)
        axes = mirror_axes_in_plane(aug.mirror_axes, slice_axis)
        self.mirror = MirrorTransform(axes=axes) if axes else None

    def __call__(
        self, data: np.ndarray, seg: np.ndarray, extras: np.ndarray | None = None, slab: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data (B, C, *patch), seg (B, 1, *patch), extras (B, E, *patch)) from the read boxes.

        ``slab``: consecutive data channels that are slices of one image channel (2k+1 in 2D).
        """
        n_image = data.shape[1]
        n_extra = 0 if extras is None else extras.shape[1]
        if n_extra:
            data = np.concatenate([data, extras.astype(np.float32, copy=False)], axis=1)
        out = self.spatial(data=data, seg=seg)
        data, seg = out["data"], out["seg"]
        # A view of the image channels: gamma and noise write into ``data`` in place. Splitting
        # the channel axis into (channel, slice) is always possible without a copy.
        image = data[:, :n_image] if n_extra else data
        if slab > 1:
            image = image.reshape(image.shape[0], n_image // slab, slab, *image.shape[2:])
        self.gamma(data=image)
        self.noise(data=image)
        if self.mirror is not None:
            out = self.mirror(data=data, seg=seg)
            data, seg = out["data"], out["seg"]
        return data[:, :n_image], seg, data[:, n_image:]


def build_augmentation(aug: AugmentationConfig, patch_size: Sequence[int], slice_axis: int | None = None) -> Augmentation:
    """The random transforms for patches of ``patch_size`` (2D: slices across ``slice_axis``)."""
    return Augmentation(aug, patch_size, slice_axis)


def extra_names(cases: Sequence[CachedCase]) -> list[str]:
    """The extras every case has (sorted); cases with different sets cannot share a batch."""
    sets = {tuple(sorted(c.extras)) for c in cases}
    if len(sets) > 1:
        raise ValueError(f"all training cases need the same extra arrays, found the sets {sorted(sets)}")
    names = list(sets.pop()) if sets else []
    _check_extra_names(names)
    return names


class Patch(NamedTuple):
    image: np.ndarray  # (C·S, *read_size), S = 2k+1 slices per channel for a 2D patch with k neighbours, else 1
    seg: np.ndarray  # uint8 (*read_size)
    extras: np.ndarray  # float32 (E, *read_size) in ``PatchSampler.extra_names`` order
    foreground: bool  # lesion-centred?
    case_id: str
    case_label: int  # NO_CASE_LABEL when the case has none


class PatchSampler:
    """Draws training patches (image, label, extras) from cached cases; see the module docstring.

    ``read_size`` has 3 entries (3D) or 2 (slices across ``slice_axis``, ``neighbours`` slices on
    each side of the centre one for the image).
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        read_size: Sequence[int],
        foreground_share: float,
        max_shift_voxels: int,
        rng: np.random.Generator,
        slice_axis: int | None = None,
        neighbours: int = 0,
    ):
        if not cases:
            raise ValueError("no training cases")
        check_patch_layout(read_size, slice_axis, neighbours)
        self.cases = list(cases)
        self.read_size = [int(s) for s in read_size]
        self.foreground_share = float(foreground_share)
        self.max_shift = int(max_shift_voxels)
        self.rng = rng
        self.slice_axis = slice_axis
        self.slab = 2 * int(neighbours) + 1 if slice_axis is not None else 1
        self.extra_names = extra_names(self.cases)
        self.has_case_labels = any(c.case_label is not None for c in self.cases)
        # 3D boxes to cut: a 2D patch is a box one slice thick (the image: ``slab`` slices).
        self._label_box = list(self.read_size)
        self._image_box = list(self.read_size)
        if slice_axis is not None:
            self._label_box.insert(slice_axis, 1)
            self._image_box.insert(slice_axis, self.slab)
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

    def sample(self) -> Patch:
        foreground = self._next_is_foreground()
        if foreground:
            case = self.cases[self.lesion_cases[self.rng.integers(len(self.lesion_cases))]]
            voxel = case.foreground_zyx[self.rng.integers(len(case.foreground_zyx))]
            shift = self.rng.integers(-self.max_shift, self.max_shift + 1, size=3)
            if self.slice_axis is not None:
                shift[self.slice_axis] = 0  # stay on the lesion's slice; the shift moves the patch in-plane
            center = voxel + shift
        else:
            case = self.cases[self.rng.integers(len(self.cases))]
            center = self.rng.integers(0, np.asarray(case.seg.shape))
        image = extract_patch(case.image, center, self._image_box)
        seg = extract_patch(case.seg, center, self._label_box, pad_value=0)
        extras = np.zeros((len(self.extra_names), *self._label_box), dtype=np.float32)
        for i, name in enumerate(self.extra_names):
            extras[i] = extract_patch(case.extras[name], center, self._label_box, pad_value=0.0)
        if self.slice_axis is not None:
            # (C, ..slices.., ) -> (C, S, a, b) -> channel-major (C·S, a, b); the slice axis of the
            # label and extras boxes has length 1 and is dropped by the reshape.
            image = np.moveaxis(image, 1 + self.slice_axis, 1).reshape(-1, *self.read_size)
            seg = seg.reshape(self.read_size)
            extras = extras.reshape(len(self.extra_names), *self.read_size)
        label = NO_CASE_LABEL if case.case_label is None else int(case.case_label)
        return Patch(image, seg, extras, foreground, case.case_id, label)

    def sample_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        samples = [self.sample() for _ in range(batch_size)]
        return {
            "data": np.stack([s.image for s in samples]).astype(np.float32, copy=False),
            "seg": np.stack([s.seg for s in samples])[:, None].astype(np.float32),
            "extras": np.stack([s.extras for s in samples]),
            "foreground": np.asarray([s.foreground for s in samples]),
            "case_ids": [s.case_id for s in samples],
            "case_label": np.asarray([s.case_label for s in samples], dtype=np.int64),
        }


class PatchBatchStream(IterableDataset):
    """Endless stream of augmented batches.

    A batch is {"data": float32 (B, C', *patch), "target": int64 (B, 1, *patch), "foreground":
    bool (B,)}, plus one float32 (B, 1, *patch) entry per extra array, plus "case_label" int64
    (B,) (``NO_CASE_LABEL`` where unknown) when any case has a label. C' = C for 3D patches,
    C·(2k+1) for 2D ones with k neighbours.

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
        slice_axis: int | None = None,
        neighbours: int = 0,
    ):
        self.cases = list(cases)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.foreground_share = foreground_share
        self.aug = aug
        self.seed = int(seed)
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.slice_axis = None if slice_axis is None else int(slice_axis)
        self.neighbours = int(neighbours)
        # Fail here, in the calling process, rather than inside a worker.
        check_patch_layout(self.patch_size, self.slice_axis, self.neighbours)
        extra_names(self.cases)

    def batch_seeds(self, batch_index: int) -> tuple[int, int, int]:
        """(numpy global seed, Python ``random`` seed, sampler seed) of global batch ``batch_index``."""
        state = np.random.SeedSequence([self.seed, self.rank, int(batch_index)]).generate_state(3)
        return int(state[0]), int(state[1]), int(state[2])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        read_size = augmentation_input_size(self.patch_size, self.aug)
        sampler = PatchSampler(
            self.cases,
            read_size,
            self.foreground_share,
            self.aug.max_shift_voxels,
            np.random.default_rng(0),
            self.slice_axis,
            self.neighbours,
        )
        transform = build_augmentation(self.aug, self.patch_size, self.slice_axis) if self.aug.enabled else None
        index = self.start_batch + worker
        while True:
            numpy_seed, python_seed, sampler_seed = self.batch_seeds(index)
            np.random.seed(numpy_seed)
            random.seed(python_seed)
            sampler.seek(index * self.batch_size, np.random.default_rng(sampler_seed))
            batch = sampler.sample_batch(self.batch_size)
            data, seg, extras = batch["data"], batch["seg"], batch["extras"]
            if transform is not None:
                data, seg, extras = transform(data, seg, extras, slab=sampler.slab)
            out = {
                "data": torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(np.rint(seg), dtype=np.int64)),
                "foreground": torch.from_numpy(batch["foreground"]),
            }
            for i, name in enumerate(sampler.extra_names):
                out[name] = torch.from_numpy(np.ascontiguousarray(extras[:, i : i + 1], dtype=np.float32))
            if sampler.has_case_labels:
                out["case_label"] = torch.from_numpy(batch["case_label"])
            yield out
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
    slice_axis: int | None = None,
    neighbours: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of training batches, from global batch ``start_batch`` on (see ``PatchBatchStream``).

    A 2-entry ``patch_size`` makes 2D patches: slices across ``slice_axis`` with ``neighbours``
    slices on each side as extra image channels.
    """
    stream = PatchBatchStream(
        cases, patch_size, batch_size, foreground_share, aug, seed, rank, start_batch, slice_axis, neighbours
    )
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
