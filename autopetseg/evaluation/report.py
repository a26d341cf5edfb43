"""The lesion-level report of the L1DFL paper (Dzikunu et al., §2.7 and §3.2-3.4) on any predictions.

``autopetseg evaluate -p PRED -g CASES --report`` writes, under ``<evaluate output>/report/``:

- ``scenarios.csv``: patient-level DSC (mean ± std, median and quartiles) and detection counts
  per lesion scenario. Scenarios (§2.7): single ``S = {x | n(G_l) = 1}``, multiple
  ``M = {x | n(G_l) >= 2}``, with ``n(G_l)`` the 18-connected ground-truth lesions; also ``all``
  (every scored case) and ``lesion_free`` (detection only: their DSC is undefined).
- ``patient_tmtv_thresholds.csv``: per scenario, median patient DSC over the cases whose ground
  truth TMTV ``v > t`` (§2.7.1 "Clinical Metrics", Figure 5). Thresholds ``t``: 0 ml, then the
  25th, 50th, 75th and 85th percentiles of that scenario's ground-truth TMTV ("thresholds based
  on the inter-quartile range from 0 to the 85th percentile").
- ``lesion_mtv_thresholds.csv``: the same at the lesion level (§2.7.2): lesion-wise DSC of the
  ground-truth lesions with MTV ``v_l > t``, thresholds from the lesions' MTV percentiles.
- ``dmax_groups.csv``: multiple-lesion cases only (§2.7.1), grouped by ground-truth Dmax
  (largest distance between lesion voxels, eq. 15) into quartile groups G0-G3 (§3.4, Figure 6):
  by default the quartiles of the data at hand, as the paper derived its groups; the paper's own
  edges (0-9, 9-11, 11-14, 14-60 cm) are ``PAPER_DMAX_EDGES_MM``.
- ``lesions.csv``: one row per ground-truth lesion (MTV, TLA, SUVmax, lesion-wise DSC, detected)
  and per false-positive predicted component (volume, TLA): the data the tables are built from.
- PNG plots (matplotlib, Agg canvas, no pyplot state): ``scenarios_dsc.png`` (Figure 4),
  ``thresholds_dsc.png`` (Figure 5 a/b), ``dmax_groups.png`` (Figure 6), ``detection_f1.png``.

Every group also gets detection counts by the paper's SUVmax rule (``metrics.detection``):
TP, FP, FN summed over the group and the F1 of those sums (``f1``); patient groups also give the
mean of per-case F1 (``mean_case_f1``, what Table 1 reports). At the lesion level the paper
defines no per-threshold detection; here a lesion with ``v_l > t`` is a TP or FN, and a
false-positive predicted component counts as FP when its own volume is ``> t``.

Lesion-level numbers need the masks again: ``collect_lesions`` reads each scored case once more
(reusing ``metrics``' labelling, lesion-wise DSC and SUVmax voxels), in parallel if asked.
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
from autopetseg.data.imageio import Geometry, read_image
from autopetseg.data.parallel import run_per_case
from autopetseg.data.records import CaseRecord
from autopetseg.evaluation.evaluate import _read_mask, find_predictions
from autopetseg.scoring.metrics import (
    bounding_box,
    f1_score,
    label_lesions,
    lesion_wise_dice,
    suvmax_voxels,
)
from autopetseg.io_utils import atomic_path

log = logging.getLogger(__name__)

REPORT_DIR = "report"
# The paper's Dmax groups G0-G3 (§3.4): 0-9, 9-11, 11-14, 14-60 cm, the quartiles of its test set.
PAPER_DMAX_EDGES_MM = (0.0, 90.0, 110.0, 140.0, 600.0)
SCENARIOS = ("all", "single", "multiple", "lesion_free")


@dataclass(frozen=True)
class ReportSettings:
    """``threshold_percentiles``: percentiles of the ground-truth (T)MTV used as thresholds after
    0 ml (the paper: IQR up to the 85th). ``dmax_edges_mm``: group edges (5 values, G0-G3);
    ``None`` takes the quartiles (min, 25, 50, 75 %, max) of the multiple-lesion cases' Dmax.
    ``plots``: write the PNGs. ``num_processes``: cases read in parallel for the lesion table."""

    threshold_percentiles: tuple[float, ...] = (25.0, 50.0, 75.0, 85.0)
    dmax_edges_mm: tuple[float, ...] | None = None
    plots: bool = True
    num_processes: int = 1


# --------------------------------------------------------------------------------------------
# Lesion table: one pass over the masks


def lesion_records(case_id: str, gt: np.ndarray, pred: np.ndarray, suv: np.ndarray | None, spacing_zyx) -> list[dict]:
    """Rows for one case: each ground-truth lesion and each false-positive predicted component.

    Lesion rows (``kind="lesion"``, numbered 1.. in ``lesion_wise_dice``'s order): ``volume_ml``
    (MTV), ``tla`` (Σ SUV × voxel ml), ``suvmax``, ``dsc`` (lesion-wise, 0 when missed) and
    ``detected`` (the prediction holds the lesion's SUVmax voxel). False-positive rows
    (``kind="false_positive"``): predicted components touching no ground-truth voxel, with
    ``volume_ml`` and ``tla``. Without SUV, ``tla``/``suvmax``/``detected`` are ``nan``.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0  # as clinical_numbers computes TMTV
    box = bounding_box(gt, pred)
    if box is None:
        return []
    # Label in the box of both masks, as lesion_wise_dice does, so lesion numbers agree with it.
    gt_labels, n_lesions = label_lesions(gt[box])
    pred_labels, n_pred = label_lesions(pred[box])
    box_suv = None if suv is None else np.asarray(suv, dtype=np.float64)[box]
    rows: list[dict] = []
    if n_lesions:
        in_lesion = gt_labels > 0
        sizes = np.bincount(gt_labels[in_lesion], minlength=n_lesions + 1)[1:]
        dsc = lesion_wise_dice(gt[box], pred[box])
        if box_suv is not None:
            tla = np.bincount(gt_labels[in_lesion], weights=box_suv[in_lesion], minlength=n_lesions + 1)[1:] * voxel_ml
            hottest = suvmax_voxels(gt_labels, n_lesions, box_suv)
            suvmax = box_suv.ravel()[hottest]
            detected = pred[box].ravel()[hottest].astype(float)
        else:
            tla = suvmax = detected = np.full(n_lesions, math.nan)
        for i in range(n_lesions):
            rows.append({
                "case_id": case_id, "kind": "lesion", "index": i + 1, "volume_ml": float(sizes[i] * voxel_ml),
                "tla": float(tla[i]), "suvmax": float(suvmax[i]), "dsc": float(dsc[i]), "detected": float(detected[i]),
            })
    if n_pred:
        in_pred = pred_labels > 0
        touching = np.unique(pred_labels[in_pred & (gt_labels > 0)])
        sizes = np.bincount(pred_labels[in_pred], minlength=n_pred + 1)
        if box_suv is not None:
            tla = np.bincount(pred_labels[in_pred], weights=box_suv[in_pred], minlength=n_pred + 1) * voxel_ml
        else:
            tla = np.full(n_pred + 1, math.nan)
        untouched = np.setdiff1d(np.arange(1, n_pred + 1), touching)
        for j, component in enumerate(untouched):
            rows.append({
                "case_id": case_id, "kind": "false_positive", "index": j + 1,
                "volume_ml": float(sizes[component] * voxel_ml), "tla": float(tla[component]),
                "suvmax": math.nan, "dsc": math.nan, "detected": math.nan,
            })
    return rows


def case_lesions(record: CaseRecord, prediction: Path | None) -> list[dict]:
    """``lesion_records`` of a labelled case read from disk (checks as ``evaluate_case``);
    ``prediction=None`` scores an empty mask."""
    case = record.case_id
    suv, reference, reference_name = None, None, "ground-truth"
    if record.pet is not None:
        pet_image = read_image(record.pet, case, "PET")
        reference, reference_name = Geometry.of(pet_image), "PET"
        suv = sitk.GetArrayFromImage(pet_image)
    gt, gt_geometry = _read_mask(record.label, case, "label", reference, reference_name)
    reference = reference or gt_geometry
    if prediction is not None:
        pred, _ = _read_mask(prediction, case, "prediction", reference, reference_name)
    else:
        pred = np.zeros_like(gt)
    return lesion_records(case, gt, pred, suv, reference.spacing_zyx)


def _lesions_worker(record: CaseRecord, predictions: dict[str, Path]) -> list[dict]:
    """Module-level (picklable) worker for ``run_per_case``."""
    return case_lesions(record, predictions.get(record.case_id))


def collect_lesions(pred_dir: str | Path, gt_dir: str | Path, rows: list[dict], num_processes: int = 1) -> list[dict]:
    """The lesion table of the cases ``evaluate_folder`` scored (``rows``), in their order.

    A case whose row says the prediction was missing is read as an empty mask, as it was scored.
    """
    wanted = [r["case_id"] for r in rows]
    records = discover(gt_dir).by_id()
    predictions = find_predictions(pred_dir)
    results, failures = run_per_case(
        functools.partial(_lesions_worker, predictions=predictions),
        [records[c] for c in wanted], num_processes, desc="lesion report",
    )
    if failures:  # evaluate_folder scored these cases, so the files changed in between
        log.warning("%d case(s) could not be read for the lesion report: %s", len(failures), "; ".join(map(str, failures)))
    return [row for case in wanted for row in results.get(case, [])]


# --------------------------------------------------------------------------------------------
# Tables


def scenario_of(lesion_count) -> str:
    """``single`` (1 lesion), ``multiple`` (>= 2) or ``lesion_free`` (0), the paper's S and M."""
    count = int(lesion_count)
    return "lesion_free" if count == 0 else "single" if count == 1 else "multiple"


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def dsc_stats(dsc) -> dict:
    """``n``, ``mean_dsc``, ``std_dsc`` (population), ``median_dsc``, ``q1_dsc``, ``q3_dsc`` of the
    defined (non-nan) values; ``nan`` statistics when there are none."""
    values = np.asarray([v for v in dsc if not math.isnan(v)], dtype=np.float64)
    return {
        "n": int(values.size),
        "mean_dsc": float(values.mean()) if values.size else math.nan,
        "std_dsc": float(values.std()) if values.size else math.nan,
        "median_dsc": _quantile(values, 50),
        "q1_dsc": _quantile(values, 25),
        "q3_dsc": _quantile(values, 75),
    }


def detection_stats(tp, fp, fn) -> dict:
    """Summed ``tp``, ``fp``, ``fn`` (``nan`` entries, cases without PET, left out) and their F1."""
    sums = [int(np.nansum(np.asarray(v, dtype=np.float64))) if len(v) else 0 for v in (tp, fp, fn)]
    return {"tp": sums[0], "fp": sums[1], "fn": sums[2], "f1": f1_score(*sums)}


def _patient_group(rows: list[dict]) -> dict:
    """Patient-level statistics of a group of evaluate rows (DSC over lesion-positive cases)."""
    stats = dsc_stats([r["dsc"] for r in rows if r["gt_positive"]])
    stats["n_cases"] = len(rows)
    del stats["n"]
    stats.update(detection_stats([r["tp"] for r in rows], [r["fp"] for r in rows], [r["fn"] for r in rows]))
    case_f1 = [r["f1"] for r in rows if not math.isnan(r["f1"])]
    stats["mean_case_f1"] = float(np.mean(case_f1)) if case_f1 else math.nan
    tlg = np.asarray([r["gt_tlg"] for r in rows if r["gt_positive"]], dtype=np.float64)
    stats["median_gt_tlg"] = float(np.nanmedian(tlg)) if tlg.size and not np.isnan(tlg).all() else math.nan
    return stats


def thresholds(values, percentiles: tuple[float, ...]) -> list[tuple[str, float]]:
    """(label, t): 0 ml, then the given percentiles of ``values`` (empty when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return []
    return [("0", 0.0)] + [(f"p{p:g}", float(np.percentile(values, p))) for p in percentiles]


def _in_scenario(scenario: str, row_scenario: str) -> bool:
    return scenario == "all" or scenario == row_scenario


def scenario_table(rows: list[dict]) -> list[dict]:
    """One row per scenario that has cases (``all`` always)."""
    table = []
    for scenario in SCENARIOS:
        members = [r for r in rows if _in_scenario(scenario, scenario_of(r["gt_lesion_count"]))]
        if members or scenario == "all":
            table.append({"scenario": scenario, **_patient_group(members)})
    return table


def patient_threshold_table(rows: list[dict], percentiles: tuple[float, ...]) -> list[dict]:
    """Median patient DSC over cases with ground-truth TMTV ``> t``, per scenario and threshold.
    Thresholds come from the scenario's own lesion-positive cases."""
    table = []
    for scenario in ("all", "single", "multiple"):
        members = [r for r in rows if r["gt_positive"] and _in_scenario(scenario, scenario_of(r["gt_lesion_count"]))]
        for label, t in thresholds([r["gt_tmtv_ml"] for r in members], percentiles):
            above = [r for r in members if r["gt_tmtv_ml"] > t]
            table.append({"scenario": scenario, "threshold": label, "threshold_ml": t, **_patient_group(above)})
    return table


def lesion_threshold_table(rows: list[dict], lesions: list[dict], percentiles: tuple[float, ...]) -> list[dict]:
    """Median lesion-wise DSC over ground-truth lesions with MTV ``> t``, per scenario and threshold.

    Thresholds from the scenario's lesion MTVs. Detection: those lesions are TP (SUVmax voxel
    predicted) or FN; false-positive components of the scenario's cases with volume ``> t`` are FP.
    """
    scenario_by_case = {r["case_id"]: scenario_of(r["gt_lesion_count"]) for r in rows}
    table = []
    for scenario in ("all", "single", "multiple"):
        members = [les for les in lesions if _in_scenario(scenario, scenario_by_case[les["case_id"]])]
        gt_lesions = [les for les in members if les["kind"] == "lesion"]
        false_pos = [les for les in members if les["kind"] == "false_positive"]
        for label, t in thresholds([les["volume_ml"] for les in gt_lesions], percentiles):
            above = [les for les in gt_lesions if les["volume_ml"] > t]
            detected = np.asarray([les["detected"] for les in above], dtype=np.float64)
            fp = sum(1 for les in false_pos if les["volume_ml"] > t)
            stats = dsc_stats([les["dsc"] for les in above])
            stats["n_lesions"] = stats.pop("n")
            stats.update(detection_stats(detected == 1, [fp], (detected == 0)))
            tla = np.asarray([les["tla"] for les in above], dtype=np.float64)
            stats["median_tla"] = float(np.nanmedian(tla)) if tla.size and not np.isnan(tla).all() else math.nan
            table.append({"scenario": scenario, "threshold": label, "threshold_ml": t, **stats})
    return table


def dmax_edges(dmax_mm, edges: tuple[float, ...] | None) -> np.ndarray | None:
    """The five group edges: given, or (min, Q1, median, Q3, max) of ``dmax_mm``; ``None`` if no values."""
    if edges is not None:
        edges = np.asarray(edges, dtype=np.float64)
        if edges.shape != (5,) or np.any(np.diff(edges) < 0):
            raise ValueError(f"dmax_edges_mm must be 5 increasing values, got {tuple(edges)}")
        return edges
    values = np.asarray(dmax_mm, dtype=np.float64)
    values = values[~np.isnan(values)]
    return np.percentile(values, [0, 25, 50, 75, 100]) if values.size else None


def dmax_group(dmax: float, edges: np.ndarray) -> int | None:
    """Group index 0-3: G0 = [e0, e1], Gk = (e_k, e_k+1]; ``None`` outside [e0, e4] or ``nan``."""
    if math.isnan(dmax) or dmax < edges[0] or dmax > edges[-1]:
        return None
    return int(np.searchsorted(edges[1:-1], dmax, side="left"))


def dmax_table(rows: list[dict], edges_mm: tuple[float, ...] | None = None) -> list[dict]:
    """Patient-level statistics of the multiple-lesion cases per Dmax group G0-G3."""
    multiple = [r for r in rows if scenario_of(r["gt_lesion_count"]) == "multiple"]
    edges = dmax_edges([r["gt_dmax_mm"] for r in multiple], edges_mm)
    if edges is None:
        return []
    groups: list[list[dict]] = [[] for _ in range(4)]
    outside = []
    for r in multiple:
        g = dmax_group(float(r["gt_dmax_mm"]), edges)
        (outside if g is None else groups[g]).append(r)
    if outside:
        log.warning("%d multiple-lesion case(s) have Dmax outside the groups' %.1f-%.1f mm: %s",
                    len(outside), edges[0], edges[-1], ", ".join(r["case_id"] for r in outside))
    return [
        {"group": f"G{k}", "lower_mm": float(edges[k]), "upper_mm": float(edges[k + 1]), **_patient_group(groups[k])}
        for k in range(4)
    ]


def build_report(rows: list[dict], lesions: list[dict], settings: ReportSettings = ReportSettings()) -> dict[str, list[dict]]:
    """All tables from ``evaluate_folder``'s rows and ``collect_lesions``' lesion table."""
    scenario_by_case = {r["case_id"]: scenario_of(r["gt_lesion_count"]) for r in rows}
    return {
        "scenarios": scenario_table(rows),
        "patient_tmtv_thresholds": patient_threshold_table(rows, settings.threshold_percentiles),
        "lesion_mtv_thresholds": lesion_threshold_table(rows, lesions, settings.threshold_percentiles),
        "dmax_groups": dmax_table(rows, settings.dmax_edges_mm),
        "lesions": [{"scenario": scenario_by_case[les["case_id"]], **les} for les in lesions],
    }


# --------------------------------------------------------------------------------------------
# Files


COLUMNS = {
    "scenarios": ("scenario",),
    "patient_tmtv_thresholds": ("scenario", "threshold", "threshold_ml"),
    "lesion_mtv_thresholds": ("scenario", "threshold", "threshold_ml"),
    "dmax_groups": ("group", "lower_mm", "upper_mm"),
}
_PATIENT_STATS = ("n_cases", "mean_dsc", "std_dsc", "median_dsc", "q1_dsc", "q3_dsc", "tp", "fp", "fn", "f1", "mean_case_f1", "median_gt_tlg")
_LESION_STATS = ("n_lesions", "mean_dsc", "std_dsc", "median_dsc", "q1_dsc", "q3_dsc", "tp", "fp", "fn", "f1", "median_tla")
LESION_COLUMNS = ("case_id", "scenario", "kind", "index", "volume_ml", "tla", "suvmax", "dsc", "detected")


def _columns(name: str) -> tuple[str, ...]:
    if name == "lesions":
        return LESION_COLUMNS
    return COLUMNS[name] + (_LESION_STATS if name == "lesion_mtv_thresholds" else _PATIENT_STATS)


def _write_csv(path: Path, columns: tuple[str, ...], table: list[dict]) -> None:
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: row[c] for c in columns} for row in table)


