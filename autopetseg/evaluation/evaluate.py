"""The ``evaluate`` stage: score a folder of predicted masks against a folder of labelled cases.

Ground truth comes from any accepted layout (``autopetseg.data.discovery.discover``); a
prediction is ``<pred_dir>/<case_id>.nii.gz`` (other image suffixes are accepted too), a binary
mask on the case's PET grid. Per case: the challenge metrics (DSC, FPV, FNV), detection by the
SUVmax rule (TP/FP/FN, F1) and TMTV/TLG/SUVmax/lesion count/Dmax of ground truth and
prediction with their errors. Output: ``metrics.csv`` (one row per scored case) and
``summary.json`` (challenge means and the cases that could not be scored), both atomic.

Missing predictions are listed in the summary (``missing_predictions``), never silently
dropped: by default they are left out of the means; with ``missing_as_empty=True`` they are
scored as empty masks (every lesion missed). Bad input (unreadable file, wrong grid, non-binary
mask) is an ``InputError`` for that case, collected in ``failed``; the other cases finish.
No torch here: evaluation runs wherever SimpleITK and numpy do.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.discovery import discover
from autopetseg.data.imageio import IMAGE_SUFFIXES, Geometry, read_image, strip_image_suffix
from autopetseg.data.parallel import run_per_case
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.evaluation.prognosis import PrognosisEvaluationSettings, evaluate_prognosis
from autopetseg.scoring.clinical import clinical_numbers
from autopetseg.scoring.metrics import aggregate, case_metrics, challenge_voxel_volume_ml, detection
from autopetseg.io_utils import atomic_path, nan_to_none, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"

# Columns of metrics.csv, in order. Errors are prediction minus ground truth.
CSV_COLUMNS = (
    "case_id", "gt_positive", "prediction", "dsc", "fpv_ml", "fnv_ml", "tp", "fp", "fn", "f1",
    "gt_tmtv_ml", "pred_tmtv_ml", "tmtv_error_ml", "gt_tlg", "pred_tlg", "tlg_error",
    "gt_suvmax", "pred_suvmax", "gt_lesion_count", "pred_lesion_count", "gt_dmax_mm", "pred_dmax_mm",
    "voxel_ml",
)


@dataclass(frozen=True)
class EvaluationSettings:
    """``missing_as_empty``: score a missing prediction as an empty mask instead of leaving it out
    of the means (it is listed either way). ``num_processes``: cases scored in parallel."""

    missing_as_empty: bool = False
    num_processes: int = 1
    prognosis: PrognosisEvaluationSettings = PrognosisEvaluationSettings()  # column names (prognosis.py)


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """Case id → prediction file in ``pred_dir``; ``.nii.gz`` wins when a case has several formats."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError("prediction folder does not exist", file=pred_dir)
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.iterdir()):
        case_id = strip_image_suffix(path.name) if path.is_file() else None
        if case_id is None or case_id.startswith("."):
            continue  # not an image, or a temporary file of an interrupted atomic write
        if case_id in found:
            keep = min(found[case_id], path, key=lambda p: IMAGE_SUFFIXES.index(_suffix(p)))
            log.warning("case %r has several predictions (%s, %s); using %s", case_id, found[case_id].name, path.name, keep.name)
            path = keep
        found[case_id] = path
    return found


def _suffix(path: Path) -> str:
    return next(s for s in IMAGE_SUFFIXES if path.name.endswith(s))


def _describe(geometry: Geometry) -> str:
    return f"{geometry.shape_zyx} @ {geometry.spacing_zyx} mm, origin {geometry.origin_xyz}"


def _read_mask(path: Path, case: str, what: str, reference: Geometry | None, reference_name: str) -> tuple[np.ndarray, Geometry]:
    """A binary mask as bool (z, y, x) and its geometry; wrong grid or non-0/1 values → ``InputError``."""
    image = read_image(path, case, what)
    geometry = Geometry.of(image)
    if reference is not None and not geometry.same_grid(reference):
        raise InputError(
            f"{what} grid {_describe(geometry)} differs from the {reference_name} grid {_describe(reference)}; "
            "masks must lie on the PET image's grid",
            case,
            path,
        )
    values = sitk.GetArrayFromImage(image)
    present = np.unique(values)
    if not np.isin(present, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in present[:8])
        raise InputError(f"{what} must be a binary mask with values 0 and 1, found {shown}", case, path)
    return values.astype(bool), geometry


def evaluate_case(record: CaseRecord, prediction: Path | None) -> dict:
    """One CSV row for a labelled case; ``prediction=None`` scores an empty mask."""
    case = record.case_id
    record.raise_problem()
    suv = None
    reference, reference_name = None, "ground-truth"
    if record.pet is not None:
        pet_image = read_image(record.pet, case, "PET")
        reference, reference_name = Geometry.of(pet_image), "PET"
        suv = sitk.GetArrayFromImage(pet_image).astype(np.float32, copy=False)
    gt, gt_geometry = _read_mask(record.label, case, "label", reference, reference_name)
    if reference is None:
        log.warning("case %r has no PET: detection, TLG and SUV numbers are left empty", case)
        reference = gt_geometry
    if prediction is not None:
        pred, _ = _read_mask(prediction, case, "prediction", reference, reference_name)
    else:
        pred = np.zeros_like(gt)

    voxel_ml = challenge_voxel_volume_ml(reference.spacing_zyx)
    spacing_zyx = reference.spacing_zyx
    row = {"case_id": case, "prediction": "found" if prediction is not None else "missing_scored_empty"}
    row.update(case_metrics(gt, pred, voxel_ml))
    if suv is not None:
        row.update(detection(gt, pred, suv))
    else:
        row.update({"tp": math.nan, "fp": math.nan, "fn": math.nan, "f1": math.nan})
        suv = np.full(gt.shape, math.nan, dtype=np.float32)  # TLG and SUVs come out nan
    gt_numbers = clinical_numbers(gt, suv, spacing_zyx)
    pred_numbers = clinical_numbers(pred, suv, spacing_zyx)
    for name, key in (("tmtv_ml", "tmtv_ml"), ("tlg", "tlg"), ("suvmax", "suvmax"), ("lesion_count", "lesion_count"), ("dmax_mm", "dmax_mm")):
        row[f"gt_{name}"] = gt_numbers[key]
        row[f"pred_{name}"] = pred_numbers[key]
    row["tmtv_error_ml"] = pred_numbers["tmtv_ml"] - gt_numbers["tmtv_ml"]
    row["tlg_error"] = pred_numbers["tlg"] - gt_numbers["tlg"]
    row["voxel_ml"] = voxel_ml
    return {column: row[column] for column in CSV_COLUMNS}


