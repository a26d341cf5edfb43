"""An earlier stage's outputs, written for a later stage of the same fold to train on.

For each training and validation case of the fold, the earlier stage's fold model predicts the
lesion probability over the case's cached volume (by its own strategy: slices for a 2D stage,
windows for a 3D one), the probability is mapped onto the later stage's cache grid (both grids
cover the same body box, so the mapping is exact in physical space) and saved as float16
``<stage folder>/inputs/<case>_<earlier stage>.npy``.

``in_fold`` (default; the cascade papers): fold k's earlier stage predicts every case of fold k,
its own training cases included. ``out_of_fold`` (nnU-Net's cascade): a training case of fold k
is predicted by the fold that had it for validation, so the later stage trains on outputs as
imperfect as those it will see on new cases; those folds must be trained first.

A file newer than the checkpoint that made it is reused (an interrupted run resumes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, save_npy
from autopetseg.models.folders import CHECKPOINT_BEST, stage_dir
from autopetseg.models.methods import MethodSpec
from autopetseg.models.trained import TrainedStage, ensemble_probabilities, load_trained_stage
from autopetseg.options import check_option
from autopetseg.preprocessing.preprocessor import map_between_caches
from autopetseg.training.data_loader import load_cached_case
from autopetseg.training.trainer import Trainer, case_volume

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


def _validation_fold(splits: list[dict], case_id: str) -> int:
    for k, split in enumerate(splits):
        if case_id in split["val"]:
            return k
    raise InputError(f"case {case_id!r} is in no fold's validation set", case_id)


def write_stage_inputs(trainer: Trainer, method: MethodSpec, mode: str = "in_fold") -> Path:
    """Write the outputs of ``trainer``'s input stages for its fold's cases; returns the folder."""
    check_option("stage_inputs", mode)
    stage = trainer.stage
    model_dir = trainer.output_dir.parents[1]  # <model>/fold_k/<stage>
    out = trainer.inputs_dir
    out.mkdir(parents=True, exist_ok=True)
    dataset_dir = trainer.data_dir.parent
    splits = read_json(dataset_dir / SPLITS_FILE) if mode == "out_of_fold" else None
    loaded: dict[tuple[str, int | str], TrainedStage] = {}
    val_ids = set(trainer.val_case_ids)
    written = 0
    for case_id in trainer.train_case_ids + trainer.val_case_ids:
        target_props = read_json(trainer.data_dir / f"{case_id}.json")
        for source in stage.inputs:
            fold = trainer.fold
            if splits is not None and case_id not in val_ids:
                fold = _validation_fold(splits, case_id)
            producer = stage_dir(model_dir, method, fold, source)
            path = out / f"{case_id}_{source}.npy"
            checkpoint = producer / CHECKPOINT_BEST
            if not checkpoint.is_file():
                raise InputError(f"stage {stage.name!r} needs stage {source!r} of fold {fold} trained first "
                                 f"(train it with --stage {source}, or --stage all)", file=checkpoint)
            if path.is_file() and path.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
                continue
            if (source, fold) not in loaded:
                loaded[(source, fold)] = load_trained_stage(producer, fold, model_dir, "best", trainer.device)
            model = loaded[(source, fold)]
            source_dir = dataset_dir / model.record.load_plans().configuration(model.record.configuration).data_identifier
            extras = {f"input_{s}": producer / "inputs" / f"{case_id}_{s}.npy" for s in model.record.inputs}
            image = case_volume(load_cached_case(source_dir, case_id, extras=extras or None), model.record.inputs)
            with torch.inference_mode():
                probabilities = ensemble_probabilities([model], image, device=trainer.device,
                                                       amp_dtype=trainer.amp_dtype)["probabilities"]
            lesion = model.record.output.lesion_probability(probabilities).numpy()
            source_props = read_json(source_dir / f"{case_id}.json")
            save_npy(path, map_between_caches(lesion, source_props, target_props).astype(np.float16))
            written += 1
    log.info("stage %s, fold %s: %d input file(s) written to %s (%s)", stage.name, trainer.fold, written, out, mode)
    return out
