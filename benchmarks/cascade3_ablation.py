#!/usr/bin/env python
"""Benchmark: ``cascade_3step`` beside ``gdfl`` on the same phantoms, and what its slice classifier buys (issue #13).

The same data as ``time_to_accuracy.py`` (``--n-train`` tiny training phantoms, ``--n-test`` held-out
ones from another seed, CPU plan with ``3d_fullres`` and ``2d_axial`` on one cache; made once in
``WORK/data``), fold ``--fold``:

1. ``cascade_3step``: the classifier, the detector and the ROI segmenter, each ``--<stage>-epochs`` x
   ``--<stage>-iterations`` with the paper's settings plus ``--set key=value`` (every stage) and
   ``--<stage>-set key=value`` (JSON values);
2. a second ROI segmenter with negative ROIs (``stage_settings`` ``negative_roi_share``
   ``--negative-roi-share``, default 0.25: that share of each batch boxes hot spots without lesion)
   trained the same way on a copy of the same classifier and detector (``--negative-roi-share 0``
   skips it);
3. ``gdfl`` (the demo's ``output_prior`` 0.01) for the cascade's training seconds (``train
   --time-budget``), or for ``--gdfl-epochs`` x ``--gdfl-iterations``;
4. the held-out phantoms predicted (``predict_folder``, best of ``--repeats`` for the timing) and
   scored (DSC, FPV, FNV, detection TP/FP/FN and F1) for: gdfl; the cascade (default); the cascade
   with the classifier bypassed (every slice with uptake goes to the detector: the same folds,
   ``bypass_classifier`` in the method's notes); the cascade with the negative-ROI segmenter;
5. the per-module figures of each stage's ``validation.json`` (the fold's validation cases):
   classifier AUC, threshold, sensitivity and specificity; detector mAP@0.5, box F1, lesion recall,
   thresholds; ROI 2D Dice; the whole cascade's 3D DSC, FPV, FNV and detection F1.

Training seconds are the sums of each run's ``training_log.csv`` epoch times; the machine's load
is not controlled (say so with the figures). Results also go to ``WORK/results.json``.

Example (the README's run)::

    python benchmarks/cascade3_ablation.py --work /tmp/c3_100 --n-train 100 --n-test 8 \\
        --classifier-epochs 2 --classifier-iterations 30 --classifier-set learning_rate=0.001 \\
        --classifier-set batch_size=16 --detector-epochs 6 --detector-iterations 50 \\
        --roi-segmenter-epochs 3 --roi-segmenter-iterations 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2s_ablation import predictor_variant, score, train_seconds  # noqa: E402  (scripts beside this one)
from time_to_accuracy import parse_overrides  # noqa: E402

STAGES = ("classifier", "detector", "roi_segmenter")


def module_figures(fold_dir: Path) -> dict:
    """The figures of each stage's validation.json (its best epoch)."""
    keys = {
        "classifier": ("epoch", "auc", "threshold", "sensitivity", "specificity", "n_slices", "n_lesion_slices"),
        "detector": ("epoch", "map50", "f1", "precision", "recall", "lesion_recall", "score_threshold", "nms_iou",
                     "box_error_std", "n_boxes"),
        "roi_segmenter": ("epoch", "roi_dice", "n_rois", "mean_dsc", "mean_fpv_ml", "mean_fnv_ml", "tp", "fp", "fn",
                          "detection_f1"),
    }
    out = {}
    for stage, names in keys.items():
        path = fold_dir / stage / "validation.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        out[stage] = {k: raw.get(k) for k in names}
    return out


