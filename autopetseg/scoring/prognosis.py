"""Scores of a patient-level prediction (a probability per case against a 0/1 outcome), and survival curves.

Used by the multitask trainer's validation (AUC, the Youden threshold) and by ``evaluate``
(prognosis metrics with bootstrap intervals, ROC and Kaplan-Meier pictures). Liu et al. report
AUC, accuracy, sensitivity, specificity and Youden's index (Tables 3-4) and Kaplan-Meier curves
of the predicted groups with a log-rank test (Fig. 6).

* ``roc_auc``: the Mann-Whitney statistic, ties counted one half (average ranks), so it equals the
  trapezoidal area under the ROC curve with tied scores joined by one diagonal step.
* ``roc_curve``: one point per distinct score (descending), from (0, 0) to (1, 1).
* ``youden_threshold``: the cut with the largest sensitivity + specificity - 1. A case is positive
  when its score is ``>= threshold``; the threshold sits halfway between the lowest score called
  positive and the next lower score (so new cases between the two are not decided by which side
  of a training score they fall on). Ties of J go to the higher threshold (fewer positives).
* ``bootstrap_intervals``: percentile intervals over cases resampled with replacement (seeded);
  resamples where a metric is undefined (one class only) are left out of that metric.
* ``kaplan_meier`` / ``logrank``: ``scipy.stats.ecdf`` and ``scipy.stats.logrank`` on right-censored
  times (event 1 = the event happened at that time, 0 = censored then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats


def _as_binary(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()))}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    return s, y.astype(np.int64)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count one half); nan when one class is absent."""
    s, y = _as_binary(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(s)  # average ranks: a tie between a positive and a negative counts 1/2
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds): point k calls ``score >= thresholds[k]``
    positive; the first point (threshold +inf) calls nothing positive."""
    s, y = _as_binary(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both classes")
    thresholds = np.unique(s)[::-1]
    tpr = np.array([0.0] + [np.count_nonzero(s[y == 1] >= t) / n_pos for t in thresholds])
    fpr = np.array([0.0] + [np.count_nonzero(s[y == 0] >= t) / n_neg for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def youden_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold of the largest Youden index (module doc); nan when one class is absent."""
    s, y = _as_binary(scores, labels)
    if y.min() == y.max():
        return math.nan
    fpr, tpr, thresholds = roc_curve(s, y)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # the first maximum: the highest threshold among ties
    lowest_positive = thresholds[best]
    below = s[s < lowest_positive]
    return float((lowest_positive + below.max()) / 2) if below.size else float(lowest_positive)


@dataclass(frozen=True)
class BinaryScores:
    """Counts and rates of 0/1 predictions against 0/1 outcomes (nan where a class is absent)."""

    n: int
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else math.nan

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else math.nan

    @property
    def youden_index(self) -> float:
        return self.sensitivity + self.specificity - 1.0

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn, "accuracy": self.accuracy,
                "sensitivity": self.sensitivity, "specificity": self.specificity, "youden_index": self.youden_index}


def binary_scores(predicted: Sequence[int], labels: Sequence[int]) -> BinaryScores:
    p, y = _as_binary(predicted, labels)
    p = p.astype(np.int64)
    return BinaryScores(int(y.size), int(((p == 1) & (y == 1)).sum()), int(((p == 1) & (y == 0)).sum()),
                        int(((p == 0) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum()))


def prognosis_metrics(probabilities: Sequence[float], predicted: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """AUC of the probabilities and the scores of the 0/1 predictions (the paper's Table 3 columns)."""
    return {"auc": roc_auc(probabilities, labels), **binary_scores(predicted, labels).as_dict()}


def bootstrap_intervals(
    metric: Callable[[np.ndarray], dict[str, float]],
    n_cases: int,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every number ``metric(indices)`` returns, over ``n_resamples`` draws of
    ``n_cases`` case indices with replacement."""
    if n_cases < 1 or n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("bootstrap needs cases, resamples and a confidence in (0, 1)")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        for key, value in metric(rng.integers(0, n_cases, n_cases)).items():
            if value is not None and not math.isnan(value):
                draws.setdefault(key, []).append(float(value))
    tail = (1.0 - confidence) / 2 * 100
    return {key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for key, v in draws.items()}


def prognosis_report(probabilities: Sequence[float], predicted: Sequence[int], labels: Sequence[int],
                     n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """``prognosis_metrics`` with a ``<metric>_ci`` [low, high] beside each rate."""
    prob, y = _as_binary(probabilities, labels)
    pred, _ = _as_binary(predicted, labels)
    point = prognosis_metrics(prob, pred, y)
    rates = ("auc", "accuracy", "sensitivity", "specificity", "youden_index")

    def metric(idx: np.ndarray) -> dict[str, float]:
        resampled = prognosis_metrics(prob[idx], pred[idx], y[idx])
        return {k: resampled[k] for k in rates}

    intervals = bootstrap_intervals(metric, y.size, n_resamples, confidence, seed)
    out = dict(point)
    for key in rates:
        out[f"{key}_ci"] = list(intervals.get(key, (math.nan, math.nan)))
    out.update(bootstrap_resamples=n_resamples, confidence=confidence)
    return out


# ----------------------------------------------------------------------------- survival


def _censored(times: Sequence[float], events: Sequence[int]) -> stats.CensoredData:
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    e = np.asarray(events).reshape(-1)
    if t.shape != e.shape or t.size == 0:
        raise ValueError(f"{t.size} times but {e.size} events")
    if not np.isin(e, (0, 1)).all():
        raise ValueError("events must be 0 (censored) or 1 (event)")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("times must be finite and >= 0")
    return stats.CensoredData(uncensored=t[e == 1], right=t[e == 0])


def kaplan_meier(times: Sequence[float], events: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct times, survival just after each) of the Kaplan-Meier estimate (``scipy.stats.ecdf``)."""
    sf = stats.ecdf(_censored(times, events)).sf
    return np.asarray(sf.quantiles, dtype=np.float64), np.asarray(sf.probabilities, dtype=np.float64)


def logrank_p(times: Sequence[float], events: Sequence[int], groups: Sequence[int]) -> float:
    """Two-sided log-rank p-value between group 0 and group 1; nan when a group is empty."""
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events)
    g = np.asarray(groups)
    if not ((g == 0).any() and (g == 1).any()):
        return math.nan
    result = stats.logrank(_censored(t[g == 0], e[g == 0]), _censored(t[g == 1], e[g == 1]))
    return float(result.pvalue)
