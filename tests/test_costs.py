"""Per-network training cost models (models/costs.py, issue #11): each network's planned memory is
within the stated fit error of a measured forward/backward at a small size."""

from __future__ import annotations

import math

import pytest

from autopetseg.models.costs import (MEMORY_FIT_ERROR, NETWORK_COSTS, graph_counts, measure_training_step,
                                     training_cost)
from autopetseg.models.networks import build_network, count_parameters
from autopetseg.planning.plans import NetworkTopology

CPU_PLAN = {
    "resunet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 2),
    "attention_unet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 0),
    "segresnet": NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 0),
}


@pytest.mark.parametrize("network", sorted(NETWORK_COSTS))
def test_graph_counts_are_the_networks_own(network):
    topology = CPU_PLAN[network]
    counts = graph_counts(network, topology)
    assert counts.parameters == count_parameters(build_network(network, topology))
    # Linear in voxels and batch: the reference run serves every patch.
    a = training_cost(network, topology, [32, 32, 32], 1)
    b = training_cost(network, topology, [64, 32, 32], 2)
    assert b.flops == pytest.approx(4 * a.flops) and b.activation_bytes_fp32 == pytest.approx(4 * a.activation_bytes_fp32)


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(NETWORK_COSTS))
def test_planned_memory_is_within_the_stated_error_of_a_measured_training_step(network):
    topology, patch, batch = CPU_PLAN[network], [40, 40, 40], 2
    measured = measure_training_step(network, topology, patch, batch)["peak_bytes"]
    cost = training_cost(network, topology, patch, batch)
    planned = cost.cpu_memory_bytes - 16 * cost.parameters  # the step's activations (weights held before it)
    assert math.isclose(planned, measured, rel_tol=MEMORY_FIT_ERROR), (planned / 2**20, measured / 2**20)
