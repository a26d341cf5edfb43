"""Experiment planning: from the fingerprint and a compute budget to ``plans.json``.

The heuristics, in the order the planner applies them:

**Target spacing** (``target_spacing``). The median PET spacing per axis. When one axis is much
coarser than the others (its median above ``anisotropy_threshold`` × the largest other median,
3 by default) the median would leave many cases with too few, interpolated slices along it; that
axis takes the 10th percentile of its spacings instead, but never a finer spacing than the
largest in-plane median (the idea of nnU-Net's ``determine_fullres_target_spacing``; unlike
nnU-Net we do not also require the coarse axis to have fewer voxels, because whole-body scans
have many slices along their coarse z axis). ``PlannerSettings.isotropic_mm`` (the GDFL paper:
2.0) overrides all of this with an isotropic spacing.

**Normalization** (``plan_normalization``). CT clipped to [-1024, 1024] HU and scaled to [0, 1]
(GDFL paper). PET kept in SUV and not clipped by default: lesions are the hot tail of the SUV
distribution and clipping at a body percentile would flatten them. ``pet_clip_lesion_percentile``
clips at that percentile of the lesion SUVs measured by the fingerprint.

**Network topology** (``plan_topology``), for a given patch and spacing, as nnU-Net v2's
``get_pool_and_conv_props`` (the tests compare the two). Stage 0 runs at the target spacing
with stride 1. Each further stage halves the axes that (a) still have at least
2 × ``min_feature_map_size`` voxels and (b) are less than ``coarse_axis_ratio`` (2) times as
coarse as the finest such axis, so a coarse axis is not pooled until the others have caught up;
a single such axis is pooled only while it has 3 × ``min_feature_map_size`` voxels. Planning
stops when no axis can be pooled or at ``max_stages``. Kernels: 1 on an axis while it is at least
``coarse_axis_ratio`` times coarser than the finest axis, 3 from the stage where it is not (and
from then on), and 3 everywhere at the bottleneck. So 2 × 2 × 5 mm data gets a (1, 3, 3) kernel
and no pooling along z at stage 0. Features per stage: ``base_features`` · 2^s, capped at
``max_features`` (320 as in nnU-Net; 512 for the GDFL network). The patch is rounded down to a
multiple of the total stride per axis.

**Per-network cost models.** ``plan_experiment(networks=..., cost=...)`` sizes ``3d_fullres`` once
per network (``NETWORK_FAMILIES``: residual U-Net, Attention U-Net, SegResNet; the first under its
own name, the others as ``3d_fullres_<network>`` on the same cache) with a ``CostFunction``; the
pipeline passes ``models.costs.planner_cost``, which reads each network's own graph and is fitted
per network (memory within 15 %, CPU seconds within 25 %; see that module). Without one, the
closed-form residual U-Net models below are used (``analytic_resunet_cost``). Paper plans, fixed
and never shrunk, are in ``named_plans``.

**Memory model (GPU)** (``MemoryModel.estimate_bytes``). Training memory of the residual U-Net::

    bytes = batch · Σ_s F_s · V_s · T · b · k   +   P · 16   +   overhead

with F_s the features and V_s the voxels of a patch at stage s (patch / cumulative stride),
T the stored activation tensors per feature channel and stage (all convolution, norm, PReLU,
residual-sum, concatenation and transposed-convolution outputs of the encoder and the decoder
block at that stage, see ``MemoryModel``), b = 2 bytes per value under AMP, k = 2 for backward
(activation gradients live beside the stored activations), P the parameter count (counted
exactly by ``count_parameters``; weights, gradients and two Adam moments in fp32 = 16 bytes) and
a fixed overhead (CUDA context, cuDNN workspace, allocator slack).

**Patch and batch (GPU)** (``plan_3d_fullres``). The patch grows as a cube in millimetres (equal
physical extent on every axis), each axis capped at the median body-cropped, resampled image
shape and the whole patch at ``max_patch_voxels_3d`` (192³, the GDFL patch), until the next
step would exceed the budget at batch size ``min_batch_size`` (2). A cube rather than the median
shape's aspect ratio: whole-body images are 3-5 times longer than wide, and an aspect-ratio patch
would be a needle along z with little context across the body (nnU-Net v2 likewise starts from
an isotropic patch clipped to the median shape). Memory left then goes to the batch, up to
``max_batch_size_3d`` and to ``max_batch_dataset_share`` (5 %) of all the dataset's voxels per
batch. With 8 GB and 2 mm data this gives patches of about 128-160 voxels per side.

**CPU** (``budget.device == 'cpu'``). A smaller network (``CpuPlanSettings``: features 16..128, at
most 4 stages, batch 2) and a time model instead of the memory model: one iteration costs
3 × the forward FLOPs of every convolution of the residual U-Net (``residual_unet_layers``
lists them as ``training.networks.ResidualUNet`` builds them; backward ≈ 2 × forward), at an
effective throughput per core measured with that network (``CpuPlanSettings.gflops_per_core``).
The patch grows as on the GPU (3d: at most ``CpuPlanSettings.max_patch_voxels_3d``) until an
iteration would take ``budget.cpu_seconds_per_iteration`` on ``budget.cpu_cores`` cores.

**CPU time budget** (``budget.time_budget_s``, ``plan_and_preprocess --device cpu --time-budget``).
The time one fold will train, not a time per iteration: every configuration is sized for
``time_budget_s / CpuPlanSettings.iterations_for_time_budget`` estimated seconds per iteration
(``seconds_per_iteration_for``). On a CPU more iterations of a smaller patch beat fewer of a larger
one until the larger one gets about that many iterations (measured on whole-body phantoms with
``benchmarks/patch_for_time.py``: the README's "Planning for a time budget"), so a short budget gets a
small patch and a long one the largest the caps allow. The plans keep the budget as given, so that
``train`` (without ``--epochs``) trains for it and a second run reuses the plans.

**2d** (``plan_2d``, for the cascades). Coronal slices (``slice_axis = 1``, the y axis), so the
patch is a (z, x) pair at the 3d target spacing; ``data_identifier`` is the 3d data folder, so the
data is preprocessed once. The patch grows to the whole median coronal slice if it fits, then the
batch fills the budget (at most ``max_batch_size_2d``). ``2d_coronal`` (the L2SNet localizer's
configuration) is planned exactly as ``2d``, under its own name: ``2d`` stays for the plans and
models made with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from autopetseg.errors import InputError
from autopetseg.planning.axial2d import plan_2d_axial
from autopetseg.planning.wholebody import plan_3d_wholebody
from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.plans import (
    ComputeBudget,
    ConfigurationPlan,
    NetworkTopology,
    NormalizationPlan,
    Plans,
    variant_name,
)

logger = logging.getLogger(__name__)

IN_CHANNELS = 2  # PET, CT
OUT_CHANNELS = 2  # background, lesion
GB = 1024**3
CORONAL_AXIS = 1  # y in (z, y, x)
KNOWN_CONFIGURATIONS = ("3d_fullres", "2d", "2d_coronal", "2d_axial",  # 2d_axial: planning/axial2d.py
                        "3d_wholebody")  # planning/wholebody.py


@dataclass(frozen=True)
class NetworkFamily:
    """How the planner shapes one network's topology: features from ``base_features`` doubling per
    stage up to ``max_features``, at most ``max_stages_3d`` stages (the CPU plan's limits apply on
    top). Strides and kernels follow the spacing for every family (``plan_topology``)."""

    name: str
    base_features: int
    max_features: int
    max_stages_3d: int
    num_res_units: int = 0


# The networks the planner sizes (``plan_experiment(networks=...)``); each has a fitted cost model in
# ``models.costs``. Residual U-Net: nnU-Net's widths (32..320, 6 stages; the GDFL paper's 32..512 is the
# ``gdfl_paper`` plan); Attention U-Net and SegResNet: the L1DFL paper's widths (16..256 in 5 stages,
# 16..128 in 4), fewer stages when the patch is small.
NETWORK_FAMILIES: dict[str, NetworkFamily] = {
    "resunet": NetworkFamily("resunet", 32, 320, 6, num_res_units=2),
    "attention_unet": NetworkFamily("attention_unet", 16, 256, 5),
    "segresnet": NetworkFamily("segresnet", 16, 128, 4),
}
DEFAULT_NETWORK = "resunet"


@dataclass(frozen=True)
class CostEstimate:
    """One training iteration of a network at a patch and batch: what the planner compares with the budget."""

    parameters: int
    gpu_memory_bytes: float  # under AMP
    cpu_seconds: float  # on the budget's cores
    cpu_memory_bytes: float = 0.0  # float32

    def notes(self, device: str) -> dict[str, object]:
        if device == "cpu":
            return {"estimated_seconds_per_iteration": round(self.cpu_seconds, 3),
                    "estimated_cpu_memory_gb": round(self.cpu_memory_bytes / GB, 2), "parameters": int(self.parameters)}
        return {"estimated_gpu_memory_gb": round(self.gpu_memory_bytes / GB, 2), "parameters": int(self.parameters)}


# (network, topology, patch, batch, cores) -> CostEstimate. ``models.costs.planner_cost`` is the one
# fitted per network; without it the planner falls back to ``analytic_resunet_cost`` (residual U-Net only).
CostFunction = Callable[[str, NetworkTopology, list[int], int, int], CostEstimate]


@dataclass
class MemoryModel:
    """GPU training memory of the residual U-Net (formula in the module docstring).

    ``activation_tensors_per_stage`` (T): the residual U-Net with 2 residual units per block keeps,
    per feature channel and stage, about 2 encoder subunits × (conv, norm, PReLU) + the shortcut
    and sum, and in the decoder the concatenation (2 F), the transposed conv-norm-act and a
    one-subunit residual unit: about 16 tensors. Many of them live at the stage below (the
    network downsamples in its first subunit), which the count per stage absorbs; T is set so
    that a 128³ patch at batch 2 with features 32..320 in 6 stages needs about 8 GB, nnU-Net's
    reference point for its own (similar) U-Net.
    """

    activation_tensors_per_stage: float = 8.0
    bytes_per_value: int = 2  # fp16/bf16 activations under AMP
    backward_factor: float = 2.0
    bytes_per_parameter: int = 16  # fp32 weight + gradient + 2 Adam moments
    overhead_gb: float = 1.0

    def activation_bytes_per_sample(self, topology: NetworkTopology, patch: list[int]) -> float:
        units = feature_voxels(topology, patch)
        return units * self.activation_tensors_per_stage * self.bytes_per_value * self.backward_factor

    def estimate_bytes(self, topology: NetworkTopology, patch: list[int], batch: int) -> float:
        return (
            batch * self.activation_bytes_per_sample(topology, patch)
            + count_parameters(topology) * self.bytes_per_parameter
            + self.overhead_gb * GB
        )


@dataclass
class CpuPlanSettings:
    """A network a CPU trains in about a second per iteration.

    ``gflops_per_core``: effective training throughput per core, counted as 3 × the forward
    convolution FLOPs of ``conv_flops`` per second. Measured on the 2-core x86 development
    machine with the CPU plan of a whole-body 2 mm dataset (``ResidualUNet`` features 16..128,
    batch 2, float32, forward + cross-entropy backward + Adam step, one thread, CPU time of the
    process because the machine was shared): 30.6 GFLOP/s for the 3d patch 64³ (0.62 s of CPU
    per iteration) and 36.1 GFLOP/s for the 2d patch 496 × 216 (0.33 s). 12 is well below that
    on purpose: two threads do not run twice as fast, and on a CPU the data loader and its
    augmentation share the same cores. The 3d patch is also capped at ``max_patch_voxels_3d``.
    """

    base_features: int = 16
    max_features: int = 128
    max_stages: int = 4
    batch_size: int = 2
    gflops_per_core: float = 12.0
    max_patch_voxels_3d: int = 64**3
    # A time budget T (``ComputeBudget.time_budget_s``) plans for T / ``iterations_for_time_budget``
    # estimated seconds per iteration, at least ``min_seconds_per_iteration``: patches that got about
    # that many estimated iterations in T were the best or within 0.02 held-out DSC of it in 3 and
    # 10 minutes, with half as many one lost by 0.14 (``benchmarks/patch_for_time.py``, the README's
    # "Planning for a time budget").
    iterations_for_time_budget: int = 1500
    min_seconds_per_iteration: float = 0.05


@dataclass
class PlannerSettings:
    """Every knob of the planner (the heuristics are in the module docstring)."""

    isotropic_mm: float | None = None  # GDFL paper: 2.0
    anisotropy_threshold: float = 3.0
    coarse_axis_percentile: float = 10.0
    ct_clip_hu: tuple[float, float] = (-1024.0, 1024.0)
    pet_clip_lesion_percentile: float | None = None  # None: PET not clipped
    base_features: int = 32
    max_features: int = 320  # GDFL network: 512
    max_stages_3d: int = 6  # GDFL network: 5
    max_stages_2d: int = 7
    min_feature_map_size: int = 4
    coarse_axis_ratio: float = 2.0  # nnU-Net: pool / kernel 3 only on axes finer than 2 × the finest
    num_res_units: int = 2
    min_batch_size: int = 2
    max_batch_size_3d: int = 8
    max_batch_size_2d: int = 64
    max_patch_voxels_3d: int = 192**3  # the GDFL patch
    max_batch_dataset_share: float = 0.05
    memory: MemoryModel = field(default_factory=MemoryModel)
    cpu: CpuPlanSettings = field(default_factory=CpuPlanSettings)

    @classmethod
    def gdfl(cls, **overrides) -> "PlannerSettings":
        """The GDFL paper: 2 mm isotropic, residual U-Net 32..512 with 5 levels."""
        return cls(**{"isotropic_mm": 2.0, "max_features": 512, "max_stages_3d": 5, **overrides})


# ---------------------------------------------------------------------------------------------
# spacing, shapes, normalization


def seconds_per_iteration_for(budget: ComputeBudget, settings: PlannerSettings) -> float:
    """The estimated time per training iteration a CPU plan is sized for: from the time budget when
    there is one (``CpuPlanSettings.iterations_for_time_budget``), else the budget's own figure."""
    if budget.time_budget_s is None:
        return budget.cpu_seconds_per_iteration
    return max(budget.time_budget_s / settings.cpu.iterations_for_time_budget, settings.cpu.min_seconds_per_iteration)


