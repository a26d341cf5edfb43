"""Every named option of autopetseg, checked in one place: an unknown name is an error, never a default.

``check_option("optimizer", "adamw")`` returns the value or raises ``ValueError`` naming the
choices. Modules that take one of these names call it where the name enters (a config's
``validate``, a function's first line), so a typo fails before anything is written.
"""

from __future__ import annotations

import re

OPTIONS: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "poly", "constant"),
    "amp_dtype": ("auto", "bf16", "fp16"),
    "activation": ("softmax", "sigmoid"),
    "ensemble": ("mean", "dice_weighted"),
    "checkpoint": ("best", "final"),
    "layout": ("nnunet", "autopet", "flat"),
    "strategy": ("sliding_window", "slices", "whole_image"),
    "stage_inputs": ("in_fold", "out_of_fold"),
    "selection_mode": ("max", "min"),
    "ensemble_space": ("probabilities", "logits"),
    "blending": ("gaussian", "constant"),
}


def check_option(kind: str, value: str) -> str:
    """``value`` if it is one of the ``kind`` choices, else ``ValueError`` naming them."""
    choices = OPTIONS[kind]
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``20m``, ``1h30m``, ``90s`` or ``1.5h`` (a unit is required);
    ``ValueError`` otherwise (argparse shows its message as the one-line error)."""
    compact = str(text).strip().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts).lower() != compact.lower():
        raise ValueError(f"a duration such as 20m, 1h30m or 900s is expected, got {text!r}")
    seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"the duration must be positive, got {text!r}")
    return seconds
