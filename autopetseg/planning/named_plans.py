"""Named plans, as nnU-Net's plans identifiers: ``plan_and_preprocess --plans NAME``.

* ``auto`` (the default, ``plans.json``): the planner sizes each method's own network for the
  budget, GPU memory or CPU seconds (``planner.plan_experiment``).
* ``gdfl_paper`` (``plans_gdfl_paper.json``): Ahamed & Rahmim, autoPET 2023 — 2 mm isotropic,
  192³ patches, batch 4, residual U-Net 32…512 in 5 stages with 2 residual units (19,223,525
  parameters), CT clipped to [-1024, 1024] HU.
* ``l1dfl_paper`` (``plans_l1dfl_paper.json``): Dzikunu et al. — 2 mm isotropic, 128³ patches,
  CT clipped to [-1000, 3000] HU, Attention U-Net 16…256 in 5 stages (``3d_fullres``; 5,910,038
  parameters, 5,909,562 with MONAI's merge block) or SegResNet with 16 initial filters in 4 stages
  (``3d_fullres_segresnet``; 4,701,346). The paper gives no batch size: 2, the planner's smallest.

A paper plan is fixed: it is never shrunk to fit. When the budget cannot hold it, ``paper_plans``
raises an ``InputError`` that says what it needs and the nearest plan that fits (the same network
and spacing, the patch and batch the ``auto`` planner picks for the budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autopetseg.errors import InputError
from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.planner import CostFunction, PlannerSettings, plan_3d_fullres
from autopetseg.planning.plans import ComputeBudget, ConfigurationPlan, NetworkTopology, NormalizationPlan, Plans, variant_name

GB = 1024**3
AUTO = "auto"


@dataclass(frozen=True)
class PaperNetwork:
    network: str
    features: tuple[int, ...]
    num_res_units: int = 0


@dataclass(frozen=True)
class PaperPlan:
    """One paper's setup: spacing, patch, batch, CT window and its network(s), the first the default."""

    spacing_mm: float
    patch: int
    batch: int
    ct_clip_hu: tuple[float, float]
    networks: tuple[PaperNetwork, ...]


PAPER_PLANS: dict[str, PaperPlan] = {
    "gdfl_paper": PaperPlan(2.0, 192, 4, (-1024.0, 1024.0),
                            (PaperNetwork("resunet", (32, 64, 128, 256, 512), num_res_units=2),)),
    "l1dfl_paper": PaperPlan(2.0, 128, 2, (-1000.0, 3000.0),
                             (PaperNetwork("attention_unet", (16, 32, 64, 128, 256)),
                              PaperNetwork("segresnet", (16, 32, 64, 128)))),
}
PLANS_NAMES = (AUTO, *PAPER_PLANS)


def plans_file(dataset_dir: str | Path, name: str = AUTO) -> Path:
    """``plans.json`` for ``auto``, ``plans_<name>.json`` for the others."""
    check_plans_name(name)
    return Path(dataset_dir) / ("plans.json" if name == AUTO else f"plans_{name}.json")


def check_plans_name(name: str) -> None:
    if name not in PLANS_NAMES:
        raise InputError(f"unknown plans {name!r}; known: {', '.join(PLANS_NAMES)}")


def _paper_configuration(key: str, data_identifier: str, plan: PaperPlan, net: PaperNetwork) -> ConfigurationPlan:
    n = len(net.features)
    topology = NetworkTopology(features_per_stage=list(net.features), strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                               kernel_sizes=[[3, 3, 3]] * n, num_res_units=net.num_res_units)
    return ConfigurationPlan(name=key, data_identifier=data_identifier, spacing_zyx=[plan.spacing_mm] * 3,
                             patch_size=[plan.patch] * 3, batch_size=plan.batch, network=topology,
                             network_name=net.network)


def paper_plans(
    name: str,
    fingerprint: Fingerprint,
    budget: ComputeBudget,
    cost: CostFunction,
    dataset_name: str = "",
    auto: Plans | None = None,
    cpu_memory_bytes: float | None = None,
) -> Plans:
    """The plans of paper ``name`` (module docstring), checked against ``budget``.

    The cache is shared with the ``auto`` plans (``data_identifier`` ``3d_fullres``) when spacing
    and normalization agree; otherwise it is ``3d_fullres_<name>``. On a CPU the budget is the
    machine's memory (``cpu_memory_bytes``) in float32; on a GPU ``budget.gpu_memory_gb`` under AMP.
    """
    plan = PAPER_PLANS[name]
    normalization = NormalizationPlan(ct_clip_hu=plan.ct_clip_hu, pet_clip_suv=None)
    spacing = [plan.spacing_mm] * 3
    shared = (auto is not None and "3d_fullres" in auto.configurations
              and auto.configurations["3d_fullres"].spacing_zyx == spacing and auto.normalization == normalization)
    identifier = "3d_fullres" if shared else f"3d_fullres_{name}"
    configurations = {}
    for i, net in enumerate(plan.networks):
        key = "3d_fullres" if i == 0 else variant_name("3d_fullres", net.network)
        conf = _paper_configuration(key, identifier, plan, net)
        estimate = cost(net.network, conf.network, conf.patch_size, conf.batch_size, budget.cpu_cores)
        _check_fits(name, conf, net, estimate, fingerprint, budget, cost, cpu_memory_bytes)
        conf.notes = {"plans": name, **estimate.notes(budget.device)}
        configurations[key] = conf
    return Plans(dataset=dataset_name, budget=budget, target_spacing_zyx=spacing, normalization=normalization,
                 configurations=configurations)


def _check_fits(name: str, conf: ConfigurationPlan, net: PaperNetwork, estimate, fingerprint: Fingerprint,
                budget: ComputeBudget, cost: CostFunction, cpu_memory_bytes: float | None) -> None:
    if budget.device == "cpu":
        needed, available, what = estimate.cpu_memory_bytes, cpu_memory_bytes, "of memory (float32 on the CPU)"
    else:
        needed, available, what = estimate.gpu_memory_bytes, budget.gpu_memory_gb * GB, "of GPU memory (AMP)"
    if available is None or needed <= available:
        return
    # The nearest plan that fits: the paper's network (widths and depth) at the paper's spacing, its patch
    # and batch sized by the auto planner for this budget (on a CPU: for its memory, whatever the seconds).
    if budget.device == "cpu":
        nearest_budget = ComputeBudget(device="cuda", gpu_memory_gb=max(available / GB - 1.0, 0.5))
    else:
        nearest_budget = budget
    paper_network = PlannerSettings(base_features=net.features[0], max_features=max(net.features),
                                    max_stages_3d=len(net.features), num_res_units=net.num_res_units)
    nearest = plan_3d_fullres(fingerprint, nearest_budget, list(conf.spacing_zyx), paper_network, conf.network_name, cost)
    raise InputError(
        f"plans {name!r} ({conf.network_name}, patch {conf.patch_size}, batch {conf.batch_size}) need about "
        f"{needed / GB:.1f} GB {what}; this budget has {available / GB:.1f} GB. The nearest plan that fits: "
        f"patch {nearest.patch_size}, batch {nearest.batch_size}, features {nearest.network.features_per_stage} "
        f"(`--plans auto` sizes it for this budget; a paper plan is never shrunk silently)")
