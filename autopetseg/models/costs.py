"""What a network costs to train, read off its own graph: FLOPs and the bytes autograd keeps.

The planner sizes patch and batch with these numbers (``planning.planner`` takes them as its
``cost`` callable, so planning does not import the networks). Every network in
``models.networks.NETWORKS`` is costed the same way, new ones included:

* the network is built on PyTorch's ``meta`` device (shapes only: no memory, no arithmetic) and
  one forward + backward runs on a reference patch of one sample;
* ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of every operator, forward and
  backward;
* a saved-tensor hook adds up the bytes autograd keeps for the backward pass (the activations).

For a fixed topology every tensor is the patch divided by a stride, times channels, so both
counts are exactly linear in patch voxels and in batch: one reference run per topology serves
every patch the planner tries (cached).

Fitted constants (``NetworkCostModel``, one per network) turn counts into what a machine sees:

* training memory = ``memory_factor`` × saved bytes (float32 on a CPU; on a GPU under AMP times
  ``AMP_ACTIVATION_RATIO``, see below) + 16 bytes per parameter (fp32 weight, gradient, two Adam moments)
  + ``overhead_gb``. ``memory_factor`` covers what autograd does not save but the peak holds:
  activation gradients during backward, temporaries, allocator slack.
* CPU seconds per iteration = FLOPs (forward + backward) / (``cpu_gflops_per_core`` × 1e9 × cores
  × ``CPU_CORE_EFFICIENCY``).

The constants were fitted on the 2-core development machine with ``benchmarks/fit_cost_models.py
--sizes 40 48 64`` (float32, one thread, the resident memory one training step adds in a fresh
process, and its CPU time; the CPU plans' shape, 16..128 channels in 4 stages, batch 2):

==================  =============  =============================  =================  ======================
network             memory_factor  memory error (40³, 48³, 64³)   GFLOP/s per core   seconds error
==================  =============  =============================  =================  ======================
resunet             1.30           +13 %, +6 %, 0 %               19                 +5 %, +8 %, -10 %
attention_unet      1.17           +3 %, +1 %, 0 %                19                 -10 %, +4 %, -2 %
segresnet           1.09           +11 %, +5 %, 0 %               26                 -5 %, +8 %, -7 %
==================  =============  =============================  =================  ======================

so the stated fit errors are 15 % for memory (``MEMORY_FIT_ERROR``; smaller patches keep a larger
share in small allocations, so the factor falls slowly with size) and 25 % for seconds. The
memory measurement is stable under load; the seconds were measured while other jobs shared the
cores (load ≈ 8), so the absolute GFLOP/s are low: ``CPU_CORE_EFFICIENCY`` is set so that the
residual U-Net plans at the 12 GFLOP/s per core its CPU plan has used since it was checked
against measured seconds per iteration, and the other networks keep their measured ratio to it.
``tests/test_costs.py`` checks the memory model against a measured forward/backward at a small
size within ``MEMORY_FIT_ERROR``. Nothing here has been measured on a GPU (no session had one):
the GPU figures assume the float32 factor holds for bf16 activations and add a fixed 1 GB for the
CUDA context and workspaces. Under AMP the convolutions keep bf16, but instance and group norms
autocast to float32 and their outputs (and the activations after them) are saved in float32: with
no GPU to measure, the GPU model counts activations at their float32 size (``AMP_ACTIVATION_RATIO``
= 1), which errs towards smaller patches rather than out-of-memory runs. ``benchmarks/gpu_check.py``
prints planned against measured memory for the first session with a GPU to refit.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autopetseg.planning.planner import CostEstimate
from autopetseg.planning.plans import NetworkTopology

GB = 1024**3
MEMORY_FIT_ERROR = 0.15  # stated above; the test holds the model to it
SECONDS_FIT_ERROR = 0.25
AMP_ACTIVATION_RATIO = 1.0  # GPU activations under AMP relative to float32 (module docstring: unmeasured)
# Two threads do not run twice as fast, and on a CPU the data loader and its augmentation share the
# cores; the fit's GFLOP/s were also measured on a loaded machine (module docstring): 12 / 19.
CPU_CORE_EFFICIENCY = 0.63


@dataclass(frozen=True)
class NetworkCostModel:
    """The fitted constants of one network (module docstring)."""

    memory_factor: float
    cpu_gflops_per_core: float
    overhead_gb: float = 1.0  # GPU: CUDA context, cuDNN workspace; the CPU measurement subtracts its baseline
    bytes_per_parameter: int = 16


NETWORK_COSTS: dict[str, NetworkCostModel] = {
    "resunet": NetworkCostModel(memory_factor=1.30, cpu_gflops_per_core=19.0),
    "attention_unet": NetworkCostModel(memory_factor=1.17, cpu_gflops_per_core=19.0),
    "segresnet": NetworkCostModel(memory_factor=1.09, cpu_gflops_per_core=26.0),
}
# Networks not fitted yet (the cascades' and the multitask model's own): the largest factor, the lowest rate.
DEFAULT_COST = NetworkCostModel(memory_factor=1.30, cpu_gflops_per_core=19.0)


@dataclass(frozen=True)
class GraphCounts:
    """Per sample and per voxel of the patch: training FLOPs and bytes saved for backward (float32)."""

    flops_per_voxel: float
    saved_bytes_per_voxel: float
    parameters: int


@dataclass(frozen=True)
class TrainingCost:
    """What one training iteration of ``batch`` × ``patch`` costs."""

    network: str
    parameters: int
    flops: float
    activation_bytes_fp32: float
    gpu_memory_bytes: float  # AMP (2-byte activations)
    cpu_memory_bytes: float  # float32
    cpu_seconds: float

    def as_notes(self) -> dict:
        return {"parameters": self.parameters, "estimated_gpu_memory_gb": round(self.gpu_memory_bytes / GB, 2),
                "estimated_cpu_memory_gb": round(self.cpu_memory_bytes / GB, 2)}


def _freeze(topology: NetworkTopology) -> str:
    return json.dumps(asdict(topology), sort_keys=True)


def reference_patch(topology: NetworkTopology) -> list[int]:
    """The smallest patch every network accepts for ``topology``: twice its total stride per axis."""
    return [2 * t for t in topology.total_stride]


@functools.lru_cache(maxsize=512)
def _graph_counts(name: str, frozen_topology: str, in_channels: int, out_channels: int) -> GraphCounts:
    from torch.utils.flop_counter import FlopCounterMode

    from autopetseg.models.networks import build_network

    topology = NetworkTopology(**json.loads(frozen_topology))
    patch = reference_patch(topology)
    with torch.device("meta"):
        network = build_network(name, topology, in_channels=in_channels, out_channels=out_channels)
        x = torch.zeros([1, in_channels, *patch])
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # One tensor saved by several operators (a conv output read by its norm and its skip) is
        # stored once: count each storage once. Weights are counted with the parameters.
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = network(x)
        out.float().sum().backward()
    voxels = math.prod(patch)
    return GraphCounts(counter.get_total_flops() / voxels, sum(storages.values()) / voxels, int(parameters))


def graph_counts(name: str, topology: NetworkTopology, in_channels: int = 2, out_channels: int = 2) -> GraphCounts:
    return _graph_counts(name, _freeze(topology), int(in_channels), int(out_channels))


def training_cost(name: str, topology: NetworkTopology, patch: list[int], batch: int, cores: int = 1,
                  in_channels: int = 2, out_channels: int = 2) -> TrainingCost:
    """The planned cost of one training iteration of network ``name`` (module docstring)."""
    counts = graph_counts(name, topology, in_channels, out_channels)
    model = NETWORK_COSTS.get(name, DEFAULT_COST)
    samples = batch * math.prod(int(p) for p in patch)
    flops = counts.flops_per_voxel * samples
    saved = counts.saved_bytes_per_voxel * samples
    weights = counts.parameters * model.bytes_per_parameter
    return TrainingCost(
        network=name,
        parameters=counts.parameters,
        flops=flops,
        activation_bytes_fp32=saved,
        gpu_memory_bytes=model.memory_factor * saved * AMP_ACTIVATION_RATIO + weights + model.overhead_gb * GB,
        cpu_memory_bytes=model.memory_factor * saved + weights,
        cpu_seconds=flops / (model.cpu_gflops_per_core * 1e9 * cores * CPU_CORE_EFFICIENCY),
    )


def planner_cost(network: str, topology: NetworkTopology, patch: list[int], batch: int, cores: int) -> CostEstimate:
    """``training_cost`` in the planner's terms (``planning.planner.CostFunction``). A topology the
    network cannot be built with (one stage: a patch too small to pool) costs infinitely much, so
    the planner grows the patch past it."""
    try:
        c = training_cost(network, topology, patch, batch, cores)
    except ValueError:
        return CostEstimate(0, math.inf, math.inf, math.inf)
    return CostEstimate(c.parameters, c.gpu_memory_bytes, c.cpu_seconds, c.cpu_memory_bytes)


# ---------------------------------------------------------------------------------------------
# measurement (the fit script and the tests): one training step in a fresh process


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_here(name: str, topology: dict, patch: list[int], batch: int, in_channels: int, out_channels: int,
                  steps: int) -> dict:
    from autopetseg.models.networks import build_network

    torch.set_num_threads(1)
    torch.manual_seed(0)
    network = build_network(name, NetworkTopology(**topology), in_channels=in_channels, out_channels=out_channels)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    x = torch.randn([batch, in_channels, *patch])
    target = torch.randint(0, out_channels, [batch, *patch])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(network(x), target)
        loss.backward()
        optimizer.step()

    step()  # Adam's moments exist from here on
    optimizer.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current size
        f.write("5")
    before = _resident_bytes("VmRSS")
    cpu0 = time.process_time()
    step()
    cpu1 = time.process_time()
    peak = _resident_bytes("VmHWM") - before
    for _ in range(steps - 1):
        step()
    seconds = (time.process_time() - cpu1) / (steps - 1) if steps > 1 else cpu1 - cpu0
    return {"peak_bytes": peak, "cpu_seconds": seconds}


def measure_training_step(name: str, topology: NetworkTopology, patch: list[int], batch: int,
                          in_channels: int = 2, out_channels: int = 2, steps: int = 1) -> dict:
    """Measured in a fresh single-threaded process: the resident memory one training step adds on
    top of the model and its optimizer state (``peak_bytes``, float32; minus the gradients, which
    ``zero_grad`` frees and the step allocates again: they are part of the 16 bytes per parameter)
    and the CPU seconds of a step (``cpu_seconds``, the mean of ``steps`` - 1 after the first)."""
    args = json.dumps([name, asdict(topology), list(patch), int(batch), int(in_channels), int(out_channels),
                       int(steps)])
    code = ("import json,sys; from autopetseg.models.costs import _measure_here; "
            "print(json.dumps(_measure_here(*json.loads(sys.argv[1]))))")
    # A fixed mmap threshold makes glibc give every freed tensor back at once, so the resident
    # size follows the live tensors instead of what the heap kept from earlier steps.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    counts = graph_counts(name, topology, in_channels, out_channels)
    measured["peak_bytes"] -= 4 * counts.parameters  # the gradients come back with every step
    return measured


def machine_memory_bytes() -> int:
    """Physical memory of this machine (the CPU's training budget)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


__all__ = ["planner_cost", "NETWORK_COSTS", "NetworkCostModel", "TrainingCost", "training_cost", "graph_counts",
           "measure_training_step", "machine_memory_bytes", "MEMORY_FIT_ERROR", "SECONDS_FIT_ERROR",
           "reference_patch"]
