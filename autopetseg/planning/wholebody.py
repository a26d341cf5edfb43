"""The ``3d_wholebody`` configuration: every case's body crop on one fixed grid (Liu et al., multitask).

The paper crops its 3.3 × 5.5 × 5.5 mm PET volumes to 247 × 80 × 64 voxels and resizes them to
224 × 64 × 64 for training and testing (§IV-B3), with a 3D U-Net of 3 poolings and batch 12.
Here the grid follows the data and the budget:

1. **Extent.** The median body-cropped extent per axis in mm (fingerprint: crop shape × spacing).
2. **Grid candidates.** Voxel sizes ``target spacing × f`` for f = 1, ``spacing_step``, its
   square, ... (one factor for every axis, so the grid keeps the target spacing's aspect); the grid
   is ``extent / voxel size`` rounded to a multiple of the network's total stride (8 for 3
   poolings), at least ``min_grid_multiple`` × the stride per axis.
3. **Choice.** The finest candidate with at most ``max_grid_voxels`` voxels (the paper's grid,
   224·64·64) whose training step fits the budget at the smallest batch (GPU: the memory model;
   CPU: the time model of ``planner.py``, on this network's convolutions); then the batch grows
   up to the paper's 12 while it fits (so a small budget lowers the paper's batch; the notes say
   by how much).
4. **Spacing.** ``median extent / grid`` per axis, so that the median case's cache is the grid
   itself; preprocessing resamples each case to it (``data_identifier`` "3d_wholebody") and the
   ``whole_image`` inference strategy resizes each cached volume to the grid and back, the small
   difference of a body from the median.

The cost model counts the layers of ``models.networks.multitask_unet.MultitaskUNet`` (listed
here, below the models layer, like ``planner.residual_unet_layers`` lists the residual U-Net's);
a test checks that its parameter count equals the built network's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.plans import ComputeBudget, ConfigurationPlan, NetworkTopology, total_stride

if TYPE_CHECKING:  # planner.py imports this module inside plan_experiment
    from autopetseg.planning.planner import PlannerSettings

logger = logging.getLogger(__name__)

NAME = "3d_wholebody"
NETWORK = "multitask_unet"  # the network this configuration is sized for (models.networks)
GB = 1024**3


@dataclass
class WholebodyPlanSettings:
    """The knobs of the ``3d_wholebody`` heuristic (module doc); the network's head sizes mirror
    ``MultitaskUNet``'s defaults so that the cost model counts the network that is trained."""

    stages: int = 4  # 3 poolings (paper)
    max_grid_voxels: int = 224 * 64 * 64  # the paper's grid
    paper_batch_size: int = 12
    min_batch_size: int = 2
    min_grid_multiple: int = 2  # each axis >= 2 × the total stride: the bottleneck keeps 2 voxels
    spacing_step: float = 1.05
    max_spacing_factor: float = 100.0
    input_channels: int = 1  # PET only (paper)
    out_channels: int = 2
    deep_supervision_scales: int = 4
    head_levels: int = 3
    head_features: int = 64
    head_hidden: int = 32
    head_classes: int = 2
    tensors_per_conv: float = 3.0  # conv, norm and activation outputs kept for the backward pass


@dataclass(frozen=True)
class Conv:
    """One convolution (or fully connected layer: ``kernel`` 1, ``voxels`` 1) of the network."""

    voxels: float  # output voxels (a transposed convolution: input voxels, which it scatters)
    c_in: int
    c_out: int
    kernel: int  # kernel volume
    bias: bool = False
    norm: bool = True  # followed by batch norm (2 parameters per channel)


def _level_shapes(grid: list[int], topology: NetworkTopology) -> list[np.ndarray]:
    cumulative = np.ones(3)
    shapes = []
    for stride in topology.strides:
        cumulative = cumulative * np.asarray(stride)
        shapes.append(np.asarray(grid) / cumulative)
    return shapes


