"""Small DICOM objects written with pydicom for the import-dicom and SEG export tests.

``pet_headers_from_json`` turns the header sets of ``realdata/calculate_suv_metadata`` (DICOM
keywords, plus the Philips and GE private values under their own names) into pydicom Datasets, so
the golden factors run through the same tag reading as real files. ``write_series`` writes a
single-frame PET or CT series of a volume (z, y, x) with an identity or given orientation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

pydicom = __import__("pytest").importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
_RADIOPHARMACEUTICAL = ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
                        "RadiopharmaceuticalStartDateTime")


def pet_header(fields: dict) -> Dataset:
    """A PET header from keyword → value; radiopharmaceutical keywords go into their sequence;
    ``PhilipsPETPrivateGroup`` {SUVScaleFactor, ActivityConcentrationScaleFactor} and
    ``GEPrivatePostInjectionDateTime`` become the vendors' private elements."""
    ds = Dataset()
    item = Dataset()
    for key, value in fields.items():
        if value is None:
            continue
        if key in _RADIOPHARMACEUTICAL:
            setattr(item, key, value)
        elif key == "PhilipsPETPrivateGroup":
            if value:
                block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
                if "SUVScaleFactor" in value:
                    block.add_new(0x00, "DS", str(value["SUVScaleFactor"]).strip())
                if "ActivityConcentrationScaleFactor" in value:
                    block.add_new(0x09, "DS", str(value["ActivityConcentrationScaleFactor"]).strip())
        elif key == "GEPrivatePostInjectionDateTime":
            ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", value)
        else:
            setattr(ds, key, value)
    if len(item):
        ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    return ds


def pet_headers_from_json(instances: list[dict]) -> list[Dataset]:
    return [pet_header(instance) for instance in instances]


