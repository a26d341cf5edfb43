"""The model folder: what ``train`` writes and ``predict`` reads, self-describing and safe to share.

::

    <results>/<Dataset>/<method>__<configuration>/     (configuration: the last stage's)
        method.json          MethodSpec: the stages, their configurations and inputs, the combine rule
        plans.json           the plans of the latest training run (for people; folds carry their own)
        dataset.json
        fold_<k>/            one-stage methods: the stage's files right here (as before methods had stages)
        fold_<k>/<stage>/    several stages: one folder per stage
            model.json       the fold record (below), written before the first checkpoint
            checkpoint_{latest,best,final}.pt   plain tensors and JSON-like data only
            config.json, validation.json, training_log.csv, progress.png
            inputs/<case>_<stage>.npy           earlier stages' outputs this stage trained on

The fold record (``FoldRecord``) holds everything prediction needs besides the weights: the whole
plans and their hash, the network (name, topology, channels), the output and the inference
strategy, the patch size, the preprocessing settings the training cache was made with, and the
trained mirror axes. Prediction uses exactly those and refuses an ensemble whose folds were trained
on different plans. A folder without ``method.json`` (written before this format) is one stage
whose fold folders hold pickled checkpoints without a record: it is read as that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, write_json
from autopetseg.models.methods import MethodSpec, OutputSpec, StrategySpec, one_stage
from autopetseg.planning.plans import NetworkTopology, Plans

METHOD_FILE = "method.json"
RECORD_FILE = "model.json"
VALIDATION_FILE = "validation.json"
CHECKPOINT_LATEST = "checkpoint_latest.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CHECKPOINT_FINAL = "checkpoint_final.pt"
CHECKPOINTS = {"best": CHECKPOINT_BEST, "final": CHECKPOINT_FINAL}
RECORD_FORMAT = 1
_FOLD_DIR = re.compile(r"^fold_(\d+|all)$")


def plans_hash(plans: Plans | dict) -> str:
    """SHA-256 of the plans' canonical JSON: equal hashes, equal plans."""
    raw = plans if isinstance(plans, dict) else json.loads(json.dumps(dataclasses.asdict(plans)))
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_dir_name(method: MethodSpec, plans_name: str = "auto") -> str:
    """``<method>__<configuration>`` on the ``auto`` plans, ``<method>__<plans>__<configuration>`` on named ones."""
    if plans_name == "auto":
        return f"{method.name}__{method.main_configuration}"
    return f"{method.name}__{plans_name}__{method.main_configuration}"


def fold_dir_name(fold: int | str) -> str:
    return f"fold_{fold}"


def stage_dir(model_dir: str | Path, method: MethodSpec, fold: int | str, stage: str) -> Path:
    """Where one stage of one fold lives (the fold folder itself for a one-stage method)."""
    fold_dir = Path(model_dir) / fold_dir_name(fold)
    return fold_dir if len(method.stages) == 1 else fold_dir / stage


def parse_fold(fold: int | str) -> int | str:
    """0, 1, ... or "all" (from the command line's text)."""
    text = str(fold)
    if text.isdigit():
        return int(text)
    if text == "all":
        return text
    raise InputError(f"fold must be a number (0, 1, ...) or 'all', got {text!r}")


@dataclass(frozen=True)
class NetworkSpec:
    """A network by registry name (``models.networks.NETWORKS``) and everything its constructor takes."""

    name: str
    topology: NetworkTopology
    in_channels: int = 2
    out_channels: int = 2
    options: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """The network, freshly initialised (load the weights after)."""
        from autopetseg.models.networks import build_network

        return build_network(self.name, self.topology, self.in_channels, self.out_channels, **self.options)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "NetworkSpec":
        return cls(
            name=str(raw["name"]),
            topology=NetworkTopology(**raw["topology"]),
            in_channels=int(raw["in_channels"]),
            out_channels=int(raw["out_channels"]),
            options=dict(raw.get("options", {})),
        )


