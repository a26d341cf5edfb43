"""``autopetseg import-dicom`` on small DICOM studies written with pydicom: SUV, geometry, layouts,
RTSTRUCT masks, candidate choice, and bad studies reported while the others are imported."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
from _dicom_helpers import phantom_study, square, write_rtstruct, write_series  # noqa: E402
from _image_helpers import read  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from autopetseg.cli import main  # noqa: E402
from autopetseg.data.dicom.importer import DicomImportSettings, import_dicom  # noqa: E402
from autopetseg.data.dicom.source import record_path  # noqa: E402
from autopetseg.data.dicom.volume import stack  # noqa: E402
from autopetseg.data.discovery import discover  # noqa: E402
from autopetseg.data.imageio import Geometry  # noqa: E402


def sitk_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("layout", ["autopet", "nnunet", "flat"])
def test_a_study_becomes_a_case_in_each_layout(tmp_path, layout):
    truth = phantom_study(tmp_path / "dicom")
    report = import_dicom(tmp_path / "dicom", tmp_path / "cases", DicomImportSettings(layout=layout))
    assert report.failures == [] and [c.case_id for c in report.cases] == ["PAT1_20200102"]
    case = discover(tmp_path / "cases").cases[0]
    assert case.case_id == "PAT1_20200102" and case.label is None
    # SUV: each slice's stored value × its slope × the factor; within the int16 quantisation of the writer
    np.testing.assert_allclose(read(case.pet), truth["pet_suv"], rtol=1e-4, atol=1e-4)
    assert Geometry.of(sitk.ReadImage(str(case.pet))) == Geometry.of(sitk_series(tmp_path / "dicom" / "PAT1_pet"))
    ct_dicom = sitk_series(tmp_path / "dicom" / "PAT1_ct")
    assert read(case.ct).dtype == np.int16
    np.testing.assert_array_equal(read(case.ct), sitk.GetArrayFromImage(ct_dicom))
    record = json.loads(record_path(case.pet).read_text())
    assert record["suv"]["factor"] == pytest.approx(truth["factor"], rel=1e-12)
    assert float(record["suv"]["tags"]["PatientWeight (0010,1030)"]) == 70
    assert record["pet"]["series_instance_uid"] == truth["pet_series"] and len(record["pet"]["files"]) == 12
    positions = [stack([f]).geometry.origin_xyz[2] for f in record["pet"]["files"]]
    assert positions == sorted(positions)  # files listed in slice order, whatever their names
    if layout == "nnunet":
        assert json.loads((tmp_path / "cases" / "dataset.json").read_text())["numTraining"] == 1


def test_ctres_puts_the_ct_on_the_pet_grid(tmp_path):
    phantom_study(tmp_path / "dicom")
    import_dicom(tmp_path / "dicom", tmp_path / "autopet", DicomImportSettings(ctres=True))
    folder = tmp_path / "autopet" / "PAT1" / "20200102"
    pet, ctres = sitk.ReadImage(str(folder / "SUV.nii.gz")), sitk.ReadImage(str(folder / "CTres.nii.gz"))
    assert Geometry.of(ctres) == Geometry.of(pet) and (folder / "CT.nii.gz").is_file()
    assert discover(tmp_path / "autopet").cases[0].ct.name == "CTres.nii.gz"
    import_dicom(tmp_path / "dicom", tmp_path / "flat", DicomImportSettings(layout="flat", ctres=True))
    assert Geometry.of(sitk.ReadImage(str(tmp_path / "flat" / "PAT1_20200102_ct.nii.gz"))) == Geometry.of(pet)


def test_each_slice_keeps_its_own_rescale_slope(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.uniform(0, 1, (5, 6, 7)) * np.array([1, 10, 100, 1000, 10000])[:, None, None]
    files = write_series(tmp_path / "s", volume, modality="PT", study_uid=generate_uid(), frame_uid=generate_uid(),
                         header={"Units": "GML"})
    from autopetseg.data.dicom.volume import read_pixels

    values = read_pixels(stack(files))
    assert values.dtype == np.float32
    slice_max = volume.max(axis=(1, 2), keepdims=True)
    assert (np.abs(values - volume) <= 1e-4 * slice_max).all()  # one stored step is max / 32000


def test_an_oblique_series_lands_where_simpleitk_puts_it(tmp_path):
    angle = np.deg2rad(20)
    orientation = (np.cos(angle), np.sin(angle), 0.0, 0.0, 0.0, -1.0)  # a tilted coronal series
    files = write_series(tmp_path / "s", np.ones((4, 5, 6)), modality="PT", study_uid=generate_uid(),
                         frame_uid=generate_uid(), orientation=orientation, origin_xyz=(10.0, -20.0, 30.0))
    ours, theirs = stack(files).geometry, Geometry.of(sitk_series(tmp_path / "s"))
    assert ours.shape_zyx == theirs.shape_zyx
    np.testing.assert_allclose(ours.spacing_zyx, theirs.spacing_zyx, atol=1e-6)
    np.testing.assert_allclose(ours.origin_xyz, theirs.origin_xyz, atol=1e-6)
    np.testing.assert_allclose(ours.direction, theirs.direction, atol=1e-6)


def test_rtstruct_lesion_rois_with_a_hole_become_the_label(tmp_path):
    truth = phantom_study(tmp_path / "dicom", lesion=False)
    z = -100.0 + 4 * 5  # PET slice 5; voxel centres at -32 + 4 i
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", {
        "GTV lesion": [square(-10, 10, -10, 10, z), square(-2, 2, -2, 2, z)],  # 5×5 voxels with a 1-voxel hole
        "Edema": [square(-30, 30, -30, 30, z)],
    }, study_uid=truth["study"], frame_uid=truth["frame"], referenced_series_uid=truth["pet_series"])
    report = import_dicom(tmp_path / "dicom", tmp_path / "cases")
    label = read(discover(tmp_path / "cases").cases[0].label)
    want = np.zeros(label.shape, dtype=np.uint8)
    want[5, 6:11, 6:11] = 1  # centres -8 .. 8 mm
    want[5, 8, 8] = 0
    np.testing.assert_array_equal(label, want)
    record = json.loads(report.cases[0].record.read_text())["segmentation"]
    assert record["lesion_names"] == ["GTV lesion"] and record["other_names"] == ["Edema"]
    import_dicom(tmp_path / "dicom", tmp_path / "edema", DicomImportSettings(roi="edema"))
    assert read(discover(tmp_path / "edema").cases[0].label).sum() == 15 * 15 - 0  # -28 .. 28 mm


def test_contours_drawn_on_the_ct_are_filled_there_and_mapped_to_the_pet(tmp_path):
    truth = phantom_study(tmp_path / "dicom", lesion=False)
    z = -105.0 + 2.5 * 8  # CT slice 8 (-85 mm), which is PET slice 3.75: not on the PET grid
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", {"tumour": [square(-10, 10, -10, 10, z)]},
                   study_uid=truth["study"], frame_uid=truth["frame"], referenced_series_uid=truth["ct_series"])
    import_dicom(tmp_path / "dicom", tmp_path / "cases")
    label = read(discover(tmp_path / "cases").cases[0].label)
    assert label.sum() > 0 and set(np.nonzero(label)[0]) == {4}  # nearest PET slice to -85 mm is -84 mm


def test_bad_studies_are_named_and_the_good_ones_imported(tmp_path, capsys):
    root = tmp_path / "dicom"
    phantom_study(root, patient_id="GOOD")
    phantom_study(root, patient_id="NOCT", with_ct=False)
    gap = phantom_study(root, patient_id="GAP")
    sorted(p for p in (root / "GAP_pet").iterdir())[5].unlink()  # a slice missing in the middle
    weightless = phantom_study(root, patient_id="NOWEIGHT", header={"PatientWeight": None})
    mixed = phantom_study(root, patient_id="MIXED")
    write_series(root / "MIXED_pet", np.zeros((1, 16, 16)), modality="CT", study_uid=mixed["study"],
                 frame_uid=mixed["frame"], series_uid=mixed["pet_series"], patient_id="MIXED")
    enhanced = phantom_study(root, patient_id="ENH", with_ct=True)
    for path in (root / "ENH_pet").iterdir():  # the same series as an enhanced multi-frame object
        import pydicom

        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.130"
        ds.save_as(path)
    assert gap and weightless and enhanced

    code = main(["import-dicom", str(root), "-o", str(tmp_path / "cases"), "--layout", "flat"])
    err = capsys.readouterr().err
    assert code == 1
    assert [c.case_id for c in discover(tmp_path / "cases").cases] == ["GOOD_20200102"]
    lines = {line.split("'")[1]: line for line in err.splitlines() if line.startswith("  case")}
    assert set(lines) == {"NOCT_20200102", "GAP_20200102", "NOWEIGHT_20200102", "MIXED_20200102", "ENH_20200102"}
    assert "without a CT" in lines["NOCT_20200102"] and str(root / "NOCT_pet") in lines["NOCT_20200102"]
    assert "missing slice" in lines["GAP_20200102"] and str(root / "GAP_pet") in lines["GAP_20200102"]
    assert "PatientWeight (0010,1030)" in lines["NOWEIGHT_20200102"] and "--weight" in lines["NOWEIGHT_20200102"]
    assert "mixed series" in lines["MIXED_20200102"] and str(root / "MIXED_pet") in lines["MIXED_20200102"]
    assert "enhanced multi-frame PET" in lines["ENH_20200102"] and str(root / "ENH_pet") in lines["ENH_20200102"]
    assert "5 case(s) failed during import-dicom" in err


def test_weight_option_rescues_a_study_without_weight(tmp_path):
    truth = phantom_study(tmp_path / "dicom", header={"PatientWeight": 0})
    assert main(["import-dicom", str(tmp_path / "dicom"), "-o", str(tmp_path / "cases"), "--weight", "70"]) == 0
    case = discover(tmp_path / "cases").cases[0]
    np.testing.assert_allclose(read(case.pet), truth["pet_suv"], rtol=1e-4, atol=1e-4)
    assert json.loads(record_path(case.pet).read_text())["suv"]["weight_source"] == "--weight"


def test_candidates_are_listed_and_series_chooses(tmp_path, caplog):
    truth = phantom_study(tmp_path / "dicom")
    short = generate_uid()  # a second, shorter PET series (a cropped copy) in the same study
    write_series(tmp_path / "dicom" / "copy", truth["pet_bq"][:6], modality="PT", spacing_zyx=(4.0, 4.0, 4.0),
                 origin_xyz=(-32.0, -32.0, -100.0), study_uid=truth["study"], frame_uid=truth["frame"],
                 series_uid=short)
    report = import_dicom(tmp_path / "dicom", tmp_path / "a")
    assert json.loads(report.cases[0].record.read_text())["pet"]["series_instance_uid"] == truth["pet_series"]
    notes = json.loads(report.cases[0].record.read_text())["choices"]
    assert len(notes) == 1 and "2 candidates" in notes[0] and short in notes[0] and "--series" in notes[0]
    assert "2 candidates" in caplog.text
    report = import_dicom(tmp_path / "dicom", tmp_path / "b", DicomImportSettings(series=(short,)))
    assert json.loads(report.cases[0].record.read_text())["pet"]["series_instance_uid"] == short


def test_without_the_dicom_extra_the_install_line_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as if not installed
    assert main(["import-dicom", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert 'highdicom, which is not installed: pip install -e ".[dicom]"' in capsys.readouterr().err


def test_a_folder_without_pet_is_an_error(tmp_path, capsys):
    write_series(tmp_path / "ct", np.zeros((3, 4, 4)), modality="CT", study_uid=generate_uid(),
                 frame_uid=generate_uid())
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert main(["import-dicom", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert "no PET study found (4 file(s), 1 not DICOM images)" in capsys.readouterr().err


def test_files_without_the_preamble_are_read(tmp_path):
    truth = phantom_study(tmp_path / "dicom")
    for path in (tmp_path / "dicom" / "PAT1_pet").iterdir():
        path.write_bytes(path.read_bytes()[132:])  # drop the 128-byte preamble and "DICM", as old exports do
    report = import_dicom(tmp_path / "dicom", tmp_path / "cases")
    assert report.failures == []
    np.testing.assert_allclose(read(report.cases[0].files["pet"]), truth["pet_suv"], rtol=1e-4, atol=1e-4)