def target_spacing(fingerprint: Fingerprint, settings: PlannerSettings) -> list[float]:
    """Target spacing (z, y, x) in mm (heuristic in the module docstring)."""
    if settings.isotropic_mm is not None:
        if not settings.isotropic_mm > 0:
            raise ValueError(f"isotropic_mm must be positive, got {settings.isotropic_mm}")
        return [float(settings.isotropic_mm)] * 3
    spacings = fingerprint.spacings_zyx
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    finest_other = max(target[a] for a in range(3) if a != coarse)
    if target[coarse] > settings.anisotropy_threshold * finest_other:
        lower = np.percentile(spacings[:, coarse], settings.coarse_axis_percentile)
        target[coarse] = max(lower, finest_other)
    return [float(s) for s in target]


def resampled_shapes(fingerprint: Fingerprint, spacing_zyx: list[float]) -> np.ndarray:
    """Body-cropped shape of every case after resampling to ``spacing_zyx`` (n, 3), as floats."""
    scale = fingerprint.spacings_zyx / np.asarray(spacing_zyx, dtype=float)
    return np.round(fingerprint.shapes_after_crop_zyx * scale)


def plan_normalization(fingerprint: Fingerprint, settings: PlannerSettings) -> NormalizationPlan:
    pet_clip = None
    if settings.pet_clip_lesion_percentile is not None:
        lesion = fingerprint.intensity["PET"].get("lesion")
        if lesion is None:
            raise InputError("cannot clip the PET at a lesion-SUV percentile: the fingerprint found no lesion voxels")
        pet_clip = lesion.percentile(settings.pet_clip_lesion_percentile)
    return NormalizationPlan(ct_clip_hu=tuple(float(v) for v in settings.ct_clip_hu), pet_clip_suv=pet_clip)


