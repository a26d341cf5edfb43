"""Methods made of stages, and what a stage's network puts out and how it is run over a volume.

A **method** (``MethodSpec``) is an ordered list of **stages** (``StageSpec``). A stage is one
trainer (one network, one configuration of the plans); it may take the lesion probability of
earlier stages (``inputs``) as extra input channels. ``METHODS`` is the one registry: the name
after ``train -tr``. Today's trainers are one-stage methods of the same name.

These are plain data, written into the model folder (``method.json``, and each fold's
``model.json``: see ``folders.py``), so that inference needs no trainer class: it rebuilds every
network from the JSON and combines the stages by the rule the method names (``combine``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from autopetseg.models.adaptive_threshold import L2SSettings
from autopetseg.models.cascade3 import Cascade3Settings
from autopetseg.options import check_option


@dataclass(frozen=True)
class OutputSpec:
    """What a segmentation network's output channels mean.

    ``softmax``: ``channels`` classes, channel 0 background; the lesion probability is
    1 - p(background) (for two classes, p(lesion)). ``sigmoid``: independent channels, the lesion
    probability is channel ``lesion_channel``. A voxel is lesion when that probability exceeds
    ``threshold``.
    """

    activation: str = "softmax"
    channels: int = 2
    lesion_channel: int = 1
    threshold: float = 0.5

    def __post_init__(self):
        check_option("activation", self.activation)
        if self.channels < 1 or not 0 <= self.lesion_channel < self.channels:
            raise ValueError(f"lesion_channel {self.lesion_channel} is not one of {self.channels} channels")
        if self.activation == "softmax" and self.channels < 2:
            raise ValueError("a softmax output needs at least 2 channels (background and lesion)")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    def lesion_probability(self, probabilities):
        """(z, y, x) lesion probability of (channels, z, y, x) probabilities (torch or numpy).

        Two softmax classes: the lesion channel itself (not 1 - background, which rounds differently).
        """
        if self.activation == "sigmoid" or self.channels == 2:
            return probabilities[self.lesion_channel]
        return 1.0 - probabilities[0]

    def background(self) -> list[float]:
        """Per-channel probabilities of "surely no lesion" (where no window or slice was run)."""
        if self.activation == "softmax":
            return [1.0] + [0.0] * (self.channels - 1)
        return [0.0] * self.channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "OutputSpec":
        return cls(**raw)


@dataclass(frozen=True)
class StrategySpec:
    """How a stage's network is run over a whole preprocessed volume (``models/strategies.py``).

    ``sliding_window``: 3D windows of the patch size (Gaussian blending, windows in air skipped).
    ``slices``: a 2D network slice by slice across array axis ``axis`` (0 axial, 1 coronal,
    2 sagittal), with ``neighbours`` slices on each side as extra channels.
    ``whole_image``: the volume resized to ``grid`` (z, y, x), one forward pass, resized back.
    """

    kind: str = "sliding_window"
    axis: int | None = None
    neighbours: int = 0
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        check_option("strategy", self.kind)
        if self.kind == "slices" and self.axis not in (0, 1, 2):
            raise ValueError(f"a slices strategy needs axis 0, 1 or 2, got {self.axis!r}")
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {self.neighbours}")
        if self.kind == "whole_image" and (self.grid is None or len(self.grid) != 3 or min(self.grid) < 1):
            raise ValueError(f"a whole_image strategy needs a grid of 3 positive sizes, got {self.grid!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StrategySpec":
        raw = dict(raw)
        if raw.get("grid") is not None:
            raw["grid"] = tuple(int(g) for g in raw["grid"])
        return cls(**raw)


@dataclass(frozen=True)
class StageSpec:
    """One stage: a trainer (``training.variants.TRAINERS``) on one configuration of the plans.

    ``inputs``: names of earlier stages whose lesion probability, mapped onto this stage's cache
    grid, this stage takes: in its batches (``input_<stage>``, moved by the spatial augmentation
    with the patch) and, with ``inputs_as_channels`` (default), as extra input channels of its
    network (in this order, after PET and CT). A stage that uses them otherwise (a loss weight, a
    threshold map) sets ``inputs_as_channels`` False.
    """

    name: str
    trainer: str
    configuration: str = "3d_fullres"
    inputs: tuple[str, ...] = ()
    inputs_as_channels: bool = True

    @property
    def channel_inputs(self) -> tuple[str, ...]:
        """The inputs the network reads as extra channels."""
        return self.inputs if self.inputs_as_channels else ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StageSpec":
        return cls(**{**raw, "inputs": tuple(raw.get("inputs", ()))})


@dataclass(frozen=True)
class MethodSpec:
    """An ordered list of stages and the rule that combines their outputs at prediction time.

    ``combine``: ``last`` = the last stage's lesion probability above its threshold (every method
    today). Later methods add their rules to ``inference.combine.COMBINERS``.
    """

    name: str
    stages: tuple[StageSpec, ...]
    combine: str = "last"
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError(f"method {self.name!r} has no stage")
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            for source in stage.inputs:
                if source not in names[:i]:
                    raise ValueError(f"method {self.name!r}: stage {stage.name!r} takes {source!r}, "
                                     f"which is not an earlier stage ({names[:i]})")

    @property
    def main_configuration(self) -> str:
        """The last stage's configuration: it names the model folder (``<method>__<configuration>``)."""
        return self.stages[-1].configuration

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"method {self.name!r} has no stage {name!r} (have: {[s.name for s in self.stages]})")

    def with_configuration(self, configuration: str) -> "MethodSpec":
        """A one-stage method on another configuration (``train -c``); several stages keep theirs."""
        if len(self.stages) != 1:
            raise ValueError(f"method {self.name!r} has {len(self.stages)} stages, each with its own configuration")
        return dataclasses.replace(self, stages=(dataclasses.replace(self.stages[0], configuration=configuration),))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MethodSpec":
        return cls(
            name=str(raw["name"]),
            stages=tuple(StageSpec.from_dict(s) for s in raw["stages"]),
            combine=str(raw.get("combine", "last")),
            notes=dict(raw.get("notes", {})),
        )


