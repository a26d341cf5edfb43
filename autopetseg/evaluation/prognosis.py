"""Prognosis scores of a prediction folder (``evaluate``, with a method that predicts a patient label).

Runs when the ground truth's ``clinical.csv`` has ``label_column`` and the prediction folder's
``predictions.csv`` has ``probability_column`` (``multitask``: ``prognosis_probability`` and
``prognosis_label``, the label at the folds' mean validation Youden threshold; a folder without
the label column is called at probability >= 0.5). For the cases with both:

* ``summary.json`` → ``prognosis``: AUC, accuracy, sensitivity, specificity and Youden index
  (Liu et al., Tables 3-4) with percentile bootstrap intervals (``scoring.prognosis``);
* ``prognosis.csv``: one row per case (label, probability, predicted label, time, event);
* ``roc.png``: the ROC curve with the AUC and the operating point of the predicted labels;
* with ``time_column`` and ``event_column`` in the clinical table (event 1, censored 0): the
  Kaplan-Meier curves of the two predicted groups with the log-rank p-value (Fig. 6),
  ``km.png``, and ``prognosis.survival`` in the summary.

A label or a time/event value that is not a number of the right kind is an ``InputError``
naming the case, the column and ``clinical.csv``.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from autopetseg.data.discovery import CLINICAL_FILE
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path
from autopetseg.scoring.prognosis import kaplan_meier, logrank_p, prognosis_report, roc_curve

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
PROGNOSIS_CSV = "prognosis.csv"
ROC_PNG = "roc.png"
KM_PNG = "km.png"


@dataclass(frozen=True)
class PrognosisEvaluationSettings:
    """Column names (ground truth: ``clinical.csv``; prediction: ``predictions.csv``) and the bootstrap."""

    label_column: str = "prognosis"
    probability_column: str = "prognosis_probability"
    predicted_label_column: str = "prognosis_label"
    time_column: str = "time"
    event_column: str = "event"
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


def _number(text: str, case: str, column: str, where: Path, allowed: Sequence[float] | None = None) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value) or (allowed is not None and value not in allowed):
        wanted = " or ".join(f"{a:g}" for a in allowed) if allowed is not None else "a number"
        raise InputError(f"column {column!r} must hold {wanted}, got {text!r}", case, where)
    return value


def read_predicted(pred_dir: Path, s: PrognosisEvaluationSettings) -> dict[str, tuple[float, int]] | None:
    """case → (probability, predicted label) from ``predictions.csv``; None when it has no probabilities."""
    path = pred_dir / PREDICTIONS_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or s.probability_column not in rows[0]:
        return None
    has_label = s.predicted_label_column in rows[0]
    if not has_label:
        log.warning("%s has no %r column: predicted labels at probability >= 0.5", path, s.predicted_label_column)
    out = {}
    for row in rows:
        p = _number(row[s.probability_column], row["case_id"], s.probability_column, path)
        label = _number(row[s.predicted_label_column], row["case_id"], s.predicted_label_column, path, (0, 1)) \
            if has_label else float(p >= 0.5)
        out[row["case_id"]] = (p, int(label))
    return out


def evaluate_prognosis(pred_dir: str | Path, cases: Sequence[CaseRecord], gt_dir: str | Path,
                       out_dir: str | Path | None, settings: PrognosisEvaluationSettings = PrognosisEvaluationSettings()
                       ) -> dict | None:
    """The prognosis summary (module doc), or None when predictions or ground-truth labels are missing."""
    s = settings
    predicted = read_predicted(Path(pred_dir), s)
    if predicted is None or not any(s.label_column in c.clinical for c in cases):
        return None
    clinical = Path(gt_dir) / CLINICAL_FILE
    rows = []
    for case in cases:
        text = case.clinical.get(s.label_column, "")
        if case.case_id not in predicted or text == "":
            continue
        p, label = predicted[case.case_id]
        row = {"case_id": case.case_id, "label": int(_number(text, case.case_id, s.label_column, clinical, (0, 1))),
               "probability": p, "predicted": label}
        if case.clinical.get(s.time_column, "") != "" and case.clinical.get(s.event_column, "") != "":
            row["time"] = _number(case.clinical[s.time_column], case.case_id, s.time_column, clinical)
            row["event"] = int(_number(case.clinical[s.event_column], case.case_id, s.event_column, clinical, (0, 1)))
        rows.append(row)
    if not rows:
        log.warning("no case has both a %r label and a predicted %r", s.label_column, s.probability_column)
        return None
    labels = [r["label"] for r in rows]
    summary = prognosis_report([r["probability"] for r in rows], [r["predicted"] for r in rows], labels,
                               s.bootstrap_resamples, s.confidence, s.seed)
    summary.update(n_positive=int(sum(labels)), settings=asdict(s))
    survival = [r for r in rows if "time" in r]
    if survival:
        times, events, groups = ([r[k] for r in survival] for k in ("time", "event", "predicted"))
        summary["survival"] = {"n": len(survival), "n_events": int(sum(events)),
                               "n_predicted_positive": int(sum(groups)), "logrank_p": logrank_p(times, events, groups)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_rows(out_dir / PROGNOSIS_CSV, rows)
        if len(set(labels)) == 2:
            _plot_roc(out_dir / ROC_PNG, rows, summary)
        if survival:
            _plot_km(out_dir / KM_PNG, survival, summary["survival"]["logrank_p"], s)
    log.info("prognosis of %d case(s): AUC %.3f, accuracy %.3f, sensitivity %.3f, specificity %.3f", len(rows),
             summary["auc"], summary["accuracy"], summary["sensitivity"], summary["specificity"])
    return summary


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns = ["case_id", "label", "probability", "predicted", "time", "event"]
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _plot_roc(path: Path, rows: list[dict], summary: dict) -> None:
    from autopetseg.evaluation.report import _new_figure, _save  # report imports evaluate, which imports this

    fpr, tpr, _ = roc_curve([r["probability"] for r in rows], [r["label"] for r in rows])
    fig, (ax,) = _new_figure(1, 4.5, 4.5)
    low, high = summary["auc_ci"]
    ax.plot(fpr, tpr, drawstyle="default", marker=".", label=f"AUC {summary['auc']:.3f} ({low:.3f}-{high:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.scatter([1 - summary["specificity"]], [summary["sensitivity"]], color="tab:red", zorder=3,
               label=f"predicted labels: sens {summary['sensitivity']:.2f}, spec {summary['specificity']:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, {len(rows)} cases ({summary['n_positive']} positive)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _plot_km(path: Path, rows: list[dict], p_value: float, s: PrognosisEvaluationSettings) -> None:
    from autopetseg.evaluation.report import _new_figure, _save

    fig, (ax,) = _new_figure(1, 5.5, 4.0)
    for group, colour in ((0, "tab:blue"), (1, "tab:red")):
        part = [r for r in rows if r["predicted"] == group]
        if not part:
            continue
        t, surv = kaplan_meier([r["time"] for r in part], [r["event"] for r in part])
        ax.step(np.concatenate([[0.0], t]), np.concatenate([[1.0], surv]), where="post", color=colour,
                label=f"predicted {group} (n={len(part)})")
        censored = np.asarray([r["time"] for r in part if r["event"] == 0])
        if censored.size:  # a tick where a case left the study without the event, on the step it left
            at = np.searchsorted(t, censored, side="right") - 1
            ax.plot(censored, np.where(at >= 0, surv[np.maximum(at, 0)], 1.0), "|", color=colour, markersize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(s.time_column)
    ax.set_ylabel(f"survival ({s.event_column} free)")
    ax.set_title(f"Kaplan-Meier by predicted {s.label_column}; log-rank p = {p_value:.3g}")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