# ---------------------------------------------------------------------------------------------
# topology and cost models


def plan_topology(
    patch: list[int],
    spacing: list[float],
    max_stages: int,
    base_features: int,
    max_features: int,
    settings: PlannerSettings,
) -> NetworkTopology:
    """Strides, kernels and features for ``patch`` at ``spacing`` (2D or 3D; module docstring)."""
    ndim = len(patch)
    size = np.asarray(patch, dtype=float)
    current = np.asarray(spacing, dtype=float)
    ratio = settings.coarse_axis_ratio

    three = np.zeros(ndim, dtype=bool)

    def kernels_at(sp: np.ndarray) -> list[int]:
        # nnU-Net: an axis gets kernel 3 once it is within ``ratio`` of the finest, and keeps it
        # (pooling the other axes alone, when this one is too short to pool, does not undo it).
        three[:] |= sp < ratio * sp.min()
        return [3 if t else 1 for t in three]

    strides = [[1] * ndim]
    kernels = [kernels_at(current)]
    while len(strides) < max_stages:
        big_enough = size >= 2 * settings.min_feature_map_size
        if not big_enough.any():
            break
        # As nnU-Net: compare with the finest axis among those that can still be pooled.
        finest = current[big_enough].min()
        pool = big_enough & (current < ratio * finest)
        if not pool.any():
            break
        if pool.sum() == 1 and size[pool][0] < 3 * settings.min_feature_map_size:
            break  # nnU-Net: pooling a single axis needs room for more than one stage's worth
        stride = [2 if p else 1 for p in pool]
        size = np.floor(size / stride)
        current = current * stride
        strides.append(stride)
        kernels.append(kernels_at(current))
    kernels[-1] = [3] * ndim  # nnU-Net: the bottleneck always convolves along every axis
    features = [int(min(base_features * 2**s, max_features)) for s in range(len(strides))]
    return NetworkTopology(features_per_stage=features, strides=strides, kernel_sizes=kernels, num_res_units=settings.num_res_units)


