"""A trained model folder as an ensemble of folds: loading, and the weights of the folds.

Model folder (written by ``autopetseg train``, see ``training/run.py``)::

    <results>/<Dataset>/<trainer>__<configuration>/
        plans.json, dataset.json
        fold_<k>/checkpoint_best.pt, checkpoint_final.pt, config.json, validation.json

Each fold's network is rebuilt through its trainer class (``training.variants.get_trainer_class``)
from the settings stored in the checkpoint, so a variant's ``build_network`` and
``output_to_mask`` hooks and its ``inference_activation`` apply at prediction time too.

Ensembling (GDFL paper §2.5): ``mean`` averages the folds' class probabilities with equal
weights; ``dice_weighted`` weights fold k by the mean validation DSC of its best checkpoint
(``fold_k/validation.json``, ``mean_dsc``). A fold without a usable DSC (file missing, null, 0 or
negative) gets the mean DSC of the folds that have one, i.e. it counts as an average fold, with a
warning; when no fold has one, the weights fall back to equal (= ``mean``), again with a warning.
``validation.json`` describes the best checkpoint; with ``--checkpoint final`` its DSC still serves
as the fold's weight.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json
from autopetseg.planning.plans import Plans
from autopetseg.training.config import TrainerConfig
from autopetseg.training.trainer import CHECKPOINT_BEST, CHECKPOINT_FINAL, Trainer
from autopetseg.training.variants import get_trainer_class

log = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("mean", "dice_weighted")
CHECKPOINTS = {"best": CHECKPOINT_BEST, "final": CHECKPOINT_FINAL}
VALIDATION_FILE = "validation.json"
_FOLD_DIR = re.compile(r"^fold_(\d+|all)$")


@dataclass
class FoldModel:
    """One fold, ready to predict: its trainer (holding the network, in eval mode, on the device)."""

    fold: int | str
    trainer: Trainer
    checkpoint: Path
    validation_dsc: float | None  # mean DSC of validation.json, None when missing/undefined

    @property
    def network(self) -> torch.nn.Module:
        return self.trainer.network


@dataclass
class EnsembleModel:
    """The folds of one model folder and their normalised weights (summing to 1)."""

    model_dir: Path
    plans: Plans
    configuration: str
    trainer_name: str
    folds: list[FoldModel]
    weights: list[float]
    method: str
    device: torch.device

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [f.network for f in self.folds]

    @property
    def trainer(self) -> Trainer:
        """The first fold's trainer: its hooks (``output_to_mask``, activation) stand for all folds."""
        return self.folds[0].trainer

    @property
    def patch_size(self) -> list[int]:
        return list(self.trainer.patch_size)

    @property
    def activation(self):
        return self.trainer.inference_activation

    @property
    def trained_mirror_axes(self) -> tuple[int, ...]:
        aug = self.trainer.config.augmentation
        return tuple(aug.mirror_axes) if aug.enabled else ()


# ----------------------------------------------------------------------------- weights


def _usable(dsc: float | None) -> bool:
    return dsc is not None and not math.isnan(dsc) and dsc > 0


