"""Walk a folder tree, read each DICOM header once and group the files by study and series.

Files that are not DICOM (or DICOMDIR indexes) are skipped. Only the attributes the import needs are
read (``HEADER_KEYWORDS``); an RTSTRUCT or SEG is read in full (no pixels) for the series and frame
of reference it refers to. Series are keyed by SeriesInstanceUID, so a folder may hold several
series and a series may span folders.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from autopetseg.data.dicom.dates import combine
from autopetseg.errors import InputError

log = logging.getLogger(__name__)

# SOP classes by what the import does with them.
PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
ENHANCED_PET_SOPS = ("1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.128.1")
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_SOPS = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
RTSTRUCT_SOP = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"

HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "FrameOfReferenceUID",
    "NumberOfFrames", "Units", "CorrectedImage", "ContentDate", "ContentTime", "StructureSetDate",
    "StructureSetTime", "InstanceNumber",
)


def series_kind(sop_class: str, modality: str, frames: int) -> str:
    """'pet', 'pet_enhanced', 'ct', 'ct_enhanced', 'rtstruct', 'seg' or 'other'."""
    if sop_class in ENHANCED_PET_SOPS or (modality == "PT" and frames > 1):
        return "pet_enhanced"
    if sop_class == PET_SOP:
        return "pet"
    if sop_class in ENHANCED_CT_SOPS or (sop_class == CT_SOP and frames > 1):
        return "ct_enhanced"
    if sop_class == CT_SOP:
        return "ct"
    if sop_class == RTSTRUCT_SOP:
        return "rtstruct"
    if sop_class == SEG_SOP:
        return "seg"
    return "other"


@dataclass(frozen=True)
class Instance:
    """One DICOM file's header fields that decide where it goes."""

    path: Path
    kind: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    study_date: str
    frame_of_reference_uid: str
    series_time: datetime | None  # SeriesDate + SeriesTime
    content_time: datetime | None  # when an RTSTRUCT/SEG was made (structure set or content date-time)
    description: str
    units: str
    corrected_image: tuple[str, ...]
    referenced_series: tuple[str, ...] = ()  # RTSTRUCT/SEG: the image series it was drawn on


