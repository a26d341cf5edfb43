"""Trained stages back from a model folder: the network rebuilt from its fold record, weights loaded
safely, and the ensemble of a stage's folds run over a volume.

Used by inference (``predict``) and by training (an earlier stage's outputs for a later stage).
No trainer is constructed: the network comes from ``model.json``'s ``NetworkSpec``, the weights
from a checkpoint read with ``weights_only=True`` (``checkpoints.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json
from autopetseg.models.checkpoints import load_checkpoint
from autopetseg.models.folders import (
    CHECKPOINTS,
    FoldRecord,
    NetworkSpec,
    plans_hash,
    read_record,
    read_head_thresholds,
    read_validation_score,
)
from autopetseg.models.methods import OutputSpec, StrategySpec
from autopetseg.models.strategies import run_strategy
from autopetseg.planning.plans import Plans

log = logging.getLogger(__name__)


@dataclass
class TrainedStage:
    """One fold of one stage, ready to predict: its record and its network (eval mode, on the device)."""

    fold: int | str
    record: FoldRecord
    network: nn.Module
    checkpoint: Path
    validation_score: float | None  # the best checkpoint's validation mean DSC, None when unknown
    head_thresholds: dict[str, float] = field(default_factory=dict)  # per head, from validation.json


def _legacy_record(state: dict, model_dir: Path, fold: int | str, path: Path) -> FoldRecord:
    """The record of a fold written before records existed: one softmax stage of the trainer's network
    on the model folder's plans, predicted with the default preprocessing (as it was then)."""
    plans_path = model_dir / "plans.json"
    plans = Plans.load(plans_path)
    try:
        config = state["config"]
        configuration = state.get("configuration") or model_dir.name.partition("__")[2] or "3d_fullres"
        conf = plans.configuration(configuration)
        aug = config.get("augmentation", {})
        raw_plans = read_json(plans_path)
        return FoldRecord(
            method=state.get("trainer") or model_dir.name.partition("__")[0],
            stage="segmenter",
            trainer=state.get("trainer") or model_dir.name.partition("__")[0],
            fold=fold,
            configuration=configuration,
            plans=raw_plans,
            plans_sha256=plans_hash(raw_plans),
            network=NetworkSpec(config.get("network", "resunet"), conf.network, 2, 2),
            output=OutputSpec(),
            strategy=StrategySpec("sliding_window"),
            patch_size=list(state.get("patch_size") or config.get("patch_size") or conf.patch_size),
            preprocessing=None,
            mirror_axes=list(aug.get("mirror_axes", [])) if aug.get("enabled", True) else [],
            channels_last_3d=bool(config.get("channels_last_3d", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"fold {fold}: checkpoint settings are not readable by this version ({exc})", file=path) from None


def load_trained_stage(
    folder: str | Path,
    fold: int | str,
    model_dir: str | Path,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
) -> TrainedStage:
    """The fold's network of the stage in ``folder`` with the ``checkpoint`` ("best"/"final") weights."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    folder = Path(folder)
    path = folder / CHECKPOINTS[checkpoint]
    if not path.is_file():
        other = [k for k, v in CHECKPOINTS.items() if (folder / v).is_file()]
        hint = f"; available: --checkpoint {' / '.join(other)}" if other else "; is this fold trained?"
        raise InputError(f"fold {fold}: checkpoint file missing{hint}", file=path)
    state = load_checkpoint(path, map_location="cpu", what=f"fold {fold} checkpoint")
    record = read_record(folder) or _legacy_record(state, Path(model_dir), fold, path)
    try:
        network = record.network.build()
        network.load_state_dict(state["network"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(f"fold {fold}: the weights do not fit the recorded network ({exc})", file=path) from None
    network = network.to(device)
    if record.channels_last_3d:
        network = network.to(memory_format=torch.channels_last_3d)
    network.eval()
    return TrainedStage(fold, record, network, path, read_validation_score(folder), read_head_thresholds(folder))


def check_one_plan(stages: Sequence[TrainedStage], where: Path) -> None:
    """Folds of one ensemble must share plans, configuration, network and patch: else an error naming them."""
    first = stages[0]
    for other in stages[1:]:
        a, b = first.record, other.record
        if a.plans_sha256 != b.plans_sha256:
            raise InputError(
                f"folds {first.fold} and {other.fold} were trained on different plans "
                f"({a.plans_sha256[:12]} vs {b.plans_sha256[:12]}: the dataset was planned again in between); "
                f"retrain one of them or predict them separately", file=where)
        if (a.trainer, a.configuration) != (b.trainer, b.configuration):
            raise InputError(f"folds disagree: fold {first.fold} is {a.trainer}/{a.configuration}, "
                             f"fold {other.fold} is {b.trainer}/{b.configuration}", file=where)
        if a.patch_size != b.patch_size or a.network != b.network or a.output != b.output or a.strategy != b.strategy:
            raise InputError(f"folds {first.fold} and {other.fold} were trained with different patch sizes, networks "
                             f"or outputs ({a.patch_size} vs {b.patch_size}); predict them separately", file=where)


def ensemble_probabilities(
    stages: Sequence[TrainedStage],
    image: np.ndarray | torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
    **strategy_settings,
) -> dict[str, torch.Tensor]:
    """The named outputs of a stage's fold ensemble over one preprocessed volume (its strategy,
    every fold on each window or slice batch, probabilities averaged with ``weights``)."""
    record = stages[0].record
    return run_strategy(
        record.strategy,
        [s.network for s in stages],
        image,
        record.patch_size,
        output=record.output,
        network_weights=weights,
        device=device,
        amp_dtype=amp_dtype,
        mirror_axes=record.mirror_axes if mirror else None,
        channels_last_3d=record.channels_last_3d,
        divisor=record.network.topology.total_stride,
        **strategy_settings,
    )
