"""The dataset fingerprint: what the planner needs to know about the data, measured once.

Per case (``fingerprint_case``, a top-level function so that a process pool can run it):

- geometry: PET spacing and shape (z, y, x), the body box (``planning.body``) and the shape
  after cropping to it;
- lesions (when the case has a label): connected components with 18-connectivity
  (``ndimage.label`` with ``generate_binary_structure(3, 2)``, as the autoPET challenge counts
  them), each with its volume in ml, SUVmax and SUVmean;
- intensity samples: at most ``samples_per_case`` voxels drawn uniformly (with replacement)
  from the body and as many from the lesions, both channels at the same voxels. The generator
  is seeded with (seed, crc32(case id)), so a case gives the same samples whatever the order
  or number of processes.

Over the dataset (``summarize``): the samples of all cases are pooled (every case weighs the
same, up to its lesion size) into percentiles, mean and std per channel and region; the
lesion numbers into per-case counts, the share of lesion-free cases (labelled cases only) and
distributions of lesion volume and SUVmax. Cases whose input is bad are left out and listed in
``Fingerprint.failures`` with their reason, so that a later run can report them.

With ``samples_per_case`` at least the number of body (lesion) voxels of every case, all voxels
are used and the statistics are exact; below it, each case contributes the same number of samples.

Every case is measured on its body crop (``preprocessing.cropping.CroppedCase``: all body and
lesion voxels lie inside it). Given a ``cropped_dir``, the pass saves those crops there (the
cropped stage of the cache), so that preprocessing does not read and resample the raw files again.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from autopetseg.data.parallel import run_per_case
from autopetseg.data.records import CaseRecord, Dataset
from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, write_json
from autopetseg.data.body import BodyMaskSettings, bbox_shape, bbox_slices, body_bbox
from autopetseg.planning.plans import CHANNELS
from autopetseg.data.cropping import CroppedCase, load_cropped_case, read_cropped, save_cropped

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
PERCENTILES = (0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5)
DISTRIBUTION_PERCENTILES = (0.0, 5.0, 25.0, 50.0, 75.0, 95.0, 100.0)
REGIONS = ("body", "lesion")
LESION_CONNECTIVITY = ndimage.generate_binary_structure(3, 2)  # 18-connectivity (autoPET)
DEFAULT_SAMPLES_PER_CASE = 10_000


def percentile_key(q: float) -> str:
    """JSON key of a percentile: ``0.5 -> 'p0.5'``, ``50 -> 'p50'``."""
    return f"p{q:g}"


@dataclass
class IntensityStats:
    """Statistics of one channel in one region, over the pooled samples of all cases."""

    n_samples: int
    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[str, float]  # percentile_key(q) -> value, q in PERCENTILES

    @classmethod
    def of(cls, values: np.ndarray) -> "IntensityStats | None":
        if values.size == 0:
            return None
        values = values.astype(np.float64, copy=False)
        pct = np.percentile(values, PERCENTILES)
        return cls(
            n_samples=int(values.size),
            mean=float(values.mean()),
            std=float(values.std()),
            min=float(values.min()),
            max=float(values.max()),
            percentiles={percentile_key(q): float(v) for q, v in zip(PERCENTILES, pct)},
        )

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile, interpolated linearly between the stored ones."""
        if not PERCENTILES[0] <= q <= PERCENTILES[-1]:
            raise ValueError(f"percentile {q} is outside the stored range [{PERCENTILES[0]}, {PERCENTILES[-1]}]")
        stored = [self.percentiles[percentile_key(p)] for p in PERCENTILES]
        return float(np.interp(q, PERCENTILES, stored))

    @classmethod
    def from_dict(cls, d: dict | None) -> "IntensityStats | None":
        if d is None:
            return None
        return cls(
            n_samples=int(d["n_samples"]),
            mean=float(d["mean"]),
            std=float(d["std"]),
            min=float(d["min"]),
            max=float(d["max"]),
            percentiles={str(k): float(v) for k, v in d["percentiles"].items()},
        )


@dataclass
class LesionStats:
    """One connected lesion component."""

    n_voxels: int
    volume_ml: float
    suv_max: float
    suv_mean: float