def stage_voxels(topology: NetworkTopology, patch: list[int]) -> list[float]:
    """Voxels of a patch at each stage (patch / cumulative stride)."""
    cumulative = np.ones(len(patch))
    voxels = []
    for stride in topology.strides:
        cumulative = cumulative * np.asarray(stride)
        voxels.append(float(np.prod(np.asarray(patch) / cumulative)))
    return voxels


def feature_voxels(topology: NetworkTopology, patch: list[int]) -> float:
    """Σ_s F_s · V_s: the size of all stage feature maps of one sample, in values."""
    return float(sum(f * v for f, v in zip(topology.features_per_stage, stage_voxels(topology, patch))))


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the residual U-Net: input on stage ``in_stage``'s grid, output on
    ``out_stage``'s; ``norm_act``: followed by a norm (2 parameters per channel) and a PReLU (1)."""

    in_stage: int
    out_stage: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    transposed: bool = False
    norm_act: bool = True


def residual_unet_layers(topology: NetworkTopology, in_channels: int = IN_CHANNELS,
                         out_channels: int = OUT_CHANNELS) -> list[ConvLayer]:
    """Every convolution of ``autopetseg.models.networks.ResidualUNet`` for ``topology`` (the
    layout of that module's docstring, MONAI's ``UNet``): encoder block k maps stage k to k + 1
    with features[k], the bottleneck stays at the last stage, decoder block k goes back from
    k + 1 to k with a transposed convolution and a one-subunit residual unit. The cost models
    count these layers instead of a rule of thumb, so that the CPU time and the parameter count
    follow the network that is actually trained."""
    feats = list(topology.features_per_stage)
    kernels = [tuple(int(v) for v in k) for k in topology.kernel_sizes]
    strides = topology.strides
    n = len(feats)
    res = topology.num_res_units
    layers: list[ConvLayer] = []

    def unit(c_in: int, c_out: int, kernel, src: int, dst: int, downsamples: bool, subunits: int,
             last_conv_only: bool = False) -> None:
        if res <= 0:  # plain variant: a single conv-norm-act
            layers.append(ConvLayer(src, dst, c_in, c_out, kernel))
            return
        count = max(1, subunits)
        for i in range(count):
            layers.append(ConvLayer(src if i == 0 else dst, dst, c_in if i == 0 else c_out, c_out, kernel,
                                    norm_act=not (last_conv_only and i == count - 1)))
        if downsamples:
            layers.append(ConvLayer(src, dst, c_in, c_out, kernel, norm_act=False))
        elif c_in != c_out:
            layers.append(ConvLayer(src, dst, c_in, c_out, (1,) * len(kernel), norm_act=False))

    for k in range(n - 1):
        c_in = in_channels if k == 0 else feats[k - 1]
        unit(c_in, feats[k], kernels[k + 1], k, k + 1, any(s != 1 for s in strides[k + 1]), res)
    unit(feats[n - 2], feats[n - 1], kernels[n - 1], n - 1, n - 1, False, res)
    for k in range(n - 1):
        c_in = feats[k] + (feats[n - 1] if k == n - 2 else feats[k])
        c_out = out_channels if k == 0 else feats[k - 1]
        top = k == 0
        layers.append(ConvLayer(k + 1, k, c_in, c_out, kernels[k + 1], transposed=True,
                                norm_act=not (top and res <= 0)))
        if res > 0:
            unit(c_out, c_out, kernels[k], k, k, False, 1, last_conv_only=top)
    return layers


