"""``<output>/prediction.json``: what produced the predictions in an output folder.

A re-run skips the cases it finished before, which is right only when the same model with the same
settings would predict them. So the first run into a folder records its producer: the model
folder (for people), the method and its combine rule, per stage the folds, their ensemble
weights, the plans hash, a hash of each fold's record (``model.json``: network, threshold,
strategy) and of each checkpoint file (a retrained fold is another producer), and every
``PredictorSettings`` field except those that cannot change a mask (``NOT_OF_THE_MASKS``: device,
batch sizes, parts, ``--png``, ``--save-probabilities``, ...): ``--checkpoint``, ``--ensemble``,
``--tta`` (as applied: on only for a model trained with mirroring), overlap, ``--min-suv``, and any
setting added later, the autocast dtype.

Predicting into a folder that holds the predictions of another producer is refused, naming what
differs, unless ``--overwrite``: then the earlier predictions (the masks, probabilities and
pictures of the cases in ``predictions.csv``, and the CSV) are removed first, so the folder never
mixes two producers. Refusing rather than silently redoing keeps a mistyped ``-o`` from
destroying earlier results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from autopetseg.io_utils import read_json, write_json

PRODUCER_FILE = "prediction.json"
RECORD_VERSION = 1
# PredictorSettings fields that cannot change a mask (the folds are recorded from the model itself;
# amp as the dtype it resolves to). Any other field, present or future, is part of the producer.
NOT_OF_THE_MASKS = frozenset({"folds", "device", "amp", "batch_size", "slice_batch_pixels", "save_probabilities", "png",
                              "overwrite", "num_parts", "part_id", "prefetch", "dicom_seg"})


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_of(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def describe_producer(model, settings, amp_dtype) -> dict[str, Any]:
    """The producer of predictions made by ``model`` (an ``EnsembleModel``) with ``settings``
    (``PredictorSettings``): the compared part of ``prediction.json``."""
    mirrored = any(stage.record.mirror_axes for stage in model.stages)
    chosen = {k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_OF_THE_MASKS}
    return {
        "method": model.method.name,
        "method_sha256": _sha256_of(dataclasses.asdict(model.method)),
        **json.loads(json.dumps(chosen, default=str)),  # as read back from the file
        "tta": bool(settings.tta and mirrored),
        "amp_dtype": None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        "stages": [
            {
                "stage": stage.stage.name,
                "folds": [fold.fold for fold in stage.folds],
                "weights": [round(float(w), 6) for w in stage.weights],
                "plans_sha256": stage.record.plans_sha256,
                "records_sha256": [_sha256_of(fold.record.to_dict()) for fold in stage.folds],
                "checkpoints_sha256": [file_sha256(fold.checkpoint) for fold in stage.folds],
            }
            for stage in model.stages
        ],
    }


def read_producer(output_dir: Path) -> dict | None:
    """``prediction.json`` of ``output_dir`` (``model_dir`` and ``producer``); ``None`` when there is no
    readable record."""
    try:
        recorded = read_json(Path(output_dir) / PRODUCER_FILE)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("producer"), dict) else None


def write_producer(output_dir: Path, producer: dict, model_dir: Path) -> None:
    write_json(Path(output_dir) / PRODUCER_FILE,
               {"version": RECORD_VERSION, "model_dir": str(model_dir), "producer": producer})


def producer_differences(recorded: dict | None, new: dict, model_dir: Path) -> list[str]:
    """What differs between the recorded producer (``read_producer``; None: no record) and ``new``
    from ``model_dir``, in words."""
    if recorded is None:
        return [f"no {PRODUCER_FILE} says which model made them"]
    old = recorded["producer"]
    out = [] if recorded.get("model_dir") == str(model_dir) else [f"model {recorded.get('model_dir')} -> {model_dir}"]
    out += [f"{key} {old.get(key)} -> {new.get(key)}" for key in new if key != "stages" and old.get(key) != new.get(key)]
    old_stages = {s.get("stage"): s for s in old.get("stages", [])}
    for stage in new["stages"]:
        before = old_stages.get(stage["stage"])
        name = f"stage {stage['stage']}: " if len(new["stages"]) > 1 else ""
        if before is None:
            out.append(f"{name}not in the earlier model")
            continue
        if before.get("folds") != stage["folds"]:
            out.append(f"{name}folds {before.get('folds')} -> {stage['folds']}")
        elif before.get("plans_sha256") != stage["plans_sha256"]:
            out.append(f"{name}trained on other plans")
        elif before.get("checkpoints_sha256") != stage["checkpoints_sha256"]:
            out.append(f"{name}other weights (another model, or the folds were trained again)")
        elif before.get("records_sha256") != stage["records_sha256"]:
            out.append(f"{name}another network, output or threshold (model.json)")
        elif before.get("weights") != stage["weights"]:
            out.append(f"{name}ensemble weights {before.get('weights')} -> {stage['weights']}")
    return out or ["another record"]
