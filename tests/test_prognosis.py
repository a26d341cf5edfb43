"""Prognosis scores (``scoring/prognosis.py``) and their evaluation (``evaluation/prognosis.py``).

* the AUC equals a hand count of the positive-negative pairs on a small table with ties, and the
  trapezoidal area under the ROC curve;
* the Youden threshold is the hand-found cut, halfway to the next lower score;
* the Kaplan-Meier estimate and the log-rank statistic equal hand computations on small censored tables;
* ``evaluate`` scores predictions.csv against clinical.csv, draws the ROC and the KM curves, and
  names the column and the case of a bad label.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.evaluation.prognosis import PrognosisEvaluationSettings, evaluate_prognosis
from autopetseg.scoring.prognosis import (
    binary_scores,
    bootstrap_intervals,
    kaplan_meier,
    logrank_p,
    prognosis_report,
    roc_auc,
    roc_curve,
    youden_threshold,
)


def test_auc_with_ties_equals_the_hand_count_of_pairs():
    scores = [0.1, 0.4, 0.4, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    # positives 0.4, 0.8, 0.4 against negatives 0.1, 0.4: (1 + 0.5) + (1 + 1) + (1 + 0.5) = 5 of 6 pairs
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    assert thresholds[0] == np.inf and list(thresholds[1:]) == [0.8, 0.4, 0.1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))
    assert roc_auc([3, 2, 1], [1, 0, 0]) == 1.0 and roc_auc([1, 2, 3], [1, 0, 0]) == 0.0


def test_youden_threshold_is_the_hand_found_cut_halfway_to_the_next_score():
    scores = [0.1, 0.3, 0.35, 0.6, 0.8]
    labels = [0, 0, 1, 0, 1]
    # cuts >= 0.8: J 0.5; >= 0.6: 0.5 - 1/3; >= 0.35: 1 - 1/3 (best); >= 0.3: 1 - 2/3; >= 0.1: 0
    assert youden_threshold(scores, labels) == pytest.approx((0.35 + 0.3) / 2)
    # equal J for >= 0.9 and >= 0.5 (both 0.5; >= 0.6 gives 0): the higher cut, fewer positives
    assert youden_threshold([0.9, 0.6, 0.5, 0.2], [1, 0, 1, 0]) == pytest.approx((0.9 + 0.6) / 2)
    s = binary_scores([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (s.tp, s.fp, s.tn, s.fn) == (2, 1, 1, 1)
    assert (s.accuracy, s.sensitivity, s.specificity) == pytest.approx((0.6, 2 / 3, 0.5))
    assert s.youden_index == pytest.approx(2 / 3 + 0.5 - 1)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        roc_auc([0.1, 0.2], [0, 2])


def test_bootstrap_intervals_hold_the_estimate_and_are_reproducible():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    scores = labels + rng.normal(0, 0.8, labels.size)
    report = prognosis_report(scores, (scores > 0.5).astype(int), labels, n_resamples=300, seed=3)
    low, high = report["auc_ci"]
    assert low < report["auc"] < high and 0.5 < low
    assert report == prognosis_report(scores, (scores > 0.5).astype(int), labels, n_resamples=300, seed=3)
    # separable data: every resample has AUC 1
    assert bootstrap_intervals(lambda idx: {"auc": roc_auc(np.arange(6)[idx], np.repeat([0, 1], 3)[idx])}, 6,
                               200)["auc"] == (1.0, 1.0)


def test_kaplan_meier_equals_the_hand_estimate_on_a_censored_table():
    times = [1, 2, 3, 3, 4, 5, 6]
    events = [1, 0, 1, 1, 0, 1, 0]
    t, s = kaplan_meier(times, events)
    # t=1: 6/7 at risk survive; t=2 censored; t=3: 2 of 5 at risk die; t=4 censored; t=5: 1 of 2 dies
    expected = {1: 6 / 7, 2: 6 / 7, 3: 6 / 7 * 3 / 5, 4: 6 / 7 * 3 / 5, 5: 6 / 7 * 3 / 5 / 2, 6: 6 / 7 * 3 / 5 / 2}
    np.testing.assert_allclose(t, list(expected))
    np.testing.assert_allclose(s, list(expected.values()))


def test_logrank_equals_the_hand_statistic():
    # group 0: events at 1, 2, 3, censored at 4; group 1: events at 5, 6, censored at 7, 8.
    times = [1, 2, 3, 4, 5, 6, 7, 8]
    events = [1, 1, 1, 0, 1, 1, 0, 0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    # observed - expected for group 0 at its event times (at risk 8, 7, 6; 4 of group 0, then 3, 2):
    # 3 - (4/8 + 3/7 + 2/6); variance 4·4·7/(64·7) + 3·4·6/(49·6) + 2·4·5/(36·5)
    o_minus_e = 3 - (4 / 8 + 3 / 7 + 2 / 6)
    variance = 0.25 + 12 / 49 + 8 / 36
    z = o_minus_e / math.sqrt(variance)
    assert logrank_p(times, events, groups) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-6)
    assert math.isnan(logrank_p(times, events, [0] * 8))


def _case(case_id, **clinical) -> CaseRecord:
    return CaseRecord(case_id=case_id, pet=None, ct=None, label=None, clinical={k: str(v) for k, v in clinical.items()})


def _predictions(folder, rows):
    with open(folder / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "tmtv_ml", "prognosis_probability", "prognosis_label"])
        writer.writeheader()
        writer.writerows(rows)


def test_evaluation_scores_labels_draws_roc_and_kaplan_meier(tmp_path):
    probs = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.6, 0.1]
    labels = [1, 1, 0, 1, 0, 0, 1, 0]
    predicted = [int(p >= 0.5) for p in probs]
    _predictions(tmp_path, [{"case_id": f"c{i}", "tmtv_ml": 1.0, "prognosis_probability": p, "prognosis_label": y}
                            for i, (p, y) in enumerate(zip(probs, predicted))])
    times = [2, 3, 10, 8, 12, 15, 4, 20]
    events = [1, 1, 0, 1, 0, 0, 1, 1]
    cases = [_case(f"c{i}", prognosis=y, months=t, relapse=e) for i, (y, t, e) in enumerate(zip(labels, times, events))]
    cases.append(_case("unlabelled"))  # no label: not scored
    settings = PrognosisEvaluationSettings(time_column="months", event_column="relapse", bootstrap_resamples=200)
    out = tmp_path / "eval"
    summary = evaluate_prognosis(tmp_path, cases, tmp_path, out, settings)
    assert summary["n"] == 8 and summary["n_positive"] == 4
    assert summary["auc"] == pytest.approx(roc_auc(probs, labels))
    scores = binary_scores(predicted, labels)
    assert (summary["accuracy"], summary["sensitivity"], summary["specificity"]) == pytest.approx(
        (scores.accuracy, scores.sensitivity, scores.specificity))
    assert summary["survival"]["logrank_p"] == pytest.approx(logrank_p(times, events, predicted))
    for name in ("prognosis.csv", "roc.png", "km.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "prognosis.csv") as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == [f"c{i}" for i in range(8)]
    json.dumps(summary)  # JSON-ready for summary.json

    # without time and event columns: no survival part, no KM picture
    assert "survival" not in evaluate_prognosis(tmp_path, cases[:8], tmp_path, None, PrognosisEvaluationSettings(
        bootstrap_resamples=50))
    # nothing to score: no label column in the ground truth, or no probabilities in predictions.csv
    assert evaluate_prognosis(tmp_path, [_case("c0", other=1)], tmp_path, None) is None
    assert evaluate_prognosis(tmp_path / "nowhere", cases, tmp_path, None) is None


def test_a_bad_label_names_the_case_and_the_column(tmp_path):
    _predictions(tmp_path, [{"case_id": "c0", "tmtv_ml": 1.0, "prognosis_probability": 0.3, "prognosis_label": 0}])
    with pytest.raises(InputError, match=r"case 'c0'.*clinical.csv.*column 'prognosis' must hold 0 or 1, got 'relapsed'"):
        evaluate_prognosis(tmp_path, [_case("c0", prognosis="relapsed")], tmp_path, None)