def one_stage(name: str) -> MethodSpec:
    """A method of one stage named ``segmenter`` whose trainer has the method's name."""
    return MethodSpec(name, (StageSpec("segmenter", name),))


# The one registry: ``autopetseg train -tr NAME``.
METHODS: dict[str, MethodSpec] = {name: one_stage(name) for name in ("gdfl", "l1dfl", "dice", "dicefocal")}

# L2SNet (Cai et al., autoPET 2023): a 2D coronal localizer, then a 3D segmenter whose loss is weighted
# by the localizer's cue (1 + P_loc per voxel) and whose mask is thresholded adaptively under the cue.
# ``notes``: the adaptive threshold and the optional component rules (``adaptive_threshold.py``).
METHODS["cascade_l2s"] = MethodSpec(
    "cascade_l2s",
    (
        StageSpec("localizer", "l2s_localizer", "2d_coronal"),
        StageSpec("segmenter", "l2s_segmenter", "3d_fullres", inputs=("localizer",), inputs_as_channels=False),
    ),
    combine="l2s_adaptive",
    notes=L2SSettings().to_notes(),
)

# Ahamed et al. (DLBCL): an axial slice classifier, a Faster R-CNN lesion detector on the slices it keeps, a 2D
# U-Net on ROIs around the boxes. The stages train independently (the detector and the segmenter on the ground
# truth); ``cascade3`` runs them in turn at prediction time (``models/cascade3.py``; ``notes``: fold fusion, threshold).
METHODS["cascade_3step"] = MethodSpec(
    "cascade_3step",
    (
        StageSpec("classifier", "cascade3_classifier", "2d_axial"),
        StageSpec("detector", "cascade3_detector", "2d_axial"),
        StageSpec("roi_segmenter", "cascade3_roi_segmenter", "2d_axial"),
    ),
    combine="cascade3",
    notes=Cascade3Settings().to_notes(),
)

# Liu et al. (DLBCL): one stage, a multitask U-Net on the whole body resized to the ``3d_wholebody`` grid;
# ``prognosis`` writes the fused head's probability and its label at the folds' mean Youden threshold.
METHODS["multitask"] = MethodSpec("multitask", (StageSpec("segmenter", "multitask", "3d_wholebody"),),
                                  combine="prognosis")


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