def _save(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _new_figure(ncols: int, width: float = 5.0, height: float = 4.0):
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _boxes(ax, groups: list[list[float]], labels: list[str], rng: np.random.Generator) -> None:
    """Box plots (whiskers 1.5 IQR) with the points overlaid, as the paper's Figures 4 and 6."""
    data = [[v for v in g if not math.isnan(v)] for g in groups]
    positions = np.arange(1, len(data) + 1)
    shown = [(p, d) for p, d in zip(positions, data) if d]
    if shown:
        ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5, whis=1.5, showfliers=False)
    for p, d in zip(positions, data):
        ax.scatter(p + rng.uniform(-0.12, 0.12, len(d)), d, s=12, alpha=0.7, color="tab:blue", zorder=3)
    ax.set_xticks(positions, [f"{name}\n(n={len(d)})" for name, d in zip(labels, data)])
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("DSC")


def _plot_scenarios(rows, lesions, path: Path) -> None:
    rng = np.random.default_rng(0)  # fixed jitter: the same data give the same picture
    fig, (left, right) = _new_figure(2)
    labels = ["single", "multiple"]
    _boxes(left, [[r["dsc"] for r in rows if r["gt_positive"] and scenario_of(r["gt_lesion_count"]) == s] for s in labels], ["S", "M"], rng)
    left.set_title("patient-level DSC")
    _boxes(right, [[les["dsc"] for les in lesions if les["kind"] == "lesion" and les["scenario"] == s] for s in labels], ["S", "M"], rng)
    right.set_title("lesion-level DSC")
    _save(fig, path)


