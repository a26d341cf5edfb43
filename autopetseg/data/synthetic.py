"""Synthetic whole-body PET/CT phantoms with lesion masks, written in any accepted layout.

One case = one body (``synthetic_anatomy``: organs with physiological uptake that varies from
case to case, hot spots that are not lesions) plus the lesions of its cohort
(``synthetic_lesions``), rasterised on two grids the way scanners deliver them:

* PET in SUV on the coarse grid, blurred to the scanner resolution (``pet_fwhm_mm``) and with
  noise whose variance grows with the activity (counting statistics);
* CT in HU (int16) on a finer grid that covers a little more than the PET field of view;
* the lesion mask on the PET grid (voxel centres inside a lesion and inside the body).

Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: the same seed gives
the same files, whatever the number of processes. Besides the images the folder gets
``clinical.csv`` (case, patient, cohort, prognosis: a label whose odds grow with the tumour
burden, for the prognosis trainer) and ``synthetic_truth.json`` (every lesion's site, centre,
size and the measured mask volume: what tests compare against).

Presets: ``tiny`` is a child-sized body (template scaled by 0.3) on a 4 mm grid, about 80×32×48
PET voxels, so that CPU training takes minutes; ``wholebody`` is an adult on autoPET's grid
(PET 400×400 at 2.04 mm in-plane, 3 mm slices from mid-thigh to the top of the head).
"""

from __future__ import annotations

import csv
import io
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from autopetseg.data import synthetic_anatomy as anat
from autopetseg.data.imageio import Geometry, write_image
from autopetseg.data.synthetic_anatomy import Anatomy, AnatomyOptions, BodyFrame, Tissue, TissueCanvas, axis_coordinates_mm, box_slices
from autopetseg.data.synthetic_lesions import COHORTS, Lesion, LesionOptions, sample_lesions
from autopetseg.io_utils import atomic_path, write_json

log = logging.getLogger(__name__)

LAYOUTS = ("nnunet", "autopet", "flat")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Template field of view (z, y, x mm): mid-thigh to the top of the head, as in autoPET scans.
TEMPLATE_FOV_Z = (650.0, anat.TEMPLATE_HEIGHT_MM + 20.0)


@dataclass(frozen=True)
class Preset:
    """Body size, grids and image quality of one kind of phantom."""

    body_scale: float  # template mm -> physical mm
    pet_spacing_zyx: tuple[float, float, float]
    pet_fov_xy_mm: float  # square in-plane PET field of view
    ct_spacing_factor_zyx: tuple[float, float, float]  # CT spacing = PET spacing x this (finer)
    ct_margin_mm: float  # the CT extends this far beyond the PET on every side
    pet_fwhm_mm: float  # scanner resolution
    noise: tuple[float, float]  # noise level range: std = level * sqrt(SUV)
    ct_noise_hu: float
    lesions: LesionOptions = field(default_factory=LesionOptions)


PRESETS = {
    # Lesions kept at 10-30 mm and clearly above background so a CPU-sized model can learn them.
    "tiny": Preset(0.3, (4.0, 4.0, 4.0), 200.0, (1.0, 0.75, 0.75), 6.0, 6.0, (0.05, 0.12), 12.0,
                   LesionOptions(count={"lymphoma": (1, 4), "lung_cancer": (1, 3), "melanoma": (1, 3)},
                                 diameter_mm=(10.0, 30.0), delta_suv=(2.5, 12.0), necrosis_min_diameter_mm=26.0)),
    "wholebody": Preset(1.0, (3.0, 2.04, 2.04), 816.0, (1.0, 0.75, 0.75), 10.0, 6.5, (0.08, 0.2), 15.0),
}


@dataclass(frozen=True)
class CaseSpec:
    """What decides one case before any voxel is drawn."""

    index: int
    case_id: str
    patient: str
    study: str
    cohort: str