def _score(record: CaseRecord, predictions: dict[str, Path]) -> dict:
    """Module-level (picklable) worker for ``run_per_case``."""
    return evaluate_case(record, predictions.get(record.case_id))


def _nanmean(values) -> float:
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


def summarize(rows: list[dict]) -> dict:
    """Challenge means (``aggregate``) plus detection and clinical-number summaries."""
    summary = aggregate(rows)
    summary["median_dsc"] = float(np.median([r["dsc"] for r in rows if r["gt_positive"]])) if summary["n_positive"] else math.nan
    for key in ("tp", "fp", "fn"):
        summary[f"total_{key}"] = int(np.nansum([r[key] for r in rows])) if rows else 0
        summary[f"mean_{key}"] = _nanmean([r[key] for r in rows])
    summary["mean_f1"] = _nanmean([r["f1"] for r in rows])
    summary["mean_abs_tmtv_error_ml"] = _nanmean([abs(r["tmtv_error_ml"]) for r in rows])
    summary["mean_abs_tlg_error"] = _nanmean([abs(r["tlg_error"]) for r in rows])
    return summary


def write_metrics_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV (full float precision, ``nan`` where a number is undefined), atomically."""
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def evaluate_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path | None = None,
    settings: EvaluationSettings = EvaluationSettings(),
) -> tuple[list[dict], dict]:
    """Score every labelled case of ``gt_dir`` against ``<pred_dir>/<case_id>.nii.gz``.

    Returns (per-case rows, the columns of ``CSV_COLUMNS``; summary). The summary holds
    ``aggregate``'s challenge means (``mean_dsc`` over lesion-positive cases, ``mean_fpv_ml``
    over all scored cases, ``mean_fnv_ml`` over lesion-positive cases, ``n_cases``,
    ``n_positive``), detection and clinical-error means, and the cases not scored:
    ``missing_predictions`` (ids), ``failed`` (id → message), ``unlabelled_cases`` (ids) and
    ``unmatched_predictions`` (prediction files naming no ground-truth case). With ``out_dir``,
    ``metrics.csv`` and ``summary.json`` are written there (nan → null in JSON).
    """
    dataset = discover(gt_dir)
    predictions = find_predictions(pred_dir)
    labelled = [r for r in dataset.cases if r.label is not None]
    unlabelled = [r.case_id for r in dataset.cases if r.label is None]
    if unlabelled:
        log.warning("%d case(s) in %s have no label and are not scored: %s", len(unlabelled), gt_dir, ", ".join(unlabelled))
    missing = [r.case_id for r in labelled if r.case_id not in predictions]
    if missing:
        log.warning(
            "%d case(s) have no prediction in %s (%s): %s",
            len(missing), pred_dir, "scored as empty masks" if settings.missing_as_empty else "left out of the means",
            ", ".join(missing),
        )
    known = {r.case_id for r in dataset.cases}
    unmatched = sorted(str(p.name) for case, p in predictions.items() if case not in known)
    if unmatched:
        log.warning("%d prediction(s) match no ground-truth case: %s", len(unmatched), ", ".join(unmatched))

    to_score = labelled if settings.missing_as_empty else [r for r in labelled if r.case_id in predictions]
    results, failures = run_per_case(
        functools.partial(_score, predictions=predictions), to_score, settings.num_processes, desc="evaluate"
    )
    rows = list(results.values())

    summary = summarize(rows)
    summary.update(
        {
            "n_ground_truth_cases": len(labelled),
            "missing_predictions": missing,
            "missing_as_empty": settings.missing_as_empty,
            "failed": {error.case: str(error) for error in failures},
            "unlabelled_cases": unlabelled,
            "unmatched_predictions": unmatched,
            "connectivity": 18,
        }
    )
    log.info(
        "%d case(s) scored (%d with lesions): mean DSC %.4f, mean FPV %.3f ml, mean FNV %.3f ml",
        summary["n_cases"], summary["n_positive"], summary["mean_dsc"], summary["mean_fpv_ml"], summary["mean_fnv_ml"],
    )
    # A method with a patient-level label (multitask): AUC etc. against the clinical table, ROC and KM pictures.
    prognosis = evaluate_prognosis(pred_dir, dataset.cases, gt_dir, out_dir, settings.prognosis)
    if prognosis is not None:
        summary["prognosis"] = prognosis
    if out_dir is not None:
        out_dir = Path(out_dir)
        remove_stale_temporaries(out_dir)  # of a killed run
        write_metrics_csv(out_dir / METRICS_CSV, rows)
        write_json(out_dir / SUMMARY_JSON, nan_to_none(summary))
    return rows, summary
