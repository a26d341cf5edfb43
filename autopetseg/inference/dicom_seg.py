"""``predict --dicom-seg``: the predicted mask as a DICOM Segmentation (highdicom) that references the
source PET series of a case made by ``import-dicom``.

The case's ``<PET>.dicom.json`` lists the PET series' files in slice order and the grid the import
gave them; the mask lies on exactly that grid (the predictor writes every mask on the PET grid), so
frame k of the SEG is derived from source slice k. A binary SEG with one segment ("lesion",
Morphologically Abnormal Structure / Neoplasm, automatic, by an AI algorithm); empty frames are left
out (an all-empty mask keeps every frame, so the object still opens). Written atomically to
``<output>/<case>_seg.dcm``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autopetseg import __version__
from autopetseg.data.dicom.catalog import open_dicom
from autopetseg.data.dicom.source import read_source, source_pet_files
from autopetseg.data.imageio import Geometry
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path

log = logging.getLogger(__name__)

SEG_SUFFIX = "_seg.dcm"


@dataclass(frozen=True)
class SegExportSettings:
    """What the SEG object says about itself."""

    segment_label: str = "lesion"
    series_description: str = "autopetseg lesions"
    series_number: int = 901
    manufacturer: str = "autopetseg"
    model_name: str = "autopetseg predict"
    algorithm_name: str = "autopetseg"


def dicom_seg_path(output_dir: str | Path, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}{SEG_SUFFIX}"


def build_segmentation(mask: np.ndarray, source_images: list, settings: SegExportSettings = SegExportSettings()):
    """A highdicom Segmentation of ``mask`` (z, y, x), frame k on ``source_images[k]``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=settings.algorithm_name, version=__version__, family=codes.DCM.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=settings.segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    return hd.seg.Segmentation(
        source_images=source_images, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=settings.series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.model_name, software_versions=__version__, device_serial_number="none",
        series_description=settings.series_description, omit_empty_frames=bool(mask.any()),
    )


def write_case_seg(output_dir: str | Path, record: CaseRecord, mask: np.ndarray, geometry: Geometry,
                   settings: SegExportSettings = SegExportSettings()) -> Path:
    """Write ``<output>/<case>_seg.dcm``; ``InputError`` for a case without a DICOM source."""
    source = read_source(record)
    files, source_geometry = source_pet_files(source, record.case_id)
    if not geometry.same_grid(source_geometry):
        raise InputError(f"the mask's grid {geometry.shape_zyx} @ {geometry.spacing_zyx} mm is not the grid of the "
                         "source PET series; was the PET changed after import-dicom?", record.case_id, record.pet)
    headers = [open_dicom(path, stop_before_pixels=True) for path in files]
    uids = [str(h.SOPInstanceUID) for h in headers]
    if uids != source["pet"]["sop_instance_uids"]:
        raise InputError("the source PET files no longer hold the imported series (SOP instance UIDs differ)",
                         record.case_id, files[0].parent)
    if logging.getLogger("highdicom").level == logging.NOTSET:
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # not a line per copied DICOM module
    try:
        segmentation = build_segmentation(mask, headers, settings)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source headers
        raise InputError(f"cannot build a DICOM SEG on the source PET series ({exc})", record.case_id,
                         files[0].parent) from None
    path = dicom_seg_path(output_dir, record.case_id)
    with atomic_path(path, ".dcm") as tmp:
        segmentation.save_as(tmp)
    log.info("%s: DICOM SEG (%d frame(s)) referencing PET series %s -> %s", record.case_id,
             int(segmentation.NumberOfFrames), source["pet"]["series_instance_uid"], path)
    return path
