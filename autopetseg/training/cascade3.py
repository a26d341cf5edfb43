"""The three trainers of ``cascade_3step`` (Ahamed et al., DLBCL), each on the ``2d_axial`` configuration.

The modules train independently, as in the paper: the detector and the ROI segmenter on the
ground truth, not on the earlier modules' outputs. Slices come from the ``3d_fullres`` cache
(PET channel, SUV) and are framed, z-scored and resized on the fly (``models/roi.py``); batches
are drawn by their own samplers (below), seeded per (seed, rank, batch index) like the engine's,
so a resumed run sees the batches the uninterrupted one would have. The only augmentation is
mirroring along the in-plane axes in ``augmentation.mirror_axes`` (default: left-right, p 0.5);
the engine's other transforms do not apply to these batches. The paper names none.

``cascade3_classifier`` (Module 1): ``SliceClassifier``; every slice with uptake, a share
``foreground_share`` (0.5) of each batch from slices holding lesion, the rest from the others, so
both classes are in every batch. Focal loss α 0.25, γ 2 (torchvision's ``sigmoid_focal_loss``,
mean). Adam, lr 1e-5 (β 0.9, 0.999, ε 1e-8: torch's defaults), batch 64 (the plans' on a CPU).
Validation: every slice with uptake of the validation cases; AUC; the threshold of the largest
geometric mean of sensitivity and specificity, stored in the weights (``decision_threshold``);
sensitivity and specificity there. Best checkpoint by AUC.

``cascade3_detector`` (Module 2): ``LesionDetector`` (Faster R-CNN) on the slices holding
lesion only; the boxes are the connected components of each slice's mask. Loss: torchvision's
four terms weighted by ``loss`` (λ = 10 on the second stage's box regression, the paper's
L_class + λ L_box; the RPN's terms weight 1; torchvision's box loss is smooth L1 with β = 1/9,
i.e. L1 but for the last ninth of a pixel). Adam, lr 1e-3, batch 16 (the plans' on a CPU).
Validation: the lesion slices of the validation cases; for each NMS IoU in ``nms_ious`` the score
threshold of the best box F1 (IoU >= ``match_iou`` with a ground-truth box); the best pair is
stored in the weights. Reported: mAP@0.5 (VOC all-point AP at that NMS IoU), box precision,
recall and F1, lesion recall (a 3D lesion is found when one of its slices' boxes is), and the
spread of the matched boxes' sides relative to the true box (``box_error_std``), which the ROI
segmenter's jitter copies. Best checkpoint by mAP@0.5.

``cascade3_roi_segmenter`` (Module 3): ``RoiUNet`` on R×R ROIs around the ground-truth boxes,
each side of a box jittered by N(0, σ · box size) with σ the detector's ``box_error_std`` of the
same fold (``box_jitter`` when the detector has not been validated), padded by the margin and
made square (``models/roi.py``). Optionally (``negative_roi_share`` > 0; off by default, as in the
paper, because it cost held-out DSC when measured) a share of each batch boxes hot spots without
lesion instead (SUV >= ``negative_roi_suv``, 2.5) with an empty target. Loss: generalized Dice (Sudre et al., per ROI, background and
lesion classes) + 10 × focal (α 0.25, γ 2). Adam (lr 1e-3: the paper gives none for this
module, we keep the detector's), batch 32 (the plans' on a CPU). Validation: the 2D Dice of
every ground-truth ROI (unjittered), and, when the fold's classifier and detector are trained,
the whole cascade on each validation volume: 3D DSC, FPV, FNV (autoPET) and lesion detection.
Best checkpoint by the cascade's mean DSC (by ROI Dice without the earlier modules).

Epochs: the paper's pre-training plus fine-tuning epochs of each module (150 + 50, 100 + 100,
25 + 15); an epoch here is the engine's ``iterations_per_epoch`` batches, not a pass over the data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json
from autopetseg.models.cascade3 import (
    Cascade3Settings,
    Ensemble,
    classify_slices,
    detector_candidates,
    occupied_slices,
    run_cascade,
    segment_boxes,
    settings_from,
    to_slice_boxes,
)
from autopetseg.models.folders import CHECKPOINT_BEST, VALIDATION_FILE, NetworkSpec
from autopetseg.models.methods import METHODS, OutputSpec, StrategySpec
from autopetseg.models.networks.cascade3 import require_torchvision
from autopetseg.models.roi import (
    SliceFrame,
    axial_images,
    boxes_from_mask,
    crop_rois,
    crop_windows,
    jitter_box,
    roi_window,
    slice_statistics,
)
from autopetseg.models.trained import load_trained_stage
from autopetseg.planning.axial2d import AxialCascadePlan
from autopetseg.scoring.boxes import average_precision, box_iou, gmean_threshold, match_boxes, rates_at
from autopetseg.scoring.metrics import aggregate, case_metrics, detection, f1_score, label_lesions
from autopetseg.scoring.prognosis import roc_auc
from autopetseg.training.data_loader import CachedCase
from autopetseg.training.losses import GeneralizedDiceFocalLoss
from autopetseg.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cascade3TrainingSettings:
    """``TrainerConfig.stage_settings`` of the cascade's trainers (module doc)."""

    box_jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.1)  # σ of x1, y1, x2, y2 / box size
    jitter_from_detector: bool = True  # σ from the fold's detector validation when it has one
    match_iou: float = 0.5  # a detection matches a ground-truth box at this IoU (mAP@0.5)
    nms_ious: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # the detector's NMS IoUs tried on validation
    # A share of each ROI segmenter batch from hot spots that are not lesion (SUV >= negative_roi_suv,
    # boxed like a lesion), meant to teach it to leave the detector's false boxes empty. Off (the
    # paper's lesion ROIs only): at 0.25 it cut the false-positive volume by ~0.3 ml but lost
    # 0.03-0.04 held-out DSC in both runs of benchmarks/cascade3_ablation.py (README, "Trainers").
    negative_roi_share: float = 0.0
    negative_roi_suv: float = 2.5  # the common fixed SUV threshold of metabolic tumour volume

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> "Cascade3TrainingSettings":
        return settings_from(cls, raw, "stage_settings of cascade_3step")


