"""How a method's stages become one lesion probability (and patient-level numbers) at prediction time.

``method.json`` names the rule (``combine``); ``COMBINERS`` maps the name to a function of the
method and the stages' outputs. ``last``: the last stage's lesion probability and threshold, and
every stage's patient-level heads as ``predictions.csv`` columns (for a two-class head
``<head>`` = the probability of class 1, else ``<head>_<k>`` per class).

``l2s_adaptive`` (``cascade_l2s``, L2SNet): the last stage's lesion probability on its grid, with
a per-voxel threshold from the cue = the lesion probability of the stage it takes as input (the
localizer), mapped onto that grid; settings from ``method.notes``
(``models/adaptive_threshold.py``). Each stage's folds are averaged before (``ensemble.py``).
The cue changes the mask only near voxels between the two thresholds (``l2s_cue_region``), so the
predictor runs the localizer after the segmenter, on the coronal slices that hold such voxels
(``READ_REGIONS``); the masks are those of the whole cue.

``prognosis`` (``multitask``, Liu et al.): the mask as ``last``; a two-class head ``h`` becomes
``h_probability`` (folds averaged with the ensemble weights, mean or Dice-weighted), ``h_threshold``
(the mean of the folds' Youden thresholds from their ``validation.json``) and ``h_label``.

Rules in ``STAGE_RUNNERS`` run the stages themselves, because their stages pass more than a voxel
map to each other: the predictor hands them the stage ensembles and the preprocessed arrays.
``cascade3`` (``cascade_3step``, Ahamed et al.): slice classifier, detector, ROI segmenter in turn
(``models/cascade3.py``; settings from ``method.notes``), the last stage's threshold being
``Cascade3Settings.threshold``; ``predictions.csv`` gets the number of slices the classifier kept
and of boxes the detector found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from autopetseg.models.adaptive_threshold import L2SSettings
from autopetseg.models.cascade3 import Cascade3Settings, Ensemble, run_cascade
from autopetseg.models.methods import MethodSpec, OutputSpec
from autopetseg.models.sliding_window import SlidingWindowStats
from autopetseg.preprocessing.preprocessor import map_between_caches
from autopetseg.preprocessing.resampling import is_same_spacing


@dataclass
class StageOutput:
    """One stage's prediction of one case, on its own cache grid."""

    probabilities: np.ndarray  # (channels, z, y, x) float32
    properties: dict  # the cache properties of the case for this stage's configuration
    output: OutputSpec
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # patient-level heads: name -> (K,) probabilities
    head_thresholds: dict[str, float] = field(default_factory=dict)  # the folds' mean validation threshold per head

    def lesion_probability(self) -> np.ndarray:
        return np.asarray(self.output.lesion_probability(self.probabilities), dtype=np.float32)


@dataclass
class Combined:
    """What the predictor writes: a lesion probability on one cache grid, its threshold, extra numbers."""

    lesion_probability: np.ndarray  # (z, y, x) float32 on the grid of ``properties``
    properties: dict
    threshold: float | np.ndarray  # one value, or one per voxel of that grid (an adaptive threshold)
    values: dict[str, float] = field(default_factory=dict)  # extra predictions.csv columns


def head_columns(outputs: dict[str, StageOutput]) -> dict[str, float]:
    columns: dict[str, float] = {}
    for stage in outputs.values():
        for name, p in stage.heads.items():
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            if p.size == 2:
                columns[name] = float(p[1])
            else:
                columns.update({f"{name}_{k}": float(v) for k, v in enumerate(p)})
    return columns


def combine_last(method: MethodSpec, outputs: dict[str, StageOutput]) -> Combined:
    last = outputs[method.stages[-1].name]
    return Combined(last.lesion_probability(), last.properties, last.output.threshold, head_columns(outputs))


def combine_l2s_adaptive(method: MethodSpec, outputs: dict[str, StageOutput]) -> Combined:
    last = method.stages[-1]
    if len(last.inputs) != 1:
        raise ValueError(f"l2s_adaptive needs a last stage with one input stage (the cue), got {list(last.inputs)}")
    segmenter, localizer = outputs[last.name], outputs[last.inputs[0]]
    cue = map_between_caches(localizer.lesion_probability(), localizer.properties, segmenter.properties)
    probability, threshold = L2SSettings.from_notes(method.notes).combine(segmenter.lesion_probability(), cue)
    return Combined(probability, segmenter.properties, threshold, head_columns(outputs))


def same_grid(a: dict, b: dict) -> bool:
    """Whether two caches' properties of one case describe the same grid (same box, spacing and shape)."""
    keys = ("bbox_zyx", "spacing_zyx", "shape_after_resample_zyx")
    return a["geometry"] == b["geometry"] and all(np.allclose(a[k], b[k]) for k in keys)


