"""``plans.json``: what the planner decided, as dataclasses that round-trip through JSON.

The file is meant to be read and edited by hand; ``Plans.load`` validates it so that a bad
edit fails with a message naming the field instead of deep inside training.

Conventions: every size and spacing is in array order (z, y, x); a ``2d`` configuration gives
its in-plane sizes as (y, x)-like pairs of the slicing plane it names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, write_json

PLANS_VERSION = 1
CHANNELS = ("PET", "CT")  # channel order everywhere: 0 = PET (SUV), 1 = CT


@dataclass
class NormalizationPlan:
    """Per-channel intensity normalization applied by preprocessing.

    CT: clip to [ct_clip_hu[0], ct_clip_hu[1]] and scale linearly to [0, 1] (GDFL paper).
    PET: kept in SUV; clipped at ``pet_clip_suv`` when that is not ``None``.
    """

    ct_clip_hu: tuple[float, float] = (-1024.0, 1024.0)
    pet_clip_suv: float | None = None


@dataclass
class NetworkTopology:
    """Encoder-decoder shape shared by the U-Net-like networks.

    ``strides[0]`` is the first stage's stride (normally all 1s); stage s downsamples its input by
    ``strides[s]``. ``features_per_stage[s]`` channels at stage s; the last stage is the bottleneck.
    """

    features_per_stage: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    num_res_units: int = 2

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> list[int]:
        """Downsampling from the input to the bottleneck per axis; see :func:`total_stride`."""
        return total_stride(self.strides)


def total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    """Per axis, the product of every stage's stride: the factor a network's input must be divisible by.

    The one place this is computed (planner, plans validation and the networks all call it).
    """
    return [int(math.prod(int(v) for v in axis)) for axis in zip(*strides)]


@dataclass
class ConfigurationPlan:
    name: str  # "3d_fullres" or "2d"
    data_identifier: str  # cache sub-folder holding this configuration's data
    spacing_zyx: list[float]
    patch_size: list[int]
    batch_size: int
    network: NetworkTopology
    # Free-form notes the planner writes for a human reader (the budget it planned for, ...).
    notes: dict[str, object] = field(default_factory=dict)
    # 2d only: the array axis (0 = z, 1 = y, 2 = x) the slices are taken across; 1 = coronal
    # slices, whose patch is a (z, x) pair. None for 3d.
    slice_axis: int | None = None
    # The network patch, batch and topology were sized for (``models.networks.NETWORKS``); None in
    # plans written before plans named their network.
    network_name: str | None = None

    @property
    def ndim(self) -> int:
        return len(self.patch_size)


@dataclass
class ComputeBudget:
    """What the plans are sized for: a GPU with ``gpu_memory_gb`` or a CPU (``device='cpu'``).

    On a CPU the planner sizes the network so that one training iteration (forward, backward and
    optimizer step of one batch) takes about ``cpu_seconds_per_iteration`` on ``cpu_cores`` cores.
    ``time_budget_s`` (CPU only; ``plan_and_preprocess --time-budget``): the wall-clock time one
    fold will train. It replaces ``cpu_seconds_per_iteration`` by the time per iteration that gives
    the measured best accuracy in that time (``planner.seconds_per_iteration_for``), and ``train``
    without ``--epochs`` or ``--time-budget`` trains for it.
    """

    device: str = "cuda"  # "cuda" or "cpu"
    gpu_memory_gb: float = 8.0
    cpu_cores: int = 2
    cpu_seconds_per_iteration: float = 1.0
    time_budget_s: float | None = None

    def validate(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"budget.device must be 'cuda' or 'cpu', got {self.device!r}")
        if not self.gpu_memory_gb > 0 or not self.cpu_seconds_per_iteration > 0:
            raise ValueError("budget.gpu_memory_gb and budget.cpu_seconds_per_iteration must be positive")
        if not isinstance(self.cpu_cores, int) or self.cpu_cores < 1:
            raise ValueError(f"budget.cpu_cores must be a positive integer, got {self.cpu_cores!r}")
        if self.time_budget_s is not None:
            if self.device != "cpu":
                raise ValueError("a time budget sizes a CPU plan (--device cpu); on a GPU the memory sizes the "
                                 "plan: give the time to `train --time-budget` instead")
            if not self.time_budget_s > 0:
                raise ValueError(f"budget.time_budget_s must be positive, got {self.time_budget_s}")


@dataclass
class Plans:
    dataset: str
    budget: ComputeBudget
    target_spacing_zyx: list[float]
    normalization: NormalizationPlan
    configurations: dict[str, ConfigurationPlan]
    channels: tuple[str, ...] = CHANNELS
    version: int = PLANS_VERSION

    def save(self, path: str | Path) -> None:
        write_json(path, self)

    @classmethod
    def load(cls, path: str | Path) -> "Plans":
        path = Path(path)
        try:
            raw = read_json(path)
            return cls.from_dict(raw)
        except FileNotFoundError:
            raise InputError("plans file not found; run `autopetseg plan_and_preprocess` first", file=path) from None
        except KeyError as exc:
            raise InputError(f"invalid plans file: missing field {exc}", file=path) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"invalid plans file: {exc}", file=path) from None

    @classmethod
    def from_dict(cls, raw: dict) -> "Plans":
        if raw.get("version") != PLANS_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, this autopetseg reads version {PLANS_VERSION}")
        norm = raw["normalization"]
        configurations = {}
        for name, c in raw["configurations"].items():
            net = NetworkTopology(**c["network"])
            conf = ConfigurationPlan(**{**c, "network": net})
            _validate_configuration(conf)
            configurations[name] = conf
        budget = ComputeBudget(**raw["budget"])
        budget.validate()
        plans = cls(
            dataset=str(raw["dataset"]),
            budget=budget,
            target_spacing_zyx=[float(s) for s in raw["target_spacing_zyx"]],
            normalization=NormalizationPlan(
                ct_clip_hu=tuple(float(v) for v in norm["ct_clip_hu"]),
                pet_clip_suv=None if norm.get("pet_clip_suv") is None else float(norm["pet_clip_suv"]),
            ),
            configurations=configurations,
            channels=tuple(raw.get("channels", CHANNELS)),
            version=int(raw["version"]),
        )
        if plans.channels != CHANNELS:
            raise ValueError(f"channels must be {list(CHANNELS)}, got {list(plans.channels)}")
        lo, hi = plans.normalization.ct_clip_hu
        if not lo < hi:
            raise ValueError(f"normalization.ct_clip_hu must be increasing, got {[lo, hi]}")
        return plans

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise InputError(f"configuration {name!r} is not in the plans (have: {sorted(self.configurations)})")
        return self.configurations[name]

    def configuration_for(self, name: str, network: str, sized_networks: Sequence[str] = ()) -> ConfigurationPlan:
        """Configuration ``name`` as planned for ``network``: the entry itself when it was sized for
        that network, else its variant ``<name>_<network>`` (same cache, own patch, batch and
        topology). A network in ``sized_networks`` (those the planner has a cost model for) that
        the plans were not sized for is an error: building it from another network's plan is
        what made a 30 M-parameter Attention U-Net out of the residual U-Net's plan. Plans from
        before networks were named, and networks that size themselves from the patch (the
        cascades' own networks), take the entry as it is."""
        conf = self.configuration(name)
        if conf.network_name in (None, network):
            return conf
        variant = self.configurations.get(variant_name(name, network))
        if variant is not None:
            return variant
        if network in sized_networks:
            planned = sorted({c.network_name for k, c in self.configurations.items()
                              if k == name or k.startswith(name + "_")} - {None})
            raise InputError(f"these plans have no {name!r} configuration sized for network {network!r} (only for "
                             f"{', '.join(planned)}): plan again with this version of autopetseg, or choose "
                             f"--network {planned[0]}")
        return conf


def variant_name(configuration: str, network: str) -> str:
    """The key of ``configuration`` sized for another network than its default one."""
    return f"{configuration}_{network}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_configuration(c: ConfigurationPlan) -> None:
    where = f"configurations.{c.name}"
    net = c.network
    int_lists = {"patch_size": [c.patch_size], "network.features_per_stage": [net.features_per_stage]}
    int_lists["network.strides"] = list(net.strides)
    int_lists["network.kernel_sizes"] = list(net.kernel_sizes)
    for name, lists in int_lists.items():
        for values in lists:
            if not isinstance(values, list) or not all(_is_int(v) and v >= 1 for v in values):
                raise ValueError(f"{where}.{name} must hold positive integers, got {values!r}")
    if not _is_int(c.batch_size):
        raise ValueError(f"{where}.batch_size must be an integer, got {c.batch_size!r}")
    if c.ndim not in (2, 3):
        raise ValueError(f"{where}.patch_size must have 2 or 3 entries, got {c.patch_size}")
    if c.ndim == 2 and c.name.startswith("3d"):  # a 3D configuration edited to 2 entries, not a 2D one
        raise ValueError(f"{where}.patch_size {c.patch_size} has 2 entries; {c.name!r} is a 3D configuration and "
                         "needs 3 (z, y, x)")
    if c.ndim == 2 and c.slice_axis not in (0, 1, 2):
        raise ValueError(f"{where}.slice_axis must be 0, 1 or 2 for a 2d configuration, got {c.slice_axis!r}")
    if len(c.spacing_zyx) != 3 or any(s <= 0 for s in c.spacing_zyx):
        raise ValueError(f"{where}.spacing_zyx must be 3 positive numbers, got {c.spacing_zyx}")
    if c.batch_size < 1 or any(p < 1 for p in c.patch_size):
        raise ValueError(f"{where}: batch_size and patch_size must be positive")
    net = c.network
    if not (len(net.strides) == len(net.kernel_sizes) == net.n_stages):
        raise ValueError(f"{where}.network: features_per_stage, strides and kernel_sizes need one entry per stage")
    for s in range(net.n_stages):
        if len(net.strides[s]) != c.ndim or len(net.kernel_sizes[s]) != c.ndim:
            raise ValueError(f"{where}.network: stage {s} stride/kernel must have {c.ndim} entries")
    total = net.total_stride
    if any(p % t for p, t in zip(c.patch_size, total)):
        raise ValueError(f"{where}.patch_size {c.patch_size} must be divisible by the total stride {total}")


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
