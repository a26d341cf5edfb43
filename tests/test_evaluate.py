"""The evaluate stage on a tiny flat-layout folder whose right answers are worked out by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _metrics_helpers import random_blobs, reference_case
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.evaluation.evaluate import (
    CSV_COLUMNS,
    EvaluationSettings,
    evaluate_case,
    evaluate_folder,
)

SHAPE_ZYX = (10, 12, 14)
SPACING_XYZ = (4.0, 2.0, 3.0)  # anisotropic: 24 mm^3 = 0.024 ml per voxel
VOXEL_ML = 0.024
ORIGIN_XYZ = (-10.0, 5.0, 100.0)


def write(path: Path, array: np.ndarray, spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin_xyz)
    sitk.WriteImage(image, str(path))
    return path


def zeros(dtype=np.uint8) -> np.ndarray:
    return np.zeros(SHAPE_ZYX, dtype=dtype)


@pytest.fixture()
def folders(tmp_path):
    """GT (flat layout) and predictions for four cases:

    hit      lesion 27 voxels found exactly, plus an 8-voxel false positive far away
    clean    no lesion; a 4-voxel prediction (FPV counted, DSC/FNV not)
    missed   lesion of 12 voxels, no prediction file
    shifted  prediction written with a different spacing (a grid error)
    """
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    ct = np.full(SHAPE_ZYX, -1000, dtype=np.int16)
    ct[2:8, 2:10, 2:12] = 40

    def pet(lesion: np.ndarray | None, peak=None) -> np.ndarray:
        suv = np.full(SHAPE_ZYX, 1.0, dtype=np.float32)
        if lesion is not None:
            suv[lesion > 0] = 5.0
        if peak is not None:
            suv[peak] = 12.0
        return suv

    hit = zeros()
    hit[2:5, 3:6, 3:6] = 1
    missed = zeros()
    missed[5:7, 6:8, 8:11] = 1
    for case, label, suv in (
        ("hit", hit, pet(hit, (3, 4, 4))),
        ("clean", zeros(), pet(None)),
        ("missed", missed, pet(missed)),
        ("shifted", hit, pet(hit)),
    ):
        write(gt_dir / f"{case}_pet.nii.gz", suv)
        write(gt_dir / f"{case}_ct.nii.gz", ct)
        write(gt_dir / f"{case}_seg.nii.gz", label)

    hit_pred = hit.copy()
    hit_pred[7:9, 9:11, 11:13] = 1
    write(pred_dir / "hit.nii.gz", hit_pred)
    clean_pred = zeros()
    clean_pred[1, 1, 1:5] = 1
    write(pred_dir / "clean.nii.gz", clean_pred)
    write(pred_dir / "shifted.nii.gz", hit, spacing_xyz=(4.0, 2.0, 2.5))
    write(pred_dir / "stray.nii.gz", zeros())  # names no ground-truth case
    return gt_dir, pred_dir


def expected_hit() -> dict:
    return {
        "dsc": 2 * 27 / (27 + 35),
        "fpv_ml": 8 * VOXEL_ML,
        "fnv_ml": 0.0,
        "gt_tmtv_ml": 27 * VOXEL_ML,
        "pred_tmtv_ml": 35 * VOXEL_ML,
        "tmtv_error_ml": 8 * VOXEL_ML,
        "gt_tlg": (26 * 5.0 + 12.0) * VOXEL_ML,
        "pred_tlg": (26 * 5.0 + 12.0 + 8 * 1.0) * VOXEL_ML,
        "gt_suvmax": 12.0,
        "gt_dmax_mm": math.sqrt((2 * 3.0) ** 2 + (2 * 2.0) ** 2 + (2 * 4.0) ** 2),
    }


def test_evaluate_folder_writes_challenge_numbers(folders, tmp_path):
    gt_dir, pred_dir = folders
    out_dir = tmp_path / "out"
    rows, summary = evaluate_folder(pred_dir, gt_dir, out_dir)

    assert [r["case_id"] for r in rows] == ["clean", "hit"]
    by_case = {r["case_id"]: r for r in rows}
    hit = by_case["hit"]
    for key, value in expected_hit().items():
        assert hit[key] == pytest.approx(value), key
    assert (hit["tp"], hit["fp"], hit["fn"]) == (1, 1, 0)
    assert hit["f1"] == pytest.approx(2 / 3)
    assert (hit["gt_lesion_count"], hit["pred_lesion_count"]) == (1, 2)
    assert hit["voxel_ml"] == pytest.approx(VOXEL_ML)

    clean = by_case["clean"]
    assert clean["gt_positive"] is False
    assert math.isnan(clean["dsc"]) and math.isnan(clean["fnv_ml"])
    assert clean["fpv_ml"] == pytest.approx(4 * VOXEL_ML)
    assert (clean["tp"], clean["fp"], clean["fn"], clean["f1"]) == (0, 1, 0, 0.0)

    # Challenge means: DSC and FNV over the one positive case, FPV over both scored cases.
    assert summary["n_cases"] == 2 and summary["n_positive"] == 1
    assert summary["mean_dsc"] == pytest.approx(expected_hit()["dsc"])
    assert summary["mean_fpv_ml"] == pytest.approx((8 + 4) * VOXEL_ML / 2)
    assert summary["mean_fnv_ml"] == 0.0
    assert summary["missing_predictions"] == ["missed"]
    assert set(summary["failed"]) == {"shifted"}
    assert "shifted" in summary["failed"]["shifted"] and "shifted.nii.gz" in summary["failed"]["shifted"]
    assert summary["unmatched_predictions"] == ["stray.nii.gz"]
    assert (summary["total_tp"], summary["total_fp"], summary["total_fn"]) == (1, 2, 0)

    # The files say the same, nan as "nan" in the CSV and null in the JSON.
    with open(out_dir / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0].keys()) == CSV_COLUMNS
    assert [row["case_id"] for row in table] == ["clean", "hit"]
    assert float(table[1]["dsc"]) == hit["dsc"]  # full precision
    assert float(table[1]["tmtv_error_ml"]) == pytest.approx(8 * VOXEL_ML)
    assert table[0]["dsc"] == "nan"
    saved = json.loads((out_dir / "summary.json").read_text())
    assert saved["mean_dsc"] == pytest.approx(summary["mean_dsc"])
    assert saved["mean_fpv_ml"] == pytest.approx(summary["mean_fpv_ml"])
    assert saved["missing_predictions"] == ["missed"]
    assert not list(out_dir.glob(".*"))  # no temporary files left behind


def test_missing_prediction_scored_as_empty_when_asked(folders):
    gt_dir, pred_dir = folders
    rows, summary = evaluate_folder(pred_dir, gt_dir, settings=EvaluationSettings(missing_as_empty=True))
    missed = {r["case_id"]: r for r in rows}["missed"]
    assert missed["prediction"] == "missing_scored_empty"
    assert missed["dsc"] == 0.0
    assert missed["fnv_ml"] == pytest.approx(12 * VOXEL_ML)
    assert (missed["tp"], missed["fp"], missed["fn"]) == (0, 0, 1)
    assert summary["n_cases"] == 3 and summary["n_positive"] == 2
    assert summary["mean_dsc"] == pytest.approx(expected_hit()["dsc"] / 2)
    assert summary["mean_fnv_ml"] == pytest.approx(12 * VOXEL_ML / 2)
    assert summary["missing_predictions"] == ["missed"]  # still listed


def test_bad_predictions_are_input_errors_naming_case_and_file(folders, tmp_path):
    gt_dir, pred_dir = folders
    record = CaseRecord("hit", gt_dir / "hit_pet.nii.gz", gt_dir / "hit_ct.nii.gz", gt_dir / "hit_seg.nii.gz")

    moved = write(tmp_path / "moved.nii.gz", zeros(), origin_xyz=(0.0, 0.0, 0.0))
    with pytest.raises(InputError) as error:
        evaluate_case(record, moved)
    assert error.value.case == "hit" and error.value.file == str(moved)
    assert "grid" in error.value.reason

    probabilities = zeros(np.float32)
    probabilities[3, 3, 3] = 0.7
    soft = write(tmp_path / "soft.nii.gz", probabilities)
    with pytest.raises(InputError, match="binary"):
        evaluate_case(record, soft)


def test_parallel_scoring_gives_the_same_rows(folders):
    gt_dir, pred_dir = folders
    serial_rows, serial = evaluate_folder(pred_dir, gt_dir)
    parallel_rows, parallel = evaluate_folder(pred_dir, gt_dir, settings=EvaluationSettings(num_processes=2))
    assert [r["case_id"] for r in parallel_rows] == [r["case_id"] for r in serial_rows]
    for a, b in zip(serial_rows, parallel_rows):
        for key in CSV_COLUMNS:
            assert a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])), key
    assert parallel["failed"].keys() == serial["failed"].keys()


def test_bit_identical_to_challenge_script_reading_nifti_headers(tmp_path):
    """The challenge reads masks and pixdim with nibabel; on a non-round spacing our numbers match to the bit."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(7)
    shape = (18, 20, 22)
    spacing_xyz = (2.0364201068878174, 2.0364201068878174, 3.0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    expected = {}
    for i in range(3):
        case = f"case{i}"
        gt = random_blobs(rng, shape, threshold=1.6)
        pred = random_blobs(rng, shape, threshold=1.6) | (gt * (rng.random(shape) < 0.5)).astype(np.uint8)
        write(gt_dir / f"{case}_pet.nii.gz", rng.random(shape).astype(np.float32), spacing_xyz)
        write(gt_dir / f"{case}_ct.nii.gz", np.zeros(shape, np.int16), spacing_xyz)
        write(gt_dir / f"{case}_seg.nii.gz", gt, spacing_xyz)
        write(pred_dir / f"{case}.nii.gz", pred, spacing_xyz)
        # The challenge's reading: get_fdata() arrays and float32 pixdim arithmetic.
        gt_nii = nib.load(str(gt_dir / f"{case}_seg.nii.gz"))
        pixdim = gt_nii.header["pixdim"]
        voxel_vol = pixdim[1] * pixdim[2] * pixdim[3] / 1000
        gt_array = gt_nii.get_fdata()
        pred_array = nib.load(str(pred_dir / f"{case}.nii.gz")).get_fdata()
        expected[case] = reference_case(gt_array, pred_array, voxel_vol)

    rows, _ = evaluate_folder(pred_dir, gt_dir)
    for row in rows:
        dsc, fpv, fnv = expected[row["case_id"]]
        assert (row["dsc"], row["fpv_ml"], row["fnv_ml"]) == (dsc, fpv, fnv)
    assert any(row["fpv_ml"] > 0 for row in rows) and any(row["fnv_ml"] > 0 for row in rows)