# ----------------------------------------------------------------------------- losses


class FocalLoss(nn.Module):
    """Lin et al.'s sigmoid focal loss (α for the positives, 1 - α for the negatives), mean over elements."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = float(alpha), float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import sigmoid_focal_loss

        x = logits.float()
        return sigmoid_focal_loss(x, target.float().reshape(x.shape), self.alpha, self.gamma, reduction="mean")


class GeneralizedDiceFocalRoiLoss(nn.Module):
    """Generalized Dice (per ROI, the two classes of one sigmoid channel) + ``focal_weight`` × focal."""

    def __init__(self, focal_weight: float = 10.0, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.focal_weight = float(focal_weight)
        self.focal = FocalLoss(alpha, gamma)
        self.dice = GeneralizedDiceFocalLoss(focal_weights=(1.0, 1.0))  # its Dice term only (below)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        # softmax over (0, x) is (1 - sigmoid(x), sigmoid(x)): the two-class Dice of the sigmoid output
        dice, _ = self.dice.terms(torch.cat([torch.zeros_like(x), x], dim=1), target)
        return dice + self.focal_weight * self.focal(x, target)


# ----------------------------------------------------------------------------- batches


class SliceSampler:
    """The training slices of a module and how one batch is drawn from them (subclasses)."""

    def __init__(self, cases: Sequence[CachedCase], plan: AxialCascadePlan, mirror_axes: Sequence[int]):
        self.cases = list(cases)
        self.plan = plan
        self.flip_dims = [-1 if a == 2 else -2 for a in mirror_axes if a in (1, 2)]  # x, y of an axial slice
        self.lesion_slices: list[tuple[int, int]] = []
        self.other_slices: list[tuple[int, int]] = []
        for c, case in enumerate(self.cases):
            seg = np.asarray(case.seg)
            with_lesion = seg.reshape(len(seg), -1).any(axis=1)
            self.lesion_slices += [(c, int(z)) for z in np.flatnonzero(with_lesion)]
            self.other_slices += [(c, int(z)) for z in occupied_slices(np.asarray(case.image[0])) if not with_lesion[z]]

    def frame(self, case: int, size: int) -> SliceFrame:
        shape = self.cases[case].seg.shape
        return SliceFrame.of(shape[1], shape[2], self.plan.canvas, size)

    def image(self, case: int, z: int) -> tuple[torch.Tensor, SliceFrame]:
        frame = self.frame(case, self.plan.slice_size)
        return axial_images(np.asarray(self.cases[case].image[0, z])[None], frame)[0][0], frame

    def flips(self, rng: np.random.Generator) -> list[int]:
        return [d for d in self.flip_dims if rng.random() < 0.5]

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, Any]:
        """One batch of this module's samples; each module's sampler defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define batch()")


