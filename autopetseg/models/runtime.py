"""Devices and mixed precision, the same for training and inference."""

from __future__ import annotations

import contextlib

import torch

from autopetseg.errors import InputError
from autopetseg.options import check_option


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` → this process's GPU (``local_rank``)."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def amp_dtype(device: torch.device, amp: bool | None = None, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for float32.

    ``amp`` None: on for CUDA, off elsewhere. ``dtype`` "auto": bf16 where the GPU supports it (and
    on the CPU), else fp16 (which needs a GradScaler in training).
    """
    check_option("amp_dtype", dtype)
    use = device.type == "cuda" if amp is None else amp
    if not use:
        return None
    if dtype == "fp16":
        return torch.float16
    if dtype == "bf16" or device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
