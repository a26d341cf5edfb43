"""Checkpoints as plain data: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, ``None`` and lists, tuples and dicts of
those (network, optimizer, scheduler and scaler state dicts, the training log, the RNG states).
``load_checkpoint`` never unpickles anything else: a file that carries a pickled object (which an
ordinary ``torch.load`` would *run*) or is truncated or not a checkpoint at all is an
``InputError`` naming the file, and nothing in it is executed.

The one exception is what checkpoints of earlier autopetseg versions hold: numpy's global RNG state
as the tuple ``np.random.get_state()`` returns, whose key is a ``uint32`` ndarray. Unpickling an
ndarray needs ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and the
dtype's class (``numpy.dtypes.UInt32DType``); exactly those (for the plain numeric dtypes) are
allowed, nothing else. ``rng_state`` now stores numpy's state as a tensor and numbers, so new
checkpoints need no numpy global at all.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path


def _numpy_globals() -> list:
    """The numpy globals an ndarray pickle needs, under numpy 2's and numpy 1's module names."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed: list = [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),  # written by numpy 2
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1
        np.ndarray,
        np.dtype,
    ]
    plain = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    classes = {type(np.dtype(t)) for t in plain}
    # numpy >= 1.25 builds each dtype from its own class (numpy.dtypes.UInt32DType, ...); older
    # numpy has no such classes (type(dtype) is numpy.dtype itself, already allowed).
    allowed += sorted((c for c in classes if c is not np.dtype), key=lambda c: c.__name__)
    return allowed


_NUMPY_GLOBALS = _numpy_globals()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` with ``torch.save``, atomically (never a half-written file)."""
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (or an earlier autopetseg), as plain data only.

    ``torch.load(weights_only=True)`` with numpy's ndarray globals allowed for legacy RNG states.
    Any failure (missing, truncated or foreign file, a pickled object or a global that is not
    allowed) is an ``InputError`` naming the file; nothing in the file is run. ``what`` names the
    file's role in the message ("checkpoint", "model weights", ...).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{what} not found", file=path) from None
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file is the same user error
        detail = _first_line(exc)
        raise InputError(
            f"{what} is unreadable or holds objects that are not plain data (tensors, numbers, strings, "
            f"lists, dicts); it was not loaded and nothing in it was run ({type(exc).__name__}: {detail})",
            file=path,
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"{what} holds a {type(state).__name__}, not a dict of states", file=path)
    return state


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The most telling line of ``exc``'s message (torch's weights-only errors run to many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return "no message"
    telling = [line for line in lines if "global" in line.lower() or "unsupported" in line.lower()]
    line = (telling or lines)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """The random states of torch (CPU and every CUDA device), numpy's global generator and
    Python's ``random``, as plain data (tensors, ints, floats, tuples) that ``load_checkpoint`` reads."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "bit_generator": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # uint32 values; int64 holds them exactly
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the random states saved by ``rng_state``: the next numbers of torch, numpy and ``random``
    are those that followed the save. Also reads the legacy form (numpy's state as the tuple
    ``np.random.get_state()`` returns), which earlier autopetseg checkpoints hold."""
    torch.set_rng_state(_cpu_byte_tensor(state["torch"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, torch.Tensor):
            torch.cuda.set_rng_state(_cpu_byte_tensor(cuda))
        else:
            torch.cuda.set_rng_state_all([_cpu_byte_tensor(s) for s in cuda][: torch.cuda.device_count()])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))


def _cpu_byte_tensor(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(device="cpu", dtype=torch.uint8)


def _numpy_state(saved: Any) -> tuple:
    if isinstance(saved, dict):
        key = saved["key"]
        key = key.detach().cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return (
            str(saved.get("bit_generator", "MT19937")),
            key.astype(np.uint32),
            int(saved["pos"]),
            int(saved["has_gauss"]),
            float(saved["cached_gaussian"]),
        )
    kind, key, pos, has_gauss, cached_gaussian = saved  # legacy: np.random.get_state()'s tuple
    return str(kind), np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached_gaussian)


def _python_state(saved: Any) -> tuple:
    """``random.setstate`` wants (version, tuple of ints, gauss_next); lists (JSON-like) are accepted too."""
    version, internal, gauss_next = saved
    return int(version), tuple(int(v) for v in internal), gauss_next
