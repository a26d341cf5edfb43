#!/usr/bin/env python
"""Benchmark: on a CPU with a time budget, a small patch many times or a big patch a few times? (issue 17, item 9)

The data behind ``plan_and_preprocess --device cpu --time-budget``. On whole-body phantoms (not the
tiny ones: there the patch is the whole image whatever the budget), for every CPU plan in
``--seconds-per-iteration`` (the planner's target for one training iteration; a bigger target gives
a bigger patch) and every training budget in ``--time-budgets``:

1. ``plan_and_preprocess`` with that target (Python API: the target is not a command-line option);
2. ``autopetseg train DATASET FOLD --time-budget T`` (the real command, in a subprocess, with the
   demo's output prior 0.01);
3. ``autopetseg predict`` and ``autopetseg evaluate`` on held-out phantoms of another seed.

Prints one row per (plan, budget): patch, iterations the budget gave, measured seconds per
iteration, held-out DSC, FPV, FNV and detection F1. The planner's rule (``CpuPlanSettings``) is read
off this table: the budget's best patch and the iterations it got.

Example (2 cores: about 45 minutes)::

    python benchmarks/patch_for_time.py --work /tmp/pft --n-train 40 --n-test 8 \
        --seconds-per-iteration 0.15 0.4 1.0 --time-budgets 3m 10m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import _cli  # noqa: E402  (a script beside this one)

DATASET = "Dataset002_WholeBody"


def make_data(args) -> tuple[Path, Path]:
    raw, held_out = args.work / "raw" / DATASET, args.work / "held_out"
    spacing = [str(s) for s in args.pet_spacing]
    if not (raw / "synthetic_truth.json").is_file():
        _cli("synth", raw, "-n", args.n_train, "--preset", "wholebody", "--pet-spacing", *spacing,
             "--layout", "nnunet", "--seed", args.seed, "-np", 2)
    if not (held_out / "synthetic_truth.json").is_file():
        _cli("synth", held_out, "-n", args.n_test, "--preset", "wholebody", "--pet-spacing", *spacing,
             "--layout", "flat", "--seed", args.seed + 10_000, "-np", 2)
    return raw, held_out


def plan(raw: Path, prep: Path, seconds_per_iteration: float) -> dict:
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget

    budget = ComputeBudget(device="cpu", cpu_seconds_per_iteration=seconds_per_iteration)
    result = plan_and_preprocess(raw, budget=budget, num_processes=2, preprocessed_root=prep)
    conf = result.plans.configurations["3d_fullres"]
    return {"patch": conf.patch_size, "batch": conf.batch_size, "features": conf.network.features_per_stage,
            "estimated_s": conf.notes.get("estimated_seconds_per_iteration")}


def run(args, raw: Path, held_out: Path, target: float, budget: str) -> dict:
    from autopetseg.options import parse_duration
    from autopetseg.scoring.metrics import f1_score
    from autopetseg.training.run import model_dir, resolve_method

    prep = args.work / f"prep_{target:g}"
    planned = plan(raw, prep, target)
    run_dir = args.work / f"run_{target:g}_{budget}"
    results, predictions, evaluation = run_dir / "results", run_dir / "predictions", run_dir / "evaluation"
    model = model_dir(results, DATASET, resolve_method("gdfl"))
    config_file = model / f"fold_{args.fold}" / "config.json"
    load_before = os.getloadavg()
    start = time.perf_counter()
    if not config_file.is_file():
        _cli("train", DATASET, args.fold, "--device", "cpu", "--preprocessed", prep, "--results", results,
             "--time-budget", budget, "--iterations", args.iterations, "--seed", args.seed, "--output-prior", 0.01)
    train_s = time.perf_counter() - start
    _cli("predict", "-i", held_out, "-o", predictions, "-m", model, "-f", args.fold, "--device", "cpu", "--overwrite")
    _cli("evaluate", "-p", predictions, "-g", held_out, "-o", evaluation)
    config = json.loads(config_file.read_text())
    s = json.loads((evaluation / "summary.json").read_text())
    tp, fp, fn = (s.get(f"total_{k}", 0) for k in ("tp", "fp", "fn"))
    iterations = config["time_budget"]["achieved_iterations"]
    return {"target_s": target, **planned, "budget": budget, "budget_s": parse_duration(budget), "train_s": train_s,
            "iterations": iterations, "load_before": load_before, "load_after": os.getloadavg(),
            "dsc": s.get("mean_dsc"), "fpv_ml": s.get("mean_fpv_ml"), "fnv_ml": s.get("mean_fnv_ml"),
            "tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("autopetseg_patch_for_time"))
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--pet-spacing", type=float, nargs=3, default=[6.0, 6.0, 6.0], metavar=("Z", "Y", "X"))
    p.add_argument("--seconds-per-iteration", type=float, nargs="+", default=[0.15, 0.4, 1.0])
    p.add_argument("--time-budgets", nargs="+", default=["3m", "10m"])
    p.add_argument("--iterations", type=int, default=100, help="iterations per epoch (a validation after each)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    raw, held_out = make_data(args)
    rows = []
    for budget in args.time_budgets:
        for target in args.seconds_per_iteration:
            rows.append(run(args, raw, held_out, target, budget))
            (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.n_train} training / {args.n_test} held-out whole-body phantoms at {args.pet_spacing} mm, gdfl "
          f"fold {args.fold}, `train --time-budget`, {os.cpu_count()} cores")
    print("| budget | target s/it | patch | estimated s/it | iterations | measured s/it (train wall / its) | "
          "held-out DSC | FPV ml | FNV ml | TP/FP/FN | F1 | load before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['target_s']:g} | {r['patch']} | {r['estimated_s']} | {r['iterations']} | "
              f"{r['train_s'] / max(r['iterations'], 1):.3f} | {r['dsc'] or 0:.3f} | {r['fpv_ml'] or 0:.2f} | "
              f"{r['fnv_ml'] or 0:.2f} | {r['tp']}/{r['fp']}/{r['fn']} | {r['f1']:.3f} | "
              f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
