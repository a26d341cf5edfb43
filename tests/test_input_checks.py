"""Every kind of bad input gives an ``InputError`` naming the case and the file; good input passes.

Also the pieces the checks rest on: the CT coverage computation (against an independent
resampling), the truncation check for NIfTI, and the per-case process pool.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _image_helpers import Grid, Phantom, write_case, write_flat_case, write_volume
from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry
from autopetseg.data.loading import (
    BODY_HU,
    check_dataset,
    check_file_complete,
    ct_coverage,
    load_case,
    read_array_checked,
    tissue_box,
)
from autopetseg.data.parallel import CaseFailed, run_per_case
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError

GRID = Grid()
PHANTOM = Phantom.for_grid(GRID)


def _record(tmp_path: Path, case_id: str = "c1", **kwargs) -> tuple[CaseRecord, dict[str, Path]]:
    paths = write_flat_case(tmp_path, case_id, **kwargs)
    return CaseRecord(case_id, paths["pet"], paths["ct"], paths.get("label")), paths


def _raises(record: CaseRecord, file: Path | None, match: str) -> InputError:
    """load_case raises an InputError naming the case and the file, with ``match`` in the reason."""
    with pytest.raises(InputError, match=match) as info:
        load_case(record)
    error = info.value
    assert error.case == record.case_id
    assert repr(record.case_id) in str(error)
    if file is not None:
        assert error.file == str(file)
        assert str(file) in str(error)
    return error


def test_good_case_loads_with_expected_arrays(tmp_path):
    record, _ = _record(tmp_path)
    loaded = load_case(record)
    assert loaded.stacked().shape == (2, *GRID.shape_zyx)
    np.testing.assert_array_equal(loaded.stacked()[0], PHANTOM.pet(GRID))
    assert loaded.label.dtype == np.uint8
    assert int(loaded.label.sum()) == int(PHANTOM.label(GRID).sum()) > 0
    assert load_case(record, with_label=False).label is None


def test_missing_channel(tmp_path):
    record, paths = _record(tmp_path)
    _raises(CaseRecord("c1", None, paths["ct"]), tmp_path, "no PET image found")
    _raises(CaseRecord("c1", paths["pet"], None), tmp_path, "no CT image found")
    paths["ct"].unlink()
    _raises(record, paths["ct"], "CT file does not exist")


def test_label_on_another_grid_than_the_pet(tmp_path):
    record, paths = _record(tmp_path, label_grid=GRID.finer(2))
    _raises(record, paths["label"], "label grid .* differs from the PET grid")
    write_case(None, None, paths["label"], label_grid=GRID.shifted(dx_mm=2.0))  # same shape, moved
    _raises(record, paths["label"], "differs from the PET grid")


@pytest.mark.parametrize("shift_mm, ok", [(20.0, False), (1.2, True)])
def test_ct_must_cover_the_pet(tmp_path, shift_mm, ok):
    record, paths = _record(tmp_path, ct_grid=GRID.shifted(dx_mm=shift_mm))
    if ok:  # a CT shifted by 1.2 mm still covers every PET voxel centre (rim excluded)
        assert load_case(record).ct.shape == GRID.shape_zyx
    else:  # CT faces at x = 18..58 mm; of the interior PET centres x = 4, 8, ..., 32 only 20..32 are inside
        error = _raises(record, paths["ct"], "CT covers only 50.0% of the PET field of view")
        assert "same study" in str(error)


@pytest.mark.parametrize("role, value", [("pet", np.nan), ("ct", np.inf), ("label", np.nan), ("pet", -np.inf)])
def test_nan_or_infinite_voxels(tmp_path, role, value):
    record, paths = _record(tmp_path)
    array = {"pet": PHANTOM.pet, "ct": PHANTOM.ct, "label": lambda g: PHANTOM.label(g).astype(np.float32)}[role](GRID)
    array[3, 4, 5] = value
    array[0, 0, 0] = value
    write_volume(paths[role], array, GRID)
    _raises(record, paths[role], "has 2 NaN or infinite voxel")


def test_label_values_other_than_0_1(tmp_path):
    record, paths = _record(tmp_path)
    label = PHANTOM.label(GRID)
    label[0, 0, :3] = 2
    write_volume(paths["label"], label, GRID)
    _raises(record, paths["label"], "label values must be 0 and 1, found 0, 1, 2")
    write_volume(paths["label"], PHANTOM.label(GRID).astype(np.float32) * 0.5, GRID)
    _raises(record, paths["label"], "found 0, 0.5$")
    signed = PHANTOM.label(GRID).astype(np.int16)
    signed[0, 0, 0] = -1
    write_volume(paths["label"], signed, GRID)
    _raises(record, paths["label"], "found -1, 0, 1$")


def test_pet_in_bq_per_ml(tmp_path):
    record, paths = _record(tmp_path)
    write_volume(paths["pet"], PHANTOM.pet(GRID) * 5000.0, GRID)  # ~5 kBq/ml body activity
    error = _raises(record, paths["pet"], "looks like Bq/ml rather than SUV")
    body_median = np.median((PHANTOM.pet(GRID) * 5000.0)[PHANTOM.body(GRID)])
    assert f"PET body median is {body_median:.0f}" in str(error)


def test_ct_given_as_pet(tmp_path):
    record, paths = _record(tmp_path)
    swapped = CaseRecord("c1", paths["ct"], paths["pet"])
    _raises(swapped, paths["ct"], "channels swapped")


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("role, ext", [("pet", ".nii.gz"), ("ct", ".nii"), ("label", ".mha"), ("pet", ".nrrd")])
def test_truncated_file(tmp_path, role, ext):
    kwargs = {"pet_ext": ext} if role == "pet" else {"ct_ext": ext} if role == "ct" else {"seg_ext": ext}
    record, paths = _record(tmp_path, **kwargs)
    _truncate(paths[role], 0.5)
    _raises(record, paths[role], "(truncated|unreadable)")


def test_unreadable_files(tmp_path):
    record, paths = _record(tmp_path)
    paths["ct"].write_text("this is not an image")
    _raises(record, paths["ct"], "CT file is unreadable")
    paths["ct"].write_bytes(b"")
    _raises(record, paths["ct"], "CT file is unreadable")


def test_not_3d(tmp_path):
    record, paths = _record(tmp_path)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10), np.float32)), str(paths["pet"]))
    _raises(record, paths["pet"], "must be a 3D single-channel image, got 2D")


def test_truncation_check_accepts_multi_member_gzip(tmp_path):
    """A valid .nii.gz made of two gzip members (the trailer then holds only the last member's size)."""
    path = write_volume(tmp_path / "two_members.nii.gz", PHANTOM.pet(GRID), GRID)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), PHANTOM.pet(GRID))
    check_file_complete(path)  # no error
    # ...whereas dropping the last member is caught by the full decompression
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:])[:-30])
    with pytest.raises(InputError, match="truncated"):
        check_file_complete(path, "c", "PET")