def count_parameters(topology: NetworkTopology) -> int:
    """Trainable parameters of the residual U-Net for ``topology`` (weights, biases, norm scale
    and shift, one PReLU slope per layer): equal to the built network's count with batch norm."""
    total = 0
    for layer in residual_unet_layers(topology):
        total += math.prod(layer.kernel) * layer.in_channels * layer.out_channels + layer.out_channels
        if layer.norm_act:
            total += 2 * layer.out_channels + 1
    return total


def conv_flops(topology: NetworkTopology, patch: list[int]) -> float:
    """Forward FLOPs of one sample over the convolutions: 2 · kernel volume · C_in · C_out per
    output voxel (per *input* voxel for a transposed convolution, which scatters each input)."""
    voxels = stage_voxels(topology, patch)
    total = 0.0
    for layer in residual_unet_layers(topology):
        at = voxels[layer.in_stage] if layer.transposed else voxels[layer.out_stage]
        total += 2.0 * at * math.prod(layer.kernel) * layer.in_channels * layer.out_channels
    return total


def estimate_cpu_seconds(topology: NetworkTopology, patch: list[int], batch: int, cores: int, cpu: CpuPlanSettings) -> float:
    """Seconds per training iteration on ``cores`` cores (forward + backward ≈ 3 × forward)."""
    return 3 * batch * conv_flops(topology, patch) / (cpu.gflops_per_core * 1e9 * cores)