def _pick(rng: np.random.Generator, items: Sequence, n: int) -> list:
    return [items[i] for i in rng.integers(0, len(items), size=n)] if n else []


class ClassifierSampler(SliceSampler):
    """Slices with and without lesion, a share ``positive_share`` of each batch with (at least one of each)."""

    def __init__(self, cases, plan, mirror_axes, positive_share: float):
        super().__init__(cases, plan, mirror_axes)
        if not self.lesion_slices or not self.other_slices:
            raise InputError("the slice classifier needs training slices with and without lesions (labels of the training cases)")
        self.positive_share = float(positive_share)

    def batch(self, rng, size):
        n_pos = min(size - 1, max(1, int(round(self.positive_share * size)))) if size > 1 else int(rng.random() < 0.5)
        picked = [(s, 1.0) for s in _pick(rng, self.lesion_slices, n_pos)]
        picked += [(s, 0.0) for s in _pick(rng, self.other_slices, size - n_pos)]
        images = []
        for (case, z), _ in picked:
            image, _frame = self.image(case, z)
            flips = self.flips(rng)
            images.append(image.flip(flips) if flips else image)
        return {"data": torch.stack(images), "target": torch.tensor([[label] for _, label in picked])}


class DetectorSampler(SliceSampler):
    """Slices holding lesion, with the boxes of their mask's components (S×S image pixels)."""

    def __init__(self, cases, plan, mirror_axes):
        super().__init__(cases, plan, mirror_axes)
        if not self.lesion_slices:
            raise InputError("the detector needs training slices with lesions (labels of the training cases)")

    def batch(self, rng, size):
        images, boxes = [], []
        for case, z in _pick(rng, self.lesion_slices, size):
            image, frame = self.image(case, z)
            found = frame.to_image(boxes_from_mask(self.cases[case].seg[z]))
            for dim in self.flips(rng):
                image = image.flip(dim)
                lo, hi = (0, 2) if dim == -1 else (1, 3)
                found[:, [lo, hi]] = frame.size - found[:, [hi, lo]]
            images.append(image)
            boxes.append(torch.from_numpy(found.astype(np.float32)))
        return {"data": torch.stack(images), "boxes": boxes}


