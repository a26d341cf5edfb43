"""The ``2d_axial`` configuration: axial PET slices for ``cascade_3step`` (Ahamed et al., DLBCL).

The three modules of the cascade read axial slices (``slice_axis = 0``) of the ``3d_fullres``
cache (``data_identifier``: the data is preprocessed once). What the planner decides, kept in
``ConfigurationPlan.notes["cascade_3step"]`` (``AxialCascadePlan``, editable in ``plans.json``):

* ``canvas``: the largest in-plane extent (y or x, voxels) of the body-cropped, resampled cases.
  Every slice is padded with air to a square of side max(canvas, its own extent) before it is
  resized, so a pixel has the same size in mm in every case (the paper's slices all had one
  matrix, 192×192, resized to 224×224); a larger case seen at prediction time keeps its own side.
* ``slice_size`` S (the configuration's ``patch_size`` is [S, S]): the paper's 224 on a GPU; on a
  CPU the canvas rounded up to a multiple of 32, within [64, 224] (small slices are not blown up
  to 224, which would cost ~10× the time for no new detail).
* ``roi_size`` R: the paper's 128 on a GPU, 64 on a CPU.
* Backbones: the paper's ResNet152 classifier and ResNet50-FPN Faster R-CNN on a GPU; ResNet18 and
  ResNet18-FPN on a CPU. The detector's FPN width and box-head size are torchvision's (256, 1024)
  on a GPU and 64, 256 on a CPU (a third of the parameters, about half the time per iteration).
* Batches: the paper's 64 (classifier), 16 (detector), 32 (ROI U-Net) on a GPU. On a CPU the
  classifier batch is the largest (4..64) whose iteration fits ``cpu_seconds_per_iteration``
  under the planner's time model (3 × forward FLOPs at ``CpuPlanSettings.gflops_per_core``; the
  backbone's FLOPs at 224² from torchvision's model tables, scaled by (S/224)²); detector 4, ROI
  U-Net 16 (``AxialPlanSettings``).
* ``anchor_sizes``: the detector's anchors (pixels of the S×S slice), one per FPN level doubling
  from the smallest, which is the diameter of a sphere of the 5th-percentile lesion volume
  (fingerprint) in pixels, at least 2 (8 px at 224 when the fingerprint has no lesion). The
  paper gives none; torchvision's defaults (32..512 px) are larger than most lesions.
* ``network``: the ROI U-Net's topology, planned as the other configurations' on an R×R patch
  (4 stages of 16..128 features on a CPU, 5 of 32..512 on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.plans import ComputeBudget, ConfigurationPlan

NOTES_KEY = "cascade_3step"
AXIAL_AXIS = 0  # z in (z, y, x)
# Forward multiply-accumulates (G) at 224×224 (torchvision's model tables); one MAC is 2 FLOPs.
BACKBONE_GMACS_224 = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51}


@dataclass(frozen=True)
class AxialPlanSettings:
    """The sizes of ``2d_axial`` per budget (module doc); GPU values are the paper's."""

    gpu_slice_size: int = 224
    gpu_roi_size: int = 128
    gpu_backbones: tuple[str, str] = ("resnet152", "resnet50_fpn")
    gpu_detector_widths: tuple[int, int] = (256, 1024)  # FPN channels, box-head size (torchvision's)
    gpu_batches: tuple[int, int, int] = (64, 16, 32)  # classifier, detector, ROI U-Net
    gpu_roi_unet: tuple[int, int, int] = (5, 32, 512)  # stages, base features, max features
    cpu_slice_size_range: tuple[int, int] = (64, 224)
    cpu_roi_size: int = 64
    cpu_backbones: tuple[str, str] = ("resnet18", "resnet18_fpn")
    cpu_detector_widths: tuple[int, int] = (64, 256)
    cpu_classifier_batch_range: tuple[int, int] = (4, 64)
    cpu_batches: tuple[int, int] = (4, 16)  # detector, ROI U-Net
    cpu_roi_unet: tuple[int, int, int] = (4, 16, 128)
    anchor_levels: int = 5  # torchvision's FPN: 4 feature maps + the pooled one
    anchor_lesion_percentile: str = "p5"
    min_anchor_px: float = 2.0
    default_anchor_px_at_224: float = 8.0


