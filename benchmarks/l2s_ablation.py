#!/usr/bin/env python
"""Benchmark: ``cascade_l2s`` beside ``gdfl``, and the L2SNet paper's Table 1 ablation on our data (issue #12).

The same data as ``time_to_accuracy.py`` (``--n-train`` tiny training phantoms, ``--n-test``
held-out ones from another seed, CPU plan; made once in ``WORK/data``), fold ``--fold``:

1. ``gdfl``: the demo pipeline with one fold (``autopetseg.demo.run_demo``), ``--gdfl-epochs`` x
   ``--gdfl-iterations``, the demo's ``output_prior`` 0.01;
2. ``cascade_l2s``: the ``2d_coronal`` configuration is added to the plans (same cache), the
   localizer trained for ``--localizer-epochs`` x ``--localizer-iterations``, then the segmenter
   (after the localizer's in-fold cue is written) for ``--segmenter-epochs`` x ``--segmenter-iterations``;
3. the segmenter without the cue weight (``loss.cue_weight`` false), same budget, same localizer
   (copied), in a model folder of its own (``cascade_l2s_nocue``).

Every L2S stage gets its trainer's defaults (the paper's SGD 1e-3 with per-epoch poly decay, the
1% output prior, on a CPU plan the segmenter's patch cut to the plan network's cost per iteration:
``CpuPatchRule``) plus ``--set key=value`` (JSON values); ``--segmenter-set key=value`` applies to
the segmenters only (after ``--set``). Training seconds are the sums of the runs' ``training_log.csv``
epoch times, so a resumed run reports what its epochs took. Then the held-out phantoms are
predicted and scored (DSC, FPV, FNV, detection TP/FP/FN and F1) for: gdfl; the localizer alone
(threshold 0.5); the segmenter without the cue weight at 0.5 (the paper's "3D U-Net") and with
the adaptive threshold; the cascade at 0.5 ("L2SNet") and with the adaptive threshold ("+
post-process", the method's default); the cascade with the component rules on as well. The
variants are the same trained folds predicted with other combine settings (``method.notes``), not
retrained.

Prediction time: ``autopetseg predict`` (``predict_folder``, no pictures) of the held-out cases,
best of ``--repeats``, for gdfl, the segmenter alone (a one-stage 3D model: the cascade's own 3D
network without the 2D pass, the fair reference) and the cascade; the ratios cascade / segmenter
alone and cascade / gdfl are printed (issue: at most 1.3x).

Example (the README's table; the localizer and the segmenter cost about what gdfl costs per
iteration on the CPU plan, so 1,500 + 1,500 iterations are gdfl's 3,000)::

    python benchmarks/l2s_ablation.py --work /tmp/l2s_bench --n-train 100 --n-test 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import link_shared_data, parse_overrides  # noqa: E402  (a script beside this one)

PLAIN = {"adaptive_threshold": {"low": 0.5, "high": 0.5}}
COMPONENTS = {"components": {"enabled": True, "cueless_to_one_voxel": True, "min_voxels": 3}}


def predictor_variant(model_dir: Path, fold: int, notes: dict | None = None, stages: str = "all"):
    """A predictor of ``model_dir`` with other combine settings (``notes``) or one stage alone."""
    from autopetseg.inference.combine import get_combiner
    from autopetseg.inference.predictor import Predictor, PredictorSettings
    from autopetseg.models.methods import MethodSpec

    predictor = Predictor(model_dir, PredictorSettings(folds=[fold], device="cpu", overwrite=True))
    model, method = predictor.model, predictor.model.method
    if stages != "all":  # one stage as a one-stage model, thresholded at its own threshold
        kept = [s for s in model.stages if s.stage.name == stages]
        spec = MethodSpec(f"{method.name}_{stages}", tuple(dataclasses.replace(s.stage, inputs=()) for s in kept))
        predictor.model = dataclasses.replace(model, method=spec, stages=kept)
    elif notes is not None:
        predictor.model = dataclasses.replace(model, method=dataclasses.replace(method, notes={**method.notes, **notes}))
    predictor.combine = get_combiner(predictor.model.method.combine)
    return predictor


def gdfl_patch(model_dir: Path, fold: int):
    return json.loads((model_dir / f"fold_{fold}" / "config.json").read_text()).get("patch_size")


def train_seconds(folder: Path) -> float:
    """Sum of the epoch times in a stage's ``training_log.csv`` (training and validation)."""
    import csv

    with open(folder / "training_log.csv", newline="") as f:
        return sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))


