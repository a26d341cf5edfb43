"""The two trainers of ``cascade_l2s`` (L2SNet, Cai et al., autoPET 2023) and their loss.

``l2s_localizer`` (§2.1, §2.3, §3.2-3.3): ``L2SLocalizerUNet`` on 2D slices across the
configuration's slice axis (``2d_coronal``: coronal; ``slice_axis`` moves it, e.g. 0 as the
released code), ``slice_neighbours`` = 2 slices on each side as extra channels (5 slices, the
released code); it reads the PET slices only (the CT slices of the slab are dropped by the
network's ``read_channels``), SUV clipped to [0, 35] and mapped to [-1, 1] (released code).
Loss BCE + Dice (λ = 1). SGD, lr 1e-3, poly decay per epoch, weight decay 1e-4, 200 epochs.
A fifth of the patches are centred on lesions ("about 1/5" lesion slices per step); augmentation
is a random left-right flip and a random in-plane rotation only.

``l2s_segmenter`` (§2.2-2.3, §3.2-3.3): ``L2SUNet3D`` (4 levels, 16 filters, layer norm) on PET
and CT patches of the planned size, PET clipped to [0, 15] SUV and CT to [100, 250] HU, each
scaled to [0, 1] (§3.2), batch 2; loss BCE + Dice, each weighted per voxel by (1 + P_loc) with
P_loc the localizer's cue on the segmenter's grid (``input_localizer`` of the batch, moved by the
spatial augmentation with the patch); SGD as above, 500 epochs; nnU-Net's other augmentation.
Trained alone (no input stage) the weight is 1.

Unspecified by the paper, our choices: SGD momentum 0.99 with Nesterov (nnU-Net, on which the
paper builds), Dice over the whole batch with smoothing 1e-5, the rotation range and probability
of the engine (±15°, 0.2), iterations per epoch the engine's (250), the output layer's bias at the
log-odds of a 1% lesion probability (``output_prior``: with a sigmoid at 50% everywhere the BCE
first pushes every voxel down and the paper's small SGD steps take hundreds of iterations more).
On a CPU plan the segmenter's patch is cut to the plan network's cost per iteration
(``CpuPatchRule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autopetseg.models.folders import NetworkSpec
from autopetseg.models.methods import OutputSpec, StrategySpec
from autopetseg.models.networks.l2s import PAPER_SEGMENTER_FEATURES, PAPER_SEGMENTER_LEVELS, segmenter_topology
from autopetseg.planning.plans import ConfigurationPlan, NormalizationPlan
from autopetseg.training.data_loader import make_train_loader
from autopetseg.training.losses import DiceLoss
from autopetseg.training.trainer import Trainer, lr_factor_schedule

IMAGE_CHANNELS = ("PET", "CT")


class CueWeightedBCEDiceLoss(nn.Module):
    """BCE^w + λ · Dice^w of one sigmoid channel, w = 1 + P_loc per voxel (L2SNet equation 2).

    ``BCE^w`` = mean over voxels of w · BCE(sigmoid(x), g); ``Dice^w`` = 1 - (2 Σ w p g + s) /
    (Σ w (p + g) + s), the sums over the batch (``batch_dice``) or per sample, then averaged.
    Without a cue, or with ``cue_weight`` False, w = 1 (equation 1).
    """

    def __init__(self, lambda_dice: float = 1.0, smooth: float = 1e-5, batch_dice: bool = True, cue_weight: bool = True):
        super().__init__()
        if lambda_dice < 0:
            raise ValueError(f"lambda_dice must be >= 0, got {lambda_dice}")
        self.lambda_dice = float(lambda_dice)
        self.cue_weight = bool(cue_weight)
        self.dice = DiceLoss(smooth_nr=smooth, smooth_dr=smooth, batch_dice=batch_dice)

    def weights(self, target: torch.Tensor, cue: torch.Tensor | None) -> torch.Tensor:
        if cue is None or not self.cue_weight:
            return torch.ones(target.shape, dtype=torch.float32, device=target.device)
        return 1.0 + cue.float().clamp(0.0, 1.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, cue: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.float()
            g = target.float().reshape(x.shape)
            w = self.weights(g, cue)
            bce = F.binary_cross_entropy_with_logits(x, g, weight=w)
            return bce + self.lambda_dice * self.dice.from_probabilities(torch.sigmoid(x), g, w)


def input_windows(windows: dict[str, list[float]], normalization: NormalizationPlan, slab: int = 1) -> list[list[float]]:
    """``TrainerConfig.input_windows`` in the cache's units, one [channel, low, high, to_low, to_high]
    per input channel (``slab`` consecutive channels per image channel, the slices of a 2D slab).

    PET is cached in SUV; CT as (HU - lo) / (hi - lo) clipped to [0, 1], with the plans' ``ct_clip_hu``."""
    out = []
    for name, (low, high, to_low, to_high) in windows.items():
        if name not in IMAGE_CHANNELS:
            raise ValueError(f"input_windows: unknown channel {name!r}; known: {IMAGE_CHANNELS}")
        c = IMAGE_CHANNELS.index(name)
        if name == "CT":
            lo, hi = normalization.ct_clip_hu
            low, high = ((float(v) - lo) / (hi - lo) for v in (low, high))
        out += [[c * slab + j, float(low), float(high), float(to_low), float(to_high)] for j in range(slab)]
    return out