def mean_column(pred_dir: Path, column: str) -> float | None:
    import csv

    path = pred_dir / "predictions.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column) not in (None, "", "nan")]
    return sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    from autopetseg.data.synthetic import synthesize_dataset
    from autopetseg.demo import DATASET, DemoSettings
    from autopetseg.models.methods import METHODS
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget
    from autopetseg.training.run import model_dir, run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("autopetseg_cascade3_ablation"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DemoSettings.n_train)
    p.add_argument("--n-test", type=int, default=DemoSettings.n_test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gdfl-epochs", type=int, help="default: train gdfl for the cascade's training seconds")
    p.add_argument("--gdfl-iterations", type=int, default=100)
    p.add_argument("--negative-roi-share", type=float, default=0.25,
                   help="also train an ROI segmenter with this share of negative ROIs (0: skip it)")
    for stage, epochs, iterations in (("classifier", 3, 40), ("detector", 3, 60), ("roi-segmenter", 3, 60)):
        p.add_argument(f"--{stage}-epochs", type=int, default=epochs)
        p.add_argument(f"--{stage}-iterations", type=int, default=iterations)
        p.add_argument(f"--{stage}-set", dest=f"{stage.replace('-', '_')}_overrides", action="append", default=[],
                       metavar="KEY=VALUE", help=f"TrainerConfig field for the {stage} only (JSON value)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainerConfig field for every cascade stage (JSON value)")
    p.add_argument("--repeats", type=int, default=1, help="timed predictions per model (the best counts)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work, fold = args.work, args.fold
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    # 1. the shared data, as the demo makes it (a different seed for the held-out phantoms)
    raw, test_dir, prep = work / "data" / "raw" / DATASET, work / "data" / "held_out", work / "data" / "preprocessed"
    if not (raw / "synthetic_truth.json").is_file():
        synthesize_dataset(raw, args.n_train, "nnunet", args.seed, num_processes=2)
    if not (test_dir / "synthetic_truth.json").is_file():
        synthesize_dataset(test_dir, args.n_test, "flat", args.seed + 10_000, num_processes=2)
    plan_and_preprocess(raw, configurations=("3d_fullres", "2d_axial"), budget=ComputeBudget(device="cpu"),
                        num_processes=2, preprocessed_root=prep)

    # 2. the cascade, stage by stage (a second run in the same WORK resumes each stage for more epochs)
    results = work / "results"
    cascade = METHODS["cascade_3step"]
    cascade_dir = model_dir(results, DATASET, cascade)
    common = dict(preprocessed_root=prep, device="cpu", seed=args.seed)
    stage_settings = {}
    for stage in STAGES:
        epochs, iterations = getattr(args, f"{stage}_epochs"), getattr(args, f"{stage}_iterations")
        settings = stage_settings[stage] = {**parse_overrides(args.overrides),
                                            **parse_overrides(getattr(args, f"{stage}_overrides"))}
        run_training(DATASET, fold, cascade, stage=stage, epochs=epochs, iterations_per_epoch=iterations,
                     results_root=results, continue_training=True, **common, **settings)
        seconds[f"{stage}_train"] = train_seconds(cascade_dir / f"fold_{fold}" / stage)
    cascade_train_s = sum(seconds[f"{s}_train"] for s in STAGES)

    # 3. an ROI segmenter with negative ROIs on the same classifier and detector
    negative_rois = work / f"results_negative_rois_{args.negative_roi_share:g}"
    negative_dir = model_dir(negative_rois, DATASET, cascade)
    negatives = args.negative_roi_share > 0
    if negatives and not (negative_dir / f"fold_{fold}" / "roi_segmenter" / "checkpoint_final.pt").is_file():
        for stage in STAGES[:2]:
            shutil.copytree(cascade_dir / f"fold_{fold}" / stage, negative_dir / f"fold_{fold}" / stage, dirs_exist_ok=True)
        for name in ("plans.json", "dataset.json", "method.json"):
            if (cascade_dir / name).is_file():
                shutil.copy2(cascade_dir / name, negative_dir / name)
        settings = dict(stage_settings["roi_segmenter"])
        settings["stage_settings"] = {**settings.get("stage_settings", {}),
                                      "negative_roi_share": args.negative_roi_share}
        run_training(DATASET, fold, cascade, stage="roi_segmenter", epochs=args.roi_segmenter_epochs,
                     iterations_per_epoch=args.roi_segmenter_iterations, results_root=negative_rois, overwrite=True,
                     **common, **settings)

    # 4. gdfl for the cascade's training time (validation included), or for --gdfl-epochs
    gdfl_results = work / "gdfl" / "results"
    gdfl_model = model_dir(gdfl_results, DATASET, METHODS["gdfl"])
    if not (gdfl_model / f"fold_{fold}" / "checkpoint_final.pt").is_file():
        budget = cascade_train_s if args.gdfl_epochs is None else None
        run_training(DATASET, fold, "gdfl", epochs=args.gdfl_epochs or 1000, iterations_per_epoch=args.gdfl_iterations,
                     results_root=gdfl_results, time_budget_s=budget, output_prior=0.01, **common)
    seconds["gdfl_train"] = train_seconds(gdfl_model / f"fold_{fold}")

    # 5. predict and score the held-out phantoms
    out = work / "scores"
    rows = [
        ("gdfl", predictor_variant(gdfl_model, fold), args.repeats),
        ("cascade_3step (default)", predictor_variant(cascade_dir, fold), args.repeats),
        ("cascade_3step, classifier bypassed", predictor_variant(cascade_dir, fold, {"bypass_classifier": True}),
         args.repeats),
    ]
    if negatives:
        rows.append((f"cascade_3step, ROI segmenter with negative ROIs ({args.negative_roi_share:g})",
                     predictor_variant(negative_dir, fold), args.repeats))
    table = []
    for i, (name, predictor, repeats) in enumerate(rows):
        row = {"row": name, **score(predictor, test_dir, out / f"row_{i}", repeats)}
        row["predict_s_per_case"] = row["predict_s"] / max(args.n_test, 1)
        for column in ("cascade_slices_kept", "cascade_boxes"):
            row[column] = mean_column(out / f"row_{i}" / "pred", column)
        table.append(row)
    figures = module_figures(cascade_dir / f"fold_{fold}")
    seconds["total"] = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "seconds": seconds, "rows": table, "modules": figures}, indent=1))

    print(f"\n{args.n_train} training / {args.n_test} held-out tiny phantoms, fold {fold}, CPU, {os.cpu_count()} cores "
          f"(load average at the end {os.getloadavg()}); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    gdfl_its = json.loads((gdfl_model / f"fold_{fold}" / "config.json").read_text()).get("time_budget", {}).get(
        "achieved_iterations", (args.gdfl_epochs or 0) * args.gdfl_iterations)
    print(f"training: gdfl {gdfl_its} it {seconds['gdfl_train']:.0f} s; "
          + "; ".join(f"{s} {getattr(args, f'{s}_epochs')} x {getattr(args, f'{s}_iterations')} it "
                      f"{seconds[f'{s}_train']:.0f} s" for s in STAGES)
          + f"; whole run {seconds['total']:.0f} s")
    print("| model | held-out DSC | FPV ml | FNV ml | TP / FP / FN | F1 | predict s per case | slices kept | boxes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        kept = "" if r["cascade_slices_kept"] is None else f"{r['cascade_slices_kept']:.1f}"
        boxes = "" if r["cascade_boxes"] is None else f"{r['cascade_boxes']:.1f}"
        print(f"| {r['row']} | {r['dsc'] or 0:.3f} | {r['fpv_ml'] or 0:.2f} | {r['fnv_ml'] or 0:.2f} | "
              f"{r['tp']} / {r['fp']} / {r['fn']} | {r['f1']:.3f} | {r['predict_s_per_case']:.2f} | {kept} | {boxes} |")
    gdfl_s, cascade_s = table[0]["predict_s"], table[1]["predict_s"]
    print(f"predict time per case: gdfl {gdfl_s / args.n_test:.2f} s, cascade {cascade_s / args.n_test:.2f} s "
          f"({cascade_s / gdfl_s:.2f}x)")
    print("per module (validation cases of the fold, best epoch):")
    for stage, values in figures.items():
        print(f"  {stage}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