@dataclass
class CaseFingerprint:
    case_id: str
    spacing_zyx: list[float]
    shape_zyx: list[int]
    bbox_zyx: list[list[int]]  # body box, end exclusive
    shape_after_crop_zyx: list[int]
    body_voxels: int
    lesions: list[LesionStats] | None  # None: the case has no label
    # The files it was measured from (``data.provenance``): a later run re-measures when they changed.
    sources: dict | None = None

    @property
    def n_lesions(self) -> int | None:
        return None if self.lesions is None else len(self.lesions)

    @classmethod
    def from_dict(cls, d: dict) -> "CaseFingerprint":
        lesions = d.get("lesions")
        return cls(
            case_id=str(d["case_id"]),
            spacing_zyx=[float(v) for v in d["spacing_zyx"]],
            shape_zyx=[int(v) for v in d["shape_zyx"]],
            bbox_zyx=[[int(lo), int(hi)] for lo, hi in d["bbox_zyx"]],
            shape_after_crop_zyx=[int(v) for v in d["shape_after_crop_zyx"]],
            body_voxels=int(d["body_voxels"]),
            lesions=None if lesions is None else [LesionStats(**les) for les in lesions],
            sources=d.get("sources"),
        )


@dataclass
class CaseSamples:
    """Intensity samples of one case, (2, n) float32 with rows PET, CT; not saved."""

    body: np.ndarray
    lesion: np.ndarray


@dataclass
class LesionSummary:
    n_labelled_cases: int
    n_lesion_free_cases: int
    lesion_free_fraction: float | None  # of the labelled cases
    n_lesions_total: int
    lesions_per_case_mean: float | None
    lesions_per_case_median: float | None
    lesions_per_case_max: int | None
    volume_ml: dict[str, float] | None  # percentile_key(q) -> value, q in DISTRIBUTION_PERCENTILES
    suv_max: dict[str, float] | None

    @classmethod
    def from_dict(cls, d: dict) -> "LesionSummary":
        return cls(**d)


@dataclass
class CaseFailure:
    """A case the fingerprint could not measure (bad input), kept so that a re-run can report it."""

    case_id: str
    reason: str
    file: str | None = None

    @classmethod
    def of(cls, error: InputError) -> "CaseFailure":
        return cls(case_id=str(error.case), reason=error.reason, file=error.file)

    def error(self) -> InputError:
        return InputError(self.reason, self.case_id, self.file)


@dataclass
class Fingerprint:
    """``fingerprint.json``: per-case geometry and lesions, pooled intensity statistics, and the
    cases left out because their input was bad (``failures``)."""

    cases: list[CaseFingerprint]
    # channel ("PET", "CT") -> region ("body", "lesion") -> stats (None when no voxel was sampled)
    intensity: dict[str, dict[str, IntensityStats | None]]
    lesions: LesionSummary
    median_spacing_zyx: list[float]
    median_shape_zyx: list[float]
    median_shape_after_crop_zyx: list[float]
    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE
    seed: int = 0
    failures: list[CaseFailure] = field(default_factory=list)
    version: int = FINGERPRINT_VERSION

    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def spacings_zyx(self) -> np.ndarray:
        return np.array([c.spacing_zyx for c in self.cases], dtype=float).reshape(-1, 3)

    @property
    def shapes_after_crop_zyx(self) -> np.ndarray:
        return np.array([c.shape_after_crop_zyx for c in self.cases], dtype=float).reshape(-1, 3)

    def save(self, path: str | Path) -> None:
        write_json(path, self)

    @classmethod
    def load(cls, path: str | Path) -> "Fingerprint":
        path = Path(path)
        try:
            return cls.from_dict(read_json(path))
        except FileNotFoundError:
            raise InputError("fingerprint file not found; run the fingerprint step first", file=path) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid fingerprint file: {exc!r}", file=path) from None

    @classmethod
    def from_dict(cls, raw: dict) -> "Fingerprint":
        if raw.get("version") != FINGERPRINT_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, this autopetseg reads version {FINGERPRINT_VERSION}")
        intensity = {
            str(ch): {str(region): IntensityStats.from_dict(s) for region, s in regions.items()}
            for ch, regions in raw["intensity"].items()
        }
        if set(intensity) != set(CHANNELS):
            raise ValueError(f"intensity must have channels {list(CHANNELS)}, got {sorted(intensity)}")
        return cls(
            cases=[CaseFingerprint.from_dict(c) for c in raw["cases"]],
            intensity=intensity,
            lesions=LesionSummary.from_dict(raw["lesions"]),
            median_spacing_zyx=[float(v) for v in raw["median_spacing_zyx"]],
            median_shape_zyx=[float(v) for v in raw["median_shape_zyx"]],
            median_shape_after_crop_zyx=[float(v) for v in raw["median_shape_after_crop_zyx"]],
            samples_per_case=int(raw["samples_per_case"]),
            seed=int(raw["seed"]),
            failures=[CaseFailure(**f) for f in raw.get("failures", [])],
            version=int(raw["version"]),
        )


