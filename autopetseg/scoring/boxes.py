"""Scores of the 2D modules of ``cascade_3step``: a slice classifier and a box detector.

Boxes are ``[x1, y1, x2, y2]`` in pixel-edge coordinates (a box around pixel columns c0..c1 and
rows r0..r1 is ``[c0, r0, c1 + 1, r1 + 1]``), as torchvision's detection models use them.

* ``box_iou``: intersection over union of two sets of boxes.
* ``match_boxes``: greedy matching of one image's detections, highest score first, each to the
  unmatched ground-truth box of largest IoU at or above ``iou`` (PASCAL VOC's rule).
* ``average_precision``: VOC's all-point interpolated AP of the detections pooled over images at
  one IoU (0.5: "mAP@0.5"; with one class, mAP = AP).
* ``gmean_threshold``: the classifier threshold where the geometric mean of sensitivity and
  specificity is largest (Ahamed et al.); a slice is positive when its probability is
  ``>= threshold``, and the threshold sits halfway between the lowest probability called positive
  and the next lower one. ``rates_at`` gives sensitivity and specificity at a threshold.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from autopetseg.scoring.prognosis import roc_curve


def as_boxes(boxes) -> np.ndarray:
    """(n, 4) float64 array of ``boxes`` (any sequence of 4 numbers per box, or an empty one)."""
    array = np.asarray(boxes, dtype=np.float64)
    return array.reshape(-1, 4) if array.size else np.zeros((0, 4))


def box_area(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a, b) -> np.ndarray:
    """(n, m) IoU of boxes ``a`` (n) and ``b`` (m)."""
    a, b = as_boxes(a), as_boxes(b)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(detections, scores: Sequence[float], truth, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(per detection: matched a ground-truth box, per ground-truth box: matched) for one image."""
    detections, truth = as_boxes(detections), as_boxes(truth)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    overlaps = box_iou(detections, truth)
    hit = np.zeros(len(detections), dtype=bool)
    found = np.zeros(len(truth), dtype=bool)
    for d in order:
        if not len(truth):
            break
        candidates = np.where(found, -1.0, overlaps[d])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou:
            hit[d], found[best] = True, True
    return hit, found


def average_precision(images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], iou: float = 0.5) -> float:
    """VOC all-point AP over ``images`` = [(detection boxes, their scores, ground-truth boxes)];
    nan when there is no ground-truth box."""
    scores, hits, n_truth = [], [], 0
    for boxes, image_scores, truth in images:
        hit, _ = match_boxes(boxes, image_scores, truth, iou)
        scores.extend(np.asarray(image_scores, dtype=np.float64).tolist())
        hits.extend(hit.tolist())
        n_truth += len(as_boxes(truth))
    if n_truth == 0:
        return math.nan
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits, dtype=np.float64)[order])
    recall = np.concatenate([[0.0], tp / n_truth])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(tp) + 1)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    return float(np.sum(np.diff(recall) * envelope[1:]))


def rates_at(scores: Sequence[float], labels: Sequence[int], threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold`` (nan where a class is absent)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positive = s >= threshold
    sensitivity = float(positive[y].mean()) if y.any() else math.nan
    specificity = float((~positive[~y]).mean()) if (~y).any() else math.nan
    return sensitivity, specificity


def gmean_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold of the largest sqrt(sensitivity · specificity) (module doc); nan with one class."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    fpr, tpr, thresholds = roc_curve(s, y)
    best = 1 + int(np.argmax(np.sqrt(tpr[1:] * (1.0 - fpr[1:]))))  # the first maximum: the highest threshold
    lower = s[s < thresholds[best]]
    return float((thresholds[best] + lower.max()) / 2) if lower.size else float(thresholds[best])
