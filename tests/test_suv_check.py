"""Issue #17, item 1: a PET in the wrong units is an error naming the case, the file and the
statistic; normal phantoms and real PET pass; the override for unusual tracers; warnings for a
constant PET and a one-slice volume."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import SimpleITK as sitk

from _image_helpers import Grid, Phantom, link_mirp_cases, write_flat_case, write_volume
from autopetseg.data.discovery import discover
from autopetseg.data.loading import load_case
from autopetseg.data.records import CaseRecord
from autopetseg.data.suv_check import SUV_CHECK_ENV, BodyStatistics, SuvCheck, check_suv, suv_check_mode
from autopetseg.data.synthetic import synthesize_dataset
from autopetseg.errors import InputError

GRID = Grid((12, 14, 14), (4.0, 4.0, 4.0))
PHANTOM = Phantom.for_grid(GRID)


def _case(tmp_path, factor: float = 1.0) -> tuple[CaseRecord, dict]:
    paths = write_flat_case(tmp_path, "c1", grid=GRID)
    if factor != 1.0:
        write_volume(paths["pet"], PHANTOM.pet(GRID) * np.float32(factor), GRID)
    return CaseRecord("c1", paths["pet"], paths["ct"], paths["label"]), paths


@pytest.mark.parametrize("factor, statistic", [
    (5.0, r"body median SUV 5\.\d+ is above 2 "),  # kBq/ml-like
    (60.0, r"body median SUV (59\.9|60\.)\d+ is above 2 .*99th percentile of the body .* is above 40"),  # int16, lost slope
    (100.0, r"body median SUV .* above 2 .*SUVmax 800\.0 is above 150"),
    (-1.0, r"100% of the body voxels are negative"),  # negated
    (1e-3, r"body median SUV .* is below 0\.05"),  # SUV / 1000
])
def test_pet_in_wrong_units_is_an_error_naming_case_file_and_statistic(tmp_path, factor, statistic):
    record, paths = _case(tmp_path, factor)
    with pytest.raises(InputError, match=statistic) as info:
        load_case(record)
    assert info.value.case == "c1" and info.value.file == str(paths["pet"])
    assert "does not look like SUV" in str(info.value) and "--suv-check" in str(info.value)


def test_normal_test_phantom_passes_with_its_statistics(tmp_path):
    record, _ = _case(tmp_path)
    body = PHANTOM.pet(GRID)[PHANTOM.body(GRID)]
    stats = check_suv(PHANTOM.pet(GRID), body, "c1", None, SuvCheck())
    assert stats.median == pytest.approx(float(np.median(body)), rel=1e-6) and stats.negative_share == 0
    assert stats.suv_max == 8.0
    assert load_case(record).pet.shape == GRID.shape_zyx


def test_synthetic_phantoms_pass_and_scaled_ones_fail(tmp_path):
    """The tiny phantoms (body median 0.56-0.85, SUVmax up to 57 over 30 cases) pass; ×5 does not."""
    root = synthesize_dataset(tmp_path / "ds", n_cases=3, layout="flat", seed=3, preset="tiny")
    for record in discover(root).cases:
        case = load_case(record)
        pet = sitk.ReadImage(str(record.pet))
        scaled = sitk.Cast(pet, sitk.sitkFloat32) * 5.0
        sitk.WriteImage(scaled, str(record.pet))
        with pytest.raises(InputError, match="body median SUV"):
            load_case(record)
        assert case.pet.max() < 150


@pytest.mark.realdata
def test_real_fdg_pet_passes(tmp_path):
    flat = link_mirp_cases(tmp_path)
    for record in discover(flat).cases:
        assert load_case(record).pet.max() > 10  # real SUV, untouched


def test_each_limit_alone():
    rng = np.random.default_rng(0)
    body = rng.uniform(0.3, 1.0, 10_000).astype(np.float32)
    pet = body.reshape(10, 10, 100)
    assert check_suv(pet, body, "c", "f", SuvCheck()) is not None
    hot = pet.copy()
    hot[0, 0, :2] = 400.0  # SUVmax alone
    with pytest.raises(InputError, match=r"SUVmax 400\.0 is above 150") as info:
        check_suv(hot, body, "c", "f", SuvCheck())
    assert "median" not in str(info.value) and "percentile" not in str(info.value)
    wide = np.concatenate([body, np.full(200, 60.0, np.float32)])  # 2 % of the body at SUV 60
    with pytest.raises(InputError, match=r"99th percentile of the body 60\.0 is above 40"):
        check_suv(wide.reshape(-1, 1, 1), wide, "c", "f", SuvCheck())
    noisy = body.copy()
    noisy[:1500] *= -1  # 15 % negative: an unconstrained reconstruction does not do this to tissue
    with pytest.raises(InputError, match="15% of the body voxels are negative"):
        check_suv(noisy.reshape(pet.shape), noisy, "c", "f", SuvCheck())


def test_override_modes_and_environment(tmp_path, monkeypatch, caplog):
    record, _ = _case(tmp_path, 5.0)
    with caplog.at_level(logging.WARNING, logger="autopetseg.data.suv_check"):
        loaded = load_case(record, suv_check=SuvCheck("warn"))
    assert loaded.pet.max() == 40.0 and "body median SUV" in caplog.text
    assert load_case(record, suv_check=SuvCheck("off")).pet.max() == 40.0
    monkeypatch.delenv(SUV_CHECK_ENV, raising=False)
    with suv_check_mode("off"):
        assert load_case(record).pet.max() == 40.0  # worker processes read the same variable
    assert SUV_CHECK_ENV not in os.environ
    with pytest.raises(InputError, match="body median"):
        load_case(record)
    monkeypatch.setenv(SUV_CHECK_ENV, "sometimes")
    with pytest.raises(InputError, match="unknown SUV check mode 'sometimes'"):
        load_case(record)


def test_constant_pet_and_one_slice_volume_warn(tmp_path, caplog):
    paths = write_flat_case(tmp_path, "c1", grid=GRID)
    write_volume(paths["pet"], np.zeros(GRID.shape_zyx, np.float32), GRID)
    with caplog.at_level(logging.WARNING, logger="autopetseg.data.suv_check"):
        load_case(CaseRecord("c1", paths["pet"], paths["ct"]))
    assert "PET is constant (0 everywhere)" in caplog.text and "c1" in caplog.text
    caplog.clear()
    thin = Grid((1, 14, 14), (4.0, 4.0, 4.0), origin_xyz=(0.0, 0.0, 24.0))
    paths = write_flat_case(tmp_path / "thin", "t1", grid=thin)
    with caplog.at_level(logging.WARNING, logger="autopetseg.data.suv_check"):
        load_case(CaseRecord("t1", paths["pet"], paths["ct"]))
    assert "one voxel thick along z" in caplog.text


def test_statistics_fall_back_to_the_whole_pet():
    pet = np.array([[[0.0, -1.0, -2.0, -3.0]]], np.float32)
    stats = BodyStatistics.of(np.empty(0, np.float32), pet)
    assert stats.n_voxels == 4 and stats.negative_share == 0.75 and stats.suv_max == 0.0