class RoiSampler(SliceSampler):
    """Ground-truth boxes, jittered, and their R×R ROIs of image and mask; a share ``negative_share``
    of each batch boxes hot spots without lesion instead (``hot_spot_boxes``), where there are any."""

    def __init__(self, cases, plan, mirror_axes, jitter: Sequence[float], margin_fraction: float, min_margin: float,
                 negative_share: float = 0.0, hot_suv: float = 2.5):
        super().__init__(cases, plan, mirror_axes)
        self.rois = [(case, z, box) for case, z in self.lesion_slices for box in boxes_from_mask(self.cases[case].seg[z])]
        if not self.rois:
            raise InputError("the ROI segmenter needs training slices with lesions (labels of the training cases)")
        self.jitter, self.margin_fraction, self.min_margin = tuple(jitter), float(margin_fraction), float(min_margin)
        self.negative_share = float(negative_share)
        self.negatives = [(c, z, box) for c, case in enumerate(self.cases)
                          for z, box in hot_spot_boxes(case, hot_suv)] if self.negative_share > 0 else []

    def batch(self, rng, size):
        images, targets = [], []
        n_negative = int(rng.binomial(size, self.negative_share)) if self.negatives else 0
        for case, z, box in _pick(rng, self.rois, size - n_negative) + _pick(rng, self.negatives, n_negative):
            window = roi_window(jitter_box(box, rng, self.jitter), self.margin_fraction, self.min_margin)
            pet = torch.tensor(np.asarray(self.cases[case].image[0, z]), dtype=torch.float32)
            mean, std = slice_statistics(pet[None], self.frame(case, self.plan.roi_size))
            image = crop_rois(pet, [window], float(mean[0]), float(std[0]), self.plan.roi_size)[0]
            seg = torch.tensor(np.asarray(self.cases[case].seg[z]), dtype=torch.float32)
            target = (crop_windows(seg, [window], self.plan.roi_size)[0] > 0.5).long()
            flips = self.flips(rng)
            images.append(image.flip(flips) if flips else image)
            targets.append(target.flip(flips) if flips else target)
        return {"data": torch.stack(images), "target": torch.stack(targets)}


def hot_spot_boxes(case: CachedCase, suv: float) -> list[tuple[int, np.ndarray]]:
    """(slice, box) of every 8-connected hot spot (PET >= ``suv``) of each axial slice that touches no
    lesion voxel: the normal uptake (brain, heart, kidneys, bladder) the detector mistakes for lesion."""
    pet, seg = np.asarray(case.image[0]), np.asarray(case.seg) > 0
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # connected within a slice only
    labels, _ = ndimage.label(pet >= suv, structure=structure)
    touching = set(np.unique(labels[seg]).tolist())
    out = []
    for k, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None or k in touching:
            continue
        z, ys, xs = found
        out.append((int(z.start), np.asarray([xs.start, ys.start, xs.stop, ys.stop], dtype=np.float64)))
    return out


class BatchStream(IterableDataset):
    """Endless batches of a sampler; batch k drawn from a generator seeded by (seed, rank, k)."""

    def __init__(self, sampler: SliceSampler, batch_size: int, seed: int, rank: int = 0, start_batch: int = 0):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.seed, self.rank, self.start_batch = int(seed), int(rank), int(start_batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start_batch + worker
        while True:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, index]))
            yield self.sampler.batch(rng, self.batch_size)
            index += n_workers


# ----------------------------------------------------------------------------- trainers


