"""Entry point of ``autopetseg train``: resolve the dataset, the splits, the device and DDP, then train.

Several GPUs: ``torchrun --nproc_per_node N -m autopetseg train ...``. When ``WORLD_SIZE > 1``
``run_training`` initialises ``torch.distributed`` from the environment itself (nccl on CUDA,
gloo on CPU), gives each process its own GPU (``LOCAL_RANK``) and its own patch stream; only rank
0 validates and writes files. A CPU run takes the same code path with one process.

Layout of the results:
``<results>/<Dataset>/<trainer>__<configuration>/{plans.json, dataset.json, fold_<k>/...}``; the
copies of ``plans.json`` and ``dataset.json`` make the model folder self-contained for predict.
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
from autopetseg.paths import PREPROCESSED_ENV, preprocessed_dir, results_dir
from autopetseg.planning.plans import Plans
from autopetseg.training.config import TrainerConfig
from autopetseg.training.splits import fold_cases, load_or_create_splits
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


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


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


def model_dir(results_root, dataset_name: str, trainer: str, configuration: str) -> Path:
    return results_dir(dataset_name, results_root) / f"{trainer}__{configuration}"


def fold_dir_name(fold: int | str) -> str:
    return f"fold_{fold}"


def prepare_trainer(
    dataset: str | Path,
    fold: int | str,
    trainer: str = "gdfl",
    configuration: str = "3d_fullres",
    preprocessed_root: str | Path | None = None,
    results_root: str | Path | None = None,
    device: str = "auto",
    dist_context: DistributedContext | None = None,
    **overrides: Any,
) -> Trainer:
    """Build the ``Trainer`` of one fold (splits created if needed); ``overrides`` are ``TrainerConfig`` fields."""
    ctx = dist_context or DistributedContext()
    dataset_dir = resolve_preprocessed_dataset(dataset, preprocessed_root)
    plans = Plans.load(dataset_dir / "plans.json")
    conf = plans.configuration(configuration)
    dataset_json = read_json(dataset_dir / "dataset.json")
    data_dir = dataset_dir / conf.data_identifier
    # Only cases the cache holds completely (properties file written last) take part.
    cases = [c for c in dataset_json["cases"] if (data_dir / f"{c['case_id']}.json").is_file()]
    if not cases:
        raise InputError(f"no preprocessed cases for configuration {configuration!r}", file=data_dir)
    if ctx.is_main:
        splits = load_or_create_splits(dataset_dir / SPLITS_FILE, cases)
    ctx.barrier()
    if not ctx.is_main:
        splits = load_or_create_splits(dataset_dir / SPLITS_FILE, cases)
    train_ids, val_ids = fold_cases(splits, fold)

    trainer_cls = get_trainer_class(trainer)
    config: TrainerConfig = trainer_cls.default_config().replace(**{k: v for k, v in overrides.items() if v is not None})
    out = model_dir(results_root, dataset_dir.name, trainer, configuration)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("plans.json", "dataset.json"):
            with atomic_path(out / name, ".json") as tmp:
                shutil.copyfile(dataset_dir / name, tmp)
    return trainer_cls(
        plans,
        configuration,
        data_dir,
        out / fold_dir_name(fold),
        train_ids,
        val_ids,
        config=config,
        device=resolve_device(device, ctx.local_rank),
        dist_context=ctx,
        fold=fold,
    )


def run_training(
    dataset: str | Path,
    fold: int | str,
    trainer: str = "gdfl",
    configuration: str = "3d_fullres",
    preprocessed_root: str | Path | None = None,
    results_root: str | Path | None = None,
    device: str = "auto",
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    continue_training: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Train one fold (0..4 or "all"); returns the fold folder. Under torchrun, initialises DDP."""
    fold = int(fold) if isinstance(fold, str) and fold.isdigit() else fold
    ctx, started = init_distributed(resolve_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        t = prepare_trainer(
            dataset,
            fold,
            trainer,
            configuration,
            preprocessed_root,
            results_root,
            device,
            dist_context=ctx,
            epochs=epochs,
            iterations_per_epoch=iterations_per_epoch,
            num_workers=num_workers,
            seed=seed,
            **overrides,
        )
        return t.run(continue_training=continue_training)
    finally:
        if started:
            dist.destroy_process_group()
