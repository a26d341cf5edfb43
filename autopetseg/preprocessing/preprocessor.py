"""Preprocess cases into the cache (``docs/ARCHITECTURE.md``) and map network outputs back.

One case, in this order (GDFL paper §2.2, with the cheap steps first):

1. ``load_case``: every input check.
2. Crop to the body bounding box (the lesions always inside it): whole-body PET/CT is mostly air.
   The CT is resampled onto the PET grid inside the crop only (``preprocessing.cropping``). When
   the fingerprint pass left the crop in the cropped stage of the cache (``cropped_dir``), steps
   1-2 are a read of that entry instead of the raw files.
3. Normalize on the crop, before resampling, so the arithmetic runs on the smaller array when the
   target grid is finer: CT clipped to ``ct_clip_hu`` and scaled to [0, 1]; PET kept in SUV,
   clipped at ``pet_clip_suv`` when the plans set it. Linear interpolation commutes with the CT's
   affine scaling, and interpolated values stay inside the clip range, so the order is free.
4. Resample PET and CT (linear) and the mask (``LabelResampling``) to the configuration spacing.
5. Sample lesion locations per connected lesion; write ``<case>.npy``, ``_seg.npy``, ``_fg.npy``
   and last ``<case>.json``: its presence means the case is complete.

``invert_to_original`` undoes 4 and 2 exactly on the grids involved, for predictions.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from autopetseg.data.imageio import Geometry
from autopetseg.data.loading import LoadedCase
from autopetseg.data.parallel import run_per_case
from autopetseg.data.provenance import changed_sources
from autopetseg.data.records import CaseRecord, Dataset
from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, save_npy, write_json
from autopetseg.data.body import BodyMaskSettings
from autopetseg.planning.plans import ConfigurationPlan, NormalizationPlan, Plans
from autopetseg.data.cropping import CroppedCase, crop_case, load_cropped_case, read_cropped
from autopetseg.preprocessing.foreground import ForegroundSampling, case_rng, sample_foreground
from autopetseg.preprocessing.resampling import (
    LabelResampling,
    crop_geometry,
    resample_array,
    resample_label,
    resampled_geometry,
)

log = logging.getLogger(__name__)

CACHE_FILE_SUFFIXES = (".npy", "_seg.npy", "_fg.npy", ".json")


@dataclass(frozen=True)
class PreprocessingSettings:
    """What preprocessing decides beyond the plans (kept out of the function bodies)."""

    label_resampling: LabelResampling = field(default_factory=LabelResampling)
    foreground: ForegroundSampling = field(default_factory=ForegroundSampling)
    body: BodyMaskSettings = field(default_factory=BodyMaskSettings)  # the crop (planning.body)


    @classmethod
    def from_signature(cls, signature: dict | None) -> "PreprocessingSettings":
        """The settings a cache was made with, from a case's ``preprocessing`` signature (None: defaults)."""
        if not signature:
            return cls()
        return cls(
            label_resampling=LabelResampling(**signature["label_resampling"]),
            foreground=ForegroundSampling(**signature["foreground"]),
            body=BodyMaskSettings(**signature["body"]),
        )


DEFAULT_SETTINGS = PreprocessingSettings()


# --------------------------------------------------------------------------- one case, in memory


def normalize_ct(ct: np.ndarray, normalization: NormalizationPlan) -> np.ndarray:
    """Clip HU to ``ct_clip_hu`` and scale linearly to [0, 1] (float32, new array)."""
    lo, hi = (float(v) for v in normalization.ct_clip_hu)
    out = np.clip(ct, lo, hi, dtype=np.float32)
    out -= lo
    out *= np.float32(1.0 / (hi - lo))
    return out


def normalize_pet(pet: np.ndarray, normalization: NormalizationPlan) -> np.ndarray:
    """SUV unchanged, clipped above at ``pet_clip_suv`` when set (a view when nothing changes)."""
    if normalization.pet_clip_suv is None:
        return pet.astype(np.float32, copy=False)
    return np.minimum(pet, np.float32(normalization.pet_clip_suv), dtype=np.float32)


def crop_box(case: LoadedCase, settings: BodyMaskSettings = BodyMaskSettings()) -> list[list[int]]:
    """The body's bounding box (``planning.body``) grown to hold every lesion voxel, so that cropping
    never removes a lesion, even one drawn in air by mistake."""
    return crop_case(case, settings).bbox_zyx


