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
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path, read_json
from autopetseg.models.folders import model_dir_name, parse_fold, plans_hash, read_record, stage_dir, write_method
from autopetseg.models.methods import MethodSpec, get_method
from autopetseg.models.runtime import resolve_device
from autopetseg.options import check_option
from autopetseg.paths import PREPROCESSED_ENV, preprocessed_dir, results_dir
from autopetseg.planning.plans import Plans
from autopetseg.training.config import TrainerConfig
from autopetseg.training.splits import fold_cases, load_or_create_splits
from autopetseg.training.stage_inputs import write_stage_inputs
from autopetseg.training.trainer import DistributedContext, Trainer
from autopetseg.training.variants import get_trainer_class

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
DDP_TIMEOUT = timedelta(hours=2)
_DATASET_ID = re.compile(r"^Dataset(\d{3})_")


def resolve_preprocessed_dataset(dataset: str | Path, preprocessed_root: str | Path | None = None) -> Path:
    """The preprocessed dataset folder (holding ``plans.json``) from a path, a name or a numeric id."""
    candidate = Path(dataset).expanduser()
    if (candidate / "plans.json").is_file():
        return candidate.resolve()
    text = str(dataset)
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


def model_dir(results_root, dataset_name: str, method: MethodSpec) -> Path:
    return results_dir(dataset_name, results_root) / model_dir_name(method)


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


def _resolved_fold(dataset_dir: Path, fold, cases: list[dict], ctx: DistributedContext) -> tuple[list[str], list[str], dict]:
    if ctx.is_main:
        splits = load_or_create_splits(dataset_dir / SPLITS_FILE, cases)
    ctx.barrier()
    if not ctx.is_main:
        splits = load_or_create_splits(dataset_dir / SPLITS_FILE, cases)
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
    **overrides: Any,
) -> Trainer:
    """The ``Trainer`` of one stage (default: the last) of one fold, splits created if needed.

    ``overrides`` are ``TrainerConfig`` fields (None = the trainer's default). The earlier stages'
    outputs this stage takes must exist (``run_training`` writes them).
    """
    ctx = dist_context or DistributedContext()
    fold = parse_fold(fold)
    spec = resolve_method(method, configuration)
    stage_spec = spec.stage(stage) if stage is not None else spec.stages[-1]
    trainer_cls = get_trainer_class(stage_spec.trainer)
    config: TrainerConfig = trainer_cls.default_config().replace(**{k: v for k, v in overrides.items() if v is not None})
    dataset_dir = resolve_preprocessed_dataset(dataset, preprocessed_root)
    plans = Plans.load(dataset_dir / "plans.json")
    conf = plans.configuration(stage_spec.configuration)
    dataset_json = read_json(dataset_dir / "dataset.json")
    data_dir = dataset_dir / conf.data_identifier
    # Only cases the cache holds completely (properties file written last) take part.
    cases = [c for c in dataset_json["cases"] if (data_dir / f"{c['case_id']}.json").is_file()]
    if not cases:
        raise InputError(f"no preprocessed cases for configuration {conf.name!r}", file=data_dir)
    train_ids, val_ids, _ = _resolved_fold(dataset_dir, fold, cases, ctx)
    out = model_dir(results_root, dataset_dir.name, spec)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _check_plans_of_other_folds(out, spec, fold, plans)
        write_method(out, spec)
        for name in ("plans.json", "dataset.json"):
            with atomic_path(out / name, ".json") as tmp:
                shutil.copyfile(dataset_dir / name, tmp)
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
    **overrides: Any,
) -> Path:
    """Train one fold (0..4 or "all") of ``method``: every stage in order, or only ``stage``.

    Returns the folder of the last stage trained. Under torchrun, initialises DDP.
    ``overrides`` (``TrainerConfig`` fields) apply to every stage trained.
    """
    fold = parse_fold(fold)
    check_option("stage_inputs", stage_inputs)
    spec = resolve_method(method, configuration)
    stages = spec.stages if stage == "all" else (spec.stage(stage),)
    ctx, started = init_distributed(resolve_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        folder = None
        for stage_spec in stages:
            trainer = prepare_trainer(
                dataset, fold, spec, None, preprocessed_root, results_root, device, dist_context=ctx,
                stage=stage_spec.name, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                num_workers=num_workers, seed=seed, **overrides,
            )
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