def ensemble_weights(dscs: Sequence[float | None], method: str = "mean", names: Sequence[str] | None = None) -> list[float]:
    """Normalised weights of the folds for ``method`` ("mean" or "dice_weighted").

    ``dscs``: each fold's mean validation DSC (``None``/nan when unknown). See the module doc
    for the fallback of a fold without a usable DSC.
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {ENSEMBLE_METHODS}")
    n = len(dscs)
    if n == 0:
        raise ValueError("no folds to ensemble")
    names = list(names) if names is not None else [f"fold {i}" for i in range(n)]
    if method == "mean":
        return [1.0 / n] * n
    usable = [float(d) for d in dscs if _usable(d)]
    if not usable:
        log.warning("dice_weighted ensemble: no fold has a positive validation DSC; using equal weights (mean)")
        return [1.0 / n] * n
    fallback = sum(usable) / len(usable)
    raw = []
    for name, dsc in zip(names, dscs):
        if _usable(dsc):
            raw.append(float(dsc))
        else:
            log.warning(
                "dice_weighted ensemble: %s has no usable validation DSC (%s); weighting it as an average fold (%.4f)",
                name, "missing" if dsc is None else f"{dsc}", fallback,
            )
            raw.append(fallback)
    total = sum(raw)
    return [w / total for w in raw]


def read_validation_dsc(fold_dir: str | Path) -> float | None:
    """``mean_dsc`` of ``fold_dir/validation.json`` (the best checkpoint's validation); None if absent."""
    path = Path(fold_dir) / VALIDATION_FILE
    if not path.is_file():
        return None
    try:
        value = read_json(path).get("mean_dsc")
    except (OSError, ValueError):
        log.warning("could not read %s", path)
        return None
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- loading


def available_folds(model_dir: str | Path, checkpoint: str = "best") -> list[int | str]:
    """Folds of ``model_dir`` that hold the checkpoint, numeric first, then "all"."""
    name = CHECKPOINTS[checkpoint]
    found: list[int | str] = []
    for child in Path(model_dir).iterdir():
        m = _FOLD_DIR.match(child.name)
        if m and (child / name).is_file():
            found.append(m.group(1) if m.group(1) == "all" else int(m.group(1)))
    return sorted(found, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def _check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "plans.json").is_file():
        raise InputError(
            "not a model folder: plans.json is missing (expected <results>/<Dataset>/<trainer>__<configuration>)",
            file=model_dir,
        )
    return model_dir.resolve()


def load_fold(
    model_dir: str | Path,
    fold: int | str,
    plans: Plans,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
) -> FoldModel:
    """Rebuild fold ``fold``'s network through its trainer class and load the checkpoint weights."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    fold_dir = Path(model_dir) / f"fold_{fold}"
    path = fold_dir / CHECKPOINTS[checkpoint]
    if not path.is_file():
        other = [k for k, v in CHECKPOINTS.items() if (fold_dir / v).is_file()]
        hint = f"; available: --checkpoint {' / '.join(other)}" if other else "; is this fold trained?"
        raise InputError(f"fold {fold}: checkpoint file missing{hint}", file=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: name it
        raise InputError(f"fold {fold}: checkpoint is unreadable ({type(exc).__name__}: {exc})", file=path) from None
    trainer_name = state.get("trainer") or Path(model_dir).name.split("__")[0]
    configuration = state.get("configuration") or Path(model_dir).name.split("__")[-1]
    try:
        trainer_cls = get_trainer_class(trainer_name)
    except ValueError as exc:
        raise InputError(f"fold {fold}: {exc}", file=path) from None
    try:
        config = TrainerConfig.from_dict(state["config"]) if "config" in state else trainer_cls.default_config()
    except (TypeError, ValueError) as exc:  # written by another version of autopetseg
        raise InputError(f"fold {fold}: checkpoint settings are not readable by this version ({exc})", file=path) from None
    if state.get("patch_size") is not None and config.patch_size is None:
        config = config.replace(patch_size=list(state["patch_size"]))
    device = torch.device(device)
    # Nothing of the training data is touched: the constructor only stores its arguments.
    trainer = trainer_cls(plans, configuration, model_dir, fold_dir, [], [], config=config, device=device, fold=fold)
    network = trainer.build_network()
    network.load_state_dict(state["network"])
    network = network.to(device)
    if config.channels_last_3d:
        network = network.to(memory_format=torch.channels_last_3d)
    network.eval()
    trainer.network = network
    return FoldModel(fold=fold, trainer=trainer, checkpoint=path, validation_dsc=read_validation_dsc(fold_dir))


def load_ensemble(
    model_dir: str | Path,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "best",
    method: str = "mean",
    device: str | torch.device = "cpu",
) -> EnsembleModel:
    """The chosen folds (default: every fold with the checkpoint) of a model folder, on ``device``."""
    model_dir = _check_model_dir(Path(model_dir))
    plans = Plans.load(model_dir / "plans.json")
    if folds is None or len(folds) == 0:
        folds = available_folds(model_dir, checkpoint)
        if not folds:
            raise InputError(f"no fold with checkpoint_{checkpoint}.pt in the model folder", file=model_dir)
    folds = [int(f) if isinstance(f, str) and f.isdigit() else f for f in folds]
    loaded = [load_fold(model_dir, f, plans, checkpoint, device) for f in folds]
    first = loaded[0].trainer
    for other in loaded[1:]:
        t = other.trainer
        if t.name != first.name or t.configuration.name != first.configuration.name:
            raise InputError(
                f"folds disagree: fold {loaded[0].fold} is {first.name}/{first.configuration.name}, "
                f"fold {other.fold} is {t.name}/{t.configuration.name}",
                file=model_dir,
            )
        if list(t.patch_size) != list(first.patch_size):
            raise InputError(
                f"folds {loaded[0].fold} and {other.fold} were trained with different patch sizes "
                f"({first.patch_size} vs {t.patch_size}); predict them separately",
                file=model_dir,
            )
    if first.configuration.ndim != 3:
        raise InputError(
            f"configuration {first.configuration.name!r} is not 3D; the predictor handles 3D models", file=model_dir
        )
    weights = ensemble_weights([f.validation_dsc for f in loaded], method, [f"fold {f.fold}" for f in loaded])
    log.info(
        "model %s: %s, folds %s, %s ensemble, weights %s, checkpoint %s",
        model_dir.name, first.name, [f.fold for f in loaded], method, [round(w, 4) for w in weights], checkpoint,
    )
    return EnsembleModel(
        model_dir=model_dir,
        plans=plans,
        configuration=first.configuration.name,
        trainer_name=first.name,
        folds=loaded,
        weights=weights,
        method=method,
        device=torch.device(device),
    )