@dataclass(frozen=True)
class AxialCascadePlan:
    """What ``cascade_3step``'s trainers read from the ``2d_axial`` configuration (module doc)."""

    canvas: int
    slice_size: int
    roi_size: int
    classifier_backbone: str
    detector_backbone: str
    classifier_batch: int
    detector_batch: int
    roi_batch: int
    anchor_sizes: tuple[float, ...]
    detector_fpn_channels: int = 256
    detector_head_size: int = 1024

    def __post_init__(self):
        sizes = (self.canvas, self.slice_size, self.roi_size, self.classifier_batch, self.detector_batch, self.roi_batch,
                 self.detector_fpn_channels, self.detector_head_size)
        if min(sizes) < 1 or not self.anchor_sizes or min(self.anchor_sizes) <= 0:
            raise ValueError(f"notes.{NOTES_KEY}: sizes, batches and anchor sizes must be positive, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "anchor_sizes": list(self.anchor_sizes)}

    @classmethod
    def of(cls, conf: ConfigurationPlan) -> "AxialCascadePlan":
        """The plan kept in ``conf.notes``; ``ValueError`` when the configuration was not planned as ``2d_axial``."""
        raw = conf.notes.get(NOTES_KEY) if isinstance(conf.notes, dict) else None
        if conf.ndim != 2 or conf.slice_axis != AXIAL_AXIS or raw is None:
            raise ValueError(f"configuration {conf.name!r} is not an axial cascade configuration "
                             f"(plan it with `plan_and_preprocess -c 2d_axial`)")
        return cls(**{**raw, "anchor_sizes": tuple(float(a) for a in raw["anchor_sizes"])})


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def lesion_diameter_mm(fingerprint: Fingerprint, percentile: str) -> float | None:
    """Diameter of a sphere of the fingerprint's ``percentile`` lesion volume; None without lesions."""
    volumes = fingerprint.lesions.volume_ml
    if not volumes or volumes.get(percentile) is None:
        return None
    return float((6.0 * volumes[percentile] * 1000.0 / math.pi) ** (1.0 / 3.0))


def classifier_batch_for_cpu(backbone: str, slice_size: int, budget: ComputeBudget, gflops_per_core: float,
                             batch_range: tuple[int, int]) -> int:
    """The largest batch in ``batch_range`` whose iteration (3 × forward FLOPs) fits the CPU budget."""
    flops = 2e9 * BACKBONE_GMACS_224[backbone] * (slice_size / 224.0) ** 2
    affordable = budget.cpu_seconds_per_iteration * budget.cpu_cores * gflops_per_core * 1e9 / (3.0 * flops)
    return int(min(batch_range[1], max(batch_range[0], math.floor(affordable))))


def plan_2d_axial(fingerprint: Fingerprint, budget: ComputeBudget, spacing_zyx: list[float], settings,
                  axial: AxialPlanSettings = AxialPlanSettings()) -> ConfigurationPlan:
    """The ``2d_axial`` configuration (``settings``: the planner's ``PlannerSettings``)."""
    from autopetseg.planning.planner import plan_topology, resampled_shapes  # planner.py imports this module

    shapes = resampled_shapes(fingerprint, spacing_zyx)
    canvas = max(1, int(np.max(shapes[:, 1:]))) if len(shapes) else 1
    cpu = budget.device == "cpu"
    if cpu:
        low, high = axial.cpu_slice_size_range
        slice_size = min(high, max(low, _round_up(canvas, 32)))
        roi_size, (classifier, detector) = axial.cpu_roi_size, axial.cpu_backbones
        batches = (classifier_batch_for_cpu(classifier, slice_size, budget, settings.cpu.gflops_per_core,
                                            axial.cpu_classifier_batch_range), *axial.cpu_batches)
        stages, base, top = axial.cpu_roi_unet
        widths = axial.cpu_detector_widths
    else:
        slice_size, roi_size, (classifier, detector) = axial.gpu_slice_size, axial.gpu_roi_size, axial.gpu_backbones
        batches, (stages, base, top) = axial.gpu_batches, axial.gpu_roi_unet
        widths = axial.gpu_detector_widths
    in_plane_mm = max(canvas * max(spacing_zyx[1:]), 1e-6)
    diameter = lesion_diameter_mm(fingerprint, axial.anchor_lesion_percentile)
    smallest = (axial.default_anchor_px_at_224 * slice_size / 224.0 if diameter is None
                else diameter * slice_size / in_plane_mm)
    smallest = round(max(axial.min_anchor_px, smallest), 1)
    plan = AxialCascadePlan(canvas, slice_size, roi_size, classifier, detector, *batches,
                            tuple(smallest * 2**level for level in range(axial.anchor_levels)), *widths)
    topology = plan_topology([roi_size, roi_size], [1.0, 1.0], stages, base, top, settings)
    notes: dict[str, object] = {"budget": asdict(budget), "median_shape": [int(v) for v in np.median(shapes, axis=0)],
                                NOTES_KEY: plan.to_dict()}
    return ConfigurationPlan(
        name="2d_axial",
        data_identifier="3d_fullres",  # the slices are cut from the 3d cache at load time
        spacing_zyx=[float(s) for s in spacing_zyx],
        patch_size=[slice_size, slice_size],
        batch_size=int(batches[0]),
        network=topology,
        notes=notes,
        slice_axis=AXIAL_AXIS,
    )


def replace_plan(conf: ConfigurationPlan, **changes: Any) -> ConfigurationPlan:
    """``conf`` with fields of its ``AxialCascadePlan`` changed (tests, benchmarks, hand edits in code)."""
    plan = dataclasses.replace(AxialCascadePlan.of(conf), **changes)
    return dataclasses.replace(conf, notes={**conf.notes, NOTES_KEY: plan.to_dict()},
                               patch_size=[plan.slice_size, plan.slice_size], batch_size=plan.classifier_batch)
