"""The L1DFL paper's lesion-level report (``evaluate --report``) on hand-built masks and rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autopetseg.cli import main
from autopetseg.evaluation.evaluate import evaluate_folder
from autopetseg.scoring.metrics import detection, f1_score
from autopetseg.evaluation.report import (
    PAPER_DMAX_EDGES_MM,
    ReportSettings,
    build_report,
    dmax_group,
    lesion_records,
    report_folder,
    scenario_of,
)

SHAPE_ZYX = (8, 12, 30)
SPACING_ZYX = (2.0, 2.0, 2.0)
VOXEL_ML = 0.008


def two_lesion_case():
    """GT lesion A (27 voxels, SUV 5, peak 10 at its centre) and B (8 voxels, SUV 4, peak 9 at a
    corner); prediction: A plus a 9-voxel rim, half of B without its peak, an 8-voxel blob away."""
    gt = np.zeros(SHAPE_ZYX, bool)
    pred = np.zeros(SHAPE_ZYX, bool)
    suv = np.ones(SHAPE_ZYX, np.float32)
    gt[1:4, 1:4, 1:4] = True
    suv[1:4, 1:4, 1:4] = 5.0
    suv[2, 2, 2] = 10.0
    gt[1:3, 1:3, 10:12] = True
    suv[1:3, 1:3, 10:12] = 4.0
    suv[1, 1, 10] = 9.0
    pred[1:4, 1:4, 1:5] = True  # A + rim of 9
    pred[2, 1:3, 10:12] = True  # 4 voxels of B, not (1, 1, 10)
    pred[5:7, 8:10, 20:22] = True  # false positive, SUV 1
    return gt, pred, suv


def test_lesion_records_of_hand_built_case():
    gt, pred, suv = two_lesion_case()
    rows = lesion_records("c", gt, pred, suv, SPACING_ZYX)
    lesions = [r for r in rows if r["kind"] == "lesion"]
    fps = [r for r in rows if r["kind"] == "false_positive"]
    assert [les["index"] for les in lesions] == [1, 2] and len(fps) == 1
    a, b = lesions
    assert a["volume_ml"] == pytest.approx(27 * VOXEL_ML)
    assert a["tla"] == pytest.approx((26 * 5 + 10) * VOXEL_ML)
    assert a["suvmax"] == 10.0
    assert a["dsc"] == pytest.approx(2 * 27 / (27 + 36))
    assert a["detected"] == 1.0
    assert b["volume_ml"] == pytest.approx(8 * VOXEL_ML)
    assert b["suvmax"] == 9.0
    assert b["dsc"] == pytest.approx(2 * 4 / (8 + 4))
    assert b["detected"] == 0.0  # overlaps, but misses the SUVmax voxel
    assert fps[0]["volume_ml"] == pytest.approx(8 * VOXEL_ML)
    assert fps[0]["tla"] == pytest.approx(8 * VOXEL_ML)
    # The same TP/FP/FN as the per-case detection of evaluate.
    counts = detection(gt, pred, suv)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (1, 1, 1)

    # An empty prediction: every lesion missed (DSC 0), no false positive.
    empty = lesion_records("c", gt, np.zeros_like(pred), suv, SPACING_ZYX)
    assert [(r["kind"], r["dsc"], r["detected"]) for r in empty] == [("lesion", 0.0, 0.0)] * 2
    assert lesion_records("c", np.zeros_like(gt), np.zeros_like(pred), suv, SPACING_ZYX) == []


def row(case, count, dsc, tmtv, dmax, tp, fp, fn, tlg=None):
    return {
        "case_id": case, "gt_positive": count > 0, "gt_lesion_count": count, "dsc": dsc,
        "gt_tmtv_ml": tmtv, "gt_tlg": tmtv * 3 if tlg is None else tlg, "gt_dmax_mm": dmax,
        "tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn),
    }


ROWS = [
    row("s1", 1, 0.1, 1.0, 5.0, 1, 0, 0),
    row("s2", 1, 0.2, 2.0, 5.0, 1, 1, 0),
    row("s3", 1, 0.3, 3.0, 5.0, 0, 0, 1),
    row("s4", 1, 0.4, 4.0, 5.0, 1, 2, 0),
    row("m1", 2, 0.5, 10.0, 50.0, 2, 0, 0),
    row("m2", 3, 0.6, 20.0, 100.0, 1, 0, 1),
    row("m3", 2, 0.7, 30.0, 150.0, 3, 1, 0),
    row("m4", 5, 0.8, 40.0, 200.0, 2, 0, 2),
    row("z1", 0, math.nan, 0.0, math.nan, 0, 2, 0),
]


def lesion(case, volume, dsc, detected):
    return {"case_id": case, "kind": "lesion", "index": 1, "volume_ml": volume, "tla": volume * 2,
            "suvmax": 5.0, "dsc": dsc, "detected": detected}


def false_positive(case, volume):
    return {"case_id": case, "kind": "false_positive", "index": 1, "volume_ml": volume, "tla": volume,
            "suvmax": math.nan, "dsc": math.nan, "detected": math.nan}


LESIONS = [
    lesion("s1", 1.0, 0.0, 0.0), lesion("s2", 2.0, 0.5, 1.0), lesion("s3", 3.0, 0.6, 1.0),
    lesion("s4", 4.0, 0.9, 1.0), lesion("m1", 5.0, 1.0, 1.0),
    false_positive("s2", 0.5), false_positive("z1", 3.5),
]


def by(table, **keys):
    hits = [r for r in table if all(r[k] == v for k, v in keys.items())]
    assert len(hits) == 1, keys
    return hits[0]


def test_scenarios_and_patient_thresholds():
    assert [scenario_of(n) for n in (0, 1, 2, 7)] == ["lesion_free", "single", "multiple", "multiple"]
    tables = build_report(ROWS, LESIONS)

    scenarios = tables["scenarios"]
    assert [s["scenario"] for s in scenarios] == ["all", "single", "multiple", "lesion_free"]
    single = by(scenarios, scenario="single")
    assert single["n_cases"] == 4 and single["median_dsc"] == pytest.approx(0.25)
    assert (single["tp"], single["fp"], single["fn"]) == (3, 3, 1)
    assert single["f1"] == pytest.approx(3 / (3 + 2))
    assert single["mean_case_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0.5) / 4)
    multiple = by(scenarios, scenario="multiple")
    assert multiple["median_dsc"] == pytest.approx(0.65)
    assert (multiple["tp"], multiple["fp"], multiple["fn"]) == (8, 1, 3)
    assert multiple["f1"] == pytest.approx(0.8)
    everyone = by(scenarios, scenario="all")
    assert everyone["n_cases"] == 9 and everyone["median_dsc"] == pytest.approx(0.45)  # DSC over the 8 positive
    assert everyone["f1"] == pytest.approx(11 / (11 + 5))  # the lesion-free case's 2 FP count
    free = by(scenarios, scenario="lesion_free")
    assert math.isnan(free["median_dsc"]) and (free["fp"], free["f1"]) == (2, 0.0)

    # Thresholds: 0 ml, then the 25/50/75/85th percentiles of the scenario's TMTV; cases with v > t.
    patient = tables["patient_tmtv_thresholds"]
    expected_single = [("0", 0.0, 4, 0.25), ("p25", 1.75, 3, 0.3), ("p50", 2.5, 2, 0.35), ("p75", 3.25, 1, 0.4), ("p85", 3.55, 1, 0.4)]
    for label, t, n, median in expected_single:
        r = by(patient, scenario="single", threshold=label)
        assert (r["threshold_ml"], r["n_cases"], r["median_dsc"]) == (pytest.approx(t), n, pytest.approx(median)), label
    r = by(patient, scenario="multiple", threshold="p25")
    assert r["threshold_ml"] == pytest.approx(17.5) and r["median_dsc"] == pytest.approx(0.7)
    assert (r["tp"], r["fp"], r["fn"]) == (6, 1, 3)
    r = by(patient, scenario="all", threshold="p50")  # TMTVs 1..4, 10..40: median 7 ml
    assert r["threshold_ml"] == pytest.approx(7.0) and r["n_cases"] == 4 and r["median_dsc"] == pytest.approx(0.65)
    assert r["median_gt_tlg"] == pytest.approx(75.0)
    assert all(r["scenario"] != "lesion_free" for r in patient)
    # Strictly above: at the largest TMTV as threshold no case is left.
    top = build_report(ROWS, LESIONS, ReportSettings(threshold_percentiles=(100.0,)))["patient_tmtv_thresholds"]
    r = by(top, scenario="single", threshold="p100")
    assert r["threshold_ml"] == 4.0 and r["n_cases"] == 0 and math.isnan(r["median_dsc"])


def test_lesion_mtv_thresholds():
    table = build_report(ROWS, LESIONS)["lesion_mtv_thresholds"]
    # MTVs 1..5: p25 = 2, p50 = 3, p75 = 4, p85 = 4.4; FPs of 0.5 and 3.5 ml count when > t.
    expected = [
        ("0", 0.0, 5, 0.6, (4, 2, 1)),
        ("p25", 2.0, 3, 0.9, (3, 1, 0)),
        ("p50", 3.0, 2, 0.95, (2, 1, 0)),
        ("p75", 4.0, 1, 1.0, (1, 0, 0)),
        ("p85", 4.4, 1, 1.0, (1, 0, 0)),
    ]
    for label, t, n, median, (tp, fp, fn) in expected:
        r = by(table, scenario="all", threshold=label)
        assert r["threshold_ml"] == pytest.approx(t), label
        assert (r["n_lesions"], r["tp"], r["fp"], r["fn"]) == (n, tp, fp, fn), label
        assert r["median_dsc"] == pytest.approx(median), label
        assert r["f1"] == pytest.approx(f1_score(tp, fp, fn)), label
    r = by(table, scenario="single", threshold="0")  # lesions of s1..s4 and the FP of s2 only
    assert (r["n_lesions"], r["tp"], r["fp"], r["fn"]) == (4, 3, 1, 1)
    assert r["median_tla"] == pytest.approx(5.0)


def test_dmax_quartile_groups():
    edges = np.array([50.0, 87.5, 125.0, 162.5, 200.0])
    assert [dmax_group(d, edges) for d in (50.0, 87.5, 87.6, 125.0, 200.0)] == [0, 0, 1, 1, 3]
    assert dmax_group(49.9, edges) is None and dmax_group(200.1, edges) is None and dmax_group(math.nan, edges) is None

    # Quartiles of the data (multiple-lesion cases only): Dmax 50/100/150/200 mm → one case per group.
    groups = build_report(ROWS, LESIONS)["dmax_groups"]
    assert [g["group"] for g in groups] == ["G0", "G1", "G2", "G3"]
    assert [g["lower_mm"] for g in groups] == [50.0, 87.5, 125.0, 162.5] and groups[-1]["upper_mm"] == 200.0
    assert [g["n_cases"] for g in groups] == [1, 1, 1, 1]
    assert [g["median_dsc"] for g in groups] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert [g["f1"] for g in groups] == pytest.approx([1.0, 1 / 1.5, 3 / 3.5, 2 / 3])

    # The paper's fixed groups (0-9, 9-11, 11-14, 14-60 cm): 150 and 200 mm both fall in G3, G2 is empty.
    paper = build_report(ROWS, LESIONS, ReportSettings(dmax_edges_mm=PAPER_DMAX_EDGES_MM))["dmax_groups"]
    assert [g["n_cases"] for g in paper] == [1, 1, 0, 2]
    assert math.isnan(paper[2]["median_dsc"]) and math.isnan(paper[2]["f1"])
    assert paper[3]["median_dsc"] == pytest.approx(0.75)
    assert (paper[3]["tp"], paper[3]["fp"], paper[3]["fn"]) == (5, 1, 2)
    assert paper[3]["f1"] == pytest.approx(5 / 6.5)


def write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_ZYX[::-1])
    sitk.WriteImage(image, str(path))


@pytest.fixture()
def folders(tmp_path):
    """Flat-layout cases: 'multi' (the two-lesion case above), 'single' (one lesion found
    exactly), 'free' (no lesion, a 2-voxel false positive)."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt, pred, suv = two_lesion_case()
    single = np.zeros(SHAPE_ZYX, bool)
    single[4:6, 4:7, 15:18] = True
    free_pred = np.zeros(SHAPE_ZYX, bool)
    free_pred[0, 0, 0:2] = True
    for case, label, prediction, pet in (
        ("multi", gt, pred, suv),
        ("single", single, single, np.where(single, 6.0, 1.0).astype(np.float32)),
        ("free", np.zeros(SHAPE_ZYX, bool), free_pred, np.ones(SHAPE_ZYX, np.float32)),
    ):
        write(gt_dir / f"{case}_pet.nii.gz", pet)
        write(gt_dir / f"{case}_ct.nii.gz", np.zeros(SHAPE_ZYX, np.int16))
        write(gt_dir / f"{case}_seg.nii.gz", label.astype(np.uint8))
        write(pred_dir / f"{case}.nii.gz", prediction.astype(np.uint8))
    return gt_dir, pred_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_folder_agrees_with_evaluate(folders, tmp_path):
    gt_dir, pred_dir = folders
    rows, _ = evaluate_folder(pred_dir, gt_dir)
    report_dir = report_folder(pred_dir, gt_dir, tmp_path / "out", rows, ReportSettings(plots=False))
    lesions = read_csv(report_dir / "lesions.csv")
    assert [(les["case_id"], les["scenario"], les["kind"]) for les in lesions] == [
        ("free", "lesion_free", "false_positive"),
        ("multi", "multiple", "lesion"), ("multi", "multiple", "lesion"), ("multi", "multiple", "false_positive"),
        ("single", "single", "lesion"),
    ]
    assert float(lesions[4]["dsc"]) == 1.0 and float(lesions[4]["volume_ml"]) == pytest.approx(18 * VOXEL_ML)
    for r in rows:  # per case, the lesion table's TP and FP are evaluate's
        mine = [les for les in lesions if les["case_id"] == r["case_id"]]
        assert sum(float(les["detected"]) == 1.0 for les in mine if les["kind"] == "lesion") == r["tp"]
        assert sum(les["kind"] == "false_positive" for les in mine) == r["fp"]
    scenarios = {s["scenario"]: s for s in read_csv(report_dir / "scenarios.csv")}
    assert set(scenarios) == {"all", "single", "multiple", "lesion_free"}
    assert (scenarios["all"]["tp"], scenarios["all"]["fp"], scenarios["all"]["fn"]) == ("2", "2", "1")
    assert float(scenarios["all"]["f1"]) == pytest.approx(2 / 3.5)
    assert not list(report_dir.glob("*.png"))


def test_cli_evaluate_report_writes_files(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "eval"
    assert main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "--report"]) == 0
    report_dir = out / "report"
    assert str(report_dir) in capsys.readouterr().out
    for name in ("scenarios", "patient_tmtv_thresholds", "lesion_mtv_thresholds", "dmax_groups", "lesions"):
        assert read_csv(report_dir / f"{name}.csv"), name
    for name in ("scenarios_dsc", "thresholds_dsc", "detection_f1", "dmax_groups"):
        png = report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "metrics.csv").exists() and not list(report_dir.glob(".*"))
    # Without --report nothing is written there.
    assert main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "report").exists()