def _plot_thresholds(patient: list[dict], lesion: list[dict], path: Path) -> None:
    fig, axes = _new_figure(2)
    for ax, table, what in ((axes[0], patient, "TMTV"), (axes[1], lesion, "MTV")):
        for scenario in ("all", "single", "multiple"):
            part = [r for r in table if r["scenario"] == scenario]
            if part:
                ax.plot([r["threshold_ml"] for r in part], [r["median_dsc"] for r in part], marker="o", label=scenario)
        ax.set_xlabel(f"ground-truth {what} threshold t (ml); cases/lesions with v > t")
        ax.set_ylabel("median DSC")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{'patient' if what == 'TMTV' else 'lesion'} level")
        ax.legend()
    _save(fig, path)


def _plot_dmax(rows: list[dict], table: list[dict], path: Path) -> None:
    rng = np.random.default_rng(0)
    fig, (left, right) = _new_figure(2)
    multiple = [r for r in rows if scenario_of(r["gt_lesion_count"]) == "multiple"]
    edges = np.asarray([g["lower_mm"] for g in table] + [table[-1]["upper_mm"]])
    groups: list[list[float]] = [[] for _ in table]
    for r in multiple:
        k = dmax_group(float(r["gt_dmax_mm"]), edges)
        if k is not None:
            groups[k].append(r["dsc"])
    labels = [f"{g['group']}\n{g['lower_mm'] / 10:.0f}-{g['upper_mm'] / 10:.0f} cm" for g in table]
    _boxes(left, groups, labels, rng)
    left.set_title("multiple-lesion cases: patient DSC by Dmax group")
    right.bar(range(len(table)), [0 if math.isnan(g["f1"]) else g["f1"] for g in table], color="tab:orange")
    right.set_xticks(range(len(table)), [g["group"] for g in table])
    right.set_ylim(0, 1.05)
    right.set_ylabel("detection F1 (summed TP/FP/FN)")
    right.set_title("detection by Dmax group")
    _save(fig, path)


