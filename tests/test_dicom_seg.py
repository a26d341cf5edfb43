"""``predict --dicom-seg``: a DICOM SEG of the mask, referencing the source PET series, that reads back
(pydicom alone, frame positions mapped to the grid) to the NIfTI mask's voxels; and the SEG as an
input of ``import-dicom``. The real-data test runs the chain on MIRP's STS_001 (skipped without it)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
import pydicom  # noqa: E402
from _dicom_helpers import phantom_study, read_seg_independently, write_series  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from _image_helpers import read, shared_dir  # noqa: E402
from test_predict import registered, write_constant_model  # noqa: E402,F401  (fixture and model folder)

from autopetseg.cli import main  # noqa: E402
from autopetseg.data.dicom.importer import import_dicom  # noqa: E402
from autopetseg.data.discovery import discover  # noqa: E402
from autopetseg.data.imageio import Geometry, read_image  # noqa: E402
from autopetseg.errors import InputError  # noqa: E402
from autopetseg.inference.dicom_seg import dicom_seg_path, write_case_seg  # noqa: E402


def imported_case(tmp_path):
    truth = phantom_study(tmp_path / "dicom")
    import_dicom(tmp_path / "dicom", tmp_path / "cases")
    record = discover(tmp_path / "cases").cases[0]
    return truth, record, Geometry.of(read_image(record.pet))


def test_seg_reads_back_to_the_mask_and_references_the_pet_series(tmp_path):
    truth, record, geometry = imported_case(tmp_path)
    rng = np.random.default_rng(0)
    mask = (rng.random(geometry.shape_zyx) > 0.97).astype(np.uint8)
    mask[truth["lesion_box"]] = 1
    mask[0] = 0  # an empty slice: its frame is left out
    path = write_case_seg(tmp_path / "pred", record, mask, geometry)
    assert path == dicom_seg_path(tmp_path / "pred", record.case_id)
    np.testing.assert_array_equal(read_seg_independently(path, geometry), mask)
    seg = pydicom.dcmread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == truth["pet_series"]
    assert seg.FrameOfReferenceUID == truth["frame"] and seg.StudyInstanceUID == truth["study"]
    assert int(seg.NumberOfFrames) == int(mask.any(axis=(1, 2)).sum())
    source_uids = {pydicom.dcmread(f).SOPInstanceUID for f in (tmp_path / "dicom" / "PAT1_pet").iterdir()}
    derived = {group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
               for group in seg.PerFrameFunctionalGroupsSequence}
    assert derived <= source_uids and len(derived) == seg.NumberOfFrames
    # highdicom's own reader agrees
    import highdicom as hd

    volume = hd.seg.segread(path).get_volume(combine_segments=True)  # the frames that hold voxels
    assert volume.spatial_shape == (int(mask.any(axis=(1, 2)).sum()), *geometry.shape_zyx[1:])
    assert int(volume.array.sum()) == int(mask.sum())


def test_frames_lie_on_their_source_slices_when_steps_are_uneven(tmp_path):
    """Like MIRP's STS_001 (steps 3.19-3.29 mm): the NIfTI grid has the mean step, the SEG frames the
    positions of the slices they are derived from."""
    jitter = np.array([0.0, 0.06, -0.05, 0.08, 0.0, -0.07, 0.03, 0.0])
    files = write_series(tmp_path / "dicom" / "pet", np.full((8, 6, 6), 1000.0), modality="PT",
                         spacing_zyx=(3.27, 4.0, 4.0), study_uid=generate_uid(), frame_uid=generate_uid(),
                         jitter_mm=jitter, header={"Units": "GML"})
    write_series(tmp_path / "dicom" / "ct", np.zeros((12, 8, 8)), modality="CT", spacing_zyx=(3.0, 4.0, 4.0),
                 origin_xyz=(-34.0, -34.0, -104.0), study_uid=pydicom.dcmread(files[0]).StudyInstanceUID,
                 frame_uid=pydicom.dcmread(files[0]).FrameOfReferenceUID)
    import_dicom(tmp_path / "dicom", tmp_path / "cases")
    record = discover(tmp_path / "cases").cases[0]
    geometry = Geometry.of(read_image(record.pet))
    mask = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    mask[:, 2:4, 1:5] = 1
    path = write_case_seg(tmp_path / "pred", record, mask, geometry)
    np.testing.assert_array_equal(read_seg_independently(path, geometry), mask)
    headers = [pydicom.dcmread(f) for f in files]
    source_z = {str(h.SOPInstanceUID): float(h.ImagePositionPatient[2]) for h in headers}
    for group in pydicom.dcmread(path).PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert float(group.PlanePositionSequence[0].ImagePositionPatient[2]) == pytest.approx(source_z[uid], abs=1e-4)


def test_an_empty_mask_keeps_every_frame(tmp_path):
    _, record, geometry = imported_case(tmp_path)
    mask = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    path = write_case_seg(tmp_path / "pred", record, mask, geometry)
    assert int(pydicom.dcmread(path).NumberOfFrames) == geometry.shape_zyx[0]
    np.testing.assert_array_equal(read_seg_independently(path, geometry), mask)


def test_an_exported_seg_is_a_lesion_label_on_import(tmp_path):
    truth, record, geometry = imported_case(tmp_path)
    mask = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    mask[truth["lesion_box"]] = 1
    shutil.copy(write_case_seg(tmp_path / "pred", record, mask, geometry), tmp_path / "dicom" / "seg.dcm")
    report = import_dicom(tmp_path / "dicom", tmp_path / "again")
    np.testing.assert_array_equal(read(discover(tmp_path / "again").cases[0].label), mask)
    assert report.cases[0].files["label"].name == "SEG.nii.gz"


def test_a_case_without_dicom_source_or_with_another_grid_is_an_input_error(tmp_path):
    _, record, geometry = imported_case(tmp_path)
    shifted = Geometry(geometry.shape_zyx, geometry.spacing_zyx, (0.0, 0.0, 0.0), geometry.direction)
    with pytest.raises(InputError, match="not the grid of the source PET series"):
        write_case_seg(tmp_path / "pred", record, np.zeros(geometry.shape_zyx, np.uint8), shifted)
    (record.pet.parent / "SUV.dicom.json").unlink()
    with pytest.raises(InputError, match="no DICOM source"):
        write_case_seg(tmp_path / "pred", record, np.zeros(geometry.shape_zyx, np.uint8), geometry)


def test_predict_dicom_seg_matches_the_nifti_mask_and_names_cases_without_source(tmp_path, registered, capsys):
    phantom_study(tmp_path / "dicom")
    assert main(["import-dicom", str(tmp_path / "dicom"), "-o", str(tmp_path / "cases")]) == 0
    plain = tmp_path / "cases" / "PLAIN" / "study"  # a NIfTI case that did not come from DICOM
    shutil.copytree(tmp_path / "cases" / "PAT1" / "20200102", plain)
    (plain / "SUV.dicom.json").unlink()
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {0: None})
    code = main(["predict", "-i", str(tmp_path / "cases"), "-o", str(tmp_path / "pred"), "-m", str(model),
                 "--device", "cpu", "--dicom-seg"])
    err = capsys.readouterr().err
    assert code == 1 and "case 'PLAIN_study'" in err and "no DICOM source" in err
    nifti = tmp_path / "pred" / "PAT1_20200102.nii.gz"
    mask = read(nifti)
    assert mask.any()
    np.testing.assert_array_equal(read_seg_independently(tmp_path / "pred" / "PAT1_20200102_seg.dcm",
                                                         Geometry.of(sitk.ReadImage(str(nifti)))), mask)
    assert (tmp_path / "pred" / "PLAIN_study.nii.gz").is_file()  # the mask is written; only the SEG failed
    assert not (tmp_path / "pred" / "PLAIN_study_seg.dcm").exists()


@pytest.mark.realdata
def test_sts001_chain_import_predict_seg(tmp_path, registered):
    """STS_001's real PET (the cropped GML series), its real CT crop written as a CT series in the same
    study and frame of reference, and its RTSTRUCT: import → predict --dicom-seg → SEG == NIfTI mask."""
    shared = shared_dir()
    sts = shared / "realdata" / "mirp_sts" if shared else None
    if sts is None or not (sts / "cropped" / "STS_001" / "PET" / "dicom_SUV_GML").is_dir():
        pytest.skip("shared/realdata/mirp_sts not found")
    dicom = tmp_path / "dicom"
    shutil.copytree(sts / "cropped" / "STS_001" / "PET" / "dicom_SUV_GML", dicom / "pet")
    shutil.copy(sts / "cropped" / "STS_001" / "PET" / "dicom_RTSTRUCT.dcm", dicom / "rtstruct.dcm")
    pet_header = pydicom.dcmread(next((dicom / "pet").iterdir()), stop_before_pixels=True)
    ct = sitk.ReadImage(str(sts / "cropped" / "STS_001" / "CT" / "image.nii.gz"))
    write_series(dicom / "ct", sitk.GetArrayFromImage(ct).astype(np.float64), modality="CT",
                 spacing_zyx=ct.GetSpacing()[::-1], origin_xyz=ct.GetOrigin(), study_uid=pet_header.StudyInstanceUID,
                 frame_uid=pet_header.FrameOfReferenceUID, patient_id="STS_001", intercept=-1024.0)
    assert main(["import-dicom", str(dicom), "-o", str(tmp_path / "cases")]) == 0
    case = discover(tmp_path / "cases").cases[0]
    np.testing.assert_allclose(read(case.pet), read(sts / "cropped" / "STS_001" / "PET" / "image.nii.gz"),
                               rtol=1e-6, atol=1e-6)  # GML passes through
    np.testing.assert_array_equal(read(case.label), read(sts / "cropped" / "STS_001" / "PET" / "mask.nii.gz"))
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {0: None})
    assert main(["predict", "-i", str(tmp_path / "cases"), "-o", str(tmp_path / "pred"), "-m", str(model),
                 "--device", "cpu", "--dicom-seg"]) == 0
    nifti = tmp_path / "pred" / f"{case.case_id}.nii.gz"
    mask = read(nifti)
    assert mask.any()
    np.testing.assert_array_equal(read_seg_independently(tmp_path / "pred" / f"{case.case_id}_seg.dcm",
                                                         Geometry.of(sitk.ReadImage(str(nifti)))), mask)