def multitask_unet_layers(topology: NetworkTopology, grid: list[int], s: WholebodyPlanSettings) -> list[Conv]:
    """Every convolution and linear layer of ``MultitaskUNet`` for ``topology`` on ``grid``."""
    feats = list(topology.features_per_stage)
    k = [math.prod(kk) for kk in topology.kernel_sizes]
    shapes = _level_shapes(grid, topology)
    vox = [float(np.prod(sh)) for sh in shapes]
    n = len(feats)
    layers: list[Conv] = []
    for lvl in range(n):  # encoder: two conv-BN-ReLU per level
        c_in = s.input_channels if lvl == 0 else feats[lvl - 1]
        layers += [Conv(vox[lvl], c_in, feats[lvl], k[lvl]), Conv(vox[lvl], feats[lvl], feats[lvl], k[lvl])]
    for lvl in range(n - 1):  # decoder: transposed conv-BN-ReLU up, then two conv-BN-ReLU on the concatenation
        up = math.prod(topology.strides[lvl + 1])
        layers.append(Conv(vox[lvl + 1], feats[lvl + 1], feats[lvl], up))
        layers += [Conv(vox[lvl], 2 * feats[lvl], feats[lvl], k[lvl]), Conv(vox[lvl], feats[lvl], feats[lvl], k[lvl])]
    for lvl in range(s.deep_supervision_scales):  # 3×3×3 output convolutions with a bias
        layers.append(Conv(vox[lvl], feats[lvl], s.out_channels, 27, bias=True, norm=False))
    for lvl in range(n - s.head_levels, n):  # prognosis heads
        lowest = lvl == n - 1
        pooled = shapes[lvl] if lowest else np.ceil(shapes[lvl] / 2)
        layers += [Conv(float(np.prod(shapes[lvl])), feats[lvl], s.head_features, k[lvl]),
                   Conv(float(np.prod(pooled)), s.head_features, s.head_features, k[lvl]),
                   Conv(1, s.head_features, s.head_hidden, 1, bias=True, norm=False),
                   Conv(1, s.head_hidden, s.head_classes, 1, bias=True, norm=False)]
    return layers


def count_multitask_parameters(topology: NetworkTopology, s: WholebodyPlanSettings) -> int:
    """Trainable parameters of ``MultitaskUNet`` (weights, biases, batch-norm scale and shift)."""
    layers = multitask_unet_layers(topology, [2 ** 10] * 3, s)  # the grid does not change the count
    return int(sum(c.kernel * c.c_in * c.c_out + (c.c_out if c.bias else 0) + (2 * c.c_out if c.norm else 0)
                   for c in layers))


def forward_flops(topology: NetworkTopology, grid: list[int], s: WholebodyPlanSettings) -> float:
    """Forward FLOPs of one sample: 2 · kernel volume · C_in · C_out per output voxel."""
    return float(sum(2.0 * c.voxels * c.kernel * c.c_in * c.c_out for c in multitask_unet_layers(topology, grid, s)))


def activation_values(topology: NetworkTopology, grid: list[int], s: WholebodyPlanSettings) -> float:
    """Values one sample keeps for the backward pass (``tensors_per_conv`` per conv output, plus the
    concatenations of the decoder)."""
    layers = multitask_unet_layers(topology, grid, s)
    convs = sum(c.voxels * c.c_out for c in layers if c.norm)
    vox = [float(np.prod(sh)) for sh in _level_shapes(grid, topology)]
    concat = sum(2 * f * v for f, v in zip(topology.features_per_stage[:-1], vox[:-1]))
    return convs * s.tensors_per_conv + concat


def wholebody_topology(base: int, top: int, s: WholebodyPlanSettings) -> NetworkTopology:
    """``stages`` levels of 2×2×2 pooling and 3×3×3 kernels (paper), features base · 2^l capped at ``top``."""
    return NetworkTopology(
        features_per_stage=[int(min(base * 2**lvl, top)) for lvl in range(s.stages)],
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (s.stages - 1),
        kernel_sizes=[[3, 3, 3]] * s.stages,
        num_res_units=0,
    )


