"""``autopetseg import-dicom``: one case per PET study, in the autopet, nnunet or flat layout.

Per study (``selection``): PET in SUV (``suv``, per-slice factors) as float32 on its DICOM grid; CT in
HU on its own grid (int16 when the values are whole numbers), and with ``ctres`` also on the PET
grid (autopet: ``CTres.nii.gz`` beside ``CT.nii.gz``; nnunet and flat: the CT channel itself, as
nnU-Net wants every channel on one grid); a lesion mask on the PET grid from the study's RTSTRUCT or
SEG (``masks``); then ``<PET>.dicom.json`` (``source``), last, so a case with it is complete.
Everything is read before anything is written: a study that fails leaves no files. A bad study is
an ``InputError`` naming its folder; the others go on and the report lists the failures.

Case ids are ``<PatientID>_<StudyDate>`` (the autopet layout's ``<patient>/<study>`` folders), with
the end of the StudyInstanceUID added when one patient has two studies on one date.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autopetseg.data.dicom.catalog import Study, scan
from autopetseg.data.dicom.masks import LesionRoiRule, MaskResult, rtstruct_mask, seg_mask
from autopetseg.data.dicom.selection import StudySelection, patient_and_study_ids, select_study
from autopetseg.data.dicom.source import RECORD_FORMAT, record_path
from autopetseg.data.dicom.suv import SuvOverrides, SuvResult, suv_factors
from autopetseg.data.dicom.volume import SliceSpacingRule, SliceStack, read_pixels, stack
from autopetseg.data.imageio import Geometry, write_image
from autopetseg.data.loading import resample_ct
from autopetseg.data.synthetic import case_files, write_nnunet_dataset_json
from autopetseg.errors import InputError
from autopetseg.io_utils import write_json
from autopetseg.options import check_option

log = logging.getLogger(__name__)

INT16_RANGE = (-32768, 32767)


@dataclass(frozen=True)
class DicomImportSettings:
    """What ``import-dicom`` does; every field is a command-line option."""

    layout: str = "autopet"
    weight_kg: float | None = None  # --weight: overrides PatientWeight for every study
    dose_bq: float | None = None  # --dose: overrides RadionuclideTotalDose for every study
    series: tuple[str, ...] = ()  # --series: series (or SOP instance) UIDs to take where there are candidates
    ctres: bool = False  # --ctres: also the CT on the PET grid
    roi: str | None = None  # --roi: regular expression of lesion ROI/segment names (default: LesionRoiRule)
    slices: SliceSpacingRule = field(default_factory=SliceSpacingRule)

    def validate(self) -> None:
        check_option("layout", self.layout)
        SuvOverrides(self.weight_kg, self.dose_bq).validate()
        LesionRoiRule.from_pattern(self.roi)


@dataclass
class ImportedCase:
    case_id: str
    files: dict[str, Path]
    suv_factor: float
    record: Path


@dataclass
class ImportReport:
    """What a run did: cases written, studies without PET (skipped), and the studies that failed."""

    output_dir: Path
    layout: str
    cases: list[ImportedCase] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[InputError] = field(default_factory=list)


@dataclass
class _ReadCase:
    """A study read in full, ready to be written."""

    selection: StudySelection
    pet: np.ndarray
    pet_stack: SliceStack
    suv: SuvResult
    ct: np.ndarray
    ct_stack: SliceStack
    segmentation: MaskResult | None


def _ct_values(ct: np.ndarray) -> np.ndarray:
    """HU as int16 when they are whole numbers in range (the usual CT), else float32."""
    if ct.size and np.array_equal(ct, np.round(ct)) and INT16_RANGE[0] <= ct.min() and ct.max() <= INT16_RANGE[1]:
        return ct.astype(np.int16)
    return ct


def _case_ids(studies: list[Study]) -> dict[str, tuple[str, str]]:
    """StudyInstanceUID → (patient, study) folder names, unique per patient."""
    names = {s.uid: patient_and_study_ids(s) for s in studies}
    counts = Counter(names.values())
    for study in studies:
        if counts[names[study.uid]] > 1:
            tail = "".join(ch for ch in study.uid if ch.isdigit())[-6:]
            names[study.uid] = (names[study.uid][0], f"{names[study.uid][1]}-{tail}")
    return names


def read_case(selection: StudySelection, settings: DicomImportSettings) -> _ReadCase:
    """Read a selected study: PET in SUV, CT in HU, the lesion mask; ``InputError`` naming the folder."""
    case = selection.case_id
    pet_stack = stack([i.path for i in selection.pet.instances], case, settings.slices)
    suv = suv_factors(pet_stack.headers, SuvOverrides(settings.weight_kg, settings.dose_bq), case,
                      selection.pet.folder_text)
    pet = read_pixels(pet_stack, suv.factors, case)
    ct_stack = stack([i.path for i in selection.ct.instances], case, settings.slices)
    ct = _ct_values(read_pixels(ct_stack, None, case))
    segmentation = None
    if selection.segmentation is not None:
        rule = LesionRoiRule.from_pattern(settings.roi)
        path = selection.segmentation.path
        if selection.segmentation.kind == "rtstruct":
            grids = {uid: ("PET", pet_stack.geometry) for uid in [selection.pet.uid, *pet_stack.sop_instance_uids]}
            grids.update({uid: ("CT", ct_stack.geometry) for uid in [selection.ct.uid, *ct_stack.sop_instance_uids]})
            segmentation = rtstruct_mask(path, pet_stack.geometry, grids, rule, case)
        else:
            segmentation = seg_mask(path, pet_stack.geometry, rule, case)
        if segmentation.mask is None:
            log.warning("%s: no lesion ROI/segment in %s (names: %s); no label written. Use --roi REGEX to "
                        "name the lesion ROIs", case, path, ", ".join(segmentation.left_out) or "none")
    return _ReadCase(selection, pet, pet_stack, suv, ct, ct_stack, segmentation)


def _series_record(series, slices: SliceStack) -> dict:
    return {
        "series_instance_uid": series.uid, "frame_of_reference_uid": series.frame_of_reference_uid,
        "description": series.first.description, "folders": [str(f) for f in series.folders],
        "files": [str(p.resolve()) for p in slices.paths], "sop_instance_uids": slices.sop_instance_uids,
        "geometry": slices.geometry, "max_slice_step_error_mm": slices.max_step_error_mm,
    }


def write_case(read: _ReadCase, root: Path, patient: str, study: str, settings: DicomImportSettings) -> ImportedCase:
    """Write one read study in ``settings.layout``; the ``.dicom.json`` record last."""
    selection = read.selection
    files = case_files(root, selection.case_id, patient, study, settings.layout)
    pet_geometry = read.pet_stack.geometry
    written = {"pet": files["pet"]}
    write_image(files["pet"], read.pet, pet_geometry)
    ct_image = read.ct_stack.geometry.image(read.ct)
    if settings.ctres and settings.layout == "autopet":
        written["ctres"] = files["ct"].with_name("CTres.nii.gz")
        write_image(written["ctres"], _ct_resampled(ct_image, pet_geometry), pet_geometry)
    if settings.ctres and settings.layout != "autopet":
        write_image(files["ct"], _ct_resampled(ct_image, pet_geometry), pet_geometry)
    else:
        write_image(files["ct"], read.ct, read.ct_stack.geometry)
    written["ct"] = files["ct"]
    if read.segmentation is not None and read.segmentation.mask is not None:
        write_image(files["label"], read.segmentation.mask, pet_geometry)
        written["label"] = files["label"]
    record = record_path(files["pet"])
    write_json(record, {
        "format": RECORD_FORMAT,
        "case_id": selection.case_id,
        "patient_id": selection.study.patient_id,
        "study_instance_uid": selection.study.uid,
        "study_date": selection.study.study_date,
        "files": {k: str(v.relative_to(root)) for k, v in written.items()},
        "suv": read.suv.audit,
        "pet": _series_record(selection.pet, read.pet_stack),
        "ct": {**_series_record(selection.ct, read.ct_stack), "ctres": settings.ctres},
        "segmentation": read.segmentation.record() if read.segmentation is not None else None,
        "choices": selection.notes,
    })
    return ImportedCase(selection.case_id, written, read.suv.factor, record)


def _ct_resampled(ct_image, pet_geometry: Geometry) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(resample_ct(ct_image, pet_geometry))


def import_dicom(dicom_root: str | Path, output_dir: str | Path,
                 settings: DicomImportSettings = DicomImportSettings()) -> ImportReport:
    """Import every PET study under ``dicom_root`` into ``output_dir`` (see the module doc)."""
    settings.validate()
    root = Path(output_dir)
    report = ImportReport(output_dir=root, layout=settings.layout)
    catalog = scan(dicom_root)
    studies = sorted(catalog.studies.values(), key=lambda s: (s.patient_id, s.study_date, s.uid))
    names = _case_ids(studies)
    pet_studies = 0
    for study in studies:
        patient, study_name = names[study.uid]
        case_id = f"{patient}_{study_name}"
        try:
            selection = select_study(study, settings.series, case_id)
            if selection is None:
                report.skipped.append(f"study {study.uid} (no PET) in {study.folder_text}")
                log.info("study %s of patient %s has no PET: skipped", study.uid, study.patient_id)
                continue
            pet_studies += 1
            read = read_case(selection, settings)
            case = write_case(read, root, patient, study_name, settings)
        except InputError as error:
            error = error.with_case(case_id)
            log.error("%s", error)
            report.failures.append(error)
            continue
        report.cases.append(case)
        log.info("%s: SUV factor %.6g (%s), %s", case_id, case.suv_factor, read.suv.audit.get("rule"),
                 "with lesion mask" if "label" in case.files else "no lesion mask")
    if pet_studies > 1 and (settings.weight_kg is not None or settings.dose_bq is not None):
        log.warning("--weight/--dose were applied to all %d PET studies", pet_studies)
    if pet_studies == 0 and not report.failures:
        report.failures.append(InputError(f"no PET study found ({catalog.n_files} file(s), {catalog.n_skipped} not "
                                          "DICOM images)", file=dicom_root))
    if settings.layout == "nnunet" and report.cases:
        n_cases = len(list((root / "imagesTr").glob("*_0001.nii.gz")))
        write_nnunet_dataset_json(root, n_cases, "imported from DICOM by autopetseg import-dicom")
    return report