def l2s_cue_region(method: MethodSpec, outputs: dict[str, StageOutput], stage: str, properties: dict) -> np.ndarray | None:
    """The voxels of the cue stage's grid where the cue can change the mask (``L2SSettings.cue_region``
    of the segmenter's probability); None (all of them) for another stage, or when the two stages'
    grids differ (the planner's ``2d_coronal`` has ``3d_fullres``'s grid)."""
    last = method.stages[-1]
    if stage not in last.inputs or last.name not in outputs:
        return None
    segmenter = outputs[last.name]
    if not same_grid(segmenter.properties, properties):
        return None
    pet_spacing = segmenter.properties["geometry"]["spacing_zyx"]
    interpolated = tuple(not is_same_spacing([c], [p]) for c, p in zip(segmenter.properties["spacing_zyx"], pet_spacing))
    return L2SSettings.from_notes(method.notes).cue_region(segmenter.lesion_probability(), interpolated)


# Rules that read only part of a stage's output. The predictor runs a stage whose output only the rule
# reads (not the last stage, no stage's channel input) after the others, and where the rule's function
# (method, the outputs so far, the stage, its cache properties) gives the voxels it reads on that
# stage's grid (bool; None: all), only there: a 2D stage on the slices that hold any of them.
READ_REGIONS: dict[str, Callable[[MethodSpec, dict[str, StageOutput], str, dict], np.ndarray | None]] = {
    "l2s_adaptive": l2s_cue_region,
}


def read_last(method: MethodSpec) -> tuple[str, ...]:
    """The stages the predictor runs last, on the region the combine rule reads (``READ_REGIONS``)."""
    if method.combine not in READ_REGIONS:
        return ()
    as_channels = {name for s in method.stages for name in s.channel_inputs}
    return tuple(s.name for s in method.stages[:-1] if s.name not in as_channels)


DEFAULT_HEAD_THRESHOLD = 0.5  # when no fold's validation chose one (e.g. a single class among its cases)


def combine_prognosis(method: MethodSpec, outputs: dict[str, StageOutput]) -> Combined:
    """``prognosis`` (``multitask``): the mask as ``last``; each two-class head ``h`` of the last stage gives
    ``h_probability`` (the fold ensemble's probability of class 1), ``h_threshold`` (the folds' mean
    validation Youden threshold, or 0.5 when none was chosen) and ``h_label`` (1 when the probability
    reaches the threshold)."""
    last = outputs[method.stages[-1].name]
    values: dict[str, float] = {}
    for name, p in last.heads.items():
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if p.size != 2:
            raise ValueError(f"the prognosis rule needs two-class heads; head {name!r} has {p.size} classes")
        threshold = last.head_thresholds.get(name, DEFAULT_HEAD_THRESHOLD)
        values.update({f"{name}_probability": float(p[1]), f"{name}_threshold": float(threshold),
                       f"{name}_label": float(p[1] >= threshold)})
    return Combined(last.lesion_probability(), last.properties, last.output.threshold, values)


COMBINERS: dict[str, Callable[[MethodSpec, dict[str, StageOutput]], Combined]] = {
    "last": combine_last,
    "l2s_adaptive": combine_l2s_adaptive,
    "prognosis": combine_prognosis,
}


@dataclass
class RunContext:
    """What a rule that runs the stages itself gets from the predictor besides the stages and the arrays."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    stats: SlidingWindowStats = field(default_factory=SlidingWindowStats)  # slices run and skipped


def run_cascade3(method: MethodSpec, stages: Sequence, prepared: Sequence[tuple[np.ndarray, dict]],
                 context: RunContext) -> Combined:
    """``cascade3`` (module doc). ``stages``: classifier, detector, ROI segmenter ensembles (``ensemble.StageEnsemble``),
    ``prepared``: each stage's (preprocessed array, properties); the PET is channel 0 of the last stage's."""
    if len(stages) != 3:
        raise ValueError(f"cascade3 needs 3 stages (classifier, detector, ROI segmenter), got {len(stages)}")
    settings = Cascade3Settings.from_notes(method.notes)
    classifier, detector, segmenter = (Ensemble([f.network for f in s.folds], list(s.weights)) for s in stages)
    data, properties = prepared[-1]
    result = run_cascade(np.asarray(data[0]), classifier, detector, segmenter, settings, context.device, context.amp_dtype)
    context.stats.n_windows += len(result.kept)
    context.stats.n_skipped += int(len(result.kept) - result.kept.sum())
    values = {"cascade_slices_kept": float(result.kept.sum()), "cascade_boxes": float(result.n_boxes)}
    return Combined(result.probability, properties, settings.threshold, values)


STAGE_RUNNERS: dict[str, Callable[..., Combined]] = {
    "cascade3": run_cascade3,
}


def get_combiner(name: str) -> Callable[[MethodSpec, dict[str, StageOutput]], Combined] | None:
    """The rule ``name`` of ``COMBINERS``; None for a rule of ``STAGE_RUNNERS`` (it runs the stages itself)."""
    if name in STAGE_RUNNERS:
        return None
    if name not in COMBINERS:
        raise ValueError(f"unknown combine rule {name!r}; known: {', '.join(sorted([*COMBINERS, *STAGE_RUNNERS]))}")
    return COMBINERS[name]
