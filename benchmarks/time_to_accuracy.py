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

Examples::

    # issue 3, item 9: one GDFL fold on the CPU budget, 2 cores
    python benchmarks/time_to_accuracy.py --trainers gdfl --work /tmp/tta --n-train 100 --epochs 50 --iterations 100
    # issue 5: the L1DFL paper's trainers and GDFL side by side, one network, papers' initialisation
    python benchmarks/time_to_accuracy.py --trainers gdfl l1dfl dice dicefocal --work /tmp/tta \
        --n-train 100 --epochs 50 --iterations 100 --set network=resunet --set output_prior=null
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    rows = []
    for trainer in args.trainers:
        overrides = DemoSettings(trainer=trainer).resolved_training_overrides()
        overrides.update(parse_overrides(args.overrides))
        run_dir = args.work / trainer
        link_shared_data(args.work / "data", run_dir)
        settings = DemoSettings(n_train=args.n_train, n_test=args.n_test, folds=(args.fold,), epochs=args.epochs,
                                iterations_per_epoch=args.iterations, trainer=trainer, seed=args.seed,
                                training_overrides=overrides)
        start = time.perf_counter()
        result = run_demo(run_dir, settings)
        total = time.perf_counter() - start
        validation = json.loads((result.model_dir / f"fold_{args.fold}" / "validation.json").read_text())
        config = json.loads((result.model_dir / f"fold_{args.fold}" / "config.json").read_text())
        s = result.summary
        tp, fp, fn = (s.get(f"total_{k}", 0) for k in ("tp", "fp", "fn"))
        rows.append({
            "trainer": trainer, "overrides": overrides, "network": config["config"]["network"], "train_s": result.seconds.get(f"train fold {args.fold}"),
            "total_s": total, "best_val_dsc": validation.get("mean_dsc"), "best_epoch": validation.get("epoch"),
            "dsc": s.get("mean_dsc"), "fpv_ml": s.get("mean_fpv_ml"), "fnv_ml": s.get("mean_fnv_ml"),
            "tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn),
        })
        (args.work / "results.json").write_text(json.dumps({"args": {**vars(args), "work": str(args.work)},
                                                           "rows": rows}, indent=1))

    print(f"\n{args.n_train} training / {args.n_test} held-out tiny phantoms, fold {args.fold}, "
          f"{args.epochs} x {args.iterations} iterations, CPU, {os.cpu_count()} cores")
    print("| trainer | network | overrides | train s | total s | best val DSC (epoch) | held-out DSC | FPV ml | FNV ml | TP/FP/FN | F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['network']} | {r['overrides']} | {r['train_s'] or 0:.0f} | {r['total_s']:.0f} | "
              f"{r['best_val_dsc'] or 0:.3f} ({r['best_epoch']}) | {r['dsc'] or 0:.3f} | {r['fpv_ml'] or 0:.2f} | "
              f"{r['fnv_ml'] or 0:.2f} | {r['tp']}/{r['fp']}/{r['fn']} | {r['f1']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