def network_flops(spec: NetworkSpec, patch: list[int], batch: int = 1) -> float:
    """Forward FLOPs of ``spec``'s network on a batch of patches (counted by torch on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        network = spec.build()
        x = torch.zeros([batch, spec.in_channels, *patch])
    with FlopCounterMode(display=False) as counter:
        network(x)
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class CpuPatchRule:
    """The segmenter's patch on a CPU plan (``plans.budget.device == "cpu"``, no ``patch_size`` given).

    The planner sizes a configuration's patch for its own network (``network_name``, the residual
    U-Net for ``3d_fullres``) and the CPU budget; L2SNet's 3D U-Net convolves twice at full
    resolution with 16 filters and costs about 8 times the residual U-Net's FLOPs per voxel. So its
    patch is the largest one of the planner's kind (equal physical extent per axis, in steps of the
    finest spacing, capped at the planned patch, a multiple of the network's stride) whose forward
    FLOPs are at most ``cost_ratio`` times the planned network's on the planned patch: an iteration
    then costs what the plan's own network costs, and the cascade's two stages train in the budget
    of one. On a GPU plan the planned patch is kept.
    """

    cost_ratio: float = 1.0
    default_reference: str = "resunet"  # plans from before configurations named their network

    def patch(self, configuration: ConfigurationPlan, spec: NetworkSpec) -> list[int]:
        planned = [int(p) for p in configuration.patch_size]
        reference = NetworkSpec(configuration.network_name or self.default_reference, configuration.network,
                                spec.in_channels, 2)
        stride = [int(t) for t in spec.topology.total_stride]
        # FLOPs are proportional to the voxels for patches that are multiples of the stride.
        per_voxel = network_flops(spec, stride) / math.prod(stride)
        max_voxels = self.cost_ratio * network_flops(reference, planned) / per_voxel
        spacing = np.asarray(configuration.spacing_zyx, dtype=float)
        step, longest = float(spacing.min()), float(np.max(np.asarray(planned) * spacing))
        best = stride
        for k in range(1, int(math.ceil(longest / step)) + 1):
            wanted = np.clip(np.round(k * step / spacing), 1, planned).astype(int)
            patch = [max(t, int(w) // t * t) for w, t in zip(wanted, stride)]
            if math.prod(patch) <= max_voxels and math.prod(patch) > math.prod(best):
                best = patch
        return best


class L2STrainer(Trainer):
    """What both L2SNet stages share: one sigmoid output, the cue-weighted loss, SGD with per-epoch poly."""

    output = OutputSpec(activation="sigmoid", channels=1, lesion_channel=0)
    shared_defaults: dict[str, Any] = {
        "optimizer": "sgd",
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "poly",
        "schedule_per_epoch": True,
        # The paper does not say how the output starts; at PyTorch's 50% lesion probability its SGD at
        # 1e-3 did not move off "no lesion" in 300 CPU iterations, from 1% it did (README, deviations).
        "output_prior": 0.01,
        "loss": {"lambda_dice": 1.0, "smooth": 1e-5, "batch_dice": True, "cue_weight": True},
    }

    def build_loss(self) -> nn.Module:
        return CueWeightedBCEDiceLoss(**{**type(self).config_defaults.get("loss", {}), **self.config.loss})

    def configure_optimizer(self, parameters):
        optimizer, scheduler = super().configure_optimizer(parameters)
        cfg = self.config
        if not cfg.schedule_per_epoch:
            return optimizer, scheduler
        factor, per_epoch = lr_factor_schedule(cfg.schedule, cfg.epochs), cfg.iterations_per_epoch
        # Stepped per iteration like every schedule here, but constant within an epoch: (1 - n/N)^0.9.
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step // per_epoch))

    def network_options(self, slab: int = 1) -> dict[str, Any]:
        options = {"windows": input_windows(self.config.input_windows, self.plans.normalization, slab)}
        return {**options, **self.config.network_options}


class L2SLocalizerTrainer(L2STrainer):
    name = "l2s_localizer"
    config_defaults = {
        **L2STrainer.shared_defaults,
        "network": "l2s_localizer",
        "epochs": 200,
        "slice_neighbours": 2,
        "foreground_share": 0.2,
        "input_windows": {"PET": [0.0, 35.0, -1.0, 1.0]},
        "augmentation": {"p_scale": 0.0, "p_elastic": 0.0, "p_gamma": 0.0, "p_noise": 0.0, "mirror_axes": (2,)},
    }

    @property
    def slice_axis(self) -> int:
        if self.configuration.ndim != 2:
            raise ValueError(f"{self.name} trains on a 2D configuration, got {self.configuration.name!r}")
        axis = self.config.slice_axis
        if axis is None or axis == self.configuration.slice_axis:
            return int(self.configuration.slice_axis)
        if self.config.patch_size is None:
            raise ValueError(f"slice_axis {axis} differs from configuration {self.configuration.name!r}'s "
                             f"({self.configuration.slice_axis}): give the patch_size of its plane too")
        return int(axis)

    @property
    def slab(self) -> int:
        return 2 * self.config.slice_neighbours + 1

    @property
    def in_channels(self) -> int:
        return self.image_channels * self.slab

    def network_spec(self) -> NetworkSpec:
        options = {"read_channels": list(range(self.slab)), **self.network_options(self.slab)}  # the PET slices
        return NetworkSpec(self.config.network, self.configuration.network, self.in_channels, self.output.channels,
                           options)

    def strategy(self) -> StrategySpec:
        return StrategySpec("slices", axis=self.slice_axis, neighbours=self.config.slice_neighbours)

    def make_train_loader(self, cases, seed: int):
        cfg = self.config
        return make_train_loader(
            cases, self.patch_size, self.batch_size, cfg.foreground_share, cfg.augmentation, seed=seed,
            rank=self.dist.rank, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            start_batch=self.start_epoch * cfg.iterations_per_epoch, slice_axis=self.slice_axis,
            neighbours=cfg.slice_neighbours,
        )


class L2SSegmenterTrainer(L2STrainer):
    name = "l2s_segmenter"
    config_defaults = {
        **L2STrainer.shared_defaults,
        "network": "l2s_unet3d",
        "epochs": 500,
        "batch_size": 2,
        "input_windows": {"PET": [0.0, 15.0, 0.0, 1.0], "CT": [100.0, 250.0, 0.0, 1.0]},
        "network_options": {"levels": PAPER_SEGMENTER_LEVELS, "base_features": PAPER_SEGMENTER_FEATURES, "norm": "layer"},
    }

    cpu_patch = CpuPatchRule()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.patch_size is None and self.plans.budget.device == "cpu":
            self.patch_size = self.cpu_patch.patch(self.configuration, self.network_spec())

    def network_spec(self) -> NetworkSpec:
        options = {**type(self).config_defaults["network_options"], **self.network_options()}
        topology = segmenter_topology(self.configuration.network, options.pop("levels"), options.pop("base_features"))
        stride = topology.total_stride
        if any(p % t for p, t in zip(self.patch_size, stride)):
            raise ValueError(f"{self.name}: patch {self.patch_size} is not divisible by the network's total stride {stride}")
        return NetworkSpec(self.config.network, topology, self.in_channels, self.output.channels, options)

    def compute_loss(self, outputs, batch: dict[str, Any]) -> torch.Tensor:
        cue = batch[f"input_{self.stage.inputs[0]}"] if self.stage.inputs else None
        return self.loss(outputs, batch["target"], cue)


L2S_TRAINERS: dict[str, type[Trainer]] = {t.name: t for t in (L2SLocalizerTrainer, L2SSegmenterTrainer)}

__all__ = ["CpuPatchRule", "CueWeightedBCEDiceLoss", "L2SLocalizerTrainer", "L2SSegmenterTrainer", "L2S_TRAINERS", "input_windows"]