def test_empty_missing_and_unrecognised_folders(tmp_path):
    for folder, reason in ((tmp_path / "absent", "does not exist"), (tmp_path, "is empty")):
        with pytest.raises(InputError, match=reason) as info:
            discover(folder)
        assert info.value.file == str(folder)
        assert "accepted layouts" in str(info.value) and "nnU-Net" in str(info.value) and "autoPET" in str(info.value)
    (tmp_path / "README.txt").write_text("hello")
    write_volume(tmp_path / "scan.nii.gz", PHANTOM.pet(GRID), GRID)
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="no case files in any accepted layout") as info:
        discover(tmp_path)
    assert info.value.file == str(tmp_path) and "<case>_pet" in str(info.value)


def _reference_coverage(ct: sitk.Image, pet: sitk.Image) -> float:
    """Independent computation: resample an all-ones CT-sized image onto the PET grid."""
    inside = sitk.Image(ct.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(ct)
    on_pet = sitk.GetArrayFromImage(sitk.Resample(inside, pet, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return float(on_pet[1:-1, 1:-1, 1:-1].mean())


@pytest.mark.parametrize("angles, shift", [((0, 0, 0), 0.0), ((0, 0, 0), 9.0), ((0.1, 0.3, 0.2), 0.0), ((0.1, 0.3, 0.2), 30.0)])
def test_ct_coverage_matches_resampling(angles, shift):
    pet = sitk.Image([20, 18, 16], sitk.sitkFloat32)
    pet.SetSpacing([4.0, 4.0, 3.0])
    pet.SetOrigin([1.0, 2.0, 3.0])
    ct = sitk.Image([50, 40, 30], sitk.sitkFloat32)
    ct.SetSpacing([1.5, 1.7, 1.6])
    ct.SetOrigin([shift, -2.0, 5.0])
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    ct.SetDirection(rotation.GetMatrix())
    expected = _reference_coverage(ct, pet)
    assert 0.3 < expected < 1.0
    assert ct_coverage(ct, pet) == pytest.approx(expected, abs=1e-9)


def test_check_dataset_reports_bad_cases_and_keeps_good_ones(tmp_path):
    write_flat_case(tmp_path, "good")
    bad = write_flat_case(tmp_path, "bq")
    write_volume(bad["pet"], PHANTOM.pet(GRID) * 5000.0, GRID)
    write_flat_case(tmp_path, "no_ct")["ct"].unlink()
    dataset = discover(tmp_path)

    serial = check_dataset(dataset, num_processes=1)
    pooled = check_dataset(dataset, num_processes=2)  # spawn-started workers

    for checks, failures in (serial, pooled):
        assert list(checks) == ["good"]
        assert checks["good"].shape_zyx == GRID.shape_zyx
        assert checks["good"].n_lesion_voxels == int(PHANTOM.label(GRID).sum())
        assert [(f.case, f.file) for f in failures] == [("bq", str(bad["pet"])), ("no_ct", str(tmp_path))]


def test_run_per_case_stops_on_a_bug_naming_the_case(tmp_path):
    records = [CaseRecord("a", None, None), CaseRecord("b", None, None)]

    def buggy(record):
        if record.case_id == "b":
            raise ZeroDivisionError("oops")
        return record.case_id.upper()

    with pytest.raises(CaseFailed, match="case 'b' failed: ZeroDivisionError: oops") as info:
        run_per_case(buggy, records)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    # in the pool too: a path that is not a path is a bug, not bad input
    with pytest.raises(CaseFailed, match="case 'x' failed: TypeError"):
        run_per_case(load_case, [CaseRecord("x", 123, 456), CaseRecord("y", None, None)], num_processes=2)


# --------------------------------------------------------------------------- reading NIfTI once


def _rotated_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([1.5, 2.0, 3.0])
    image.SetOrigin([-10.0, 5.0, 7.5])
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.1, -0.2, 0.3)
    image.SetDirection(rotation.GetMatrix())
    return image


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_nifti_read_in_one_pass_matches_itk(tmp_path, ext, dtype):
    """The float NIfTI reader (one decompression, NaN kept) gives ITK's voxels and geometry."""
    array = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(dtype)
    path = tmp_path / f"img{ext}"
    sitk.WriteImage(_rotated_image(array), str(path), useCompression=ext.endswith(".gz"))
    reference = sitk.ReadImage(str(path))
    values, geometry = read_array_checked(path)
    assert values.dtype == dtype and values.flags.writeable
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(reference))
    assert geometry == Geometry.of(reference)
    if ext.endswith(".gz"):  # two gzip members and zero padding: still one file to ITK and to us
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(64))
        np.testing.assert_array_equal(read_array_checked(path)[0], array)