def score(predictor, test_dir: Path, out: Path, repeats: int = 1) -> dict:
    from autopetseg.evaluation.evaluate import evaluate_folder
    from autopetseg.scoring.metrics import f1_score

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_folder(test_dir, out / "pred")
        seconds.append(time.perf_counter() - start)
    _, s = evaluate_folder(out / "pred", test_dir, out / "eval")
    tp, fp, fn = (s.get(f"total_{k}", 0) for k in ("tp", "fp", "fn"))
    return {"dsc": s.get("mean_dsc"), "fpv_ml": s.get("mean_fpv_ml"), "fnv_ml": s.get("mean_fnv_ml"),
            "tp": tp, "fp": fp, "fn": fn, "f1": f1_score(tp, fp, fn), "predict_s": min(seconds)}


def main(argv: list[str] | None = None) -> int:
    from autopetseg.demo import DATASET, DemoSettings, run_demo
    from autopetseg.models.methods import METHODS
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget
    from autopetseg.training.run import model_dir, run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("autopetseg_l2s_ablation"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DemoSettings.n_train)
    p.add_argument("--n-test", type=int, default=DemoSettings.n_test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gdfl-epochs", type=int, default=30)
    p.add_argument("--gdfl-iterations", type=int, default=100)
    p.add_argument("--localizer-epochs", type=int, default=15)
    p.add_argument("--localizer-iterations", type=int, default=100)
    p.add_argument("--segmenter-epochs", type=int, default=15)
    p.add_argument("--segmenter-iterations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="timed predictions per model (the best counts)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainerConfig field for both L2S stages (JSON value)")
    p.add_argument("--segmenter-set", dest="segmenter_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainerConfig field for the L2S segmenters only (JSON value)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work, fold = args.work, args.fold
    seconds: dict[str, float] = {}

    # 1. gdfl, and the shared data (synthesised and cached by the demo pipeline)
    gdfl_dir = work / "gdfl"
    link_shared_data(work / "data", gdfl_dir)
    start = time.perf_counter()
    gdfl = run_demo(gdfl_dir, DemoSettings(n_train=args.n_train, n_test=args.n_test, folds=(fold,), seed=args.seed,
                                           epochs=args.gdfl_epochs, iterations_per_epoch=args.gdfl_iterations,
                                           time_budget_s=None))  # fixed iterations, whatever the machine's load
    seconds["gdfl_total"] = time.perf_counter() - start
    seconds["gdfl_train"] = train_seconds(gdfl.model_dir / f"fold_{fold}")
    raw, test_dir, prep = work / "data" / "raw" / DATASET, work / "data" / "held_out", work / "data" / "preprocessed"
    results = work / "results"

    # 2. the cascade
    plan_and_preprocess(raw, configurations=("3d_fullres", "2d_coronal"), budget=ComputeBudget(device="cpu"),
                        num_processes=2, preprocessed_root=prep)
    overrides = parse_overrides(args.overrides)
    segmenter_overrides = parse_overrides(args.segmenter_overrides)
    common = dict(preprocessed_root=prep, results_root=results, device="cpu", seed=args.seed, continue_training=True)
    budgets = {"localizer": (args.localizer_epochs, args.localizer_iterations, overrides),
               "segmenter": (args.segmenter_epochs, args.segmenter_iterations, {**overrides, **segmenter_overrides})}
    cascade = METHODS["cascade_l2s"]
    cascade_dir = model_dir(results, DATASET, cascade)
    for stage, (epochs, iterations, settings) in budgets.items():
        run_training(DATASET, fold, cascade, stage=stage, epochs=epochs, iterations_per_epoch=iterations, **common,
                     **settings)
        seconds[f"l2s_{stage}_train"] = train_seconds(cascade_dir / f"fold_{fold}" / stage)

    # 3. the segmenter without the cue weight, on the same localizer
    nocue = dataclasses.replace(cascade, name="cascade_l2s_nocue")
    nocue_dir = model_dir(results, DATASET, nocue)
    localizer = nocue_dir / f"fold_{fold}" / "localizer"
    if not localizer.exists():
        shutil.copytree(cascade_dir / f"fold_{fold}" / "localizer", localizer)
    from autopetseg.training.l2s import L2SSegmenterTrainer

    loss = {**L2SSegmenterTrainer.config_defaults["loss"], "cue_weight": False}
    run_training(DATASET, fold, nocue, stage="segmenter", epochs=args.segmenter_epochs,
                 iterations_per_epoch=args.segmenter_iterations, **common, **{**budgets["segmenter"][2], "loss": loss})
    seconds["l2s_nocue_segmenter_train"] = train_seconds(nocue_dir / f"fold_{fold}" / "segmenter")

    # 4. predict and score the held-out phantoms
    out = work / "scores"
    rows = [
        ("gdfl", predictor_variant(gdfl.model_dir, fold), args.repeats),
        ("localizer alone (threshold 0.5)", predictor_variant(cascade_dir, fold, stages="localizer"), 1),
        ("segmenter without cue weight, 0.5 (paper: 3D U-Net)", predictor_variant(nocue_dir, fold, PLAIN), 1),
        ("segmenter without cue weight, adaptive threshold", predictor_variant(nocue_dir, fold), 1),
        # The cascade at 0.5 is the cue-weighted segmenter alone (the cue only weights the loss):
        # predicted as a one-stage 3D model, it is also the timing reference for the 2D pass.
        ("cascade at 0.5 = cue-weighted segmenter alone (paper: L2SNet)",
         predictor_variant(cascade_dir, fold, stages="segmenter"), args.repeats),
        ("cascade, adaptive threshold (default; paper: + post-process)", predictor_variant(cascade_dir, fold),
         args.repeats),
        ("cascade, adaptive threshold + component rules", predictor_variant(cascade_dir, fold, COMPONENTS), 1),
    ]
    table = []
    for i, (name, predictor, repeats) in enumerate(rows):
        table.append({"row": name, **score(predictor, test_dir, out / f"row_{i}", repeats)})
        (work / "results.json").write_text(json.dumps({"args": {**vars(args), "work": str(work)}, "seconds": seconds,
                                                       "rows": table}, indent=1))

    def val(path: Path):
        v = json.loads((path / "validation.json").read_text())
        return f"{v.get('mean_dsc') or 0:.3f} ({v.get('epoch')})"

    print(f"\n{args.n_train} training / {args.n_test} held-out tiny phantoms, fold {fold}, CPU, {os.cpu_count()} cores")
    print(f"training: gdfl {args.gdfl_epochs} x {args.gdfl_iterations} it {seconds['gdfl_train']:.0f} s; localizer "
          f"{args.localizer_epochs} x {args.localizer_iterations} it {seconds['l2s_localizer_train']:.0f} s + segmenter "
          f"{args.segmenter_epochs} x {args.segmenter_iterations} it {seconds['l2s_segmenter_train']:.0f} s; "
          f"segmenter without cue weight {seconds['l2s_nocue_segmenter_train']:.0f} s")
    patches = {stage: json.loads((cascade_dir / f"fold_{fold}" / stage / "config.json").read_text()).get("patch_size")
               for stage in ("localizer", "segmenter")}
    print(f"patches: gdfl {gdfl_patch(gdfl.model_dir, fold)}, localizer {patches['localizer']}, "
          f"segmenter {patches['segmenter']}")
    print(f"best validation DSC (epoch): gdfl {val(gdfl.model_dir / f'fold_{fold}')}, localizer "
          f"{val(cascade_dir / f'fold_{fold}' / 'localizer')}, segmenter {val(cascade_dir / f'fold_{fold}' / 'segmenter')}, "
          f"segmenter without cue weight {val(nocue_dir / f'fold_{fold}' / 'segmenter')}")
    print("| model | held-out DSC | FPV ml | FNV ml | TP / FP / FN | F1 | predict s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['row']} | {r['dsc'] or 0:.3f} | {r['fpv_ml'] or 0:.2f} | {r['fnv_ml'] or 0:.2f} | "
              f"{r['tp']} / {r['fp']} / {r['fn']} | {r['f1']:.3f} | {r['predict_s']:.1f} |")
    gdfl_s, segmenter_s, cascade_s = (table[i]["predict_s"] for i in (0, 4, 5))
    print(f"predict time of the {args.n_test} held-out cases (best of {args.repeats}): gdfl {gdfl_s:.1f} s, segmenter "
          f"alone {segmenter_s:.1f} s, cascade {cascade_s:.1f} s; cascade / segmenter alone {cascade_s / segmenter_s:.2f}x, "
          f"cascade / gdfl {cascade_s / gdfl_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
