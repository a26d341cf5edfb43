"""Where datasets, caches and results live.

Like nnU-Net's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, three environment
variables give the default roots; command-line flags override them:

* ``AUTOPETSEG_RAW``: raw datasets, one folder per dataset (``Dataset001_Phantoms``).
* ``AUTOPETSEG_PREPROCESSED``: fingerprint, plans and the preprocessed cache per dataset.
* ``AUTOPETSEG_RESULTS``: trained models per dataset and trainer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from autopetseg.errors import InputError

RAW_ENV = "AUTOPETSEG_RAW"
PREPROCESSED_ENV = "AUTOPETSEG_PREPROCESSED"
RESULTS_ENV = "AUTOPETSEG_RESULTS"

_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


def _root(env: str, override: str | Path | None) -> Path | None:
    if override is not None:
        return Path(override)
    value = os.environ.get(env)
    return Path(value) if value else None


def resolve_raw_dataset(name_or_path: str | Path, raw_root: str | Path | None = None) -> Path:
    """A dataset folder from a path, a ``Dataset###_Name`` or a numeric id under the raw root."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    root = _root(RAW_ENV, raw_root)
    text = str(name_or_path)
    if root is not None and root.is_dir():
        if (root / text).is_dir():
            return (root / text).resolve()
        if text.isdigit():
            wanted = int(text)
            for child in sorted(root.iterdir()):
                m = _DATASET_NAME.match(child.name)
                if child.is_dir() and m and int(m.group(1)) == wanted:
                    return child.resolve()
    hint = "" if root is not None else f" (set {RAW_ENV} to look names up by id)"
    raise InputError(f"no dataset folder found for {text!r}{hint}", file=candidate)


def dataset_name(dataset_dir: Path) -> str:
    return Path(dataset_dir).resolve().name


def preprocessed_dir(dataset: str, override: str | Path | None = None) -> Path:
    """``<AUTOPETSEG_PREPROCESSED>/<dataset>``; defaults to ``./autopetseg_preprocessed``."""
    root = _root(PREPROCESSED_ENV, override) or Path("autopetseg_preprocessed")
    return root / dataset


def results_dir(dataset: str, override: str | Path | None = None) -> Path:
    """``<AUTOPETSEG_RESULTS>/<dataset>``; defaults to ``./autopetseg_results``."""
    root = _root(RESULTS_ENV, override) or Path("autopetseg_results")
    return root / dataset
