"""The plans each method gets on an autoPET-sized dataset: paper plans, auto at 8/24/80 GB, auto on 2 CPU cores.

    python benchmarks/plan_table.py

An autoPET-sized fingerprint (8 cases, PET 2.04 x 2.04 x 3 mm, body crop 326 x 190 x 270 voxels,
as ``tests/test_named_plans.py``) is planned with the fitted per-network cost models
(``autopetseg.models.costs``). For every method's network and plan it prints spacing, patch,
batch, network, parameters (of the built network) and the predicted GPU memory (AMP) or CPU
seconds per iteration. A paper plan that a budget cannot hold is shown with its error. Nothing
is trained: the numbers are the planner's predictions (the GPU ones unmeasured until a session
has a GPU: ``benchmarks/gpu_check.py`` measures them).
"""

from __future__ import annotations

import numpy as np

from autopetseg.errors import InputError
from autopetseg.models.costs import planner_cost
from autopetseg.models.networks import build_network, count_parameters
from autopetseg.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, LesionStats, summarize_lesions
from autopetseg.planning.named_plans import paper_plans
from autopetseg.planning.planner import NETWORK_FAMILIES, plan_experiment
from autopetseg.planning.plans import ComputeBudget

METHOD_NETWORKS = {"gdfl": ("resunet",), "l1dfl, dice, dicefocal": ("attention_unet", "segresnet")}
PAPER_OF = {"gdfl": "gdfl_paper", "l1dfl, dice, dicefocal": "l1dfl_paper"}


def autopet_fingerprint(n: int = 8) -> Fingerprint:
    spacing, shape = (3.0, 2.04, 2.04), (326, 190, 270)
    cases = [CaseFingerprint(f"case{i:03d}", list(spacing), [v + 20 for v in shape], [[10, 10 + v] for v in shape],
                             list(shape), 1000, [LesionStats(10, 0.08, 9.0, 5.0)] if i % 2 == 0 else [])
             for i in range(n)]
    rng = np.random.default_rng(0)
    body, lesion, ct = (IntensityStats.of(rng.gamma(2.0, 0.7, 5000)), IntensityStats.of(rng.uniform(3, 30, 500)),
                        IntensityStats.of(rng.normal(0, 300, 5000)))
    return Fingerprint(cases=cases, intensity={"PET": {"body": body, "lesion": lesion}, "CT": {"body": ct, "lesion": ct}},
                       lesions=summarize_lesions(cases), median_spacing_zyx=list(spacing),
                       median_shape_zyx=list(shape), median_shape_after_crop_zyx=list(shape))


def row(method, plan, conf, device) -> str:
    params = count_parameters(build_network(conf.network_name, conf.network))
    cost = (f"{conf.notes['estimated_seconds_per_iteration']:.2f} s/it" if device == "cpu"
            else f"{conf.notes['estimated_gpu_memory_gb']:.1f} GB")
    spacing = "×".join(f"{s:g}" for s in conf.spacing_zyx)
    features = conf.network.features_per_stage
    return (f"| {method} | {plan} | {spacing} | {'×'.join(map(str, conf.patch_size))} | {conf.batch_size} | "
            f"{conf.network_name} {features[0]}…{features[-1]} ({len(features)} stages) | {params:,} | {cost} |")


def main() -> None:
    fp = autopet_fingerprint()
    budgets = [("auto 8 GB", ComputeBudget("cuda", 8)), ("auto 24 GB", ComputeBudget("cuda", 24)),
               ("auto 80 GB", ComputeBudget("cuda", 80)), ("auto 2 CPU cores", ComputeBudget("cpu", cpu_cores=2))]
    print("| method | plan | spacing mm | patch | batch | network | parameters | predicted |")
    print("|---|---|---|---|---|---|---|---|")
    for method, networks in METHOD_NETWORKS.items():
        for gb in (80, 24, 8):
            try:
                plans = paper_plans(PAPER_OF[method], fp, ComputeBudget("cuda", gb), planner_cost)
            except InputError as exc:
                print(f"| {method} | {PAPER_OF[method]} at {gb} GB | refused: {exc} ||||||")
                continue
            for network in networks:
                conf = plans.configuration_for("3d_fullres", network, tuple(NETWORK_FAMILIES))
                print(row(method, f"{PAPER_OF[method]} ({gb} GB)", conf, "cuda"))
        for label, budget in budgets:
            plans = plan_experiment(fp, budget, networks=tuple(NETWORK_FAMILIES), cost=planner_cost)
            for network in networks:
                print(row(method, label, plans.configuration_for("3d_fullres", network), budget.device))


if __name__ == "__main__":
    main()
