"""Issue 17, item 9: ``train --time-budget``.

* ``TimeBudget`` on a simulated clock: the run (validation and bookkeeping included) ends inside
  the budget and close to it, also when the machine slows down or speeds up half-way; the
  learning rate falls continuously and reaches the schedule's end at the last step;
* a two-stage method trained for real under a budget: the stages share it by their configured
  iterations, each records its plan and achieved iterations in ``config.json``, and each ends at
  the end of its decay; ``--continue`` without a budget finishes nothing more.
"""

from __future__ import annotations

import json

import pytest
import torch
from _cache_helpers import DATASET, tiny_plans, write_tiny_cache
from test_model_folder import TOY, _with_coronal_2d

from autopetseg.cli import build_parser
from autopetseg.models import methods
from autopetseg.options import parse_duration
from autopetseg.training.time_budget import TimeBudget
from autopetseg.training.trainer import lr_factor_schedule


def test_durations():
    assert [parse_duration(t) for t in ("20m", "1h30m", "90s", "1.5h", " 10 m ")] == [1200, 5400, 90, 5400, 600]
    for bad in ("20", "0m", "abc", "1h 2x", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert build_parser().parse_args(["train", "D", "0", "--time-budget", "10m"]).time_budget == 600
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "D", "0", "--time-budget", "10"])


def simulate(budget_s: float, seconds_per_step, schedule: str = "cosine", iterations_per_epoch: int = 50,
             validation_s: float = 4.0, overhead_s: float = 0.5, setup_s: float = 5.0, validation_interval: int = 1):
    """Run the trainer's loop against a fake clock; (end time, budget, learning rate of each step and,
    last, the one after the last step)."""
    clock = [0.0]
    max_steps = 1000 * iterations_per_epoch
    budget = TimeBudget(budget_s, budget_s, iterations_per_epoch, max_steps, validation_interval,
                        lambda: 2.0, clock=lambda: clock[0])
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_schedule(schedule, max_steps))
    budget.warp(scheduler)
    clock[0] += setup_s
    budget.start(0)
    epoch, lrs = 0, []
    while epoch < budget.planned_epochs:
        budget.start_epoch(epoch)
        for _ in range(iterations_per_epoch):
            clock[0] += seconds_per_step(clock[0])
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            if budget.after_step():
                break
        if (epoch + 1) % validation_interval == 0 or epoch == budget.planned_epochs - 1:
            clock[0] += validation_s
            budget.record_validation(validation_s)
        clock[0] += overhead_s
        budget.record_overhead(overhead_s)
        epoch += 1
    clock[0] += overhead_s  # the final checkpoint
    return clock[0], budget, lrs + [optimizer.param_groups[0]["lr"]]


@pytest.mark.parametrize("load", ["steady", "slows down", "speeds up", "noisy"])
@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_the_run_ends_inside_the_budget_with_the_decay_done(load, schedule):
    budget_s = 600.0
    speeds = {
        "steady": lambda t: 0.1,
        "slows down": lambda t: 0.1 if t < 300 else 0.25,
        "speeds up": lambda t: 0.25 if t < 300 else 0.1,
        "noisy": lambda t: 0.1 + 0.05 * ((int(t * 7) % 3) - 1),
    }
    end, budget, lrs = simulate(budget_s, speeds[load], schedule)
    assert 0.95 * budget_s <= end <= budget_s, end
    assert budget.step == budget.total_steps == len(lrs) - 1 < budget.max_steps
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[-2] < 0.01  # the decay spans exactly the steps taken
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # falls continuously, never jumps back up
    assert max(a - b for a, b in zip(lrs, lrs[1:])) < 0.01
    assert budget.report()["achieved_iterations"] == len(lrs) - 1


def test_short_epochs_validations_every_few_epochs_and_a_budget_too_short_for_one_epoch():
    end, budget, _ = simulate(120.0, lambda t: 0.5, iterations_per_epoch=3, validation_s=0.5)  # the first timing spans epochs
    assert 0.95 * 120 <= end <= 120 and budget.report()["replans"] >= 1
    end, budget, _ = simulate(600.0, lambda t: 0.1, validation_interval=5, validation_s=30.0)
    assert 0.95 * 600 <= end <= 600
    end, budget, lrs = simulate(20.0, lambda t: 0.1, iterations_per_epoch=1000)  # the only epoch is cut short
    assert budget.planned_epochs == 1 and len(lrs) < 1000 and end <= 20.0 and lrs[-1] == pytest.approx(0.0)


@pytest.mark.slow
def test_a_two_stage_method_shares_the_budget_and_records_what_it_did(tmp_path, monkeypatch):
    from autopetseg.training.run import run_training

    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)
    cache = tmp_path / "pre"
    write_tiny_cache(cache, n_cases=10, n_lesion_free=3, plans=_with_coronal_2d(tiny_plans(features=(8, 16))))
    common = dict(preprocessed_root=cache, results_root=tmp_path / "res", device="cpu", num_workers=0,
                  iterations_per_epoch=4, epochs=500)
    run_training(cache / DATASET, 0, TOY.name, time_budget_s=16.0, **common)
    model = tmp_path / "res" / DATASET / "toy_cascade__3d_fullres" / "fold_0"
    reports = {}
    for stage in ("localizer", "segmenter"):
        config = json.loads((model / stage / "config.json").read_text())
        report = reports[stage] = config["time_budget"]
        assert config["config"]["time_budget_s"] == report["budget_s"]
        assert 0 < report["achieved_iterations"] == report["planned_iterations"] < 500 * 4
        state = torch.load(model / stage / "checkpoint_final.pt", weights_only=True)
        assert state["scheduler"]["last_epoch"] == report["achieved_iterations"]
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end
    # equal configured iterations: the first stage gets half of the time (the second: what is left)
    assert reports["localizer"]["budget_s"] == pytest.approx(8.0, abs=1.5)

    stamps = {p: p.stat().st_mtime_ns for p in model.rglob("checkpoint_*.pt")}
    run_training(cache / DATASET, 0, TOY.name, continue_training=True, **common)  # to the planned end: done
    assert {p: p.stat().st_mtime_ns for p in model.rglob("checkpoint_*.pt")} == stamps


def test_train_without_epochs_trains_for_the_time_the_plans_were_made_for(tmp_path):
    """``plan_and_preprocess --device cpu --time-budget T`` then ``train`` (no --epochs, no
    --time-budget): the fold trains for T; --epochs or an explicit budget wins."""
    from dataclasses import replace

    from autopetseg.planning.plans import ComputeBudget
    from autopetseg.training.run import run_training

    cache = tmp_path / "pre"
    plans = replace(tiny_plans(patch=(16, 16, 16), features=(4, 8)), budget=ComputeBudget("cpu", time_budget_s=6.0))
    write_tiny_cache(cache, n_cases=6, n_lesion_free=1, shape=(16, 16, 16), plans=plans)
    common = dict(preprocessed_root=cache, device="cpu", num_workers=0, iterations_per_epoch=4)
    folder = run_training(cache / DATASET, 0, "gdfl", results_root=tmp_path / "planned", **common)
    config = json.loads((folder / "config.json").read_text())
    report = config["time_budget"]  # the planned 6 s, less what the set-up before the stage took
    assert 0 < report["budget_s"] == config["config"]["time_budget_s"] <= 6.0 and report["achieved_iterations"] > 0
    folder = run_training(cache / DATASET, 0, "gdfl", results_root=tmp_path / "fixed", epochs=1, **common)
    config = json.loads((folder / "config.json").read_text())
    assert "time_budget" not in config and config["config"]["time_budget_s"] is None
