"""Helpers shared by the benchmark scripts: peak memory, device synchronisation, the timed
training loop, and nnU-Net's trainer run for a set number of iterations.

Not a benchmark itself; the scripts beside it import it (they put this folder on ``sys.path``).
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported where it is used: predict_vs_nnunet.py times subprocesses that import this
    import torch

CONFIGURATION = "3d_fullres"


# --------------------------------------------------------------------------- memory
def _cuda():
    import torch

    return torch.cuda


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA: the allocator's peaks; CPU: the peak RSS)."""
    if device.type == "cuda":
        _cuda().synchronize(device)
        _cuda().reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> tuple[float, str]:
    """(peak memory in MiB since ``reset_peak``, what was measured)."""
    if device.type == "cuda":
        return _cuda().max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak RSS of the process (VmHWM)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the process (ru_maxrss, not reset)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        _cuda().synchronize(device)


# --------------------------------------------------------------------------- the timed loop
def timed_loop(
    step: Callable[[Any], torch.Tensor],
    device: torch.device,
    iterations: int,
    warmup: int,
    fetch: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """``warmup`` untimed, then ``iterations`` timed calls of ``step(fetch())``.

    ``step`` returns a tensor that is read with ``float()`` after every call, which waits for the
    device. ``fetch`` (optional) makes the step's input, e.g. the next batch of a data loader: the
    time spent in it is reported as the data wait. Peak memory is reset after the warm-up.
    """
    fetch = fetch or (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):
        step(fetch())
    sync(device)
    warmup_s = time.perf_counter() - started
    reset_peak(device)
    waits, computes = [], []
    begin = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        batch = fetch()
        t1 = time.perf_counter()
        float(step(batch))  # waits for the device
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        computes.append(t2 - t1)
    total = time.perf_counter() - begin
    peak, peak_kind = peak_mb(device)
    return {
        "warmup_iterations": warmup,
        "timed_iterations": iterations,
        "warmup_s": warmup_s,
        "s_per_iteration": total / iterations,
        "iterations_per_s": iterations / total,
        "compute_s_per_iteration": statistics.median(computes),
        "data_wait_s_per_iteration": statistics.mean(waits),
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
    }


# --------------------------------------------------------------------------- nnU-Net's own trainer
def nnunet_train_only(dataset_id: str, trainer: str, iterations: int, device: str = "cpu") -> None:
    """Train fold 0 with nnU-Net's trainer ``trainer``, ``iterations`` per epoch, on ``device``.

    nnU-Net has no flag for the iterations per epoch: the trainer is built with its own
    ``get_trainer_from_args`` and the attribute set before ``run_training`` (run this in a
    subprocess with the ``nnUNet_*`` folders in the environment). The result folder and checkpoint
    are the ordinary ones, so ``nnUNetv2_predict -tr <trainer>`` loads them; the final validation
    export of ``nnUNetv2_train`` is not run.
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(dataset_id, CONFIGURATION, 0, trainer, device=torch.device(device))
    t.num_iterations_per_epoch = iterations
    t.num_val_iterations_per_epoch = max(1, iterations // 5)
    t.run_training()