# ---------------------------------------------------------------------------------------------
# per case


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Generator that depends only on the seed and the case (not on order or process)."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode("utf-8"))])


def sample_mask(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``n`` voxels of ``mask``: all of them when there are at most ``n``,
    else ``n`` drawn uniformly with replacement (by rejection, so that no index array of the whole
    mask is built)."""
    count = int(np.count_nonzero(mask))
    if count <= n:
        return np.flatnonzero(mask)
    flat = mask.reshape(-1)
    share = count / flat.size
    picked: list[np.ndarray] = []
    have = 0
    while have < n:
        draw = rng.integers(0, flat.size, size=int((n - have) / share * 1.2) + 64)
        hits = draw[flat[draw]]
        picked.append(hits)
        have += hits.size
    return np.concatenate(picked)[:n]


def lesion_components(label: np.ndarray, pet: np.ndarray, voxel_volume_ml: float) -> list[LesionStats]:
    """Connected lesions (18-connectivity) with volume, SUVmax and SUVmean (vectorised per component)."""
    if not label.any():
        return []
    box = bbox_slices(body_bbox(label > 0))  # label only where there are lesions: much faster
    components, n = ndimage.label(label[box] > 0, structure=LESION_CONNECTIVITY)
    index = np.arange(1, n + 1)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    pet_box = pet[box]
    suv_max = ndimage.maximum(pet_box, components, index)
    suv_mean = ndimage.mean(pet_box, components, index)
    return [
        LesionStats(n_voxels=int(c), volume_ml=float(c * voxel_volume_ml), suv_max=float(mx), suv_mean=float(mn))
        for c, mx, mn in zip(counts, suv_max, suv_mean)
    ]


def fingerprint_case(
    record: CaseRecord,
    seed: int = 0,
    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE,
    body_settings: BodyMaskSettings = BodyMaskSettings(),
    cropped_dir: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[CaseFingerprint, CaseSamples]:
    """Measure one case. Input problems surface as ``InputError`` from ``load_case``.

    With ``cropped_dir``, the body-cropped case is saved there for preprocessing
    (``preprocessing.cropping``), and an up-to-date entry already there is measured instead of the
    raw files (unless ``overwrite``): the numbers are the same either way.
    """
    case = None
    if cropped_dir is not None and not overwrite:
        case = read_cropped(Path(cropped_dir), record, body_settings)
    if case is None:
        case = load_cropped_case(record, settings=body_settings)
        if cropped_dir is not None:
            save_cropped(Path(cropped_dir), record, case, body_settings)
    return measure_cropped(case, seed, samples_per_case)


def measure_cropped(case: CroppedCase, seed: int = 0,
                    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE) -> tuple[CaseFingerprint, CaseSamples]:
    """The fingerprint of a body-cropped case (every body and lesion voxel lies in the crop)."""
    rng = case_rng(seed, case.case_id)
    mask = case.body
    channels = (case.pet.reshape(-1), case.ct.reshape(-1))  # order of CHANNELS

    body_idx = sample_mask(mask, samples_per_case, rng)
    body_samples = np.stack([c[body_idx] for c in channels]).astype(np.float32)

    lesions = None
    lesion_samples = np.zeros((2, 0), dtype=np.float32)
    if case.label is not None:
        lesions = lesion_components(case.label, case.pet, case.geometry.voxel_volume_ml)
        lesion_idx = sample_mask(case.label > 0, samples_per_case, rng)
        lesion_samples = np.stack([c[lesion_idx] for c in channels]).astype(np.float32)

    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing_zyx=[float(s) for s in case.geometry.spacing_zyx],
        shape_zyx=[int(s) for s in case.geometry.shape_zyx],
        bbox_zyx=[[int(lo), int(hi)] for lo, hi in case.bbox_zyx],
        shape_after_crop_zyx=bbox_shape(case.bbox_zyx),
        body_voxels=int(np.count_nonzero(mask)),
        lesions=lesions,
        sources=case.sources,
    )
    return fp, CaseSamples(body=body_samples, lesion=lesion_samples)


# ---------------------------------------------------------------------------------------------
# dataset


def _distribution(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    pct = np.percentile(np.asarray(values, dtype=np.float64), DISTRIBUTION_PERCENTILES)
    return {percentile_key(q): float(v) for q, v in zip(DISTRIBUTION_PERCENTILES, pct)}


def summarize_lesions(cases: list[CaseFingerprint]) -> LesionSummary:
    labelled = [c for c in cases if c.lesions is not None]
    counts = [len(c.lesions) for c in labelled]
    all_lesions = [les for c in labelled for les in c.lesions]
    free = sum(1 for n in counts if n == 0)
    return LesionSummary(
        n_labelled_cases=len(labelled),
        n_lesion_free_cases=free,
        lesion_free_fraction=free / len(labelled) if labelled else None,
        n_lesions_total=len(all_lesions),
        lesions_per_case_mean=float(np.mean(counts)) if counts else None,
        lesions_per_case_median=float(np.median(counts)) if counts else None,
        lesions_per_case_max=int(max(counts)) if counts else None,
        volume_ml=_distribution([les.volume_ml for les in all_lesions]),
        suv_max=_distribution([les.suv_max for les in all_lesions]),
    )


def summarize(
    cases: list[CaseFingerprint], samples: list[CaseSamples], samples_per_case: int, seed: int
) -> Fingerprint:
    """Pool per-case results into the dataset fingerprint."""
    if not cases:
        raise InputError("no case could be fingerprinted (every case failed or the dataset is empty)")
    intensity: dict[str, dict[str, IntensityStats | None]] = {ch: {} for ch in CHANNELS}
    for region in REGIONS:
        pooled = np.concatenate([getattr(s, region) for s in samples], axis=1)
        for row, ch in enumerate(CHANNELS):
            intensity[ch][region] = IntensityStats.of(pooled[row])
    spacings = np.array([c.spacing_zyx for c in cases], dtype=float)
    shapes = np.array([c.shape_zyx for c in cases], dtype=float)
    cropped = np.array([c.shape_after_crop_zyx for c in cases], dtype=float)
    return Fingerprint(
        cases=cases,
        intensity=intensity,
        lesions=summarize_lesions(cases),
        median_spacing_zyx=np.median(spacings, axis=0).tolist(),
        median_shape_zyx=np.median(shapes, axis=0).tolist(),
        median_shape_after_crop_zyx=np.median(cropped, axis=0).tolist(),
        samples_per_case=samples_per_case,
        seed=seed,
    )


def extract_fingerprint(
    dataset: Dataset,
    num_processes: int = 1,
    seed: int = 0,
    samples_per_case: int = DEFAULT_SAMPLES_PER_CASE,
    body_settings: BodyMaskSettings = BodyMaskSettings(),
    cropped_dir: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Fingerprint, list[InputError]]:
    """Fingerprint every case of ``dataset``; bad cases are returned as ``InputError``s, not raised.

    ``cropped_dir``: where the body-cropped cases are saved for preprocessing (and reused from, unless
    ``overwrite``), see ``fingerprint_case``. Raises ``InputError`` only when no case at all could be
    measured.
    """
    fn = functools.partial(fingerprint_case, seed=seed, samples_per_case=samples_per_case, body_settings=body_settings,
                           cropped_dir=None if cropped_dir is None else str(cropped_dir), overwrite=overwrite)
    results, failures = run_per_case(fn, dataset.cases, num_processes=num_processes, desc="fingerprint")
    ordered = [results[c.case_id] for c in dataset.cases if c.case_id in results]
    for err in failures:
        logger.warning("skipped in the fingerprint: %s", err)
    if not ordered:
        shown = "; ".join(str(e) for e in failures[:3]) + (" ..." if len(failures) > 3 else "")
        raise InputError(f"no case could be fingerprinted ({len(failures)} of {len(dataset.cases)} failed: {shown})"
                         if failures else "no case could be fingerprinted: the dataset is empty", file=dataset.root)
    fingerprint = summarize([fp for fp, _ in ordered], [s for _, s in ordered], samples_per_case, seed)
    fingerprint.failures = [CaseFailure.of(e) for e in failures]
    return fingerprint, failures