def median_extent_mm(fingerprint: Fingerprint) -> np.ndarray:
    return np.median(fingerprint.shapes_after_crop_zyx * fingerprint.spacings_zyx, axis=0)


def grid_candidates(extent_mm: np.ndarray, spacing_zyx: list[float], stride: list[int],
                    s: WholebodyPlanSettings) -> list[list[int]]:
    """Grids from the finest to the coarsest (module doc, step 2), without repeats."""
    smallest = [s.min_grid_multiple * t for t in stride]
    out: list[list[int]] = []
    factor = 1.0
    while factor <= s.max_spacing_factor:
        raw = extent_mm / (np.asarray(spacing_zyx, dtype=float) * factor)
        grid = [max(m, int(round(r / t)) * t) for r, t, m in zip(raw, stride, smallest)]
        if not out or grid != out[-1]:
            out.append(grid)
        if grid == smallest:
            break
        factor *= s.spacing_step
    return out


def plan_3d_wholebody(fingerprint: Fingerprint, budget: ComputeBudget, spacing_zyx: list[float],
                      settings: "PlannerSettings", wholebody: WholebodyPlanSettings | None = None) -> ConfigurationPlan:
    """The ``3d_wholebody`` configuration for ``budget`` (module doc)."""
    s = wholebody or WholebodyPlanSettings()
    cpu = budget.device == "cpu"
    base = settings.cpu.base_features if cpu else settings.base_features
    top = settings.cpu.max_features if cpu else settings.max_features
    topology = wholebody_topology(base, top, s)
    parameters = count_multitask_parameters(topology, s)
    memory = settings.memory

    def cost(grid: list[int], batch: int) -> float:
        if cpu:  # planner.py's time model: forward + backward = 3 x the forward FLOPs
            return 3 * batch * forward_flops(topology, grid, s) / (settings.cpu.gflops_per_core * 1e9 * budget.cpu_cores)
        per_sample = activation_values(topology, grid, s) * memory.bytes_per_value * memory.backward_factor
        return (batch * per_sample + parameters * memory.bytes_per_parameter + memory.overhead_gb * GB) / GB

    limit = budget.cpu_seconds_per_iteration if cpu else budget.gpu_memory_gb
    min_batch = settings.cpu.batch_size if cpu else s.min_batch_size
    extent = median_extent_mm(fingerprint)
    candidates = grid_candidates(extent, spacing_zyx, total_stride(topology.strides), s)
    small_enough = [g for g in candidates if math.prod(g) <= s.max_grid_voxels] or candidates[-1:]
    fitting = [g for g in small_enough if cost(g, min_batch) <= limit]
    grid = fitting[0] if fitting else small_enough[-1]
    if not fitting:
        logger.warning("%s: even the coarsest grid %s exceeds the compute budget %s", NAME, grid, budget)
    batch = min_batch
    while batch + 1 <= s.paper_batch_size and cost(grid, batch + 1) <= limit:
        batch += 1
    notes: dict[str, object] = {
        "budget": asdict(budget), "fits_budget": bool(fitting), "grid": list(grid),
        "median_extent_mm": [round(float(e), 1) for e in extent], "parameters": parameters,
        "paper_batch_size": s.paper_batch_size, "wholebody": asdict(s),
    }
    notes["estimated_seconds_per_iteration" if cpu else "estimated_gpu_memory_gb"] = round(cost(grid, batch), 3)
    if batch < s.paper_batch_size:
        notes["batch_lowered_for_budget"] = f"{s.paper_batch_size} -> {batch}"
    return ConfigurationPlan(
        name=NAME,
        data_identifier=NAME,
        spacing_zyx=[float(e / g) for e, g in zip(extent, grid)],
        patch_size=[int(g) for g in grid],
        batch_size=int(batch),
        network=topology,
        notes=notes,
        network_name=NETWORK,
    )