@dataclass
class FoldRecord:
    """What one trained stage of one fold is (``model.json``); see the module doc."""

    method: str
    stage: str
    trainer: str
    fold: int | str
    configuration: str
    plans: dict[str, Any]
    plans_sha256: str
    network: NetworkSpec
    output: OutputSpec
    strategy: StrategySpec
    patch_size: list[int]
    preprocessing: dict[str, Any] | None  # the cache signature (None: the defaults)
    mirror_axes: list[int] = field(default_factory=list)
    channels_last_3d: bool = False
    inputs: list[str] = field(default_factory=list)  # earlier stages read as extra input channels
    format: int = RECORD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FoldRecord":
        if raw.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}; this autopetseg reads format {RECORD_FORMAT}")
        return cls(
            method=str(raw["method"]),
            stage=str(raw["stage"]),
            trainer=str(raw["trainer"]),
            fold=raw["fold"],
            configuration=str(raw["configuration"]),
            plans=dict(raw["plans"]),
            plans_sha256=str(raw["plans_sha256"]),
            network=NetworkSpec.from_dict(raw["network"]),
            output=OutputSpec.from_dict(raw["output"]),
            strategy=StrategySpec.from_dict(raw["strategy"]),
            patch_size=[int(p) for p in raw["patch_size"]],
            preprocessing=raw.get("preprocessing"),
            mirror_axes=[int(a) for a in raw.get("mirror_axes", [])],
            channels_last_3d=bool(raw.get("channels_last_3d", False)),
            inputs=[str(s) for s in raw.get("inputs", [])],
        )

    def load_plans(self) -> Plans:
        return Plans.from_dict(self.plans)

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder) / RECORD_FILE, self.to_dict())


def read_record(folder: str | Path) -> FoldRecord | None:
    """The fold record of a stage folder; None when the folder predates records."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return FoldRecord.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"fold record is not readable by this version of autopetseg ({exc})", file=path) from None


def write_method(model_dir: str | Path, method: MethodSpec) -> None:
    write_json(Path(model_dir) / METHOD_FILE, method.to_dict())


def read_method(model_dir: str | Path) -> MethodSpec:
    """``method.json``; a folder written before it existed is the one-stage method of its name."""
    model_dir = Path(model_dir)
    path = model_dir / METHOD_FILE
    if path.is_file():
        try:
            return MethodSpec.from_dict(read_json(path))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"method.json is not readable by this version of autopetseg ({exc})", file=path) from None
    trainer, _, configuration = model_dir.name.partition("__")
    return one_stage(trainer).with_configuration(configuration or "3d_fullres")


def available_folds(model_dir: str | Path, method: MethodSpec, checkpoint: str = "best") -> list[int | str]:
    """Folds whose every stage holds the checkpoint, numeric first, then "all"."""
    name = CHECKPOINTS[checkpoint]
    found: list[int | str] = []
    for child in Path(model_dir).iterdir():
        m = _FOLD_DIR.match(child.name)
        if not m:
            continue
        fold = m.group(1) if m.group(1) == "all" else int(m.group(1))
        if all((stage_dir(model_dir, method, fold, s.name) / name).is_file() for s in method.stages):
            found.append(fold)
    return sorted(found, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def read_validation_score(folder: str | Path, key: str = "mean_dsc") -> float | None:
    """``key`` of ``validation.json`` (the best checkpoint's validation); None when absent or unreadable."""
    path = Path(folder) / VALIDATION_FILE
    if not path.is_file():
        return None
    try:
        value = read_json(path).get(key)
    except (OSError, ValueError):
        return None
    return None if value is None else float(value)


def read_head_thresholds(folder: str | Path) -> dict[str, float]:
    """``head_thresholds`` of ``validation.json``: per patient-level head, the threshold its
    validation chose (multitask: the Youden threshold of ``prognosis``); {} when absent."""
    path = Path(folder) / VALIDATION_FILE
    try:
        raw = read_json(path).get("head_thresholds") if path.is_file() else None
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in (raw or {}).items() if v is not None}