class AxialCascadeTrainer(Trainer):
    """What the three modules share: one PET channel, one sigmoid output, the 2d_axial plan, the samplers."""

    output = OutputSpec(activation="sigmoid", channels=1, lesion_channel=0)
    image_channels = 1
    stage_batch = "classifier_batch"  # the plan's batch field of this module
    shared_defaults: dict[str, Any] = {
        "optimizer": "adam",
        "weight_decay": 0.0,
        "schedule": "constant",
        "augmentation": {"mirror_axes": (2,)},
    }

    @classmethod
    def check_requirements(cls) -> None:
        require_torchvision(cls.name)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.axial = AxialCascadePlan.of(self.configuration)
        self.batch_size = int(self.config.batch_size or getattr(self.axial, self.stage_batch))
        self.settings = Cascade3TrainingSettings.from_config(self.config.stage_settings)
        self._scratch: dict[str, Any] = {}

    def strategy(self) -> StrategySpec:
        return StrategySpec("slices", axis=self.configuration.slice_axis)

    def network_options(self) -> dict[str, Any]:
        return {"image_size": self.axial.slice_size, "canvas": self.axial.canvas}

    def network_spec(self) -> NetworkSpec:
        options = {**type(self).config_defaults.get("network_options", {}), **self.network_options(),
                   **self.config.network_options}
        return NetworkSpec(self.config.network, self.configuration.network, self.in_channels, self.output.channels,
                           options)

    def mirror_axes(self) -> tuple[int, ...]:
        aug = self.config.augmentation
        return tuple(aug.mirror_axes) if aug.enabled else ()

    def make_sampler(self, cases: list[CachedCase]) -> SliceSampler:
        """The module's sampler over the fold's cached cases; each module's trainer defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define make_sampler()")

    def make_train_loader(self, cases: list[CachedCase], seed: int):
        stream = BatchStream(self.make_sampler(cases), self.batch_size, seed, self.dist.rank,
                             self.start_epoch * self.config.iterations_per_epoch)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.device.type == "cuda", persistent_workers=self.num_workers > 0))

    def ensemble(self) -> Ensemble:
        return Ensemble([self.network], [1.0])

    def build_loss(self) -> nn.Module:
        return FocalLoss(**{**type(self).config_defaults.get("loss", {}), **self.config.loss})


class SliceClassifierTrainer(AxialCascadeTrainer):
    name = "cascade3_classifier"
    selection_metric = "auc"
    config_defaults = {
        **AxialCascadeTrainer.shared_defaults,
        "network": "cascade3_classifier",
        "epochs": 200,  # 150 (PMBCL) + 50 (DLBCL)
        "learning_rate": 1e-5,
        "foreground_share": 0.5,
        "loss": {"alpha": 0.25, "gamma": 2.0},
    }

    def network_options(self) -> dict[str, Any]:
        return {**super().network_options(), "backbone": self.axial.classifier_backbone}

    def make_sampler(self, cases):
        return ClassifierSampler(cases, self.axial, self.mirror_axes(), self.config.foreground_share)

    def initialize_output_prior(self, prior: float) -> None:
        with torch.no_grad():
            self.network.output_layer.bias.fill_(math.log(prior / (1.0 - prior)))

    def validate_case(self, case: CachedCase) -> dict[str, Any]:
        pet, seg = np.asarray(case.image[0]), np.asarray(case.seg)
        run = occupied_slices(pet)
        probability, _ = classify_slices(self.ensemble(), pet, self.device, self.amp_dtype, self.batch_size, run)
        labels = seg.reshape(len(seg), -1).any(axis=1)[run]
        return {"slice_probability": probability[run].round(5).tolist(), "slice_label": labels.astype(int).tolist(),
                "n_slices": int(len(run)), "n_lesion_slices": int(labels.sum())}

    def summarize_validation(self, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
        scores = [p for c in per_case.values() for p in c["slice_probability"]]
        labels = [y for c in per_case.values() for y in c["slice_label"]]
        threshold = gmean_threshold(scores, labels) if scores else math.nan
        if math.isfinite(threshold):  # stored with the weights of this epoch's checkpoints
            self.network.decision_threshold.fill_(threshold)
        threshold = float(self.network.decision_threshold)
        sensitivity, specificity = rates_at(scores, labels, threshold)
        return {"auc": roc_auc(scores, labels) if scores else math.nan, "threshold": threshold,
                "sensitivity": sensitivity, "specificity": specificity,
                "n_slices": len(scores), "n_lesion_slices": int(sum(labels))}


def _f1_curve(hits: np.ndarray, scores: np.ndarray, n_truth: int) -> tuple[float, float, int]:
    """(best F1, its score threshold, its true positives) over thresholds at the detections' scores."""
    if not len(scores) or n_truth == 0:
        return 0.0, 1.0, 0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    fp = np.arange(1, len(order) + 1) - tp
    f1 = tp / (tp + 0.5 * (fp + (n_truth - tp)))
    # a threshold at a score takes every detection of that score: only the last of equal scores counts
    last = np.r_[scores[order][1:] != scores[order][:-1], True]
    best = int(np.flatnonzero(last)[np.argmax(f1[last])])
    return float(f1[best]), float(scores[order][best]), int(tp[best])


