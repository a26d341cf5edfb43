"""Fit (and check) the per-network training cost models of ``autopetseg.models.costs``.

For every network and a few small patches it measures one training step in a fresh
single-threaded process (peak resident memory it adds, float32; CPU seconds) and prints, beside
the graph counts (bytes saved for backward, FLOPs):

* the memory factor each measurement implies and the fitted one (median), and the planned vs
  measured memory with the model's current constants;
* the GFLOP/s per core each measurement implies, the fitted one, and planned vs measured seconds.

    python benchmarks/fit_cost_models.py [--networks resunet attention_unet segresnet] [--sizes 24 32 48]

CPU seconds are process CPU time of one thread, so a shared machine inflates them less than wall
time would (it still does, through caches): fit on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics

from autopetseg.models.costs import (CPU_CORE_EFFICIENCY, NETWORK_COSTS, graph_counts, measure_training_step,
                                     training_cost)
from autopetseg.planning.plans import NetworkTopology

TOPOLOGIES = {
    # the CPU plans' shapes: 16..128 in 4 stages (the residual U-Net with 2 residual units)
    "resunet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 2),
    "attention_unet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 0),
    "segresnet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[24, 32, 48])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print("| network | patch | batch | saved MB | measured MB | factor | planned MB | err | GFLOP | measured s "
          "| GFLOP/s | planned s | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        topology = TOPOLOGIES[name]
        factors, rates = [], []
        for size in args.sizes:
            patch = [size] * 3
            m = measure_training_step(name, topology, patch, args.batch, steps=args.steps)
            c = training_cost(name, topology, patch, args.batch, cores=1)
            counts = graph_counts(name, topology)
            planned_mb = (c.cpu_memory_bytes - counts.parameters * 16) / 2**20
            factor = m["peak_bytes"] / c.activation_bytes_fp32
            rate = c.flops / m["cpu_seconds"] / 1e9
            planned_s = c.cpu_seconds * CPU_CORE_EFFICIENCY  # one thread, no loader: the fit's own setting
            factors.append(factor)
            rates.append(rate)
            print(f"| {name} | {size}³ | {args.batch} | {c.activation_bytes_fp32 / 2**20:.0f} | "
                  f"{m['peak_bytes'] / 2**20:.0f} | {factor:.2f} | {planned_mb:.0f} | "
                  f"{(planned_mb * 2**20 - m['peak_bytes']) / m['peak_bytes']:+.0%} | {c.flops / 1e9:.1f} | "
                  f"{m['cpu_seconds']:.2f} | {rate:.1f} | {planned_s:.2f} | "
                  f"{(planned_s - m['cpu_seconds']) / m['cpu_seconds']:+.0%} |")
        print(f"{name}: fitted memory_factor {statistics.median(factors):.2f} (model {NETWORK_COSTS[name].memory_factor}), "
              f"GFLOP/s per core {statistics.median(rates):.1f} (model {NETWORK_COSTS[name].cpu_gflops_per_core})")


if __name__ == "__main__":
    main()