def _signature(plans: Plans, conf: ConfigurationPlan, settings: PreprocessingSettings) -> dict:
    """Everything that changes the cache content: a case made with another signature is redone."""
    return {
        "spacing_zyx": [float(s) for s in conf.spacing_zyx],
        "ct_clip_hu": [float(v) for v in plans.normalization.ct_clip_hu],
        "pet_clip_suv": plans.normalization.pet_clip_suv,
        "label_resampling": asdict(settings.label_resampling),
        "foreground": asdict(settings.foreground),
        "body": asdict(settings.body),
    }


def preprocess_loaded_case(
    case: LoadedCase | CroppedCase,
    plans: Plans,
    conf: ConfigurationPlan,
    settings: PreprocessingSettings,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(data (2, z, y, x) float32, seg uint8 or None, properties without the lesion numbers).

    ``case``: a loaded case (cropped here) or an already cropped one.
    """
    cropped = case if isinstance(case, CroppedCase) else crop_case(case, settings.body)
    geometry = cropped.geometry
    bbox = cropped.bbox_zyx
    crop = crop_geometry(geometry, bbox)
    target = resampled_geometry(crop, conf.spacing_zyx)

    data = np.empty((2, *target.shape_zyx), dtype=np.float32)
    resample_array(normalize_pet(cropped.pet, plans.normalization), crop, target, "linear", out=data[0])
    resample_array(normalize_ct(cropped.ct, plans.normalization), crop, target, "linear", out=data[1])
    seg = None
    if cropped.label is not None:
        seg = resample_label(cropped.label, crop, target, settings.label_resampling)

    properties = {
        "case_id": cropped.case_id,
        "geometry": {key: list(value) for key, value in asdict(geometry).items()},  # as JSON reads it back
        "bbox_zyx": [[int(a), int(b)] for a, b in bbox],
        "shape_after_crop_zyx": list(crop.shape_zyx),
        "shape_after_resample_zyx": list(target.shape_zyx),
        "spacing_zyx": list(target.spacing_zyx),
        "configuration": conf.name,
        "data_identifier": conf.data_identifier,
        "has_label": seg is not None,
        "preprocessing": _signature(plans, conf, settings),
    }
    return data, seg, properties


def preprocess_for_inference(
    record: CaseRecord,
    plans: Plans,
    configuration: str,
    settings: PreprocessingSettings = DEFAULT_SETTINGS,
) -> tuple[np.ndarray, dict]:
    """The cache array and properties of one case, in memory (no label read, nothing written)."""
    conf = plans.configuration(configuration)
    case = load_cropped_case(record, with_label=False, settings=settings.body)
    data, _, properties = preprocess_loaded_case(case, plans, conf, settings)
    properties.update(cohort=record.cohort, patient=record.patient)
    return data, properties


# --------------------------------------------------------------------------- one case, to the cache


def case_files(out_dir: Path, case_id: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "data": out_dir / f"{case_id}.npy",
        "seg": out_dir / f"{case_id}_seg.npy",
        "fg": out_dir / f"{case_id}_fg.npy",
        "properties": out_dir / f"{case_id}.json",
    }


def preprocess_case(
    record: CaseRecord,
    plans: Plans,
    configuration: str,
    out_dir: Path,
    seed: int = 0,
    settings: PreprocessingSettings = DEFAULT_SETTINGS,
    cropped_dir: str | Path | None = None,
) -> dict:
    """Preprocess one case into ``out_dir`` and return its properties (also ``<case>.json``).

    The case comes from the cropped stage ``cropped_dir`` when an up-to-date entry made with
    ``settings.body`` is there, else from the raw files. An unlabelled case (``record.label is
    None``) gets an all-zero mask, no lesion locations and ``has_label: false``. Raises
    ``InputError`` for bad input.
    """
    conf = plans.configuration(configuration)
    case = read_cropped(Path(cropped_dir), record, settings.body) if cropped_dir is not None else None
    if case is None:
        case = load_cropped_case(record, settings=settings.body)
    data, seg, properties = preprocess_loaded_case(case, plans, conf, settings)
    sources = case.sources
    del case  # the crop is no longer needed while the files are written

    if seg is None:
        seg = np.zeros(data.shape[1:], dtype=np.uint8)
        fg = np.zeros((0, 3), dtype=np.int32)
        n_lesions = 0
    else:
        fg, n_lesions = sample_foreground(seg, case_rng(seed, record.case_id), settings.foreground)
    properties.update(
        n_lesion_voxels=int(np.count_nonzero(seg)),
        n_lesions=n_lesions,
        n_fg_samples=int(fg.shape[0]),
        fg_seed=int(seed),
        cohort=record.cohort,
        patient=record.patient,
        sources=sources,  # what it was made from (data.provenance): a later run redoes it when they change
    )

    files = case_files(out_dir, record.case_id)
    save_npy(files["data"], data)
    save_npy(files["seg"], seg)
    save_npy(files["fg"], fg)
    write_json(files["properties"], properties)  # last: marks the case complete
    return properties


def load_preprocessed(folder: str | Path, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(data, seg, fg, properties)`` of a cached case; arrays memory-mapped read-only by default."""
    files = case_files(Path(folder), case_id)
    if not files["properties"].is_file():
        raise InputError("case is not in the preprocessed cache (run plan_and_preprocess)", case_id, files["properties"])
    mode = "r" if mmap else None
    data = np.load(files["data"], mmap_mode=mode)
    seg = np.load(files["seg"], mmap_mode=mode)
    fg = np.load(files["fg"])
    return data, seg, fg, read_json(files["properties"])


# --------------------------------------------------------------------------- inversion


def _cache_grids(properties: dict) -> tuple[Geometry, tuple[slice, ...], Geometry, Geometry]:
    geometry = Geometry.from_dict(properties["geometry"])
    bbox = properties["bbox_zyx"]
    crop = crop_geometry(geometry, bbox)
    cache = resampled_geometry(crop, properties["spacing_zyx"])
    if list(crop.shape_zyx) != list(properties["shape_after_crop_zyx"]) or list(cache.shape_zyx) != list(
        properties["shape_after_resample_zyx"]
    ):
        raise ValueError(
            f"properties of case {properties.get('case_id')!r} are inconsistent: crop {crop.shape_zyx} / cache "
            f"{cache.shape_zyx} vs stored {properties['shape_after_crop_zyx']} / {properties['shape_after_resample_zyx']}"
        )
    return geometry, tuple(slice(a, b) for a, b in bbox), crop, cache


def map_between_caches(array_zyx: np.ndarray, source: dict, target: dict) -> np.ndarray:
    """A (z, y, x) array on one configuration's cache grid resampled (linear) onto another's.

    ``source`` and ``target`` are the two caches' properties of the same case: both grids cover
    the same body box of the same PET image, so the mapping is exact in physical space (an earlier
    stage's output becomes a later stage's input this way). Outside the source box: 0.
    """
    _, _, _, source_grid = _cache_grids(source)
    _, _, _, target_grid = _cache_grids(target)
    if tuple(array_zyx.shape) != source_grid.shape_zyx:
        raise ValueError(f"array shape {array_zyx.shape} is not the source cache shape {source_grid.shape_zyx}")
    out = np.zeros(target_grid.shape_zyx, dtype=np.float32)
    resample_array(np.asarray(array_zyx, dtype=np.float32), source_grid, target_grid, "linear", out=out)
    return out


def invert_to_original(array_zyx: np.ndarray, properties: dict, order: str = "linear", fill: float = 0) -> np.ndarray:
    """Map a (z, y, x) array on the cache grid back onto the original PET grid.

    ``order="linear"`` for probabilities and images (float32 out), ``"nearest"`` for masks (dtype
    kept; bool stays bool). Outside the body box the result is ``fill``. For the best masks,
    invert probabilities linearly and threshold afterwards.
    """
    geometry, box, crop, cache = _cache_grids(properties)
    if tuple(array_zyx.shape) != cache.shape_zyx:
        raise ValueError(f"array shape {array_zyx.shape} is not the cache shape {cache.shape_zyx}")
    is_bool = array_zyx.dtype == np.bool_
    if order == "linear":
        source = array_zyx.astype(np.float32, copy=False)
    else:
        source = array_zyx.view(np.uint8) if is_bool else array_zyx
    out = np.full(geometry.shape_zyx, fill, dtype=source.dtype)
    resample_array(np.asarray(source), cache, crop, order, out=out[box])
    return out.view(np.bool_) if is_bool and order != "linear" else out


def invert_probabilities(probabilities: np.ndarray, properties: dict, fill=0.0) -> np.ndarray:
    """(C, z, y, x) probabilities on the cache grid → (C, *PET shape) float32, linear.

    ``fill``: a value, or one per channel (e.g. ``(1, 0)`` for softmax background/lesion).
    """
    fills = np.broadcast_to(np.asarray(fill, dtype=np.float32), (probabilities.shape[0],))
    geometry, box, crop, cache = _cache_grids(properties)
    out = np.empty((probabilities.shape[0], *geometry.shape_zyx), dtype=np.float32)
    for channel in range(probabilities.shape[0]):
        out[channel] = fills[channel]
        resample_array(np.asarray(probabilities[channel], dtype=np.float32), cache, crop, "linear", out=out[channel][box])
    return out


# --------------------------------------------------------------------------- a dataset


def _is_complete(record: CaseRecord, files: dict[str, Path], signature: dict) -> bool:
    """The case's cache files exist, were made with ``signature`` and from the files now on disk."""
    if not all(p.is_file() for p in files.values()):
        return False
    try:
        properties = read_json(files["properties"])
    except (OSError, ValueError):
        return False
    if properties.get("preprocessing") != signature:
        return False
    changes = changed_sources(record, properties.get("sources"))
    if changes:
        log.warning("case %r: %s since it was preprocessed; preprocessing it again", record.case_id, ", ".join(changes))
    return not changes


def _remove_stray_temporaries(out_dir: Path, case_id: str) -> None:
    """Temporary files an interrupted run left for this case (``atomic_path`` names them ``.<name>.*``)."""
    for suffix in CACHE_FILE_SUFFIXES:
        for stray in out_dir.glob(f".{case_id}{suffix}.*"):
            stray.unlink(missing_ok=True)


def preprocess_dataset(
    dataset: Dataset,
    plans: Plans,
    preprocessed_dir: Path,
    configurations=("3d_fullres",),
    num_processes: int = 1,
    overwrite: bool = False,
    seed: int = 0,
    settings: PreprocessingSettings = DEFAULT_SETTINGS,
    cropped_dir: str | Path | None = None,
) -> list[InputError]:
    """Preprocess every case into ``preprocessed_dir/<data_identifier>/``; returns the bad cases.

    ``cropped_dir``: the cropped stage the fingerprint wrote (``preprocessing.cropping``); cases
    found there up to date are not read from the raw files again.

    One pass per distinct ``data_identifier`` among ``configurations``. A case whose properties
    JSON exists and was made with the same settings from the same source files (size, modification
    time, content hash: ``data.provenance``) is skipped unless ``overwrite``; stray
    temporary files of an interrupted run are removed first. Bad cases are collected while the
    good ones finish; any other error stops the run (``autopetseg.data.parallel.CaseFailed``).
    """
    preprocessed_dir = Path(preprocessed_dir)
    by_identifier: dict[str, str] = {}
    for name in configurations:
        conf = plans.configuration(name)
        by_identifier.setdefault(conf.data_identifier, name)

    failures: list[InputError] = []
    for identifier, name in by_identifier.items():
        conf = plans.configuration(name)
        out_dir = preprocessed_dir / identifier
        out_dir.mkdir(parents=True, exist_ok=True)
        signature = _signature(plans, conf, settings)
        todo = [r for r in dataset.cases
                if overwrite or not _is_complete(r, case_files(out_dir, r.case_id), signature)]
        log.info("%s: %d of %d cases to preprocess into %s", name, len(todo), len(dataset.cases), out_dir)
        for record in todo:
            _remove_stray_temporaries(out_dir, record.case_id)
        if not todo:
            continue
        processes = max(1, min(int(num_processes), len(todo)))
        worker = functools.partial(
            preprocess_case, plans=plans, configuration=name, out_dir=out_dir, seed=seed, settings=settings,
            cropped_dir=None if cropped_dir is None else str(cropped_dir),
        )
        _, bad = run_per_case(worker, todo, processes, f"preprocess {identifier}")
        failures.extend(bad)
    return failures
