#!/usr/bin/env python
"""Benchmark: time to accuracy on the CPU, and trainers side by side (issues #3 item 9 and #5).

For each trainer in ``--trainers``: the demo pipeline with ONE fold (``autopetseg.demo.run_demo``)
on the same data: ``--n-train`` tiny phantoms for training (seed ``--seed``), ``--n-test`` held-out
phantoms (another seed, never seen in training), CPU plan, preprocessing, ``fold`` trained for
``--epochs`` x ``--iterations``, the held-out phantoms predicted with that fold alone and scored
with the autoPET metrics and the lesion detection rule. The data and the cache are made once in
``WORK/data`` and shared, so every trainer sees exactly the same patches' sources and test cases.

Prints a markdown table: training wall time, total wall time, best validation DSC (the fold's own
validation cases) and the held-out DSC, FPV, FNV, detection TP/FP/FN and F1. Training settings
that differ from a trainer's defaults are the demo's (``output_prior`` 0.01, except for l1dfl) plus
``--set key=value`` (values parsed as JSON, ``null`` for None, e.g. ``--set output_prior=null
--set network=segresnet``), applied to every trainer.

``--time-budget 10m`` (issue 17, item 9) trains instead with the real ``autopetseg train ...
--time-budget 10m`` command in a subprocess, timed from the outside (python start to exit), on the
same data and cache (made here with the ``synth`` and ``plan_and_preprocess`` commands, as a user
would), then predicts and scores the held-out phantoms with the ``predict`` and ``evaluate``
commands. The epoch length is ``--iterations``; ``--epochs`` (if given) caps the schedule,
otherwise the trainer's default does. It prints the command's wall time against the budget (the
goal: within 5 %), the iterations the budget gave, the machine's load average before and after,
and the same accuracy columns. Only ``--set network=...`` and ``--set output_prior=...`` exist as
``train`` options; other ``--set`` keys are refused in this mode.

Examples::

    # issue 3, item 9: one GDFL fold on the CPU budget, 2 cores
    python benchmarks/time_to_accuracy.py --trainers gdfl --work /tmp/tta --n-train 100 --epochs 50 --iterations 100
    # issue 5: the L1DFL paper's trainers and GDFL side by side, one network, papers' initialisation
    python benchmarks/time_to_accuracy.py --trainers gdfl l1dfl dice dicefocal --work /tmp/tta \
        --n-train 100 --epochs 50 --iterations 100 --set network=resunet --set output_prior=null
    # issue 17, item 9: the same data, `train --time-budget 10m` instead of a fixed number of epochs
    python benchmarks/time_to_accuracy.py --trainers gdfl --work /tmp/tta --n-train 100 --iterations 100 \
        --time-budget 10m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

TRAIN_FLAGS = {"network": "--network", "output_prior": "--output-prior"}  # --set keys `train` has a flag for


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as segresnet
    return overrides


def link_shared_data(shared: Path, run_dir: Path) -> None:
    """Point a trainer's demo folder at the shared data so it is synthesised and cached once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("raw", "held_out", "preprocessed"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        link = run_dir / name
        if not link.exists():
            link.symlink_to((shared / name).resolve(), target_is_directory=True)


def _cli(*arguments) -> subprocess.CompletedProcess:
    """One ``autopetseg`` command, as a user runs it (its output goes to this script's)."""
    return subprocess.run([sys.executable, "-m", "autopetseg", *map(str, arguments)], check=True)


