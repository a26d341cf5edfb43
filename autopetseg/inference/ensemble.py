"""A trained model folder as one fold ensemble per stage: loading, and the weights of the folds.

The model folder (``models/folders.py``) names its method and stages in ``method.json``; each
stage of each fold records its network, plans, output and strategy in ``model.json``. Every fold's
network is rebuilt from that record (``models/trained.py``): no trainer is constructed, and
weights are read with ``weights_only=True``. A folder written before records existed is one
stage whose folds are read from their checkpoints. The folds of a stage must share their plans:
an ensemble across a re-planning is refused, naming the folds.

Ensembling (GDFL paper §2.5): ``mean`` averages the folds' class probabilities with equal
weights; ``dice_weighted`` weights fold k by the mean validation DSC of its best checkpoint
(``validation.json``, ``mean_dsc``). A fold without a usable DSC (file missing, null, 0 or
negative) gets the mean DSC of the folds that have one, i.e. it counts as an average fold, with a
warning; when no fold has one, the weights fall back to equal (= ``mean``), again with a warning.
``validation.json`` describes the best checkpoint; with ``--checkpoint final`` its DSC still serves
as the fold's weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autopetseg.errors import InputError
from autopetseg.models.folders import available_folds, parse_fold, read_method, stage_dir
from autopetseg.models.methods import MethodSpec, StageSpec
from autopetseg.models.trained import TrainedStage, check_one_plan, load_trained_stage
from autopetseg.options import check_option
from autopetseg.planning.plans import Plans

log = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("mean", "dice_weighted")


@dataclass
class StageEnsemble:
    """The chosen folds of one stage and their normalised weights (summing to 1)."""

    stage: StageSpec
    folds: list[TrainedStage]
    weights: list[float]

    @property
    def record(self):
        """The first fold's record: the folds agree on everything but the weights (checked)."""
        return self.folds[0].record

    @property
    def plans(self) -> Plans:
        return self.record.load_plans()

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [f.network for f in self.folds]

    @property
    def head_thresholds(self) -> dict[str, float]:
        """Per patient-level head, the mean of the folds' validation thresholds (folds without one left out)."""
        names = {name for f in self.folds for name in f.head_thresholds}
        return {name: float(np.mean([f.head_thresholds[name] for f in self.folds if name in f.head_thresholds]))
                for name in sorted(names)}


@dataclass
class EnsembleModel:
    """A model folder ready to predict: its method and one fold ensemble per stage, in order."""

    model_dir: Path
    method: MethodSpec
    stages: list[StageEnsemble]
    ensemble: str
    device: torch.device

    @property
    def last(self) -> StageEnsemble:
        return self.stages[-1]

    @property
    def folds(self) -> list[int | str]:
        return [f.fold for f in self.last.folds]

    @property
    def weights(self) -> list[float]:
        return self.last.weights


# ----------------------------------------------------------------------------- weights


def _usable(dsc: float | None) -> bool:
    """A validation DSC that says something: known and not NaN (0 included: that fold found nothing)."""
    return dsc is not None and not math.isnan(dsc)


def ensemble_weights(dscs: Sequence[float | None], method: str = "mean", names: Sequence[str] | None = None) -> list[float]:
    """Normalised weights of the folds for ``method`` ("mean" or "dice_weighted").

    ``dscs``: each fold's mean validation DSC (``None``/nan when unknown). See the module doc
    for the fallback of a fold without a usable DSC.
    """
    check_option("ensemble", method)
    n = len(dscs)
    if n == 0:
        raise ValueError("no folds to ensemble")
    names = list(names) if names is not None else [f"fold {i}" for i in range(n)]
    if method == "mean":
        return [1.0 / n] * n
    usable = [max(float(d), 0.0) for d in dscs if _usable(d)]
    if not usable or sum(usable) <= 0:
        log.warning("dice_weighted ensemble: no fold has a positive validation DSC; using equal weights (mean)")
        return [1.0 / n] * n
    fallback = sum(usable) / len(usable)  # a fold whose DSC is unknown counts as an average one
    raw = []
    for name, dsc in zip(names, dscs):
        if _usable(dsc):
            raw.append(max(float(dsc), 0.0))  # the GDFL paper's weight is the DSC itself: 0 for a fold that found nothing
        else:
            log.warning(
                "dice_weighted ensemble: %s has no usable validation DSC (%s); weighting it as an average fold (%.4f)",
                name, "missing" if dsc is None else f"{dsc}", fallback,
            )
            raw.append(fallback)
    total = sum(raw)
    return [w / total for w in raw]


# ----------------------------------------------------------------------------- loading


def _check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "plans.json").is_file() and not (model_dir / "method.json").is_file():
        raise InputError(
            "not a model folder: method.json and plans.json are missing (expected <results>/<Dataset>/<method>__<configuration>)",
            file=model_dir,
        )
    return model_dir.resolve()


def load_ensemble(
    model_dir: str | Path,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "best",
    method: str = "mean",
    device: str | torch.device = "cpu",
) -> EnsembleModel:
    """The chosen folds (default: every fold with the checkpoint in every stage) of a model folder."""
    check_option("ensemble", method)
    check_option("checkpoint", checkpoint)
    model_dir = _check_model_dir(Path(model_dir))
    spec = read_method(model_dir)
    if not folds:
        folds = available_folds(model_dir, spec, checkpoint)
        if not folds:
            raise InputError(f"no fold with checkpoint_{checkpoint}.pt in every stage of the model folder", file=model_dir)
    folds = [parse_fold(f) for f in folds]
    stages = []
    for stage in spec.stages:
        loaded = [load_trained_stage(stage_dir(model_dir, spec, f, stage.name), f, model_dir, checkpoint, device)
                  for f in folds]
        check_one_plan(loaded, model_dir)
        names = [f"fold {f.fold}" + (f" ({stage.name})" if len(spec.stages) > 1 else "") for f in loaded]
        weights = ensemble_weights([f.validation_score for f in loaded], method, names)
        stages.append(StageEnsemble(stage, loaded, weights))
    first, last = stages[0].folds[0].record, stages[-1].folds[0].record
    if first.plans_sha256 != last.plans_sha256:
        log.warning("stages %s and %s were trained on different plans", stages[0].stage.name, stages[-1].stage.name)
    log.info(
        "model %s: %s, folds %s, %s ensemble, weights %s, checkpoint %s",
        model_dir.name, spec.name, folds, method, [round(w, 4) for w in stages[-1].weights], checkpoint,
    )
    return EnsembleModel(model_dir=model_dir, method=spec, stages=stages, ensemble=method, device=torch.device(device))
