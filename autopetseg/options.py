"""Every named option of autopetseg, checked in one place: an unknown name is an error, never a default.

``check_option("optimizer", "adamw")`` returns the value or raises ``ValueError`` naming the
choices. Modules that take one of these names call it where the name enters (a config's
``validate``, a function's first line), so a typo fails before anything is written.
"""

from __future__ import annotations

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
}


def check_option(kind: str, value: str) -> str:
    """``value`` if it is one of the ``kind`` choices, else ``ValueError`` naming them."""
    choices = OPTIONS[kind]
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")
    return value