@dataclass
class Phantom:
    """One rendered case: arrays (z, y, x), their geometries, and the lesions that made them."""

    spec: CaseSpec
    pet: np.ndarray  # float32 SUV on pet_geometry
    ct: np.ndarray  # int16 HU on ct_geometry
    label: np.ndarray  # uint8 on pet_geometry
    pet_geometry: Geometry
    ct_geometry: Geometry
    lesions: list[Lesion]
    lesion_voxels: list[int]  # mask voxels of each lesion (0: too small for the grid)

    def truth(self) -> dict:
        ml = self.pet_geometry.voxel_volume_ml
        return {
            "case_id": self.spec.case_id, "patient": self.spec.patient, "cohort": self.spec.cohort,
            "tmtv_ml": float(self.label.sum()) * ml,
            "lesions": [
                {"site": les.site, "centre_zyx_mm": list(les.centre_zyx_mm), "nominal_diameter_mm": les.nominal_diameter_mm,
                 "delta_suv": les.delta_suv, "mask_volume_ml": n * ml}
                for les, n in zip(self.lesions, self.lesion_voxels)
            ],
        }


# ----------------------------------------------------------------------------- grids


@lru_cache(maxsize=None)
def _template_extent_yx() -> tuple[tuple[float, float], tuple[float, float]]:
    """(y lo, hi), (x lo, hi) of the template body with arms, in template mm (from a 10 mm raster)."""
    grid = Geometry((180, 60, 70), (10.0, 10.0, 10.0), (-345.0, -295.0, 0.0), IDENTITY)
    rng = np.random.default_rng(0)
    anatomy = replace(Anatomy.sample(rng, AnatomyOptions(), (1.0, 1.0, 1.0)), arms=True)
    body = anatomy.tissue_map(grid, BodyFrame((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))) != Tissue.AIR
    axes = axis_coordinates_mm(grid)
    ys, xs = axes[1][body.any(axis=(0, 2))], axes[2][body.any(axis=(0, 1))]
    return (float(ys.min()), float(ys.max())), (float(xs.min()), float(xs.max()))


def case_grids(preset: Preset, frame: BodyFrame, pet_spacing_zyx) -> tuple[Geometry, Geometry]:
    """PET and CT geometries: PET centred on the body in-plane, z from mid-thigh to above the head."""
    sz, sy, sx = pet_spacing_zyx
    z_lo, z_hi = (frame.to_physical((z, 0.0, 0.0))[0] for z in TEMPLATE_FOV_Z)
    (y_lo, y_hi), (x_lo, x_hi) = _template_extent_yx()
    centre = frame.to_physical((0.0, 0.5 * (y_lo + y_hi), 0.5 * (x_lo + x_hi)))
    nz = int(np.ceil((z_hi - z_lo) / sz))
    ny, nx = (int(round(preset.pet_fov_xy_mm / s)) for s in (sy, sx))
    origin_zyx = (z_lo, centre[1] - 0.5 * (ny - 1) * sy, centre[2] - 0.5 * (nx - 1) * sx)
    pet = Geometry((nz, ny, nx), (sz, sy, sx), tuple(float(v) for v in origin_zyx[::-1]), IDENTITY)

    ct_spacing = tuple(s * f for s, f in zip(pet.spacing_zyx, preset.ct_spacing_factor_zyx))
    lo = np.asarray(origin_zyx) - 0.5 * np.asarray(pet.spacing_zyx) - preset.ct_margin_mm
    hi = np.asarray(origin_zyx) + (np.asarray(pet.shape_zyx) - 0.5) * np.asarray(pet.spacing_zyx) + preset.ct_margin_mm
    ct_shape = tuple(int(np.ceil((h - l) / s)) for l, h, s in zip(lo, hi, ct_spacing))
    ct_origin_zyx = lo + 0.5 * np.asarray(ct_spacing)
    ct = Geometry(ct_shape, ct_spacing, tuple(float(v) for v in ct_origin_zyx[::-1]), IDENTITY)
    return pet, ct


# ----------------------------------------------------------------------------- rendering


def _lesion_field(lesion: Lesion, geometry: Geometry) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """(box slices, relative radius on the box) of a lesion on a grid; ``None`` if off the grid."""
    lo, hi = lesion.bbox()
    axes = axis_coordinates_mm(geometry)
    slices = box_slices(axes, lo, hi)
    if slices is None:
        return None
    c = lesion.centre_zyx_mm
    dz, dy, dx = ((a[s] - ci) for a, s, ci in zip(axes, slices, c))
    t = lesion.relative_radius(dz[:, None, None], dy[None, :, None], dx[None, None, :])
    return slices, t


