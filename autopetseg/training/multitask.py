"""The ``multitask`` trainer: lesion segmentation and a patient-level prognosis from one whole-body
volume (Liu et al., IEEE Access 2022, "Joint lymphoma lesion segmentation and prognosis prediction").

Network: ``MultitaskUNet`` (3D U-Net, 3 poolings, BN + ReLU; 4 segmentation outputs for deep
supervision; 3 prognosis heads fused 0.1/0.2/0.7) on the ``3d_wholebody`` grid, whole images in,
no patches (``whole_image_loader.py``), PET only by default (``input_channels``).

Loss (§III-C), ``MultitaskLoss``: L = λ·L_seg + (1 − λ)·L_cls with λ = ``segmentation_weight`` = 0.1
(eq. 6: λ weights the segmentation).

* L_seg = Σ_i w_i · (1 − (2 Σ p y + 1) / (Σ p + Σ y + 1)) (eq. 4-5) over the segmentation outputs,
  finest first, w = 0.53/0.27/0.13/0.07; p the softmax lesion probability of a sample, y the
  lesion share of the mask down-sampled to that output (average pooling by the output's stride:
  the share of each coarse voxel that is lesion); per sample, averaged over the batch.
* L_cls = −w_p y log p − w_n (1 − y) log(1 − p) (eq. 1) with p the fused probability of the heads
  (eq. 2), w_p = N_n / (N_p + N_n), w_n = N_p / (N_p + N_n) from the fold's training labels
  (eq. 3); averaged over the samples that have a label (a case without one trains the
  segmentation only). ``classification_loss = "per_head"`` sums the heads' own weighted
  cross-entropies with the head weights instead (each head supervised on its own).

Training (§IV-B3): Adam, lr 1e-4, × 0.1 after half of the 200 epochs (``lr_drop_at``), batch 12
(the plans may lower it for the budget), rotation ±8° about each axis and scaling 0.8-1.2. An
epoch is ``iterations_per_epoch`` = 18 batches (the paper's 215 training cases of a fold / 12).

Labels: ``label_column`` (default ``prognosis``) of ``clinical.csv``, 0 or 1; a missing column,
another value, or a fold whose training cases hold only one class is an ``InputError`` naming the
column. Folds are stratified by label and cohort (``splits_<column>.json``, ``run.py``).

Validation: the whole-image strategy on every validation case: DSC/FPV/FNV and the fused
probability; the summary adds the AUC, the Youden threshold (``scoring.prognosis``) and the
scores at it, and ``mean_dsc_auc``; the best checkpoint is chosen by ``selection``: ``dsc_auc``
(mean of DSC and AUC, default), ``auc`` or ``dsc``. ``validation.json`` keeps them all and the
threshold (``head_thresholds``), which prediction averages over the folds for ``prognosis_label``.

Ablations (Liu et al. Table 4): segmentation only = ``heads`` false and ``segmentation_weight`` 1;
classification only = ``segmentation_weight`` 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autopetseg.errors import InputError
from autopetseg.models.folders import NetworkSpec
from autopetseg.models.methods import StrategySpec
from autopetseg.models.strategies import run_strategy
from autopetseg.planning.plans import CHANNELS
from autopetseg.scoring.metrics import aggregate, case_metrics
from autopetseg.scoring.prognosis import binary_scores, roc_auc, youden_threshold
from autopetseg.training.data_loader import NO_CASE_LABEL, CachedCase
from autopetseg.training.trainer import Trainer
from autopetseg.training.whole_image_loader import WholeImageAugmentation, grid_case, make_whole_image_loader

logger = logging.getLogger(__name__)

HEAD = "prognosis"  # the network's fused head: predictions.csv gets prognosis_probability / prognosis_label
SELECTIONS = {"dsc_auc": "mean_dsc_auc", "auc": "auc", "dsc": "mean_dsc"}
CLASSIFICATION_LOSSES = ("fused", "per_head")


@dataclass
class MultitaskSettings:
    """The multitask trainer's own settings (``TrainerConfig.method_settings``; module doc)."""

    segmentation_weight: float = 0.1  # λ, eq. 6
    segmentation_scale_weights: tuple[float, ...] = (0.53, 0.27, 0.13, 0.07)  # eq. 5, finest output first
    head_weights: tuple[float, ...] = (0.1, 0.2, 0.7)  # eq. 2, finest head first (the bottleneck's last)
    heads: bool = True  # False: segmentation only (no prognosis heads)
    classification_loss: str = "fused"  # "fused" (eq. 1-2) or "per_head"
    class_weighted: bool = True  # eq. 3 weights from the fold's training labels; False: 1 and 1
    dice_smooth: float = 1.0  # eq. 4
    input_channels: tuple[str, ...] = ("PET",)  # the paper; ("PET", "CT") reads both
    selection: str = "dsc_auc"  # "dsc_auc", "auc" or "dsc"
    lr_drop_at: float = 0.5  # fraction of the run after which the learning rate is multiplied by:
    lr_drop_factor: float = 0.1
    augmentation: WholeImageAugmentation = field(default_factory=WholeImageAugmentation)

    def __post_init__(self):
        if isinstance(self.augmentation, dict):
            self.augmentation = WholeImageAugmentation(**self.augmentation)
        self.segmentation_scale_weights = tuple(float(w) for w in self.segmentation_scale_weights)
        self.head_weights = tuple(float(w) for w in self.head_weights)
        self.input_channels = tuple(self.input_channels)
        if not 0.0 <= self.segmentation_weight <= 1.0:
            raise ValueError(f"segmentation_weight (λ) must be in [0, 1], got {self.segmentation_weight}")
        if not self.heads and self.segmentation_weight != 1.0:
            raise ValueError("without heads there is no classification loss: set segmentation_weight to 1")
        for name, weights in (("segmentation_scale_weights", self.segmentation_scale_weights),
                              ("head_weights", self.head_weights)):
            if not weights or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
                raise ValueError(f"{name} must be non-negative and sum to 1, got {list(weights)}")
        if self.classification_loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"classification_loss must be one of {CLASSIFICATION_LOSSES}, got {self.classification_loss!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {self.selection!r}")
        if not self.input_channels or any(c not in CHANNELS for c in self.input_channels):
            raise ValueError(f"input_channels must be taken from {list(CHANNELS)}, got {list(self.input_channels)}")
        if not 0.0 < self.lr_drop_at <= 1.0 or not 0.0 < self.lr_drop_factor <= 1.0:
            raise ValueError("lr_drop_at and lr_drop_factor must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MultitaskLoss(nn.Module):
    """λ·L_seg + (1 − λ)·L_cls with deep supervision on both tasks (module doc)."""

    def __init__(self, settings: MultitaskSettings, class_weights: tuple[float, float], strides: list[list[int]]):
        super().__init__()
        self.settings = settings
        self.register_buffer("class_weights", torch.tensor([float(w) for w in class_weights]))  # (w_n, w_p)
        self.register_buffer("head_weights", torch.tensor(settings.head_weights))
        cumulative, self.pools = np.ones(3, dtype=int), []
        for stride in strides[: len(settings.segmentation_scale_weights)]:
            cumulative = cumulative * np.asarray(stride, dtype=int)
            self.pools.append(tuple(int(v) for v in cumulative))

    def segmentation_targets(self, target: torch.Tensor) -> list[torch.Tensor]:
        """The lesion share of ``target`` (B, 1, *grid) at each output's resolution, finest first."""
        return [target if max(k) == 1 else F.avg_pool3d(target, k, k) for k in self.pools]

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1)[:, 1]
        y = target[:, 0].float()
        dims = tuple(range(1, p.ndim))
        smooth = self.settings.dice_smooth
        return (1.0 - (2.0 * (p * y).sum(dims) + smooth) / (p.sum(dims) + y.sum(dims) + smooth)).mean()

    def segmentation_loss(self, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        weights = self.settings.segmentation_scale_weights
        if len(outputs) != len(weights):
            raise ValueError(f"{len(outputs)} segmentation outputs but {len(weights)} scale weights")
        return sum(w * self.dice(o, t) for w, o, t in zip(weights, outputs, self.segmentation_targets(target)))

    def classification_loss(self, outputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        known = labels != NO_CASE_LABEL
        if not bool(known.any()):
            return outputs[HEAD].sum() * 0.0  # no labelled sample in the batch: L_cls is masked out
        y = labels[known]
        w = self.class_weights[y]
        if self.settings.classification_loss == "fused":
            log_p = outputs[HEAD][known].float()  # log of the fused probabilities (eq. 2)
            return (-w * log_p.gather(1, y[:, None])[:, 0]).mean()
        log_p = torch.log_softmax(outputs["prognosis_heads"][known].float(), dim=2)  # (N, heads, K)
        per_head = -log_p.gather(2, y[:, None, None].expand(-1, log_p.shape[1], 1))[..., 0]
        return (w[:, None] * per_head * self.head_weights[None]).sum(1).mean()

    def forward(self, outputs: dict[str, Any], target: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # Both terms whenever the network has their outputs, even at weight 0 (λ = 0 or 1): every
        # parameter then takes part in the backward pass, as DDP requires.
        lam = self.settings.segmentation_weight
        seg = outputs["segmentation"]
        loss = lam * self.segmentation_loss(seg if isinstance(seg, list) else [seg], target)
        if HEAD in outputs:
            if labels is None:
                raise ValueError("the classification loss needs the batch's case labels")
            loss = loss + (1.0 - lam) * self.classification_loss(outputs, labels)
        return loss


def class_weights(labels: list[int]) -> tuple[float, float]:
    """(w_n, w_p) of eq. 3: each class weighted by the other's share."""
    n_p = sum(1 for y in labels if y == 1)
    n_n = sum(1 for y in labels if y == 0)
    return n_p / (n_p + n_n), n_n / (n_p + n_n)


class MultitaskTrainer(Trainer):
    """Whole-image segmentation + prognosis (module doc)."""

    name = "multitask"
    config_defaults = {
        "network": "multitask_unet",
        "epochs": 200,
        "iterations_per_epoch": 18,  # the paper's epoch: 215 training cases / batch 12
        "optimizer": "adam",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "schedule": "constant",  # the step at lr_drop_at is configure_optimizer's
        "label_column": HEAD,
        # The engine's patch augmentation is not used: whole images, augmented as the paper says
        # (method_settings.augmentation); no mirroring, so no mirroring TTA either.
        "augmentation": {"enabled": False, "mirror_axes": ()},
        "method_settings": MultitaskSettings().to_dict(),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = MultitaskSettings(**self.config.method_settings)
        self.config = self.config.replace(method_settings=self.settings.to_dict())  # config.json: every setting

    # ------------------------------------------------------------------ settings as hooks
    @property
    def label_column(self) -> str | None:
        return self.config.label_column if self.settings.heads else None

    @property
    def selection_metric(self) -> str:
        return SELECTIONS[self.settings.selection]

    def network_spec(self) -> NetworkSpec:
        s = self.settings
        stride = self.configuration.network.total_stride
        if self.configuration.ndim != 3 or any(p % t for p, t in zip(self.patch_size, stride)):
            raise ValueError(f"{self.name}: the grid {self.patch_size} must be 3D and divisible by the network's "
                             f"total stride {stride}")
        options = {"read_channels": [CHANNELS.index(c) for c in s.input_channels],
                   "deep_supervision_scales": len(s.segmentation_scale_weights),
                   "head_levels": len(s.head_weights) if s.heads else 0, "head_weights": list(s.head_weights),
                   **self.config.network_options}
        return NetworkSpec(self.config.network, self.configuration.network, self.in_channels, self.output.channels,
                           options)

    def strategy(self) -> StrategySpec:
        return StrategySpec("whole_image", grid=tuple(int(p) for p in self.patch_size))

    # ------------------------------------------------------------------ labels, loss, optimizer, data
    def training_labels(self) -> list[int]:
        """The fold's training labels; ``InputError`` naming the column unless both classes are there."""
        labels = self.case_labels()
        found = [labels[c] for c in self.train_case_ids if c in labels]
        if len(set(found)) != 2:
            raise InputError(f"column {self.label_column!r} of clinical.csv must hold both classes (0 and 1) among the "
                             f"training cases of fold {self.fold}; found {sorted(set(found))} in {len(found)} case(s)",
                             file=self.data_dir.parent / "dataset.json")
        return found

    def build_loss(self) -> nn.Module:
        weights = (1.0, 1.0)
        if self.label_column is not None:
            found = self.training_labels()
            if self.settings.class_weighted:
                weights = class_weights(found)
            logger.info("%s fold %s: %d labelled training cases (%d positive); class weights w_n %.3f, w_p %.3f",
                        self.name, self.fold, len(found), sum(found), *weights)
        return MultitaskLoss(self.settings, weights, self.configuration.network.strides)

    def configure_optimizer(self, parameters):
        optimizer, _ = super().configure_optimizer(parameters)
        drop = int(round(self.settings.lr_drop_at * self.config.epochs * self.config.iterations_per_epoch))
        factor = self.settings.lr_drop_factor
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < drop else factor)

    def make_train_loader(self, cases: list[CachedCase], seed: int):
        grid = [int(p) for p in self.patch_size]
        return make_whole_image_loader([grid_case(c, grid) for c in cases], self.batch_size, self.settings.augmentation,
                                       seed, rank=self.dist.rank, num_workers=self.num_workers,
                                       pin_memory=self.device.type == "cuda",
                                       start_batch=self.start_epoch * self.config.iterations_per_epoch)

    def compute_loss(self, outputs, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(outputs, batch["target"], batch.get("case_label"))

    # ------------------------------------------------------------------ validation
    def validate_case(self, case: CachedCase) -> dict[str, Any]:
        named = run_strategy(self.strategy(), [self.network], self.case_input(case), self.patch_size,
                             output=self.output, device=self.device, amp_dtype=self.amp_dtype)
        mask = (self.output.lesion_probability(named["probabilities"]) > self.output.threshold).numpy()
        row = case_metrics(np.asarray(case.seg), mask.astype(np.uint8), case.voxel_ml)
        if HEAD in named:
            row["prognosis_probability"] = float(named[HEAD][1])
        row["label"] = case.case_label
        return row

    def summarize_validation(self, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
        summary = aggregate(list(per_case.values()))
        scored = [r for r in per_case.values() if r.get("label") is not None and "prognosis_probability" in r]
        summary.update(prognosis_summary([r["prognosis_probability"] for r in scored], [r["label"] for r in scored]))
        parts = [v for v in (summary["mean_dsc"], summary["auc"]) if not math.isnan(v)]
        summary["mean_dsc_auc"] = float(np.mean(parts)) if parts else math.nan
        logger.info("validation: DSC %.4f, AUC %.4f (%d labelled cases), Youden threshold %.3f", summary["mean_dsc"],
                    summary["auc"], summary["n_labelled"], summary["youden_threshold"])
        return summary


def prognosis_summary(probabilities: list[float], labels: list[int]) -> dict[str, Any]:
    """AUC, the Youden threshold and the scores at it (nan without both classes); ``head_thresholds``
    carries the threshold to prediction."""
    out: dict[str, Any] = {"n_labelled": len(labels), "auc": math.nan, "youden_threshold": math.nan}
    if len(set(labels)) == 2:
        threshold = youden_threshold(probabilities, labels)
        scores = binary_scores([int(p >= threshold) for p in probabilities], labels)
        out.update(auc=roc_auc(probabilities, labels), youden_threshold=threshold, accuracy=scores.accuracy,
                   sensitivity=scores.sensitivity, specificity=scores.specificity, youden_index=scores.youden_index)
        out["head_thresholds"] = {HEAD: threshold}
    return out