def run_with_time_budget(args, trainer: str, overrides: dict) -> dict:
    """The data and cache through the CLI, then ``train --time-budget`` timed from the outside, then
    ``predict`` and ``evaluate``; the row of the table."""
    from autopetseg.demo import DATASET
    from autopetseg.options import parse_duration
    from autopetseg.training.run import model_dir, resolve_method

    unknown = sorted(set(overrides) - set(TRAIN_FLAGS))
    if unknown:
        raise SystemExit(f"--time-budget runs the train command, which has no option for {unknown}")
    data = args.work / "data"
    raw, held_out, prep = data / "raw" / DATASET, data / "held_out", data / "preprocessed"
    if not (raw / "synthetic_truth.json").is_file():  # the same phantoms as run_demo makes
        _cli("synth", raw, "-n", args.n_train, "--layout", "nnunet", "--seed", args.seed, "-np", 2)
    if not (held_out / "synthetic_truth.json").is_file():
        _cli("synth", held_out, "-n", args.n_test, "--layout", "flat", "--seed", args.seed + 10_000, "-np", 2)
    _cli("plan_and_preprocess", "-d", raw, "--device", "cpu", "--preprocessed", prep, "-np", 2)

    run_dir = args.work / f"{trainer}_budget_{args.time_budget}"
    results, predictions, evaluation = run_dir / "results", run_dir / "predictions", run_dir / "evaluation"
    command = ["train", prep / DATASET, args.fold, "-tr", trainer, "--device", "cpu", "--preprocessed", prep,
               "--results", results, "--time-budget", args.time_budget, "--iterations", args.iterations,
               "--seed", args.seed, "--overwrite"]
    command += ["--epochs", args.epochs] if args.epochs_given else []
    for key, value in overrides.items():
        if value is not None:
            command += [TRAIN_FLAGS[key], value]
    load_before = os.getloadavg()
    start = time.perf_counter()
    _cli(*command)
    train_s = time.perf_counter() - start
    load_after = os.getloadavg()

    model = model_dir(results, DATASET, resolve_method(trainer))
    _cli("predict", "-i", held_out, "-o", predictions, "-m", model, "-f", args.fold, "--device", "cpu", "--overwrite")
    _cli("evaluate", "-p", predictions, "-g", held_out, "-o", evaluation)
    fold_dir = model / f"fold_{args.fold}"
    validation = json.loads((fold_dir / "validation.json").read_text())
    config = json.loads((fold_dir / "config.json").read_text())
    return {"trainer": trainer, "overrides": overrides, "network": config["config"]["network"], "train_s": train_s,
            "budget_s": parse_duration(args.time_budget), "iterations": config["time_budget"]["achieved_iterations"],
            "load_before": load_before, "load_after": load_after, "total_s": train_s,
            "best_val_dsc": validation.get("mean_dsc"), "best_epoch": validation.get("epoch"),
            "summary": json.loads((evaluation / "summary.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    from autopetseg.demo import DemoSettings, run_demo
    from autopetseg.scoring.metrics import f1_score

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("autopetseg_time_to_accuracy"))
    p.add_argument("--trainers", nargs="+", default=["gdfl"])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DemoSettings.n_train)
    p.add_argument("--n-test", type=int, default=DemoSettings.n_test)
    p.add_argument("--epochs", type=int, default=DemoSettings.epochs)
    p.add_argument("--iterations", type=int, default=DemoSettings.iterations_per_epoch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainerConfig field for every trainer (JSON value); default: the demo's")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="train with `autopetseg train --time-budget DURATION` (e.g. 10m) instead of fixed epochs")
    args = p.parse_args(argv)
    args.epochs_given = any(a == "--epochs" or a.startswith("--epochs=") for a in (argv or sys.argv[1:]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    rows = []
    for trainer in args.trainers:
        overrides = DemoSettings(trainer=trainer).resolved_training_overrides()
        overrides.update(parse_overrides(args.overrides))
        if args.time_budget:
            row = run_with_time_budget(args, trainer, overrides)
        else:
            run_dir = args.work / trainer
            link_shared_data(args.work / "data", run_dir)
            settings = DemoSettings(n_train=args.n_train, n_test=args.n_test, folds=(args.fold,), epochs=args.epochs,
                                    iterations_per_epoch=args.iterations, trainer=trainer, seed=args.seed,
                                    training_overrides=overrides, time_budget_s=None)
            start = time.perf_counter()
            result = run_demo(run_dir, settings)
            total = time.perf_counter() - start
            validation = json.loads((result.model_dir / f"fold_{args.fold}" / "validation.json").read_text())
            config = json.loads((result.model_dir / f"fold_{args.fold}" / "config.json").read_text())
            row = {"trainer": trainer, "overrides": overrides, "network": config["config"]["network"],
                   "train_s": result.seconds.get(f"train fold {args.fold}"), "total_s": total,
                   "best_val_dsc": validation.get("mean_dsc"), "best_epoch": validation.get("epoch"),
                   "summary": result.summary}
        s = row.pop("summary")
        tp, fp, fn = (s.get(f"total_{k}", 0) for k in ("tp", "fp", "fn"))
        rows.append({**row, "dsc": s.get("mean_dsc"), "fpv_ml": s.get("mean_fpv_ml"), "fnv_ml": s.get("mean_fnv_ml"),
                     "tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn)})
        (args.work / "results.json").write_text(json.dumps({"args": {**vars(args), "work": str(args.work)},
                                                           "rows": rows}, indent=1))

    length = (f"train --time-budget {args.time_budget}, {args.iterations} iterations per epoch" if args.time_budget
              else f"{args.epochs} x {args.iterations} iterations")
    print(f"\n{args.n_train} training / {args.n_test} held-out tiny phantoms, fold {args.fold}, {length}, CPU, "
          f"{os.cpu_count()} cores")
    for r in rows:
        if "budget_s" in r:
            off = r["train_s"] / r["budget_s"] - 1
            print(f"{r['trainer']}: the train command took {r['train_s']:.1f} s for a budget of {r['budget_s']:.0f} s "
                  f"({off:+.1%}, {'within' if abs(off) <= 0.05 else 'NOT within'} 5 %), {r['iterations']} iterations; "
                  f"load average (1, 5, 15 min) before {r['load_before']}, after {r['load_after']}")
    print("| trainer | network | overrides | train s | total s | best val DSC (epoch) | held-out DSC | FPV ml | FNV ml | TP/FP/FN | F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['network']} | {r['overrides']} | {r['train_s'] or 0:.0f} | {r['total_s']:.0f} | "
              f"{r['best_val_dsc'] or 0:.3f} ({r['best_epoch']}) | {r['dsc'] or 0:.3f} | {r['fpv_ml'] or 0:.2f} | "
              f"{r['fnv_ml'] or 0:.2f} | {r['tp']}/{r['fp']}/{r['fn']} | {r['f1']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