def test_nifti_that_itk_rescales_is_left_to_itk(tmp_path):
    """A header with an intensity scale (scl_slope) is read by ITK, which applies it."""
    array = np.arange(7 * 9 * 11, dtype=np.float32).reshape(7, 9, 11)
    path = tmp_path / "scaled.nii"
    sitk.WriteImage(_rotated_image(array), str(path))
    raw = bytearray(path.read_bytes())
    raw[112:120] = np.array([2.0, 5.0], dtype="<f4").tobytes()  # scl_slope, scl_inter
    path.write_bytes(bytes(raw))
    values, geometry = read_array_checked(path)
    np.testing.assert_allclose(values, array * 2.0 + 5.0)
    assert geometry == Geometry.of(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (0.05, 0.3, -0.2)])
def test_tissue_box_holds_every_pet_voxel_where_the_resampled_ct_is_tissue(angles):
    """Outside the box, the CT linearly resampled onto the whole PET grid is air: loading may
    resample the CT onto the box alone."""
    ct_array = np.full((60, 50, 40), -1000, dtype=np.int16)
    ct_array[20:31, 14:27, 9:22] = 40  # a block of tissue ...
    ct_array[44, 30, 33] = 300  # ... and one bright voxel
    ct = sitk.GetImageFromArray(ct_array)
    ct.SetSpacing([1.3, 1.1, 1.7])
    ct.SetOrigin([-3.0, 2.0, -5.0])
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    ct.SetDirection(rotation.GetMatrix())
    pet = Geometry((30, 22, 20), (3.0, 2.5, 2.5), (-6.0, 0.0, -8.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    on_pet = sitk.GetArrayFromImage(sitk.Resample(ct, pet.image(np.zeros(pet.shape_zyx, np.float32)), sitk.Transform(),
                                                  sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    tissue = on_pet > BODY_HU
    assert tissue.any()
    box = tissue_box(ct_array, Geometry.of(ct), pet)
    inside = np.zeros(pet.shape_zyx, dtype=bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    assert not (tissue & ~inside).any()
    assert inside.sum() < 0.6 * inside.size  # and it is a box around the tissue, not the whole grid
    assert tissue_box(np.full_like(ct_array, -1000), Geometry.of(ct), pet) is None


def test_ct_on_a_box_matches_the_ct_on_the_whole_grid(tmp_path):
    """``LoadedCase.ct_in`` (the CT resampled onto a box only) equals the whole-grid CT there."""
    fine = GRID.finer(2).shifted(dx_mm=1.0, dy_mm=-0.7, dz_mm=0.4)
    record, _ = _record(tmp_path, ct_grid=fine)
    case = load_case(record)
    assert case.tissue_box is not None
    box = [[1, 6], [2, 9], [3, 8]]
    part = case.ct_in(box)
    whole = load_case(record).ct
    assert whole.shape == GRID.shape_zyx and whole.dtype == np.float32
    np.testing.assert_allclose(part, whole[1:6, 2:9, 3:8], atol=1e-3)
    np.testing.assert_allclose(case.ct_in(case.tissue_box), whole[tuple(slice(a, b) for a, b in case.tissue_box)],
                               atol=1e-3)