def write_series(folder: Path, volume: np.ndarray, *, modality: str, spacing_zyx=(3.0, 4.0, 4.0),
                 origin_xyz=(-30.0, -30.0, -100.0), study_uid: str, frame_uid: str, series_uid: str | None = None,
                 header: dict | None = None, slopes=None, intercept: float = 0.0, series_time: str = "101500",
                 patient_id: str = "PAT1", order=None, orientation=(1, 0, 0, 0, 1, 0), jitter_mm=None) -> list[Path]:
    """Write ``volume`` (z, y, x) as one file per slice; stored = round((value - intercept) / slope) as int16.

    ``slopes``: one per slice (default: each slice's max / 32000 for PET, 1 for CT). ``order``: the
    order the files are named in (default reversed, so readers must sort by position).
    ``orientation``: ImageOrientationPatient; slice k lies at origin + (k × spacing + jitter_mm[k]) along
    its normal.
    """
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n = volume.shape[0]
    if slopes is None:
        slopes = [max(float(np.abs(s).max()), 1.0) / 32000.0 for s in volume] if modality == "PT" else [1.0] * n
    paths = []
    order = list(range(n))[::-1] if order is None else order
    for rank, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = PET_SOP if modality == "PT" else CT_SOP
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.Modality = modality
        ds.PatientID, ds.PatientName = patient_id, "Test^Patient"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "20200102", "100000", "20200102", series_time
        ds.AcquisitionDate, ds.AcquisitionTime = "20200102", series_time
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1 if modality == "PT" else 2, k + 1
        ds.Manufacturer = "autopetseg tests"
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        along = k * spacing_zyx[0] + (float(jitter_mm[k]) if jitter_mm is not None else 0.0)
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin_xyz, float) + along * normal]
        ds.PixelSpacing = [spacing_zyx[1], spacing_zyx[2]]
        ds.SliceThickness = spacing_zyx[0]
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slopes[k]:.10g}", intercept
        stored = np.round((volume[k] - intercept) / float(f"{slopes[k]:.10g}")).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if modality == "PT":
            for key, value in {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
                               "PatientWeight": 70, "RadionuclideTotalDose": 3.5e8, "RadionuclideHalfLife": 6588,
                               "RadiopharmaceuticalStartTime": "091500", **(header or {})}.items():
                if key in _RADIOPHARMACEUTICAL:
                    if "RadiopharmaceuticalInformationSequence" not in ds:
                        ds.RadiopharmaceuticalInformationSequence = Sequence([Dataset()])
                    if value is not None:
                        setattr(ds.RadiopharmaceuticalInformationSequence[0], key, value)
                elif value is not None:
                    setattr(ds, key, value)
        path = folder / f"{rank:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_rtstruct(path: Path, rois: dict[str, list[np.ndarray]], *, study_uid: str, frame_uid: str,
                   referenced_series_uid: str, patient_id: str = "PAT1") -> Path:
    """An RTSTRUCT with closed planar contours: ROI name → list of (n, 3) point arrays in mm."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study_uid, generate_uid()
    ds.StudyDate, ds.SeriesDate, ds.StructureSetDate, ds.StructureSetTime = "20200102", "20200102", "20200103", "090000"
    series = Dataset()
    series.SeriesInstanceUID = referenced_series_uid
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame_uid
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence()
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [float(v) for v in np.asarray(points).reshape(-1)]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def square(x0, x1, y0, y1, z) -> np.ndarray:
    """A closed square contour (mm) in the plane z."""
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def read_seg_independently(path: Path, geometry) -> np.ndarray:
    """A binary DICOM SEG's voxels on ``geometry`` (z, y, x), with pydicom only: each frame's
    ImagePositionPatient is mapped to the nearest slice of the grid (no highdicom involved). Frames
    lie on their source slices, which may sit a little off an evenly spaced grid (up to the 10 % of a
    step that import-dicom accepts), so a quarter step is allowed; in-plane they must match."""
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    direction = np.asarray(geometry.direction).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(geometry.spacing_zyx[::-1]))
    out = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        x, y, z = to_index @ (position - np.asarray(geometry.origin_xyz))
        assert abs(x) < 1e-3 and abs(y) < 1e-3 and abs(z - round(z)) < 0.25
        out[int(round(z))] |= frame.astype(np.uint8)
    return out


def phantom_study(root: Path, *, patient_id: str = "PAT1", pet_shape=(12, 16, 16), lesion=True, header=None,
                  with_ct=True) -> dict:
    """A small PET/CT study with SUV-like values: body 0.5 SUV, a lesion of 8 SUV, CT 20 HU in the
    body (−1000 outside), PET 4 mm, CT 2.5 × 2 × 2 mm covering more than the PET. Returns the UIDs,
    the PET in Bq/ml and the SUV factor the default header gives (70 kg, 350 MBq, 1 h)."""
    study, frame, pet_series = generate_uid(), generate_uid(), generate_uid()
    factor = 70_000 / (3.5e8 * 2.0 ** (-3600 / 6588))
    nz, ny, nx = pet_shape
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in pet_shape], indexing="ij")
    body = ((yy - ny / 2 + 0.5) / (ny * 0.42)) ** 2 + ((xx - nx / 2 + 0.5) / (nx * 0.42)) ** 2 <= 1
    pet_suv = np.where(body, 0.5, 0.01)
    lesion_box = (slice(nz // 2 - 1, nz // 2 + 2), slice(ny // 2 - 2, ny // 2 + 1), slice(nx // 2, nx // 2 + 3))
    if lesion:
        pet_suv[lesion_box] = 8.0
    pet_bq = pet_suv / factor
    write_series(root / f"{patient_id}_pet", pet_bq, modality="PT", spacing_zyx=(4.0, 4.0, 4.0),
                 origin_xyz=(-32.0, -32.0, -100.0), study_uid=study, frame_uid=frame, series_uid=pet_series,
                 header=header, patient_id=patient_id)
    ct_series = None
    if with_ct:
        ct_series = generate_uid()
        cz, cy, cx = int(nz * 4 / 2.5) + 4, ny * 2 + 8, nx * 2 + 8
        yy, xx = np.meshgrid(np.arange(cy), np.arange(cx), indexing="ij")
        ct_body = ((yy - cy / 2) / (cy * 0.4)) ** 2 + ((xx - cx / 2) / (cx * 0.4)) ** 2 <= 1
        ct = np.broadcast_to(np.where(ct_body, 20.0, -1000.0), (cz, cy, cx))
        write_series(root / f"{patient_id}_ct", ct, modality="CT", spacing_zyx=(2.5, 2.0, 2.0),
                     origin_xyz=(-40.0, -40.0, -105.0), study_uid=study, frame_uid=frame, series_uid=ct_series,
                     intercept=-1024.0, patient_id=patient_id, series_time="100500")
    return {"study": study, "frame": frame, "pet_series": pet_series, "ct_series": ct_series, "pet_bq": pet_bq,
            "pet_suv": pet_suv, "factor": factor, "lesion_box": lesion_box}


def realdata(*parts) -> Path:
    """A path under ``shared/realdata``; skips the calling test when it is absent."""
    from _image_helpers import shared_dir

    shared = shared_dir()
    path = shared.joinpath("realdata", *parts) if shared else None
    if path is None or not path.exists():
        __import__("pytest").skip("shared/realdata not found")
    return path
