"""Named plans (auto, gdfl_paper, l1dfl_paper) and per-network sizing (issue #11)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from autopetseg.errors import InputError
from autopetseg.models.costs import planner_cost
from autopetseg.models.networks import AttentionUNetOptions, build_network, count_parameters
from autopetseg.planning.named_plans import paper_plans, plans_file
from autopetseg.planning.planner import NETWORK_FAMILIES, plan_experiment
from autopetseg.planning.plans import ComputeBudget, Plans
from tests.test_planner import make_fingerprint

# An autoPET-sized fingerprint: PET 400 x 400 x ~326 at 2.04 x 2.04 x 3 mm, body crop ~ 326 x 190 x 270.
AUTOPET = make_fingerprint([(3.0, 2.04, 2.04)] * 8, [(326, 190, 270)] * 8)
GB = 1024**3


def built_parameters(conf, in_channels=2, out_channels=2) -> int:
    return count_parameters(build_network(conf.network_name, conf.network, in_channels, out_channels))


def test_gdfl_paper_plans_are_the_papers_setup():
    plans = paper_plans("gdfl_paper", AUTOPET, ComputeBudget(device="cuda", gpu_memory_gb=80), planner_cost)
    conf = plans.configuration("3d_fullres")
    assert plans.target_spacing_zyx == [2.0, 2.0, 2.0] and conf.spacing_zyx == [2.0, 2.0, 2.0]
    assert conf.patch_size == [192, 192, 192] and conf.batch_size == 4
    assert conf.network_name == "resunet" and conf.network.features_per_stage == [32, 64, 128, 256, 512]
    assert conf.network.num_res_units == 2
    assert plans.normalization.ct_clip_hu == (-1024.0, 1024.0) and plans.normalization.pet_clip_suv is None
    assert built_parameters(conf) == 19_223_525
    assert conf.data_identifier == "3d_fullres_gdfl_paper"  # autoPET spacing differs: its own cache


def test_l1dfl_paper_plans_are_the_papers_setup():
    plans = paper_plans("l1dfl_paper", AUTOPET, ComputeBudget(device="cuda", gpu_memory_gb=24), planner_cost)
    attention = plans.configuration_for("3d_fullres", "attention_unet", tuple(NETWORK_FAMILIES))
    segresnet = plans.configuration_for("3d_fullres", "segresnet", tuple(NETWORK_FAMILIES))
    assert attention.patch_size == segresnet.patch_size == [128, 128, 128]
    assert plans.normalization.ct_clip_hu == (-1000.0, 3000.0)
    assert built_parameters(attention) == 5_910_038  # 5,909,562 with MONAI's merge block
    assert count_parameters(build_network("attention_unet", attention.network,
                                          options=AttentionUNetOptions(merge_block="monai"))) == 5_909_562
    assert built_parameters(segresnet) == 4_701_346
    assert attention.data_identifier == segresnet.data_identifier
    with pytest.raises(InputError, match="no '3d_fullres' configuration sized for network 'resunet'"):
        plans.configuration_for("3d_fullres", "resunet", tuple(NETWORK_FAMILIES))


def test_a_paper_plan_the_budget_cannot_hold_is_an_error_naming_the_nearest_plan():
    with pytest.raises(InputError) as info:
        paper_plans("gdfl_paper", AUTOPET, ComputeBudget(device="cuda", gpu_memory_gb=4), planner_cost)
    message = str(info.value)
    assert "need about" in message and "this budget has 4.0 GB" in message and "nearest plan that fits: patch" in message


def test_a_paper_plan_shares_the_auto_cache_when_spacing_and_normalization_agree():
    iso = make_fingerprint([(2.0, 2.0, 2.0)] * 8, [(300, 180, 220)] * 8)
    auto = plan_experiment(iso, ComputeBudget(device="cuda", gpu_memory_gb=24), networks=tuple(NETWORK_FAMILIES),
                           cost=planner_cost)
    gdfl = paper_plans("gdfl_paper", iso, ComputeBudget(device="cuda", gpu_memory_gb=80), planner_cost, auto=auto)
    l1dfl = paper_plans("l1dfl_paper", iso, ComputeBudget(device="cuda", gpu_memory_gb=80), planner_cost, auto=auto)
    assert gdfl.configuration("3d_fullres").data_identifier == "3d_fullres"  # same 2 mm, same CT window
    assert l1dfl.configuration("3d_fullres").data_identifier == "3d_fullres_l1dfl_paper"  # CT [-1000, 3000]


@pytest.mark.parametrize("gb", [8, 24, 80])
def test_auto_plans_size_every_network_for_the_gpu_budget(gb):
    plans = plan_experiment(AUTOPET, ComputeBudget(device="cuda", gpu_memory_gb=gb),
                            networks=tuple(NETWORK_FAMILIES), cost=planner_cost)
    for network in NETWORK_FAMILIES:
        conf = plans.configuration_for("3d_fullres", network, tuple(NETWORK_FAMILIES))
        assert conf.network_name == network and conf.data_identifier == "3d_fullres"
        assert conf.notes["estimated_gpu_memory_gb"] <= gb
        assert conf.notes["parameters"] == built_parameters(conf)
    # Each network is sized by its own cost: the Attention U-Net and SegResNet keep the paper's widths.
    assert plans.configuration_for("3d_fullres", "attention_unet").network.features_per_stage[0] == 16
    assert max(plans.configuration_for("3d_fullres", "segresnet").network.features_per_stage) <= 128


def test_plans_from_before_networks_were_named_still_load_and_serve_every_network(tmp_path):
    plans = plan_experiment(AUTOPET, ComputeBudget(device="cuda", gpu_memory_gb=8))
    raw = json.loads(json.dumps(dataclasses.asdict(plans)))
    for conf in raw["configurations"].values():
        del conf["network_name"]
    legacy = Plans.from_dict(raw)
    conf = legacy.configuration_for("3d_fullres", "attention_unet", tuple(NETWORK_FAMILIES))
    assert conf.network_name is None and conf.patch_size == plans.configuration("3d_fullres").patch_size


def test_cli_writes_named_plans_beside_the_default(tmp_path, monkeypatch):
    from autopetseg.data.synthetic import synthesize_dataset

    monkeypatch.setenv("AUTOPETSEG_PREPROCESSED", str(tmp_path / "prep"))
    raw = synthesize_dataset(tmp_path / "raw", n_cases=3, preset="tiny", seed=1)
    run = [sys.executable, "-m", "autopetseg", "plan_and_preprocess", "-d", str(raw), "--gpu-memory", "24"]
    done = subprocess.run(run + ["--plans", "l1dfl_paper"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dataset_dir = tmp_path / "prep" / raw.name
    plans = Plans.load(plans_file(dataset_dir, "l1dfl_paper"))
    assert plans.configuration("3d_fullres").network_name == "attention_unet"
    assert (dataset_dir / "3d_fullres_l1dfl_paper").is_dir()
    done = subprocess.run(run + ["--plans", "gdfl_paper", "--gpu-memory", "3"], capture_output=True, text=True)
    assert done.returncode != 0 and "nearest plan that fits" in done.stderr
    assert "Traceback" not in done.stderr