def render_pet(anatomy: Anatomy, lesions: list[Lesion], geometry: Geometry, frame: BodyFrame, preset: Preset,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(PET SUV float32, lesion mask uint8, voxels per lesion) on the PET grid."""
    tissue = anatomy.paint(TissueCanvas(geometry, frame))
    pet = anatomy.pet_lut()[tissue]
    body = tissue != Tissue.AIR
    label = np.zeros(geometry.shape_zyx, np.uint8)
    counts = []
    for lesion in lesions:
        found = _lesion_field(lesion, geometry)
        if found is None:
            counts.append(0)
            continue
        slices, t = found
        inside = (t < 1.0) & body[slices]
        pet[slices] = np.where(inside, lesion.suv(t), pet[slices])
        label[slices] |= inside.astype(np.uint8)
        counts.append(int(inside.sum()))
    sigma_vox = [preset.pet_fwhm_mm / 2.3548 / s for s in geometry.spacing_zyx]
    pet = ndimage.gaussian_filter(pet, sigma_vox, mode="constant")
    level = rng.uniform(*preset.noise)
    pet = pet + level * np.sqrt(np.maximum(pet, 0.0)) * rng.standard_normal(pet.shape, dtype=np.float32)
    return pet.astype(np.float32), label, counts


def render_ct(anatomy: Anatomy, lesions: list[Lesion], geometry: Geometry, frame: BodyFrame, preset: Preset,
              rng: np.random.Generator) -> np.ndarray:
    """CT in HU (int16) on its own grid; lesions show as soft tissue where they are not in air."""
    tissue = anatomy.paint(TissueCanvas(geometry, frame))
    ct = anat.lookup_table(anat.CT_HU)[tissue]
    for lesion in lesions:
        found = _lesion_field(lesion, geometry)
        if found is not None:
            slices, t = found
            ct[slices] = np.where((t < 1.0) & (tissue[slices] != Tissue.AIR), lesion.hu(t), ct[slices])
    ct += preset.ct_noise_hu * rng.standard_normal(ct.shape, dtype=np.float32)
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16)


def make_phantom(spec: CaseSpec, seed: int, preset: Preset, pet_spacing_zyx=None) -> Phantom:
    """Render one case (deterministic in ``seed`` and ``spec.index``)."""
    rng = np.random.default_rng([seed, spec.index])
    jitter = AnatomyOptions().scale_jitter
    scale = tuple(preset.body_scale * float(f) for f in rng.uniform(1 - jitter, 1 + jitter, size=3))
    shift = rng.uniform(-1.0, 1.0, size=2) * AnatomyOptions().shift_mm * preset.body_scale
    frame = BodyFrame(scale, (0.0, float(shift[0]), float(shift[1])))
    anatomy = Anatomy.sample(rng, AnatomyOptions(), scale)
    lesions = sample_lesions(rng, spec.cohort, anatomy, frame, preset.lesions)
    pet_geometry, ct_geometry = case_grids(preset, frame, pet_spacing_zyx or preset.pet_spacing_zyx)
    pet, label, counts = render_pet(anatomy, lesions, pet_geometry, frame, preset, rng)
    ct = render_ct(anatomy, lesions, ct_geometry, frame, preset, rng)
    return Phantom(spec, pet, ct, label, pet_geometry, ct_geometry, lesions, counts)


# ----------------------------------------------------------------------------- dataset


def case_specs(n_cases: int, seed: int, negative_fraction: float, layout: str) -> list[CaseSpec]:
    """Case ids, patients (about one patient in six has a second study) and cohorts."""
    rng = np.random.default_rng([seed, 1_000_003])
    specs, patient, study = [], -1, 0
    positive = [c for c in COHORTS if c != "negative"]
    for i in range(n_cases):
        if patient < 0 or rng.random() >= 1.0 / 6.0:
            patient, study = patient + 1, 0
        else:
            study += 1
        cohort = "negative" if rng.random() < negative_fraction else str(rng.choice(positive))
        patient_id = f"PATIENT_{patient:03d}"
        study_id = f"study{study}"
        case_id = f"{patient_id}_{study_id}" if layout == "autopet" else f"phantom_{i:03d}"
        specs.append(CaseSpec(i, case_id, patient_id, study_id, cohort))
    return specs


def case_files(root: Path, case_id: str, patient: str, study: str, layout: str,
               labels_dir: str = "labelsTr") -> dict[str, Path]:
    """Where a case's PET, CT and label go in ``layout`` (also used by ``import-dicom``); in the
    autopet layout the case id must be ``<patient>_<study>``, as discovery names it."""
    if layout == "nnunet":
        return {"ct": root / "imagesTr" / f"{case_id}_0000.nii.gz", "pet": root / "imagesTr" / f"{case_id}_0001.nii.gz",
                "label": root / labels_dir / f"{case_id}.nii.gz"}
    if layout == "autopet":
        folder = root / patient / study
        return {"pet": folder / "SUV.nii.gz", "ct": folder / "CT.nii.gz", "label": folder / "SEG.nii.gz"}
    return {"pet": root / f"{case_id}_pet.nii.gz", "ct": root / f"{case_id}_ct.nii.gz",
            "label": root / f"{case_id}_seg.nii.gz"}


def write_nnunet_dataset_json(root: Path, n_cases: int, description: str) -> None:
    """nnU-Net's ``dataset.json`` for the files ``case_files`` places (channel 0 CT, 1 PET)."""
    write_json(root / "dataset.json", {
        "name": root.name, "description": description,
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": n_cases, "file_ending": ".nii.gz"})


def _write_case(args) -> dict:
    root, spec, layout, seed, preset, pet_spacing, with_labels = args
    phantom = make_phantom(spec, seed, preset, pet_spacing)
    files = case_files(root, spec.case_id, spec.patient, spec.study, layout)
    write_image(files["pet"], phantom.pet, phantom.pet_geometry)
    write_image(files["ct"], phantom.ct, phantom.ct_geometry)
    if with_labels:
        write_image(files["label"], phantom.label, phantom.pet_geometry)
    return phantom.truth()


def prognosis_labels(tmtv_ml: np.ndarray, seed: int) -> np.ndarray:
    """0/1 outcome whose log-odds rise with log tumour burden (noisy, so not a copy of TMTV)."""
    rng = np.random.default_rng([seed, 2_000_003])
    burden = np.log1p(tmtv_ml)
    centre = np.median(burden[burden > 0]) if (burden > 0).any() else 0.0
    p = 1.0 / (1.0 + np.exp(-2.0 * (burden - centre)))  # lesion-free cases get the lowest odds
    return (rng.random(tmtv_ml.shape) < p).astype(int)


def synthesize_dataset(out_dir: str | Path, n_cases: int = 30, layout: str = "nnunet", seed: int = 0, preset: str = "tiny",
                       pet_spacing_zyx=None, with_labels: bool = True, negative_fraction: float = 0.2,
                       num_processes: int = 1) -> Path:
    """Write ``n_cases`` phantoms to ``out_dir`` in ``layout``; returns the folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if n_cases < 1:
        raise ValueError("n_cases must be >= 1")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    specs = case_specs(n_cases, seed, negative_fraction, layout)
    jobs = [(root, s, layout, seed, PRESETS[preset], pet_spacing_zyx, with_labels) for s in specs]
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            truths = list(pool.map(_write_case, jobs))
    else:
        truths = [_write_case(job) for job in jobs]

    if layout == "nnunet":
        write_nnunet_dataset_json(root, n_cases, "autopetseg synthetic PET/CT phantoms")
    tmtv = np.array([t["tmtv_ml"] for t in truths])
    prognosis = prognosis_labels(tmtv, seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "patient", "cohort", "prognosis"])
    for spec, label in zip(specs, prognosis):
        writer.writerow([spec.case_id, spec.patient, spec.cohort, int(label)])
    with atomic_path(root / "clinical.csv", ".csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(root / "synthetic_truth.json", {"seed": seed, "preset": preset, "layout": layout, "cases": truths})
    log.info("wrote %d synthetic cases (%s layout, %s preset) to %s", n_cases, layout, preset, root)
    return root
