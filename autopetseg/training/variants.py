"""Trainer variants: small subclasses of ``Trainer`` registered by name in ``TRAINERS``.

A variant states its hyper-parameters in ``config_defaults`` (they end up in ``config.json``) and
overrides only the hooks its method changes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from autopetseg.training.cascade3 import CASCADE3_TRAINERS
from autopetseg.training.l2s import L2S_TRAINERS
from autopetseg.training.multitask import MultitaskTrainer
from autopetseg.training.trainer import Trainer

logger = logging.getLogger(__name__)


class GDFLTrainer(Trainer):
    """GDFL paper (Ahamed & Rahmim, autoPET 2023): 3D residual U-Net, Generalized Dice + focal loss.

    Adam, lr 1e-3, cosine to 0 over 300 epochs (per iteration here), best checkpoint by mean
    validation DSC. Loss: focal class weights (1, 100), gamma 2, eps = eta = 1e-5 (§2.4). Patch
    sampling: the paper crops patches at random; a third of them centred on lesions (nnU-Net's
    oversampling share) keeps lesion-poor data from starving the lesion class.
    """

    name = "gdfl"
    config_defaults = {
        "network": "resunet",
        "epochs": 300,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "foreground_share": 0.33,
        "loss": {"focal_weights": [1.0, 100.0], "gamma": 2.0, "epsilon": 1e-5, "eta": 1e-5, "focal_reduction": "mean"},
    }

    def build_loss(self) -> nn.Module:
        from autopetseg.training.losses import GeneralizedDiceFocalLoss

        settings = dict(self.config.loss)
        if "focal_weights" in settings:
            settings["focal_weights"] = tuple(settings["focal_weights"])
        return GeneralizedDiceFocalLoss(**settings)


# L1DFL paper (Dzikunu et al.), §2.2 and §2.5: shared by its three trainers, which differ only in the loss.
L1DFL_PAPER_DEFAULTS: dict[str, Any] = {
    # The paper trains Attention U-Net and SegResNet with every loss; Attention U-Net is its headline
    # L1DFL result (median DSC 0.66, F1 0.69, Table 1). ``--network segresnet`` selects the other.
    "network": "attention_unet",
    "epochs": 1000,  # iterations_per_epoch stays the engine's default; the paper's epoch is one pass over 258 scans
    "optimizer": "adamw",
    "learning_rate": 2e-4,
    "weight_decay": 1e-5,
    "schedule": "cosine",  # 2e-4 -> 0
    "foreground_share": 0.8,  # patches centred on a foreground voxel with probability 0.8
    # Augmentation: random crops and affine transforms only (translation up to 10 voxels, rotation
    # up to pi/15, scaling up to 1.1); the released code applies the affine with probability 0.5.
    "augmentation": {
        "rotation_axial_rad": (-math.pi / 15, math.pi / 15),
        "p_rotation": 0.5,
        "scale_range": (0.9, 1.1),
        "p_scale": 0.5,
        "p_elastic": 0.0,
        "p_gamma": 0.0,
        "p_noise": 0.0,
        "mirror_axes": (),
        "max_shift_voxels": 10,
    },
}


def _loss_settings(raw: dict[str, Any]) -> dict[str, Any]:
    settings = dict(raw)
    if isinstance(settings.get("focal_weights"), list):  # JSON round trip
        settings["focal_weights"] = tuple(settings["focal_weights"])
    return settings


class L1DFLTrainer(Trainer):
    """L1DFL paper: L1-weighted Dice focal loss (bin width 0.1, squared Dice denominator, focal gamma 2).

    AdamW 2e-4, weight decay 1e-5, cosine annealing to 0 over 1000 epochs, patches centred on a
    lesion voxel with probability 0.8, best checkpoint by mean validation DSC (the engine's).

    ``output_prior`` works with it: an earlier bias rule started the softmax at p² (1e-4 for 0.01),
    where the squared denominator held training at 0.000 validation DSC for 800 iterations; from the
    corrected start at p it reached 0.32 after 200 iterations on tiny phantoms (issue #11).
    """

    name = "l1dfl"
    config_defaults = {**L1DFL_PAPER_DEFAULTS, "loss": {"bin_width": 0.1, "gamma": 2.0}}

    def build_loss(self) -> nn.Module:
        from autopetseg.training.losses import L1WeightedDiceFocalLoss

        return L1WeightedDiceFocalLoss(**_loss_settings(self.config.loss))


class DiceTrainer(L1DFLTrainer):
    """L1DFL paper's Dice baseline: soft Dice of equation (1) (no squares in the denominator)."""

    name = "dice"
    config_defaults = {**L1DFL_PAPER_DEFAULTS, "loss": {"squared_denominator": False}}

    def build_loss(self) -> nn.Module:
        from autopetseg.training.losses import DiceLoss

        return DiceLoss(**_loss_settings(self.config.loss))


class DiceFocalTrainer(L1DFLTrainer):
    """L1DFL paper's Dice focal baseline: Dice (equation (1)) + focal (gamma 2, alpha 1), equation (3).

    ``loss.focal_activation``: "softmax" (default: the paper's equation, and the same focal term as
    L1DFL, so that the two differ only in the Dice weighting) or "sigmoid" (the authors' code used
    MONAI's ``DiceFocalLoss``, whose focal term is per-channel sigmoid): ``train --loss focal_activation=sigmoid``.
    """

    name = "dicefocal"
    config_defaults = {**L1DFL_PAPER_DEFAULTS,
                       "loss": {"squared_denominator": False, "gamma": 2.0, "focal_activation": "softmax"}}

    def build_loss(self) -> nn.Module:
        from autopetseg.training.losses import DiceFocalLoss

        return DiceFocalLoss(**_loss_settings(self.config.loss))


# Explicit name -> class registry (later issues add cascades, multitask).
TRAINERS: dict[str, type[Trainer]] = {
    "gdfl": GDFLTrainer,
    "l1dfl": L1DFLTrainer,
    "dice": DiceTrainer,
    "dicefocal": DiceFocalTrainer,
    **L2S_TRAINERS,  # l2s_localizer, l2s_segmenter: the stages of cascade_l2s
    **CASCADE3_TRAINERS,  # cascade3_classifier, _detector, _roi_segmenter: the stages of cascade_3step
    "multitask": MultitaskTrainer,  # Liu et al.: segmentation + prognosis
}


def get_trainer_class(name: str) -> type[Trainer]:
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; known: {sorted(TRAINERS)}")
    return TRAINERS[name]
