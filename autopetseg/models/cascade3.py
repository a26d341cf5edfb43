"""``cascade_3step`` over one cached volume: classify the axial slices, box the lesions, segment the boxes.

Shared by prediction (``inference/combine.py``, every fold of every stage) and by training (the
ROI segmenter validates the whole cascade of its fold). Each step takes a fold ensemble
(``Ensemble``: networks and normalised weights):

1. **Slice classifier** (``classify_slices``): every slice with uptake (PET max above the air bound;
   the others get probability 0) through every fold; the probabilities are averaged with the
   weights, and so are the folds' stored thresholds. A slice is kept when its probability is
   ``>=`` that threshold. ``bypass_classifier`` keeps every slice with uptake (the ablation of
   what step 1 buys).
2. **Detector** (``detect_slices``): the kept slices through every fold; each fold keeps its
   boxes by its own NMS IoU and score threshold (stored with its weights), then the folds' boxes
   of a slice are fused (``fold_fusion``: weighted box fusion at ``fusion_iou``, keeping fused
   boxes that score at least the weighted mean of the folds' thresholds; or NMS of their union),
   mapped back onto the slice (``models/roi.py``) and clipped to it.
3. **ROI segmenter** (``segment_boxes``): a square window around each box (the margin settings
   the segmenter was trained with), resized to R×R, through every fold (probabilities averaged);
   each ROI's probability goes back onto its window and the slice keeps the maximum where ROIs
   overlap. Slices stack into a (z, y, x) lesion probability on the cache grid, 0 outside the
   ROIs: the predictor maps it onto the PET grid and thresholds it at ``threshold``.

``Cascade3Settings`` lives in the method's notes (``method.json``: ``cascade_3step`` is
re-thresholded or re-fused by editing it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from autopetseg.models.roi import (
    FUSIONS,
    SliceFrame,
    axial_images,
    crop_rois,
    fuse_boxes,
    paste_rois,
    roi_window,
    slice_statistics,
)
from autopetseg.models.runtime import autocast
from autopetseg.models.sliding_window import EMPTY_PET_MAX

log = logging.getLogger(__name__)


def settings_from(cls, raw: dict[str, Any] | None, what: str):
    """The settings dataclass ``cls`` from a JSON dict of its fields (lists back to tuples); unknown keys are
    a ``ValueError`` naming them (``what``: where they were read)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}: {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass(frozen=True)
class Cascade3Settings:
    """How the folds' outputs combine at prediction time (module doc)."""

    fold_fusion: str = "wbf"  # "wbf" or "nms"
    fusion_iou: float = 0.55  # weighted box fusion's usual IoU (Solovyev et al.)
    threshold: float = 0.5  # of the pasted ROI probability
    bypass_classifier: bool = False
    slice_batch: int = 16  # slices (or ROIs) per forward pass

    def __post_init__(self):
        if self.fold_fusion not in FUSIONS:
            raise ValueError(f"fold_fusion must be one of {FUSIONS}, got {self.fold_fusion!r}")
        if not 0.0 < self.fusion_iou <= 1.0 or not 0.0 < self.threshold < 1.0 or self.slice_batch < 1:
            raise ValueError(f"fusion_iou must be in (0, 1], threshold in (0, 1), slice_batch >= 1: {self}")

    @classmethod
    def from_notes(cls, notes: dict[str, Any] | None) -> "Cascade3Settings":
        return settings_from(cls, notes, "cascade_3step settings in method.json notes")

    def to_notes(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Ensemble:
    """One stage's fold networks (eval mode, on the device) and their weights (summing to 1)."""

    networks: list[nn.Module]
    weights: list[float]

    def __post_init__(self):
        if not self.networks or len(self.networks) != len(self.weights):
            raise ValueError("an ensemble needs one weight per network and at least one network")
        total = float(sum(self.weights))
        self.weights = [float(w) / total for w in self.weights]

    @property
    def first(self) -> nn.Module:
        return self.networks[0]


@dataclass
class CascadeResult:
    """What the cascade found in one volume (slice coordinates of the cache grid)."""

    probability: np.ndarray  # (z, y, x) float32
    slice_probability: np.ndarray  # (z,) the classifier ensemble's
    slice_threshold: float
    kept: np.ndarray  # (z,) bool: slices passed to the detector
    boxes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # slice -> (boxes (n, 4), scores)

    @property
    def n_boxes(self) -> int:
        return sum(len(b) for b, _ in self.boxes.values())


def occupied_slices(pet: np.ndarray) -> np.ndarray:
    """Indices of the axial slices with uptake (PET max above the air bound)."""
    flat = np.asarray(pet).reshape(len(pet), -1)
    return np.flatnonzero(flat.max(axis=1) > EMPTY_PET_MAX) if flat.size else np.zeros(0, dtype=np.int64)


def _frame(network: nn.Module, pet: np.ndarray) -> SliceFrame:
    return SliceFrame.of(pet.shape[1], pet.shape[2], network.canvas, network.image_size)


def _chunks(items: Sequence[int] | np.ndarray, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def classify_slices(ensemble: Ensemble, pet: np.ndarray, device: torch.device, amp_dtype: torch.dtype | None = None,
                    batch: int = 16, slices: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """(lesion probability of every slice (z,), the ensemble's threshold); ``slices`` (default: those
    with uptake) are run, the others get 0."""
    frame = _frame(ensemble.first, pet)
    run = occupied_slices(pet) if slices is None else np.asarray(slices, dtype=np.int64)
    probability = np.zeros(len(pet), dtype=np.float32)
    for chunk in _chunks(run, batch):
        images = axial_images(pet[chunk], frame)[0].to(device)
        total = torch.zeros(len(chunk), device=device)
        for network, weight in zip(ensemble.networks, ensemble.weights):
            with autocast(device, amp_dtype):
                logits = network(images)
            total += weight * torch.sigmoid(logits.float()[:, 0])
        probability[chunk] = total.cpu().numpy()
    threshold = sum(w * float(n.decision_threshold) for n, w in zip(ensemble.networks, ensemble.weights))
    return probability, float(threshold)


@torch.inference_mode()
def detector_candidates(network: nn.Module, pet: np.ndarray, slices: Sequence[int], device: torch.device,
                        amp_dtype: torch.dtype | None = None, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """One detector's candidate boxes (image pixels, before its NMS and threshold) on each of ``slices``."""
    frame = _frame(network, pet)
    found: list[dict[str, torch.Tensor]] = []
    for chunk in _chunks(np.asarray(slices, dtype=np.int64), batch):
        images = axial_images(pet[chunk], frame)[0].to(device)
        with autocast(device, amp_dtype):
            found += [{k: v.float().cpu() for k, v in d.items()} for d in network(images)]
    return found


def to_slice_boxes(boxes: np.ndarray, frame: SliceFrame) -> tuple[np.ndarray, np.ndarray]:
    """(boxes in slice voxels clipped to the slice, mask of the boxes left with an area)."""
    out = frame.to_slice(boxes)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, frame.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, frame.height)
    return out, (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])


def detect_slices(ensemble: Ensemble, pet: np.ndarray, slices: Sequence[int], device: torch.device,
                  settings: Cascade3Settings, amp_dtype: torch.dtype | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The fused boxes (slice voxels) and scores of each slice that has any (module doc, step 2)."""
    slices = [int(s) for s in slices]
    if not slices:
        return {}
    per_fold = [network.keep(detector_candidates(network, pet, slices, device, amp_dtype, settings.slice_batch))
                for network in ensemble.networks]
    keep_score = sum(w * float(n.score_threshold) for n, w in zip(ensemble.networks, ensemble.weights))
    frame = _frame(ensemble.first, pet)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, z in enumerate(slices):
        boxes, scores = fuse_boxes([fold[i] for fold in per_fold], ensemble.weights, settings.fold_fusion,
                                   settings.fusion_iou, keep_score)
        boxes, valid = to_slice_boxes(boxes, frame)
        if valid.any():
            out[z] = (boxes[valid], scores[valid])
    return out


@torch.inference_mode()
def segment_boxes(ensemble: Ensemble, pet: np.ndarray, boxes: dict[int, np.ndarray], device: torch.device,
                  amp_dtype: torch.dtype | None = None, batch: int = 16) -> np.ndarray:
    """(z, y, x) float32 lesion probability: every box's ROI segmented and pasted back (module doc, step 3)."""
    unet = ensemble.first
    probability = torch.zeros(pet.shape, dtype=torch.float32)
    rois: list[tuple[int, tuple[int, int, int]]] = [
        (int(z), roi_window(box, unet.margin_fraction, unet.min_margin)) for z in sorted(boxes) for box in boxes[z]
    ]
    if not rois:
        return probability.numpy()
    slices = sorted({z for z, _ in rois})
    means, stds = slice_statistics(pet[slices], SliceFrame.of(pet.shape[1], pet.shape[2], unet.canvas, unet.roi_size))
    stats = {z: (float(m), float(s)) for z, m, s in zip(slices, means, stds)}
    for chunk in _chunks(list(range(len(rois))), batch):
        inputs = torch.cat([crop_rois(torch.tensor(np.asarray(pet[rois[i][0]]), dtype=torch.float32), [rois[i][1]],
                                      *stats[rois[i][0]], unet.roi_size) for i in chunk]).to(device)
        total = torch.zeros((len(chunk), unet.roi_size, unet.roi_size), device=device)
        for network, weight in zip(ensemble.networks, ensemble.weights):
            with autocast(device, amp_dtype):
                logits = network(inputs)
            total += weight * torch.sigmoid(logits.float()[:, 0])
        total = total.cpu()
        for k, i in enumerate(chunk):
            z, window = rois[i]
            paste_rois(probability[z], total[k : k + 1], [window])
    return probability.numpy()


def run_cascade(pet: np.ndarray, classifier: Ensemble, detector: Ensemble, segmenter: Ensemble,
                settings: Cascade3Settings, device: torch.device, amp_dtype: torch.dtype | None = None) -> CascadeResult:
    """The three steps over one cached PET volume (z, y, x) in SUV (module doc)."""
    pet = np.asarray(pet, dtype=np.float32)
    occupied = occupied_slices(pet)
    slice_probability, threshold = classify_slices(classifier, pet, device, amp_dtype, settings.slice_batch, occupied)
    kept = np.zeros(len(pet), dtype=bool)
    if settings.bypass_classifier:
        kept[occupied] = True
    else:
        kept[occupied] = slice_probability[occupied] >= threshold
    boxes = detect_slices(detector, pet, np.flatnonzero(kept), device, settings, amp_dtype)
    probability = segment_boxes(segmenter, pet, {z: b for z, (b, _) in boxes.items()}, device, amp_dtype,
                                settings.slice_batch)
    return CascadeResult(probability, slice_probability, threshold, kept, boxes)