def _plot_detection(scenarios: list[dict], patient: list[dict], path: Path) -> None:
    fig, axes = _new_figure(2)
    names = [s["scenario"] for s in scenarios]
    x = np.arange(len(names))
    for offset, key, color in ((-0.25, "tp", "tab:green"), (0.0, "fp", "tab:red"), (0.25, "fn", "tab:gray")):
        axes[0].bar(x + offset, [s[key] for s in scenarios], width=0.25, label=key.upper(), color=color)
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("lesions (summed over cases)")
    axes[0].legend()
    axes[0].set_title("detection by scenario (SUVmax rule)")
    for scenario in ("all", "single", "multiple"):
        part = [r for r in patient if r["scenario"] == scenario]
        if part:
            axes[1].plot([r["threshold_ml"] for r in part], [r["f1"] for r in part], marker="o", label=scenario)
    axes[1].set_xlabel("ground-truth TMTV threshold t (ml)")
    axes[1].set_ylabel("F1 (cases with TMTV > t)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].legend()
    axes[1].set_title("detection F1 above TMTV thresholds")
    _save(fig, path)


def write_report(rows: list[dict], tables: dict[str, list[dict]], report_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write the tables as CSV (and the PNG plots) into ``report_dir``, atomically; the paths written."""
    report_dir = Path(report_dir)
    written = []
    for name, table in tables.items():
        path = report_dir / f"{name}.csv"
        _write_csv(path, _columns(name), table)
        written.append(path)
    if plots:
        pictures = {
            "scenarios_dsc.png": lambda p: _plot_scenarios(rows, tables["lesions"], p),
            "thresholds_dsc.png": lambda p: _plot_thresholds(tables["patient_tmtv_thresholds"], tables["lesion_mtv_thresholds"], p),
            "detection_f1.png": lambda p: _plot_detection(tables["scenarios"], tables["patient_tmtv_thresholds"], p),
        }
        if tables["dmax_groups"]:
            pictures["dmax_groups.png"] = lambda p: _plot_dmax(rows, tables["dmax_groups"], p)
        for name, draw in pictures.items():
            draw(report_dir / name)
            written.append(report_dir / name)
    return written


def report_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path,
    rows: list[dict],
    settings: ReportSettings = ReportSettings(),
) -> Path:
    """The whole report for an evaluated folder: ``rows`` from ``evaluate_folder``; returns ``out_dir/report``."""
    lesions = collect_lesions(pred_dir, gt_dir, rows, settings.num_processes)
    tables = build_report(rows, lesions, settings)
    report_dir = Path(out_dir) / REPORT_DIR
    write_report(rows, tables, report_dir, plots=settings.plots)
    n_single = sum(1 for r in rows if scenario_of(r["gt_lesion_count"]) == "single")
    n_multiple = sum(1 for r in rows if scenario_of(r["gt_lesion_count"]) == "multiple")
    log.info("lesion-level report (%d single-, %d multiple-lesion cases, %d lesions) in %s",
             n_single, n_multiple, sum(1 for les in lesions if les["kind"] == "lesion"), report_dir)
    return report_dir
