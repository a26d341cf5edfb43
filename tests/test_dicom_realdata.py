"""Golden tests of ``import-dicom`` on the real DICOM in ``shared/realdata`` (skipped when absent):
MIRP's raw STS_001 FDG series (BQML → SUV), its GML copy, its RTSTRUCT, the TotalSegmentator CT
slices and the MIRP tree as a whole (a PET study without CT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
from _dicom_helpers import realdata  # noqa: E402
from _image_helpers import read  # noqa: E402

from autopetseg.cli import main  # noqa: E402
from autopetseg.data.dicom.masks import rtstruct_mask  # noqa: E402
from autopetseg.data.dicom.suv import suv_factors  # noqa: E402
from autopetseg.data.dicom.volume import read_pixels, stack  # noqa: E402
from autopetseg.data.imageio import Geometry  # noqa: E402
from autopetseg.scoring.metrics import dice  # noqa: E402

pytestmark = pytest.mark.realdata

STS_FACTOR = 2.42903e-4  # PROVENANCE.txt: 71 kg, 388.78 MBq, 2711 s of F-18 decay
STS_CROP_MAX = 25.4123


@pytest.fixture(scope="module")
def sts001():
    """(slices, SUV result, SUV volume) of the raw STS_001 series, read once for the module."""
    files = sorted(realdata("mirp_sts", "STS_001_raw_FDG_PET_dicom").glob("*.dcm"))
    slices = stack(files)
    suv = suv_factors(slices.headers)
    return slices, suv, read_pixels(slices, suv.factors)


def crop_of(volume: np.ndarray, grid: Geometry, crop: sitk.Image) -> np.ndarray:
    """The part of ``volume`` (on ``grid``) that the axis-aligned ``crop`` image covers."""
    start = np.round((np.asarray(crop.GetOrigin()) - grid.origin_xyz) / np.asarray(grid.spacing_zyx[::-1])).astype(int)
    x, y, z = start
    nx, ny, nz = crop.GetSize()
    return volume[z:z + nz, y:y + ny, x:x + nx]


def test_sts001_bqml_series_gives_the_reference_suv(sts001):
    slices, suv, volume = sts001
    assert suv.factor == pytest.approx(STS_FACTOR, rel=1e-5)
    assert suv.audit["decay_s"] == 2711.0 and suv.audit["scan_time"] == "2000-09-07T11:20:11"
    crop = sitk.ReadImage(str(realdata("mirp_sts", "cropped", "STS_001", "PET", "image.nii.gz")))
    ours, theirs = crop_of(volume, slices.geometry, crop), sitk.GetArrayFromImage(crop)
    assert float(ours.max()) == pytest.approx(STS_CROP_MAX, abs=1e-3)
    # MIRP's crop holds the same voxels up to one stored step (its own rounding): slope × factor per slice
    z0 = int(round((crop.GetOrigin()[2] - slices.geometry.origin_xyz[2]) / slices.geometry.spacing_zyx[0]))
    step = np.array([float(h.RescaleSlope) for h in slices.headers[z0:z0 + ours.shape[0]]]) * suv.factor
    assert (np.abs(ours - theirs) <= step[:, None, None] * 1.001 + 1e-6).all()
    assert np.median(np.abs(ours - theirs)) <= 1e-6 * STS_CROP_MAX


def test_sts001_geometry_is_simpleitks(sts001):
    slices, _, _ = sts001
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in slices.paths])
    theirs = Geometry.of(reader.Execute())
    assert slices.geometry.shape_zyx == theirs.shape_zyx
    np.testing.assert_allclose(slices.geometry.spacing_zyx, theirs.spacing_zyx, atol=1e-9)
    np.testing.assert_allclose(slices.geometry.origin_xyz, theirs.origin_xyz, atol=1e-9)
    np.testing.assert_allclose(slices.geometry.direction, theirs.direction, atol=1e-9)
    assert slices.max_step_error_mm == pytest.approx(0.08, abs=1e-3)  # ITK warns of the same 0.08 mm


def test_sts001_rtstruct_gives_mirps_tumour_mask(sts001):
    slices, _, _ = sts001
    result = rtstruct_mask(realdata("mirp_sts", "STS_001_raw_FDG_PET_RTSTRUCT.dcm"), slices.geometry,
                           {uid: ("PET", slices.geometry) for uid in slices.sop_instance_uids})
    assert result.taken == ["GTV_Mass"] and result.left_out == ["GTV_Edema"] and result.drawn_on == "PET"
    crop = sitk.ReadImage(str(realdata("mirp_sts", "cropped", "STS_001", "PET", "mask.nii.gz")))
    ours = crop_of(result.mask, slices.geometry, crop)
    assert ours.sum() == result.mask.sum()  # the whole tumour lies inside MIRP's crop
    assert dice(sitk.GetArrayFromImage(crop).astype(bool), ours.astype(bool)) == pytest.approx(1.0)


def test_gml_copy_passes_through_unchanged(tmp_path):
    folder = realdata("mirp_sts", "cropped", "STS_001", "PET", "dicom_SUV_GML")
    slices = stack(sorted(folder.iterdir()))
    suv = suv_factors(slices.headers)
    assert suv.factor == 1.0 and suv.audit["units"] == "GML"
    crop = sitk.ReadImage(str(realdata("mirp_sts", "cropped", "STS_001", "PET", "image.nii.gz")))
    np.testing.assert_allclose(read_pixels(slices, suv.factors), sitk.GetArrayFromImage(crop), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slices.geometry.origin_xyz, crop.GetOrigin(), atol=1e-4)


def test_real_ct_slices_read_to_the_hu_and_grid_of_their_nifti(tmp_path):
    folder = realdata("totalseg", "example_ct_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    nifti = tmp_path / "ct.nii"  # the series as a NIfTI, written by ITK's own DICOM reader
    sitk.WriteImage(reader.Execute(), str(nifti))
    slices = stack(sorted(folder.iterdir()))
    hu = read_pixels(slices)
    np.testing.assert_array_equal(hu, read(nifti))
    assert hu.min() == -1024 and hu.max() > 1000
    theirs = Geometry.of(sitk.ReadImage(str(nifti)))
    assert slices.geometry.shape_zyx == theirs.shape_zyx == (20, 512, 512)
    np.testing.assert_allclose(slices.geometry.origin_xyz, theirs.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(slices.geometry.spacing_zyx, theirs.spacing_zyx, atol=1e-6)


def test_the_mirp_tree_is_a_pet_study_without_ct(tmp_path, capsys):
    """Two PET series (raw BQML and the GML crop) and two RTSTRUCTs in one study, no CT: an error naming
    the folder of the PET the rule chose (the raw series: more slices)."""
    root = realdata("mirp_sts")
    assert main(["import-dicom", str(root), "-o", str(tmp_path / "cases")]) == 1
    err = capsys.readouterr().err
    assert "case 'STS_001_20000907'" in err and "PET study without a CT series" in err
    assert "STS_001_raw_FDG_PET_dicom" in err
    assert not (tmp_path / "cases").exists() or not any((tmp_path / "cases").rglob("*.json"))


def test_acrin_slices_import_as_one_slice_volumes():
    folder = realdata("pet_dicom_slices_acrin_flt")
    for name in ("1.dcm", "2.dcm"):
        slices = stack([folder / name])
        suv = read_pixels(slices, suv_factors(slices.headers).factors)
        assert slices.geometry.shape_zyx == (1, 168, 168)
        body = suv[suv > 0.1]
        assert 0.2 < float(np.median(body)) < 1.5  # plausible SUV (FLT, body voxels)
        assert json.dumps(suv_factors(slices.headers).audit)  # the audit is JSON
