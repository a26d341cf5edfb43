"""``autopetseg demo``: the whole pipeline on synthetic phantoms, on a CPU, in minutes.

synth (training set + held-out set) → plan for the CPU → preprocess → train a few folds →
predict the held-out phantoms with the fold ensemble → evaluate with the autoPET metrics →
MIP pictures. Each stage is the same call the CLI makes, so the demo is also an end-to-end
check of an installation. Every stage resumes: running the demo again reuses what is there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from autopetseg.planning.plans import ComputeBudget

log = logging.getLogger(__name__)

DATASET = "Dataset001_Phantoms"


@dataclass
class DemoSettings:
    """The demo fits its ``time_budget_s`` (12 min): measured on 2 idle CPU cores, 10 min 58 s,
    folds of 6,961 and 6,022 iterations, held-out DSC 0.77 (README). A hundred training phantoms,
    not 30: with 30 the validation DSC peaked near 0.5 and then fell as the model over-fitted,
    calling physiological hot spots (bladder, kidneys, brown fat) lesions."""

    n_train: int = 100
    n_test: int = 8
    folds: tuple[int, ...] = (0, 1)
    epochs: int = 100  # at most 10,000 iterations per fold: with a time budget the time decides
    iterations_per_epoch: int = 100
    trainer: str = "gdfl"
    ensemble: str = "dice_weighted"
    device: str = "cpu"
    num_processes: int = 2
    seed: int = 0
    # Wall-clock seconds of the whole demo (None: train the fixed epochs x iterations). Each fold gets
    # the time the stages before it left, less ``after_training_s`` for predicting, scoring and the
    # pictures, shared equally by the folds still to train; ``train --time-budget`` fits its schedule
    # to that (``epochs`` x ``iterations_per_epoch`` stays the most a fold trains).
    time_budget_s: float | None = 12 * 60
    after_training_s: float = 60.0
    # The CPU plan is sized for each fold's share of the budget (``plan_and_preprocess --time-budget``):
    # the budget less ``setup_s`` (synthesis and preprocessing) and ``after_training_s``.
    setup_s: float = 30.0  # measured: 7 s for synthesis and preprocessing on 2 cores
    # TrainerConfig fields. None: start from "all background" (focal-loss prior, output_prior 0.01)
    # because the short CPU schedule otherwise spends its first ~60 iterations unlearning the initial
    # 50% lesion output (measured on tiny phantoms).
    training_overrides: dict | None = None

    def planning_budget(self) -> ComputeBudget:
        """A fixed function of the settings, so that a resumed demo keeps its plans."""
        if self.time_budget_s is None:
            return ComputeBudget(device="cpu")
        per_fold = (self.time_budget_s - self.setup_s - self.after_training_s) / len(self.folds)
        return ComputeBudget(device="cpu", time_budget_s=max(per_fold, 1.0))

    def resolved_training_overrides(self) -> dict:
        if self.training_overrides is not None:
            return dict(self.training_overrides)
        return {"output_prior": 0.01}


@dataclass
class DemoResult:
    work_dir: Path
    summary: dict
    seconds: dict[str, float]
    prediction_dir: Path
    evaluation_dir: Path
    model_dir: Path


def run_demo(work_dir: str | Path = "autopetseg_demo", settings: DemoSettings | None = None) -> DemoResult:
    """Run every stage in ``work_dir`` (raw/, preprocessed/, results/, predictions/, evaluation/)."""
    from autopetseg.data.synthetic import synthesize_dataset
    from autopetseg.evaluation.evaluate import evaluate_folder
    from autopetseg.evaluation.pictures import write_evaluation_pictures
    from autopetseg.inference.predictor import PredictorSettings, predict_folder
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.training.run import model_dir as trained_model_dir
    from autopetseg.training.run import resolve_method, run_training

    s = settings or DemoSettings()
    started = time.time()
    work = Path(work_dir)
    raw, test_dir = work / "raw" / DATASET, work / "held_out"
    prep, results = work / "preprocessed", work / "results"
    pred_dir, eval_dir = work / "predictions", work / "evaluation"
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        start = time.perf_counter()
        log.info("demo: %s", name)
        out = fn()
        seconds[name] = time.perf_counter() - start
        return out

    # A different seed for the held-out set: none of its phantoms was seen in training.
    if not (raw / "synthetic_truth.json").is_file():
        stage("synthesize", lambda: synthesize_dataset(raw, s.n_train, "nnunet", s.seed, num_processes=s.num_processes))
    if not (test_dir / "synthetic_truth.json").is_file():
        stage("synthesize held-out", lambda: synthesize_dataset(test_dir, s.n_test, "flat", s.seed + 10_000,
                                                                 num_processes=s.num_processes))
    stage("plan_and_preprocess", lambda: plan_and_preprocess(
        raw, budget=s.planning_budget(), num_processes=s.num_processes, preprocessed_root=prep))
    for index, fold in enumerate(s.folds):
        budget = None
        if s.time_budget_s is not None:  # what is left for training, shared by the folds still to train
            left = started + s.time_budget_s - s.after_training_s - time.time()
            budget = max(left / (len(s.folds) - index), 1.0)
        stage(f"train fold {fold}", lambda fold=fold, budget=budget: run_training(
            DATASET, fold, s.trainer, preprocessed_root=prep, results_root=results, device=s.device,
            epochs=s.epochs, iterations_per_epoch=s.iterations_per_epoch, continue_training=_has_checkpoint(
                trained_model_dir(results, DATASET, resolve_method(s.trainer)) / f"fold_{fold}"),
            seed=s.seed, time_budget_s=budget, **s.resolved_training_overrides()))
    model = trained_model_dir(results, DATASET, resolve_method(s.trainer))
    stage("predict", lambda: predict_folder(test_dir, pred_dir, model, PredictorSettings(
        folds=list(s.folds), ensemble=s.ensemble, device=s.device, png=True)))
    _, summary = stage("evaluate", lambda: evaluate_folder(pred_dir, test_dir, eval_dir))
    stage("pictures", lambda: write_evaluation_pictures(pred_dir, test_dir, eval_dir / "png"))
    return DemoResult(work, summary, seconds, pred_dir, eval_dir, model)


def _has_checkpoint(fold_dir: Path) -> bool:
    """Resume a fold that an interrupted demo left; a finished fold resumes to its end at once."""
    return (fold_dir / "checkpoint_latest.pt").is_file()
