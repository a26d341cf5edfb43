"""How a method's stages become one lesion probability (and patient-level numbers) at prediction time.

``method.json`` names the rule (``combine``); ``COMBINERS`` maps the name to a function of the
method and the stages' outputs. ``last``: the last stage's lesion probability and threshold, and
every stage's patient-level heads as ``predictions.csv`` columns (for a two-class head
``<head>`` = the probability of class 1, else ``<head>_<k>`` per class).

``l2s_adaptive`` (``cascade_l2s``, L2SNet): the last stage's lesion probability on its grid, with
a per-voxel threshold from the cue = the lesion probability of the stage it takes as input (the
localizer), mapped onto that grid; settings from ``method.notes``
(``models/adaptive_threshold.py``). Each stage's folds are averaged before (``ensemble.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from autopetseg.models.adaptive_threshold import L2SSettings
from autopetseg.models.methods import MethodSpec, OutputSpec
from autopetseg.preprocessing.preprocessor import map_between_caches


@dataclass
class StageOutput:
    """One stage's prediction of one case, on its own cache grid."""

    probabilities: np.ndarray  # (channels, z, y, x) float32
    properties: dict  # the cache properties of the case for this stage's configuration
    output: OutputSpec
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # patient-level heads: name -> (K,) probabilities

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


COMBINERS: dict[str, Callable[[MethodSpec, dict[str, StageOutput]], Combined]] = {
    "last": combine_last,
    "l2s_adaptive": combine_l2s_adaptive,
}


def get_combiner(name: str) -> Callable[[MethodSpec, dict[str, StageOutput]], Combined]:
    if name not in COMBINERS:
        raise ValueError(f"unknown combine rule {name!r}; known: {', '.join(sorted(COMBINERS))}")
    return COMBINERS[name]
