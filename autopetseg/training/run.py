"""Entry point of ``autopetseg train``: resolve the dataset, the method, the splits, the device and
DDP, then train the method's stages in order.

A method (``models.methods.METHODS``) is an ordered list of stages; ``--stage NAME`` trains one of
them, ``all`` (default) each in turn. Before a stage that takes earlier stages' outputs, those
outputs are written for the fold's training and validation cases (``stage_inputs.py``): by the
same fold's earlier stage (``in_fold``, default, as the cascade papers do) or, for each training
case, by the fold that validated it (``out_of_fold``, as nnU-Net's cascade does).

Several GPUs: ``torchrun --nproc_per_node N -m autopetseg train ...``. When ``WORLD_SIZE > 1``
``run_training`` initialises ``torch.distributed`` from the environment itself (nccl on CUDA,
gloo on CPU), gives each process its own GPU (``LOCAL_RANK``) and its own patch stream; only rank
0 validates and writes files. A CPU run takes the same code path with one process.

Layout of the results: ``models/folders.py``
(``<results>/<Dataset>/<method>__<configuration>/{method.json, plans.json, dataset.json, fold_<k>/...}``;
each fold's ``model.json`` records the plans it was trained with, so a re-planned dataset never
mixes folds silently: ``predict`` refuses such an ensemble by name).
The splits live beside the cache, ``<preprocessed>/<Dataset>/splits.json``, shared by every
trainer of the dataset (like nnU-Net's ``splits_final.json``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path, read_json, remove_stale_temporaries
from autopetseg.models.folders import (
    CHECKPOINT_BEST,
    CHECKPOINT_FINAL,
    CHECKPOINT_LATEST,
    model_dir_name,
    parse_fold,
    plans_hash,
    read_record,
    stage_dir,
    write_method,
)
from autopetseg.models.methods import MethodSpec, get_method
from autopetseg.models.costs import NETWORK_COSTS, machine_memory_bytes, training_cost
from autopetseg.models.networks import NETWORKS
from autopetseg.models.runtime import resolve_device
from autopetseg.options import check_option
from autopetseg.paths import PREPROCESSED_ENV, preprocessed_dir, results_dir
from autopetseg.planning.named_plans import AUTO, check_plans_name, plans_file
from autopetseg.planning.planner import NETWORK_FAMILIES
from autopetseg.planning.plans import Plans
from autopetseg.training.config import TrainerConfig
from autopetseg.training.splits import N_FOLDS, fold_cases, load_or_create_splits, splits_file_name
from autopetseg.training.stage_inputs import write_stage_inputs
from autopetseg.training.trainer import DistributedContext, Trainer
from autopetseg.training.variants import get_trainer_class

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
# What a stage's training leaves; ``--overwrite`` removes these before training the stage from scratch.
TRAINING_FILES = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST, "validation.json", "training_log.csv",
                  "progress.png")
DDP_TIMEOUT = timedelta(hours=2)
_DATASET_ID = re.compile(r"^Dataset(\d{3})_")


def resolve_preprocessed_dataset(dataset: str | Path, preprocessed_root: str | Path | None = None) -> Path:
    """The preprocessed dataset folder (holding ``plans.json``) from a path, a name or a numeric id:
    what ``plan_and_preprocess -d`` takes (the raw dataset's folder, its name, its id) works too."""
    candidate = Path(dataset).expanduser()
    if (candidate / "plans.json").is_file():
        return candidate.resolve()
    text = str(dataset)
    if candidate.is_dir():  # the raw dataset folder: its cache is named after it
        text = candidate.resolve().name
    named = preprocessed_dir(text, preprocessed_root)
    if (named / "plans.json").is_file():
        return named.resolve()
    root = named.parent
    if text.isdigit() and root.is_dir():
        for child in sorted(root.iterdir()):
            m = _DATASET_ID.match(child.name)
            if m and int(m.group(1)) == int(text) and (child / "plans.json").is_file():
                return child.resolve()
    raise InputError(
        f"no preprocessed dataset {text!r} (looked for plans.json under {root}; "
        f"run `autopetseg plan_and_preprocess` first or set {PREPROCESSED_ENV})",
        file=candidate,
    )


def init_distributed(device: torch.device) -> tuple[DistributedContext, bool]:
    """(context, whether we started the process group) from torchrun's environment variables."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), False
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        # Rank 0 validates whole volumes while the others wait at a barrier: allow for long validations.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=DDP_TIMEOUT)
        started = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank), started


def resolve_method(method: str | MethodSpec, configuration: str | None = None) -> MethodSpec:
    """The method by name (``-tr``); ``configuration`` moves a one-stage method to another one (``-c``)."""
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if configuration is not None and len(spec.stages) == 1:
        spec = spec.with_configuration(configuration)
    elif configuration is not None and configuration != spec.main_configuration:
        raise InputError(f"method {spec.name!r} has {len(spec.stages)} stages, each with its own configuration; "
                         f"-c {configuration} does not apply")
    return spec


def model_dir(results_root, dataset_name: str, method: MethodSpec, plans_name: str = AUTO) -> Path:
    return results_dir(dataset_name, results_root) / model_dir_name(method, plans_name)


def _check_plans_of_other_folds(out: Path, method: MethodSpec, fold, plans: Plans) -> None:
    """A warning when other folds of this model folder were trained on other plans (predict will refuse to mix them)."""
    mine = plans_hash(plans)
    others = []
    for child in sorted(out.glob("fold_*")):
        other = child.name.removeprefix("fold_")
        if other == str(fold):
            continue
        record = read_record(stage_dir(out, method, other, method.stages[-1].name))
        if record is not None and record.plans_sha256 != mine:
            others.append(other)
    if others:
        logger.warning("fold(s) %s of %s were trained on other plans than the current ones (the dataset was "
                       "planned again?): retrain them too, or predict with the folds of one plan", ", ".join(others), out)


def _configured_iterations(trainer: str, epochs: int | None, iterations_per_epoch: int | None) -> int:
    """A stage's configured schedule length in iterations: its weight in sharing a time budget."""
    config = get_trainer_class(trainer).default_config()
    return (epochs or config.epochs) * (iterations_per_epoch or config.iterations_per_epoch)


def _guard_earlier_training(folders: list[Path], continue_training: bool, overwrite: bool) -> None:
    """Never train over an earlier run silently: a stage folder with checkpoints needs ``--continue``
    (resume it) or ``--overwrite`` (whose old training files are then removed, so that nothing of
    the earlier run mixes into the new one)."""
    if continue_training and overwrite:
        raise InputError("--continue resumes the earlier training and --overwrite replaces it: give one of them")
    if continue_training:
        return
    for folder in folders:
        found = [name for name in (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST) if (folder / name).is_file()]
        if not found:
            continue
        if not overwrite:
            state = "finished" if CHECKPOINT_FINAL in found else "interrupted"
            raise InputError(f"this stage was trained before ({state}: {', '.join(found)}); add --continue to resume "
                             "it or --overwrite to train it again from scratch", file=folder)
        if os.environ.get("RANK", "0") == "0":
            for name in TRAINING_FILES:
                (folder / name).unlink(missing_ok=True)
            logger.warning("--overwrite: removed the earlier training in %s", folder)


def _resolved_fold(dataset_dir: Path, fold, cases: list[dict], ctx: DistributedContext,
                   label_column: str | None = None) -> tuple[list[str], list[str], dict]:
    """A trainer with a label column splits by cohort and label, in its own file (``splits.py``)."""
    path = dataset_dir / splits_file_name(label_column)
    if ctx.is_main:
        splits = load_or_create_splits(path, cases, label_column=label_column)
    ctx.barrier()
    if not ctx.is_main:
        splits = load_or_create_splits(path, cases, label_column=label_column)
    train_ids, val_ids = fold_cases(splits, fold)
    return train_ids, val_ids, splits


def prepare_trainer(
    dataset: str | Path,
    fold: int | str,
    method: str | MethodSpec = "gdfl",
    configuration: str | None = None,
    preprocessed_root: str | Path | None = None,
    results_root: str | Path | None = None,
    device: str = "auto",
    dist_context: DistributedContext | None = None,
    stage: str | None = None,
    plans_name: str = AUTO,
    **overrides: Any,
) -> Trainer:
    """The ``Trainer`` of one stage (default: the last) of one fold, splits created if needed.

    ``overrides`` are ``TrainerConfig`` fields (None = the trainer's default). The earlier stages'
    outputs this stage takes must exist (``run_training`` writes them). ``plans_name``: which plans
    (``planning.named_plans``); the stage's configuration is taken as sized for the trainer's network.
    """
    ctx = dist_context or DistributedContext()
    fold = parse_fold(fold)
    spec = resolve_method(method, configuration)
    stage_spec = spec.stage(stage) if stage is not None else spec.stages[-1]
    trainer_cls = get_trainer_class(stage_spec.trainer)
    trainer_cls.check_requirements()
    config: TrainerConfig = trainer_cls.default_config().replace(**{k: v for k, v in overrides.items() if v is not None})
    dataset_dir = resolve_preprocessed_dataset(dataset, preprocessed_root)
    plans_path = plans_file(dataset_dir, plans_name)
    plans = Plans.load(plans_path)
    conf = plans.configuration_for(stage_spec.configuration, config.network, tuple(NETWORK_FAMILIES))
    check_plan_memory(conf, config, resolve_device(device, ctx.local_rank), plans_path)
    dataset_json = read_json(dataset_dir / "dataset.json")
    data_dir = dataset_dir / conf.data_identifier
    # Only cases the cache holds completely (properties file written last) take part.
    cases = [c for c in dataset_json["cases"] if (data_dir / f"{c['case_id']}.json").is_file()]
    if not cases:
        raise InputError(f"no preprocessed cases for configuration {conf.name!r}", file=data_dir)
    train_ids, val_ids, _ = _resolved_fold(dataset_dir, fold, cases, ctx, config.label_column)
    out = model_dir(results_root, dataset_dir.name, spec, plans_name)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Temporaries of killed runs (checkpoints are tens of MB); other folds' running writers keep theirs.
        remove_stale_temporaries(out, recursive=True)
        _check_plans_of_other_folds(out, spec, fold, plans)
        write_method(out, spec)
        for name, source in (("plans.json", plans_path), ("dataset.json", dataset_dir / "dataset.json")):
            with atomic_path(out / name, ".json") as tmp:
                shutil.copyfile(source, tmp)
    folder = stage_dir(out, spec, fold, stage_spec.name)
    return trainer_cls(
        plans,
        conf.name,
        data_dir,
        folder,
        train_ids,
        val_ids,
        config=config,
        device=resolve_device(device, ctx.local_rank),
        dist_context=ctx,
        fold=fold,
        stage=stage_spec,
        method=spec.name,
        inputs_dir=folder / "inputs" if stage_spec.inputs else None,
    )


def check_plan_memory(conf, config: TrainerConfig, device, plans_path: Path) -> None:
    """Refuse a plan whose training step cannot fit the device (a hand-edited patch, a paper plan on a
    small card), before anything is written: the fitted cost model of the network (``models.costs``)
    against the GPU's memory, or the machine's on a CPU. Networks without a fitted model are not checked."""
    if config.network not in NETWORK_COSTS:
        return
    patch = list(config.patch_size or conf.patch_size)
    batch = int(config.batch_size or conf.batch_size)
    try:
        cost = training_cost(config.network, conf.network, patch, batch)
    except (RuntimeError, ValueError):  # a topology the network cannot build is reported by the trainer
        return
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
        needed = cost.gpu_memory_bytes
    else:
        available, needed = machine_memory_bytes(), cost.cpu_memory_bytes
    if needed > available:
        raise InputError(f"configuration {conf.name!r} ({config.network}, patch {patch}, batch {batch}) needs about "
                         f"{needed / 2**30:.0f} GiB to train, and this {device.type} has {available / 2**30:.0f} GiB: "
                         f"lower patch_size or batch_size in the plans, or plan for this machine", file=plans_path)


def check_training_arguments(method: str | MethodSpec, configuration: str | None, stage: str, stage_inputs: str,
                             **overrides: Any) -> tuple[MethodSpec, tuple]:
    """(method, stages to train), every argument of ``train`` checked before anything is written
    (splits, model folder): an unknown method, stage or network, or a trainer setting out of range
    (``--epochs 0``, ``--output-prior 2``) is an ``InputError``."""
    try:
        check_option("stage_inputs", stage_inputs)
        spec = resolve_method(method, configuration)
        stages = spec.stages if stage == "all" else (spec.stage(stage),)
        for stage_spec in stages:
            trainer_cls = get_trainer_class(stage_spec.trainer)
            trainer_cls.check_requirements()  # an optional package missing: the install line (InputError)
            config = trainer_cls.default_config().replace(**{k: v for k, v in overrides.items() if v is not None})
            if config.network not in NETWORKS:
                raise ValueError(f"unknown network {config.network!r}; known: {', '.join(sorted(NETWORKS))}")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return spec, stages


def check_fold_exists(dataset_dir: Path, fold: int | str, stages, overrides: dict) -> None:
    """A fold the splits do not have (the existing splits file's, or a new one's ``N_FOLDS``) is an
    ``InputError`` before the splits file is written. Each stage's trainer may use its own splits
    file (a label column: ``splits_file_name``)."""
    if fold == "all":
        return
    changes = {k: v for k, v in overrides.items() if v is not None}
    for stage_spec in stages:
        label_column = get_trainer_class(stage_spec.trainer).default_config().replace(**changes).label_column
        path = dataset_dir / splits_file_name(label_column)
        try:
            n_folds = len(read_json(path)) if path.is_file() else N_FOLDS
        except (OSError, ValueError, TypeError):
            continue  # a broken splits file: load_or_create_splits says what is wrong with it
        if not 0 <= fold < n_folds:
            raise InputError(f"fold {fold} does not exist; the splits have folds 0..{n_folds - 1} and 'all'",
                             file=path)


def planned_time_budget(plans_path: Path) -> float | None:
    """The time per fold the plans were sized for (``plan_and_preprocess --time-budget``), if any:
    what ``train`` trains for when given neither ``--epochs`` nor ``--time-budget``."""
    if not plans_path.is_file():
        return None  # prepare_trainer names the missing file
    seconds = Plans.load(plans_path).budget.time_budget_s
    if seconds is not None:
        logger.info("training for %.0f s, the time budget %s was planned for (give --epochs or --time-budget "
                    "to change it)", seconds, plans_path.name)
    return seconds


def run_training(
    dataset: str | Path,
    fold: int | str,
    method: str | MethodSpec = "gdfl",
    configuration: str | None = None,
    preprocessed_root: str | Path | None = None,
    results_root: str | Path | None = None,
    device: str = "auto",
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    continue_training: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    stage: str = "all",
    stage_inputs: str = "in_fold",
    overwrite: bool = False,
    time_budget_s: float | None = None,
    budget_started: float | None = None,
    plans_name: str = AUTO,
    **overrides: Any,
) -> Path:
    """Train one fold (0..4 or "all") of ``method``: every stage in order, or only ``stage``.

    Returns the folder of the last stage trained. Under torchrun, initialises DDP.
    ``overrides`` (``TrainerConfig`` fields) apply to every stage trained. A stage that holds
    checkpoints is resumed with ``continue_training``, trained again from scratch with
    ``overwrite``, and otherwise refused (``InputError``) before anything is written.

    ``time_budget_s``: wall-clock seconds for the whole call, counted from ``budget_started``
    (``time.time()``; default now). Each stage gets the time left times its share of the
    configured iterations (epochs x iterations per epoch) of the stages still to train, and fits
    its schedule to that (``time_budget.py``); a stage that ends early leaves its time to the next.
    """
    fold = parse_fold(fold)
    spec, stages = check_training_arguments(method, configuration, stage, stage_inputs, epochs=epochs,
                                            iterations_per_epoch=iterations_per_epoch, num_workers=num_workers,
                                            seed=seed, **overrides)
    if time_budget_s is not None and not time_budget_s > 0:
        raise InputError(f"the time budget must be positive, got {time_budget_s} s")
    weights = [_configured_iterations(s.trainer, epochs, iterations_per_epoch) for s in stages]
    dataset_dir = resolve_preprocessed_dataset(dataset, preprocessed_root)
    check_fold_exists(dataset_dir, fold, stages, overrides)
    check_plans_name(plans_name)
    if time_budget_s is None and epochs is None and not continue_training:
        time_budget_s = planned_time_budget(plans_file(dataset_dir, plans_name))
    deadline = None if time_budget_s is None else (budget_started or time.time()) + time_budget_s
    _guard_earlier_training([stage_dir(model_dir(results_root, dataset_dir.name, spec, plans_name), spec, fold, s.name)
                             for s in stages], continue_training, overwrite)
    ctx, started = init_distributed(resolve_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        folder = None
        for index, stage_spec in enumerate(stages):
            stage_deadline = stage_budget = None
            if deadline is not None:
                stage_budget = max(deadline - time.time(), 0.0) * weights[index] / sum(weights[index:])
                stage_budget = max(stage_budget, 1.0)  # overrun before: train what a second allows, validate, stop
                stage_deadline = time.time() + stage_budget
            trainer = prepare_trainer(
                dataset, fold, spec, None, preprocessed_root, results_root, device, dist_context=ctx,
                stage=stage_spec.name, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                num_workers=num_workers, seed=seed, time_budget_s=stage_budget, plans_name=plans_name, **overrides,
            )
            trainer.budget_deadline = stage_deadline
            if stage_spec.inputs:
                if ctx.is_main:
                    write_stage_inputs(trainer, spec, stage_inputs)
                ctx.barrier()
            logger.info("training %s fold %s, stage %s (%s on %s)", spec.name, fold, stage_spec.name,
                        stage_spec.trainer, stage_spec.configuration)
            folder = trainer.run(continue_training=continue_training)
        return folder
    finally:
        if started:
            dist.destroy_process_group()