class LesionDetectorTrainer(AxialCascadeTrainer):
    name = "cascade3_detector"
    selection_metric = "map50"
    stage_batch = "detector_batch"
    config_defaults = {
        **AxialCascadeTrainer.shared_defaults,
        "network": "cascade3_detector",
        "epochs": 200,  # 100 (PMBCL) + 100 (DLBCL)
        "learning_rate": 1e-3,
        "loss": {"loss_classifier": 1.0, "loss_box_reg": 10.0, "loss_objectness": 1.0, "loss_rpn_box_reg": 1.0},
    }

    def network_options(self) -> dict[str, Any]:
        plan = self.axial
        return {**super().network_options(), "backbone": plan.detector_backbone, "anchor_sizes": list(plan.anchor_sizes),
                "fpn_channels": plan.detector_fpn_channels, "box_head_size": plan.detector_head_size}

    def network_spec(self) -> NetworkSpec:
        spec = super().network_spec()
        return dataclasses.replace(spec, out_channels=2)  # Faster R-CNN's classes: background and lesion

    def make_sampler(self, cases):
        return DetectorSampler(cases, self.axial, self.mirror_axes())

    def build_loss(self) -> nn.Module:
        return nn.Identity()  # the network computes its losses; ``compute_loss`` weights them

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = super().prepare_batch(batch)
        moved["targets"] = [{"boxes": b.to(self.device), "labels": torch.ones(len(b), dtype=torch.int64, device=self.device)}
                            for b in batch["boxes"]]
        return moved

    def forward_train(self, batch: dict[str, Any]):
        return self.train_network(batch["input"], batch["targets"])

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        weights = {**type(self).config_defaults["loss"], **self.config.loss}
        return sum(float(weights.get(name, 1.0)) * value.float() for name, value in outputs.items())

    def validate_case(self, case: CachedCase) -> dict[str, Any]:
        pet, seg = np.asarray(case.image[0]), np.asarray(case.seg)
        slices = np.flatnonzero(seg.reshape(len(seg), -1).any(axis=1))
        candidates = detector_candidates(self.network, pet, slices, self.device, self.amp_dtype, self.batch_size)
        lesions, _ = label_lesions(seg)
        truth = []
        for z in slices:  # an 8-connected component of a slice lies in one 18-connected lesion: take its id
            boxes, components = boxes_from_mask(seg[z], with_labels=True)
            truth.append((boxes, [int(lesions[z][components == k + 1][0]) for k in range(len(boxes))]))
        frame = SliceFrame.of(seg.shape[1], seg.shape[2], self.axial.canvas, self.axial.slice_size)
        self._scratch[case.case_id] = (frame, candidates, truth)
        return {"n_lesion_slices": int(len(slices)), "n_boxes": int(sum(len(b) for b, _ in truth)),
                "n_lesions": int(lesions.max())}

    def _kept(self, nms_iou: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, list[int], str]]:
        """(boxes, scores, true boxes, their lesion ids, case) of every validation slice at ``nms_iou``."""
        rows = []
        for case_id, (frame, candidates, truth) in self._scratch.items():
            for (boxes, scores), (true, ids) in zip(self.network.keep(candidates, 0.0, nms_iou), truth):
                boxes, valid = to_slice_boxes(boxes, frame)
                rows.append((boxes[valid], scores[valid], true, ids, case_id))
        return rows

    def summarize_validation(self, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        best = None
        for iou in s.nms_ious:
            rows = self._kept(iou)
            hits = [match_boxes(b, sc, t, s.match_iou)[0] for b, sc, t, _, _ in rows]
            n_truth = sum(len(t) for _, _, t, _, _ in rows)
            all_scores = np.concatenate([sc for _, sc, _, _, _ in rows]) if rows else np.zeros(0)
            f1, threshold, _ = _f1_curve(np.concatenate(hits) if hits else np.zeros(0), all_scores, n_truth)
            if best is None or f1 > best[0]:
                best = (f1, threshold, iou, rows)
        f1, threshold, iou, rows = best
        if f1 > 0:  # stored with the weights of this epoch's checkpoints; nothing found: keep the stored pair
            self.network.score_threshold.fill_(threshold)
            self.network.nms_iou.fill_(iou)
        else:
            threshold, iou = float(self.network.score_threshold), float(self.network.nms_iou)
            rows = self._kept(iou)
        tp = fp = n_truth = 0
        found: set[tuple[str, int]] = set()
        errors = []
        for boxes, scores, true, ids, case_id in rows:
            keep = scores >= threshold
            hit, matched = match_boxes(boxes[keep], scores[keep], true, s.match_iou)
            tp, fp, n_truth = tp + int(hit.sum()), fp + int((~hit).sum()), n_truth + len(true)
            found |= {(case_id, i) for i, m in zip(ids, matched) if m}
            errors += _side_errors(boxes[keep][hit], true, s.match_iou)
        n_lesions = sum(c["n_lesions"] for c in per_case.values())
        self._scratch.clear()
        return {
            "map50": average_precision([(b, sc, t) for b, sc, t, _, _ in rows], s.match_iou),
            "f1": f1_score(tp, fp, n_truth - tp), "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / n_truth if n_truth else math.nan,
            "lesion_recall": len(found) / n_lesions if n_lesions else math.nan,
            "score_threshold": threshold, "nms_iou": iou, "n_boxes": n_truth,
            "box_error_std": np.std(errors, axis=0).round(4).tolist() if len(errors) > 1 else None,
        }


def _side_errors(detections: np.ndarray, truth: np.ndarray, iou: float) -> list[list[float]]:
    """Each matched detection's x1, y1, x2, y2 minus its true box's, over the true box's width or height."""
    if not len(detections) or not len(truth):
        return []
    out = []
    overlaps = box_iou(detections, truth)
    for d, row in zip(detections, overlaps):
        g = truth[int(np.argmax(row))]
        if row.max() >= iou:
            size = np.array([g[2] - g[0], g[3] - g[1]] * 2)
            out.append(((d - g) / size).tolist())
    return out


class RoiSegmenterTrainer(AxialCascadeTrainer):
    name = "cascade3_roi_segmenter"
    stage_batch = "roi_batch"
    config_defaults = {
        **AxialCascadeTrainer.shared_defaults,
        "network": "cascade3_roi_unet",
        "epochs": 40,  # 25 (PMBCL) + 15 (DLBCL)
        "learning_rate": 1e-3,
        "loss": {"focal_weight": 10.0, "alpha": 0.25, "gamma": 2.0},
        "network_options": {"margin_fraction": 0.25, "min_margin": 2.0},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch_size = [self.axial.roi_size, self.axial.roi_size]
        self.earlier = self._earlier_stages()
        self.selection_metric = "mean_dsc" if self.earlier is not None else "roi_dice"

    def network_options(self) -> dict[str, Any]:
        return {"roi_size": self.axial.roi_size, "canvas": self.axial.canvas}

    def build_loss(self) -> nn.Module:
        return GeneralizedDiceFocalRoiLoss(**{**type(self).config_defaults["loss"], **self.config.loss})

    def _earlier_stages(self):
        """The stage folders of this fold's classifier and detector, when both are trained; else None."""
        method = METHODS.get(self.method_name)
        names = [s.name for s in method.stages[:2]] if method is not None and len(method.stages) == 3 else []
        folders = [self.output_dir.parent / name for name in names]
        if len(folders) != 2 or not all((f / CHECKPOINT_BEST).is_file() for f in folders):
            log.warning("%s: the fold's classifier and detector are not trained; validating the ROI Dice only",
                        self.name)
            return None
        return folders

    def jitter(self) -> tuple[float, ...]:
        """σ of each box side: the fold's detector's measured errors, else the setting."""
        s = self.settings
        if s.jitter_from_detector and self.earlier is not None:
            measured = read_json(self.earlier[1] / VALIDATION_FILE).get("box_error_std") \
                if (self.earlier[1] / VALIDATION_FILE).is_file() else None
            if measured:
                return tuple(float(v) for v in measured)
        return s.box_jitter

    def make_sampler(self, cases):
        options = self.network_spec().options
        jitter = self.jitter()
        log.info("%s: boxes jittered by %s of their size", self.name, list(jitter))
        return RoiSampler(cases, self.axial, self.mirror_axes(), jitter, options["margin_fraction"],
                          options["min_margin"], self.settings.negative_roi_share, self.settings.negative_roi_suv)

    def setup(self, continue_training: bool = False) -> None:
        super().setup(continue_training)
        self.cascade = None
        if self.earlier is not None and self.dist.is_main:
            model_dir = self.output_dir.parents[1]
            self.cascade = [Ensemble([load_trained_stage(f, self.fold, model_dir, "best", self.device).network], [1.0])
                            for f in self.earlier]

    def validate_case(self, case: CachedCase) -> dict[str, Any]:
        pet, seg = np.asarray(case.image[0], dtype=np.float32), np.asarray(case.seg)
        truth = {int(z): boxes_from_mask(seg[z]) for z in np.flatnonzero(seg.reshape(len(seg), -1).any(axis=1))}
        probability = segment_boxes(self.ensemble(), pet, truth, self.device, self.amp_dtype, self.batch_size)
        dices = []
        net = self.network
        for z, boxes in truth.items():
            for box in boxes:
                y0, x0, side = roi_window(box, net.margin_fraction, net.min_margin)
                region = (z, slice(max(y0, 0), y0 + side), slice(max(x0, 0), x0 + side))
                pred, true = probability[region] > 0.5, seg[region] > 0
                dices.append(2.0 * (pred & true).sum() / max(pred.sum() + true.sum(), 1))
        out: dict[str, Any] = {"roi_dice": [round(float(d), 4) for d in dices]}
        if self.cascade is not None:
            settings = Cascade3Settings.from_notes(METHODS[self.method_name].notes)
            result = run_cascade(pet, *self.cascade, self.ensemble(), settings, self.device, self.amp_dtype)
            mask = (result.probability > settings.threshold).astype(np.uint8)
            out.update(case_metrics(seg, mask, case.voxel_ml))
            out.update({k: v for k, v in detection(seg, mask, pet).items() if k != "f1"})
            out.update(slices_kept=int(result.kept.sum()), boxes=result.n_boxes)
        return out

    def summarize_validation(self, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
        dices = [d for c in per_case.values() for d in c["roi_dice"]]
        summary: dict[str, Any] = {"roi_dice": float(np.mean(dices)) if dices else math.nan, "n_rois": len(dices)}
        if self.cascade is not None:
            cases = list(per_case.values())
            summary.update(aggregate(cases))
            tp, fp, fn = (sum(c[k] for c in cases) for k in ("tp", "fp", "fn"))
            summary.update(tp=tp, fp=fp, fn=fn, detection_f1=f1_score(tp, fp, fn))
        return summary


CASCADE3_TRAINERS: dict[str, type[Trainer]] = {
    t.name: t for t in (SliceClassifierTrainer, LesionDetectorTrainer, RoiSegmenterTrainer)
}

__all__ = ["CASCADE3_TRAINERS", "Cascade3TrainingSettings", "FocalLoss", "GeneralizedDiceFocalRoiLoss",
           "LesionDetectorTrainer", "RoiSegmenterTrainer", "SliceClassifierTrainer"]
