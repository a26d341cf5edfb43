#!/usr/bin/env python
"""Benchmark: ``multitask`` and Liu et al.'s ablation on our data (issue #14).

Data (made once in ``WORK/data``): ``--n-train`` tiny training phantoms (seed ``--seed``) and
``--n-test`` held-out ones (another seed, never trained on); the generator's ``prognosis`` label
in ``clinical.csv`` has log-odds rising with the tumour burden plus noise
(``data.synthetic.prognosis_labels``). Both configurations are planned for the CPU
(``3d_fullres`` for gdfl, ``3d_wholebody`` for the multitask arms) and preprocessed.

Arms, fold ``--fold`` each, a fixed number of iterations (so the accuracy does not depend on the
machine's load):

1. ``multitask``: λ = 0.1, heads fused 0.1/0.2/0.7 (the paper); ``--mt-epochs`` × ``--mt-iterations``;
2. segmentation only: the same network without heads, λ = 1, checkpoint by DSC (Table 4, model A);
3. classification only: λ = 0, checkpoint by AUC (the heads on the untrained-for-segmentation U-Net);
4. ``gdfl`` (``--gdfl-epochs`` × ``--gdfl-iterations``, the demo's ``output_prior`` 0.01), and the
   TMTV baseline: its masks' TMTV as the score of each held-out case, the label at the Youden
   threshold of the TMTV on the fold's own validation cases (predicted by the same model);
5. for scale, the ground-truth TMTV as the score (threshold from the training cases): the best a
   burden-only predictor can do under the generator's label noise.

The multitask arms train on the label-stratified folds (``splits_prognosis.json``), gdfl on
``splits.json``; every arm is scored on the same held-out phantoms: DSC (lesion-positive cases),
AUC with its 95 % bootstrap interval, accuracy, sensitivity and specificity at each arm's own
operating point (multitask: the fold's validation Youden threshold, written as
``prognosis_label`` by ``predict``). ``--set key=value`` (JSON) changes a trainer setting of every
multitask arm (e.g. ``--set learning_rate=0.001``). Runs resume: a finished arm is not trained
again. Prints a markdown table and writes ``WORK/results.json``.

Example (the README's table; one thread per process is much faster than two on a shared 2-core machine)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/multitask_ablation.py --work /tmp/mt_bench2 \
        --mt-epochs 12 --mt-iterations 25 --gdfl-epochs 8 --gdfl-iterations 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2s_ablation import train_seconds  # noqa: E402  (a script beside this one)
from time_to_accuracy import parse_overrides  # noqa: E402

DATASET = "Dataset001_Phantoms"


def ablation_arms(overrides: dict) -> list[tuple[str, object, dict]]:
    """(row name, method, trainer settings) of the three multitask arms."""
    from autopetseg.models.methods import METHODS
    from autopetseg.training.multitask import MultitaskSettings

    base = METHODS["multitask"]

    def settings(**changes) -> dict:
        return {**overrides, "method_settings": MultitaskSettings(**changes).to_dict()}

    return [
        ("multitask (λ = 0.1, paper)", base, settings()),
        ("segmentation only (λ = 1, no heads)", dataclasses.replace(base, name="multitask_seg_only"),
         settings(heads=False, segmentation_weight=1.0, selection="dsc")),
        ("classification only (λ = 0)", dataclasses.replace(base, name="multitask_cls_only"),
         settings(segmentation_weight=0.0, selection="auc")),
    ]


def held_out_labels(test_dir: Path) -> dict[str, int]:
    from autopetseg.data.discovery import discover

    return {r.case_id: int(r.clinical["prognosis"]) for r in discover(test_dir).cases}


def score_prognosis(scores: dict[str, float], predicted: dict[str, int], labels: dict[str, int], seed: int) -> dict:
    from autopetseg.scoring.prognosis import prognosis_report

    ids = sorted(labels)
    return prognosis_report([scores[c] for c in ids], [predicted[c] for c in ids], [labels[c] for c in ids],
                            n_resamples=2000, seed=seed)


def tmtv_baseline(gdfl_dir: Path, raw: Path, prep: Path, fold: int, pred_dir: Path, labels: dict[str, int],
                  seed: int) -> dict:
    """The gdfl masks' TMTV as the prognosis score; threshold: Youden on the fold's validation cases."""
    import csv

    from autopetseg.data.discovery import discover
    from autopetseg.inference.predictor import Predictor, PredictorSettings
    from autopetseg.scoring.prognosis import youden_threshold
    from autopetseg.training.splits import fold_cases

    val_ids = set(fold_cases(json.loads((prep / DATASET / "splits.json").read_text()), fold)[1])
    predictor = Predictor(gdfl_dir, PredictorSettings(folds=[fold], device="cpu"))
    records = [r for r in discover(raw).cases if r.case_id in val_ids]
    val_tmtv = [predictor.predict_case(r).numbers["tmtv_ml"] for r in records]
    threshold = youden_threshold(val_tmtv, [int(r.clinical["prognosis"]) for r in records])
    with open(pred_dir / "predictions.csv", newline="") as f:
        tmtv = {row["case_id"]: float(row["tmtv_ml"]) for row in csv.DictReader(f)}
    report = score_prognosis(tmtv, {c: int(v >= threshold) for c, v in tmtv.items()}, labels, seed)
    return {**report, "threshold_ml": threshold}


def true_tmtv_baseline(raw: Path, test_dir: Path, labels: dict[str, int], seed: int) -> dict:
    """The ground-truth TMTV as the score (threshold: Youden on the training phantoms' TMTV)."""
    from autopetseg.scoring.prognosis import youden_threshold

    def truth(folder: Path) -> dict[str, float]:
        return {c["case_id"]: c["tmtv_ml"] for c in json.loads((folder / "synthetic_truth.json").read_text())["cases"]}

    train = truth(raw)
    train_labels = {r: int(v) for r, v in held_out_labels(raw).items()}
    threshold = youden_threshold([train[c] for c in sorted(train_labels)], [train_labels[c] for c in sorted(train_labels)])
    test = truth(test_dir)
    return {**score_prognosis(test, {c: int(v >= threshold) for c, v in test.items()}, labels, seed),
            "threshold_ml": threshold}


def main(argv: list[str] | None = None) -> int:
    from autopetseg.data.synthetic import synthesize_dataset
    from autopetseg.evaluation.evaluate import evaluate_folder
    from autopetseg.inference.predictor import Predictor, PredictorSettings
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget
    from autopetseg.training.run import model_dir, resolve_method, run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("autopetseg_multitask_ablation"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mt-epochs", type=int, default=12)
    p.add_argument("--mt-iterations", type=int, default=25)
    p.add_argument("--gdfl-epochs", type=int, default=8)
    p.add_argument("--gdfl-iterations", type=int, default=100)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainerConfig field for every multitask arm (JSON value)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work, fold = args.work, args.fold
    raw, test_dir, prep = work / "data" / "raw" / DATASET, work / "data" / "held_out", work / "data" / "preprocessed"
    results = work / "results"
    started = time.perf_counter()

    if not (raw / "synthetic_truth.json").is_file():
        synthesize_dataset(raw, args.n_train, "nnunet", args.seed, num_processes=2)
    if not (test_dir / "synthetic_truth.json").is_file():
        synthesize_dataset(test_dir, args.n_test, "flat", args.seed + 10_000, num_processes=2)
    plan_and_preprocess(raw, configurations=("3d_fullres", "3d_wholebody"), budget=ComputeBudget(device="cpu"),
                        num_processes=2, preprocessed_root=prep)
    labels = held_out_labels(test_dir)
    common = dict(preprocessed_root=prep, results_root=results, device="cpu", seed=args.seed)

    def train(method, epochs: int, iterations: int, **settings) -> Path:
        folder = model_dir(results, DATASET, resolve_method(method))
        done = (folder / f"fold_{fold}" / "checkpoint_final.pt").is_file()
        if not done:
            resume = (folder / f"fold_{fold}" / "checkpoint_latest.pt").is_file()
            run_training(DATASET, fold, method, epochs=epochs, iterations_per_epoch=iterations,
                         continue_training=resume, **common, **settings)
        return folder

    rows = []
    overrides = parse_overrides(args.overrides)
    for name, method, settings in ablation_arms(overrides):
        folder = train(method, args.mt_epochs, args.mt_iterations, **settings)
        pred, out = work / "pred" / method.name, work / "eval" / method.name
        Predictor(folder, PredictorSettings(folds=[fold], device="cpu")).predict_folder(test_dir, pred)
        _, summary = evaluate_folder(pred, test_dir, out)
        validation = json.loads((folder / f"fold_{fold}" / "validation.json").read_text())
        rows.append({"row": name, "iterations": args.mt_epochs * args.mt_iterations, "dsc": summary["mean_dsc"],
                     "train_s": train_seconds(folder / f"fold_{fold}"), "prognosis": summary.get("prognosis"),
                     "validation": {k: validation.get(k) for k in ("epoch", "mean_dsc", "auc", "youden_threshold")}})
    gdfl_dir = train("gdfl", args.gdfl_epochs, args.gdfl_iterations, output_prior=0.01)
    pred = work / "pred" / "gdfl"
    Predictor(gdfl_dir, PredictorSettings(folds=[fold], device="cpu")).predict_folder(test_dir, pred)
    _, summary = evaluate_folder(pred, test_dir, work / "eval" / "gdfl")
    rows.append({"row": "TMTV of gdfl masks (threshold: Youden on its validation cases)",
                 "iterations": args.gdfl_epochs * args.gdfl_iterations, "dsc": summary["mean_dsc"],
                 "train_s": train_seconds(gdfl_dir / f"fold_{fold}"),
                 "prognosis": tmtv_baseline(gdfl_dir, raw, prep, fold, pred, labels, args.seed)})
    rows.append({"row": "ground-truth TMTV (label-noise ceiling; threshold from the training phantoms)",
                 "iterations": 0, "dsc": None, "train_s": 0.0,
                 "prognosis": true_tmtv_baseline(raw, test_dir, labels, args.seed)})
    total = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps({"args": {**vars(args), "work": str(work)}, "rows": rows,
                                                   "total_s": total}, indent=1, default=str))

    print(f"\n{args.n_train} training / {args.n_test} held-out tiny phantoms ({sum(labels.values())} with label 1), "
          f"fold {fold}, CPU, {os.cpu_count()} cores shared; {total / 60:.1f} min in all")
    print("| arm | iterations | training s | held-out DSC | AUC (95 % CI) | accuracy | sensitivity | specificity |")
    print("|---|---|---|---|---|---|---|---|")

    def f(v, fmt=".3f"):
        return "–" if v is None else format(v, fmt)

    for r in rows:
        g = r["prognosis"] or {}
        auc = "–" if not g else f"{f(g['auc'])} ({f(g['auc_ci'][0])}–{f(g['auc_ci'][1])})"
        print(f"| {r['row']} | {r['iterations']} | {r['train_s']:.0f} | {f(r['dsc'])} | {auc} | {f(g.get('accuracy'))} "
              f"| {f(g.get('sensitivity'))} | {f(g.get('specificity'))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
