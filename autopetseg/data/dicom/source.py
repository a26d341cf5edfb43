"""``<PET>.dicom.json``: what ``import-dicom`` made a case from, beside the case's PET file.

It holds the SUV factor and every tag it came from (the audit), the PET series' files in slice order
with their SOP instance UIDs and grid, the CT series, the segmentation used and any choice made
among candidates. ``predict --dicom-seg`` reads it to reference the source PET series.
"""

from __future__ import annotations

from pathlib import Path

from autopetseg.data.imageio import Geometry, strip_image_suffix
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.io_utils import read_json

RECORD_SUFFIX = ".dicom.json"
RECORD_FORMAT = "autopetseg-dicom-import/1"


def record_path(pet_file: str | Path) -> Path:
    """``.../SUV.nii.gz`` → ``.../SUV.dicom.json``."""
    pet_file = Path(pet_file)
    stem = strip_image_suffix(pet_file.name) or pet_file.stem
    return pet_file.with_name(stem + RECORD_SUFFIX)


def read_source(record: CaseRecord) -> dict:
    """The import record of a case; ``InputError`` when the case did not come from ``import-dicom``."""
    if record.pet is None:
        raise InputError("no PET file, so no DICOM source", record.case_id)
    path = record_path(record.pet)
    if not path.is_file():
        raise InputError(f"no DICOM source for this case ({path.name} is missing beside its PET): a DICOM SEG "
                         "needs the PET series the case was imported from with `autopetseg import-dicom`",
                         record.case_id, path)
    try:
        source = read_json(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable DICOM import record ({exc})", record.case_id, path) from None
    if source.get("format") != RECORD_FORMAT:
        raise InputError(f"not an import-dicom record (format {source.get('format')!r})", record.case_id, path)
    return source


def source_pet_files(source: dict, case: str) -> tuple[list[Path], Geometry]:
    """The PET series' files in slice order and the grid the import gave it; a missing file is an ``InputError``."""
    files = [Path(f) for f in source["pet"]["files"]]
    for path in files:
        if not path.is_file():
            raise InputError("a file of the source PET series is missing (moved or deleted since the import)",
                             case, path)
    return files, Geometry.from_dict(source["pet"]["geometry"])