def analytic_resunet_cost(settings: "PlannerSettings") -> CostFunction:
    """The residual U-Net's closed-form models (``MemoryModel``, ``estimate_cpu_seconds``) as a cost
    function: what the planner uses when no fitted per-network cost is given."""

    def cost(network: str, topology: NetworkTopology, patch: list[int], batch: int, cores: int) -> CostEstimate:
        if network != "resunet":
            raise ValueError(f"the closed-form cost model covers the residual U-Net only, not {network!r}: "
                             "pass cost=autopetseg.models.costs.planner_cost")
        return CostEstimate(count_parameters(topology), settings.memory.estimate_bytes(topology, patch, batch),
                            estimate_cpu_seconds(topology, patch, batch, cores, settings.cpu))

    return cost


# ---------------------------------------------------------------------------------------------
# patch growth


@dataclass
class _Candidate:
    patch: list[int]
    topology: NetworkTopology


def _round_to_stride(patch: list[int], topology: NetworkTopology) -> list[int]:
    return [max(t, (p // t) * t) for p, t in zip(patch, topology.total_stride)]


def grow_patch(
    spacing: list[float],
    cap: list[int],
    make_topology: Callable[[list[int]], NetworkTopology],
    fits: Callable[[list[int], NetworkTopology], bool],
    max_voxels: int,
) -> tuple[_Candidate, bool]:
    """The largest patch (by voxels) of equal physical extent per axis, capped per axis at ``cap``
    and in total at ``max_voxels``, that ``fits``; the smallest candidate (and ``False``) if none does.

    Candidates step the physical edge by one finest-spacing voxel, so every patch size is tried.
    """
    spacing_arr = np.asarray(spacing, dtype=float)
    cap_arr = np.maximum(np.asarray(cap, dtype=int), 1)
    longest_mm = float(np.max(cap_arr * spacing_arr))
    step = float(spacing_arr.min())
    best: _Candidate | None = None
    smallest: _Candidate | None = None
    seen: set[tuple[int, ...]] = set()
    for k in range(1, int(math.ceil(longest_mm / step)) + 1):
        wanted = np.clip(np.round(k * step / spacing_arr), 1, cap_arr).astype(int).tolist()
        if tuple(wanted) in seen:
            continue
        seen.add(tuple(wanted))
        topology = make_topology(wanted)
        patch = _round_to_stride(wanted, topology)
        voxels = int(np.prod(patch))
        if voxels > max_voxels:
            break
        candidate = _Candidate(patch, topology)
        if smallest is None:
            smallest = candidate
        if fits(patch, topology) and (best is None or voxels > np.prod(best.patch)):
            best = candidate
    if best is None:
        return smallest, False
    return best, True


def _largest_batch(fits_batch: Callable[[int], bool], lowest: int, highest: int) -> int:
    batch = lowest
    while batch + 1 <= highest and fits_batch(batch + 1):
        batch += 1
    return batch


# ---------------------------------------------------------------------------------------------
# configurations


def _plan_configuration(
    name: str,
    data_identifier: str,
    spacing_zyx: list[float],
    plane_spacing: list[float],
    cap: list[int],
    dataset_voxels: float,
    budget: ComputeBudget,
    settings: PlannerSettings,
    max_stages: int,
    max_patch_voxels: int,
    max_batch: int,
    slice_axis: int | None,
    family: NetworkFamily | None = None,
    cost: CostFunction | None = None,
) -> ConfigurationPlan:
    """Shared 2d/3d logic: grow the patch under the budget's cost model of ``family``'s network, then the batch."""
    cpu = budget.device == "cpu"
    family = family or NetworkFamily(DEFAULT_NETWORK, settings.base_features, settings.max_features, max_stages,
                                     settings.num_res_units)
    cost = cost or analytic_resunet_cost(settings)
    base = min(family.base_features, settings.cpu.base_features) if cpu else family.base_features
    top = min(family.max_features, settings.cpu.max_features) if cpu else family.max_features
    stages = min(max_stages, family.max_stages_3d if len(cap) == 3 else max_stages)
    stages = min(stages, settings.cpu.max_stages) if cpu else stages
    unit_settings = replace(settings, num_res_units=family.num_res_units)

    def make_topology(patch: list[int]) -> NetworkTopology:
        return plan_topology(patch, plane_spacing, stages, base, top, unit_settings)

    budget_bytes = budget.gpu_memory_gb * GB

    def estimate(patch: list[int], topology: NetworkTopology, batch: int) -> CostEstimate:
        return cost(family.name, topology, patch, batch, budget.cpu_cores)

    def cost_fits(patch: list[int], topology: NetworkTopology, batch: int) -> bool:
        if cpu:
            return estimate(patch, topology, batch).cpu_seconds <= budget.cpu_seconds_per_iteration
        return estimate(patch, topology, batch).gpu_memory_bytes <= budget_bytes

    min_batch = settings.cpu.batch_size if cpu else settings.min_batch_size
    if cpu:
        max_patch_voxels = min(max_patch_voxels, settings.cpu.max_patch_voxels_3d) if len(cap) == 3 else max_patch_voxels
    chosen, fitted = grow_patch(
        plane_spacing, cap, make_topology, lambda p, t: cost_fits(p, t, min_batch), max_patch_voxels
    )
    patch, topology = chosen.patch, chosen.topology
    if not fitted:
        logger.warning("%s: even the smallest patch %s exceeds the compute budget %s", name, patch, budget)

    if cpu:
        batch = min_batch
    else:
        by_data = max(min_batch, int(settings.max_batch_dataset_share * dataset_voxels / np.prod(patch)))
        batch = _largest_batch(lambda b: cost_fits(patch, topology, b), min_batch, min(max_batch, by_data))

    notes: dict[str, object] = {"budget": asdict(budget), "fits_budget": fitted, "median_shape": [int(c) for c in cap]}
    notes.update(estimate(patch, topology, batch).notes(budget.device))
    return ConfigurationPlan(
        name=name,
        data_identifier=data_identifier,
        spacing_zyx=[float(s) for s in spacing_zyx],
        patch_size=[int(p) for p in patch],
        batch_size=int(batch),
        network=topology,
        notes=notes,
        slice_axis=slice_axis,
        network_name=family.name,
    )


def _median_shape(shapes: np.ndarray) -> list[int]:
    return [max(1, int(v)) for v in np.median(shapes, axis=0)]


def plan_3d_fullres(fingerprint: Fingerprint, budget: ComputeBudget, spacing_zyx: list[float], settings: PlannerSettings,
                    network: str = DEFAULT_NETWORK, cost: CostFunction | None = None,
                    name: str = "3d_fullres") -> ConfigurationPlan:
    """The 3d configuration sized for ``network`` (a key of ``NETWORK_FAMILIES``)."""
    shapes = resampled_shapes(fingerprint, spacing_zyx)
    family = NETWORK_FAMILIES[network]
    if network == DEFAULT_NETWORK:  # PlannerSettings.gdfl() and hand-made settings widen the residual U-Net
        family = replace(family, base_features=settings.base_features, max_features=settings.max_features,
                         max_stages_3d=settings.max_stages_3d, num_res_units=settings.num_res_units)
    return _plan_configuration(
        name,
        "3d_fullres",
        spacing_zyx,
        spacing_zyx,
        _median_shape(shapes),
        float(np.prod(shapes, axis=1).sum()),
        budget,
        settings,
        settings.max_stages_3d,
        settings.max_patch_voxels_3d,
        settings.max_batch_size_3d,
        None,
        family,
        cost,
    )


def plan_2d(fingerprint: Fingerprint, budget: ComputeBudget, spacing_zyx: list[float], settings: PlannerSettings,
            name: str = "2d") -> ConfigurationPlan:
    """Coronal slices of the 3d data: patch (z, x), ``slice_axis = 1``."""
    shapes = resampled_shapes(fingerprint, spacing_zyx)
    in_plane = [a for a in range(3) if a != CORONAL_AXIS]
    median = _median_shape(shapes)
    return _plan_configuration(
        name,
        "3d_fullres",  # the same cache as 3d_fullres: same spacing, the slices are cut at load time
        spacing_zyx,
        [spacing_zyx[a] for a in in_plane],
        [median[a] for a in in_plane],
        float(np.prod(shapes, axis=1).sum()),
        budget,
        settings,
        settings.max_stages_2d,
        2**62,
        settings.max_batch_size_2d,
        CORONAL_AXIS,
    )


def plan_experiment(
    fingerprint: Fingerprint,
    budget: ComputeBudget,
    configurations: tuple[str, ...] | list[str] = ("3d_fullres",),
    dataset_name: str = "",
    settings: PlannerSettings | None = None,
    target_spacing_zyx: list[float] | None = None,
    networks: tuple[str, ...] | list[str] = (DEFAULT_NETWORK,),
    cost: CostFunction | None = None,
) -> Plans:
    """Plans for ``configurations`` (``3d_fullres``, ``2d``, ``2d_coronal``) sized for ``budget``.

    ``target_spacing_zyx`` replaces the planned spacing (to add a configuration to plans whose
    spacing was chosen, or edited, before). ``3d_fullres`` is sized for each of ``networks`` with
    ``cost`` (``models.costs.planner_cost``; default: the residual U-Net's closed-form model): the
    first under its own name, the others as ``3d_fullres_<network>`` on the same cache, so that every
    method trains its own network at a size the budget holds. Deterministic: the same inputs give
    the same plans.
    """
    settings = settings or PlannerSettings()
    budget.validate()
    unknown = [c for c in configurations if c not in KNOWN_CONFIGURATIONS]
    if unknown:
        raise InputError(f"unknown configuration(s) {unknown}; known: {list(KNOWN_CONFIGURATIONS)}")
    if target_spacing_zyx is not None:
        spacing = [float(s) for s in target_spacing_zyx]
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise ValueError(f"target_spacing_zyx must be 3 positive numbers, got {target_spacing_zyx}")
    else:
        spacing = target_spacing(fingerprint, settings)
    # Every configuration is sized for the time per iteration the budget gives; the plans keep the budget as given.
    sizing = replace(budget, cpu_seconds_per_iteration=seconds_per_iteration_for(budget, settings))
    if budget.time_budget_s is not None:
        logger.info("time budget %.0f s: CPU plans sized for %.3f estimated s per iteration (%d iterations)",
                    budget.time_budget_s, sizing.cpu_seconds_per_iteration, settings.cpu.iterations_for_time_budget)
    planners = {"3d_fullres": plan_3d_fullres, "2d": plan_2d,
                "2d_coronal": lambda *args: plan_2d(*args, name="2d_coronal"),
                "2d_axial": plan_2d_axial, "3d_wholebody": plan_3d_wholebody}
    unknown_networks = [n for n in networks if n not in NETWORK_FAMILIES]
    if unknown_networks or not networks:
        raise InputError(f"the planner sizes the networks {sorted(NETWORK_FAMILIES)}, not {unknown_networks or networks}")
    planned: dict[str, ConfigurationPlan] = {}
    for name in configurations:
        if name != "3d_fullres":
            planned[name] = planners[name](fingerprint, sizing, spacing, settings)
            continue
        for i, network in enumerate(networks):
            key = name if i == 0 else variant_name(name, network)
            planned[key] = plan_3d_fullres(fingerprint, sizing, spacing, settings, network, cost, key)
    for name, conf in planned.items():
        logger.info(
            "%s: spacing %s mm, patch %s, batch %d, features %s",
            name, conf.spacing_zyx, conf.patch_size, conf.batch_size, conf.network.features_per_stage,
        )
    return Plans(
        dataset=dataset_name,
        budget=budget,
        target_spacing_zyx=spacing,
        normalization=plan_normalization(fingerprint, settings),
        configurations=planned,
    )