@dataclass
class Series:
    """The files of one SeriesInstanceUID."""

    uid: str
    kind: str  # series_kind(), or "mixed" when the files of one UID are of several kinds
    instances: list[Instance] = field(default_factory=list)

    @property
    def kinds(self) -> set[str]:
        return {i.kind for i in self.instances}

    @property
    def first(self) -> Instance:
        return self.instances[0]

    @property
    def folders(self) -> list[Path]:
        return sorted({i.path.parent for i in self.instances})

    @property
    def folder_text(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    @property
    def frame_of_reference_uid(self) -> str:
        return self.first.frame_of_reference_uid

    @property
    def time(self) -> datetime | None:
        return self.first.series_time

    def summary(self) -> str:
        """One line a user can recognise the series by."""
        parts = [f"series {self.uid}", f"{len(self.instances)} file(s)"]
        if self.first.description:
            parts.append(repr(self.first.description))
        if self.first.units:
            parts.append(f"units {self.first.units}")
        if self.time is not None:
            parts.append(self.time.isoformat(sep=" "))
        return ", ".join(parts) + f" in {self.folder_text}"


@dataclass
class Study:
    """The series of one StudyInstanceUID."""

    uid: str
    patient_id: str
    study_date: str
    series: dict[str, Series] = field(default_factory=dict)

    def of_kind(self, *kinds: str) -> list[Series]:
        return [s for s in self.series.values() if s.kind in kinds]

    @property
    def folder_text(self) -> str:
        return ", ".join(sorted({str(f) for s in self.series.values() for f in s.folders}))


@dataclass
class Catalog:
    """What a walk found: studies by UID."""

    root: Path
    studies: dict[str, Study] = field(default_factory=dict)
    n_files: int = 0
    n_skipped: int = 0  # not DICOM, or a DICOMDIR


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _referenced_series(ds) -> tuple[tuple[str, ...], str]:
    """(series UIDs an RTSTRUCT/SEG refers to, its frame of reference UID)."""
    series: list[str] = []
    frame = _text(ds, "FrameOfReferenceUID")
    for ref_frame in ds.get("ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT
        frame = frame or _text(ref_frame, "FrameOfReferenceUID")
        for study in ref_frame.get("RTReferencedStudySequence", []):
            series += [_text(s, "SeriesInstanceUID") for s in study.get("RTReferencedSeriesSequence", [])]
    series += [_text(s, "SeriesInstanceUID") for s in ds.get("ReferencedSeriesSequence", [])]  # SEG
    return tuple(s for s in series if s), frame


def open_dicom(path: Path, **options):
    """``pydicom.dcmread``, also for old files without the 128-byte preamble and 'DICM' prefix when
    they start with a group 0002 or 0008 element (anything else raises ``InvalidDicomError``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, **options)
    except InvalidDicomError:
        with open(path, "rb") as handle:
            start = handle.read(2)
        if start not in (b"\x02\x00", b"\x08\x00"):
            raise
        return pydicom.dcmread(path, force=True, **options)


def read_instance(path: Path) -> Instance | None:
    """The header of one file; ``None`` for a file that is not a DICOM object we can use."""
    try:
        ds = open_dicom(path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    except Exception:  # not DICOM, or too damaged to read: counted as skipped in the log
        return None
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class or not _text(ds, "SeriesInstanceUID"):
        return None  # a DICOMDIR or another non-image object without a series
    frames = int(ds.get("NumberOfFrames") or 1)
    kind = series_kind(sop_class, _text(ds, "Modality"), frames)
    referenced, frame = (), _text(ds, "FrameOfReferenceUID")
    if kind in ("rtstruct", "seg"):
        referenced, frame = _referenced_series(open_dicom(path, stop_before_pixels=True))
    corrected = ds.get("CorrectedImage") or ()
    corrected = (corrected,) if isinstance(corrected, str) else tuple(str(c) for c in corrected)
    made = combine(ds.get("StructureSetDate"), ds.get("StructureSetTime")) or combine(
        ds.get("ContentDate"), ds.get("ContentTime"))
    return Instance(
        path=path, kind=kind, sop_instance_uid=_text(ds, "SOPInstanceUID"), study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"), patient_id=_text(ds, "PatientID"),
        study_date=_text(ds, "StudyDate"), frame_of_reference_uid=frame,
        series_time=combine(ds.get("SeriesDate"), ds.get("SeriesTime")), content_time=made,
        description=_text(ds, "SeriesDescription"), units=_text(ds, "Units").upper(), corrected_image=corrected,
        referenced_series=referenced,
    )


def scan(root: str | Path) -> Catalog:
    """Every DICOM file under ``root``, grouped by study and series (files in sorted path order)."""
    root = Path(root).resolve()  # the JSON and the messages name absolute folders
    if not root.is_dir():
        raise InputError("DICOM folder does not exist", file=root)
    catalog = Catalog(root=root)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            catalog.n_files += 1
            instance = read_instance(Path(folder) / name)
            if instance is None:
                catalog.n_skipped += 1
                continue
            study = catalog.studies.setdefault(
                instance.study_uid, Study(instance.study_uid, instance.patient_id, instance.study_date))
            series = study.series.setdefault(instance.series_uid, Series(instance.series_uid, instance.kind))
            series.instances.append(instance)
    for study in catalog.studies.values():
        for series in study.series.values():
            if len(series.kinds) > 1:
                series.kind = "mixed"
    log.info("import-dicom: %d file(s) under %s, %d not DICOM images; %d study(ies)",
             catalog.n_files, root, catalog.n_skipped, len(catalog.studies))
    return catalog
