"""The ``autopetseg`` command line: one sub-command per pipeline stage.

Heavy imports (torch, the stages) happen inside each command so ``autopetseg --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from autopetseg import __version__
from autopetseg.errors import InputError

log = logging.getLogger("autopetseg")


def _duration(text: str) -> float:
    """``--time-budget``: seconds of ``20m``, ``1h30m``, ``900s``; argparse prints the message."""
    from autopetseg.options import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _report_failures(failures, what: str) -> int:
    """Print the bad cases, one line each; the exit code a folder run ends with."""
    if not failures:
        return 0
    print(f"{len(failures)} case(s) failed during {what}:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1


def cmd_synth(args) -> int:
    from autopetseg.data.synthetic import synthesize_dataset

    if args.num_cases < 1 or (args.pet_spacing and min(args.pet_spacing) <= 0):
        raise InputError(f"-n must be at least 1 and --pet-spacing positive, got -n {args.num_cases}"
                         + (f", --pet-spacing {' '.join(map(str, args.pet_spacing))}" if args.pet_spacing else ""))
    out = synthesize_dataset(
        args.output,
        n_cases=args.num_cases,
        layout=args.layout,
        seed=args.seed,
        preset=args.preset,
        pet_spacing_zyx=tuple(args.pet_spacing) if args.pet_spacing else None,
        with_labels=not args.no_labels,
        num_processes=args.num_processes,
    )
    print(f"wrote {args.num_cases} synthetic cases ({args.layout} layout) to {out}")
    return 0


def cmd_import_dicom(args) -> int:
    from autopetseg.data.dicom import require_dicom_libraries

    require_dicom_libraries("import-dicom")
    from autopetseg.data.dicom.importer import DicomImportSettings, import_dicom

    settings = DicomImportSettings(layout=args.layout, weight_kg=args.weight, dose_bq=args.dose,
                                   series=tuple(args.series or ()), ctres=args.ctres, roi=args.roi)
    report = import_dicom(args.dicom_root, args.output, settings)
    for case in report.cases:
        print(f"{case.case_id}: SUV factor {case.suv_factor:.6g}, {', '.join(sorted(case.files))}; audit in {case.record}")
    print(f"imported {len(report.cases)} case(s) ({report.layout} layout) to {report.output_dir}"
          + (f"; {len(report.skipped)} study(ies) without PET skipped" if report.skipped else ""))
    return _report_failures(report.failures, "import-dicom")


def cmd_plan_and_preprocess(args) -> int:
    from autopetseg.data.suv_check import suv_check_mode
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget

    budget = ComputeBudget(device=args.device, gpu_memory_gb=args.gpu_memory, time_budget_s=args.time_budget)
    with suv_check_mode(args.suv_check):  # the workers inherit it through the environment
        result = plan_and_preprocess(
            args.dataset,
            configurations=tuple(args.configurations),
            budget=budget,
            num_processes=args.num_processes,
            overwrite=args.overwrite,
            raw_root=args.raw,
            preprocessed_root=args.preprocessed,
            plans_name=args.plans,
        )
    for name, conf in result.plans.configurations.items():
        print(f"{name}: {conf.network_name or 'network'}, spacing {conf.spacing_zyx} mm, patch {conf.patch_size}, "
              f"batch {conf.batch_size}, features {conf.network.features_per_stage}")
    if result.plans.budget.time_budget_s is not None:
        print(f"planned for training {result.plans.budget.time_budget_s:g} s per fold: `train` without --epochs "
              f"or --time-budget trains for that long")
    print(f"preprocessed data in {result.output_dir}")
    return _report_failures(result.failures, "plan_and_preprocess")


def _loss_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``train --loss``: the value read as JSON, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def cmd_train(args) -> int:
    started = getattr(args, "started", time.time())  # a --time-budget counts from main(), torch's import included
    from autopetseg.training.run import run_training

    from autopetseg.models.folders import parse_fold

    fold = parse_fold(args.fold)
    fold_dir = run_training(
        args.dataset,
        fold,
        method=args.trainer,
        configuration=args.configuration,
        stage=args.stage,
        stage_inputs=args.stage_inputs,
        preprocessed_root=args.preprocessed,
        results_root=args.results,
        device=args.device,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        continue_training=args.continue_training,
        overwrite=args.overwrite,
        time_budget_s=args.time_budget,
        budget_started=started,
        num_workers=args.num_workers,
        seed=args.seed,
        network=args.network,
        output_prior=args.output_prior,
        label_column=args.label_column,
        loss=dict(args.loss) or None,
        plans_name=args.plans,
    )
    if fold_dir is not None:
        print(f"trained fold {fold}: {fold_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from autopetseg.evaluation.evaluate import EvaluationSettings, evaluate_folder
    from autopetseg.evaluation.prognosis import PrognosisEvaluationSettings

    out_dir = Path(args.output) if args.output else Path(args.predictions)
    prognosis = PrognosisEvaluationSettings(label_column=args.label_column, time_column=args.time_column,
                                            event_column=args.event_column)
    rows, summary = evaluate_folder(args.predictions, args.ground_truth, out_dir, EvaluationSettings(prognosis=prognosis))
    for key in ("n_cases", "n_positive", "mean_dsc", "mean_fpv_ml", "mean_fnv_ml"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    if "prognosis" in summary:  # a method with a patient-level label (multitask)
        p = summary["prognosis"]
        print("prognosis: " + ", ".join(f"{k} {p[k]:.3f} ({p[k + '_ci'][0]:.3f}-{p[k + '_ci'][1]:.3f})"
                                        for k in ("auc", "accuracy", "sensitivity", "specificity", "youden_index")))
        if "survival" in p:
            print(f"log-rank p of the predicted groups: {p['survival']['logrank_p']:.3g} (km.png)")
    print(f"per-case metrics and summary in {out_dir}")
    if args.report:
        from autopetseg.evaluation.report import report_folder

        print(f"lesion-level report (L1DFL paper analysis) in {report_folder(args.predictions, args.ground_truth, out_dir, rows)}")
    if getattr(args, "png", False):
        from autopetseg.evaluation.pictures import write_evaluation_pictures
        from autopetseg.inference.pictures import PNG_FOLDER

        pictures = write_evaluation_pictures(args.predictions, args.ground_truth, out_dir / PNG_FOLDER)
        print(f"{len(pictures)} MIP picture(s) in {out_dir / PNG_FOLDER}")
    missing = summary.get("missing_predictions") or []
    failed = summary.get("failed") or {}  # cases left out of the means: a bad mask, a bad label
    if failed:
        print(f"{len(failed)} case(s) failed during evaluate:", file=sys.stderr)
        for message in failed.values():
            print(f"  {message}", file=sys.stderr)
    return 1 if missing or failed else 0


def cmd_predict(args) -> int:
    from autopetseg.inference.predictor import PredictorSettings, predict_folder

    settings = PredictorSettings(
        folds=args.folds,
        checkpoint=args.checkpoint,
        ensemble=args.ensemble,
        ensemble_space=args.ensemble_space,
        blending=args.blending,
        device=args.device,
        tta=args.tta,
        overlap=args.overlap,
        batch_size=args.batch_size,
        min_suv=args.min_suv,
        save_probabilities=args.save_probabilities,
        png=args.png,
        overwrite=args.overwrite,
        num_parts=args.num_parts,
        part_id=args.part_id,
        dicom_seg=args.dicom_seg,
    )
    if args.dicom_seg:
        from autopetseg.data.dicom import require_dicom_libraries

        require_dicom_libraries("predict --dicom-seg")
    from autopetseg.data.suv_check import suv_check_mode

    with suv_check_mode(args.suv_check):
        report = predict_folder(args.input, args.output, args.model, settings)
    print(f"predicted {len(report.predicted)} case(s), {len(report.skipped)} finished before; "
          f"masks and {report.csv_path.name} in {report.output_dir}")
    if report.n_windows:
        print(f"sliding windows: {report.n_windows - report.n_windows_skipped} of {report.n_windows} run")
    return _report_failures(report.failures, "predict")


def cmd_demo(args) -> int:
    from autopetseg.demo import DemoSettings, run_demo
    from autopetseg.models.methods import METHODS
    from autopetseg.scoring.metrics import f1_score
    from autopetseg.training.splits import N_FOLDS

    # Checked before the phantoms are made and preprocessed (a minute), not when the fold is trained.
    if args.trainer not in METHODS:
        raise InputError(f"unknown method {args.trainer!r}; known: {', '.join(sorted(METHODS))}")
    if any(not 0 <= f < N_FOLDS for f in args.folds) or args.num_train < N_FOLDS or args.num_test < 1:
        raise InputError(f"the demo needs --folds within 0..{N_FOLDS - 1}, --num-train of at least {N_FOLDS} and "
                         f"--num-test of at least 1; got --folds {' '.join(map(str, args.folds))}, --num-train "
                         f"{args.num_train}, --num-test {args.num_test}")
    settings = DemoSettings(n_train=args.num_train, n_test=args.num_test, folds=tuple(args.folds), epochs=args.epochs,
                            iterations_per_epoch=args.iterations, trainer=args.trainer, device=args.device,
                            num_processes=args.num_processes, seed=args.seed,
                            time_budget_s=None if args.no_time_budget else args.time_budget)
    result = run_demo(args.work_dir, settings)
    s = result.summary
    print("\nautopetseg demo: held-out synthetic phantoms, ensemble of folds", ", ".join(map(str, settings.folds)))
    print(f"  DSC (lesion-positive cases) {s.get('mean_dsc', float('nan')):.3f}   "
          f"FPV {s.get('mean_fpv_ml', float('nan')):.2f} ml   FNV {s.get('mean_fnv_ml', float('nan')):.2f} ml   "
          f"cases {s.get('n_cases')} ({s.get('n_positive')} with lesions)")
    tp, fp, fn = (s.get(f"total_{k}", 0) for k in ("tp", "fp", "fn"))
    print(f"  lesion detection (SUVmax rule): TP {tp}  FP {fp}  FN {fn}  F1 {f1_score(tp, fp, fn):.3f}")
    print("  time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    print(f"  masks and predictions.csv (TMTV, TLG, SUVmax, lesion count): {result.prediction_dir}")
    print(f"  metrics: {result.evaluation_dir}   MIP pictures: {result.evaluation_dir / 'png'}")
    print(f"  training curves: {result.model_dir}/fold_*/progress.png")
    return 0


def _add_suv_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suv-check", choices=("error", "warn", "off"),
                   help="a PET whose body statistics are not those of SUV (body weight) is an error (default; "
                        "$AUTOPETSEG_SUV_CHECK), a warning, or not checked: for unusual tracers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autopetseg", description="Self-configuring lesion segmentation for whole-body PET/CT.")
    parser.add_argument("--version", action="version", version=f"autopetseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic PET/CT phantom dataset")
    p.add_argument("output", type=Path, help="dataset folder to create, e.g. data/Dataset001_Phantoms")
    p.add_argument("-n", "--num-cases", type=int, default=30)
    p.add_argument("--layout", choices=("nnunet", "autopet", "flat"), default="nnunet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("tiny", "wholebody"), default="tiny",
                   help="tiny: small phantoms for CPU runs and tests; wholebody: adult size for benchmarks")
    p.add_argument("--pet-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="PET voxel size in mm")
    p.add_argument("--no-labels", action="store_true", help="write no lesion masks (inputs for predict)")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("import-dicom", help="DICOM PET/CT studies (+ RTSTRUCT/SEG) → cases: PET in SUV with an "
                       "audit JSON, CT in HU, lesion mask (needs .[dicom])")
    p.add_argument("dicom_root", type=Path, help="folder tree of DICOM files (any depth, any file names)")
    p.add_argument("-o", "--output", required=True, type=Path, help="dataset folder to write the cases to")
    p.add_argument("--layout", choices=("autopet", "nnunet", "flat"), default="autopet")
    p.add_argument("--weight", type=float, metavar="KG", help="patient weight for every study (overrides PatientWeight)")
    p.add_argument("--dose", type=float, metavar="BQ",
                   help="injected dose in Bq for every study (overrides RadionuclideTotalDose)")
    p.add_argument("--series", action="append", metavar="UID",
                   help="take this PET, CT or RTSTRUCT/SEG series (or SOP instance) where a study has several "
                        "candidates; repeatable")
    p.add_argument("--ctres", action="store_true", help="also the CT resampled onto the PET grid (autopet: "
                   "CTres.nii.gz; nnunet/flat: the CT channel itself)")
    p.add_argument("--roi", metavar="REGEX", help="lesion ROI/segment names (default: GTV, lesion, tumour, MTV, "
                   "metastasis, malignant; not edema)")
    p.set_defaults(func=cmd_import_dicom)

    p = sub.add_parser("plan_and_preprocess", help="fingerprint a dataset, plan the experiment, preprocess into the cache")
    p.add_argument("-d", "--dataset", required=True, help="dataset folder, or Dataset###_Name / id under $AUTOPETSEG_RAW")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"], choices=("3d_fullres", "2d", "2d_coronal", "2d_axial",
                                                                                    "3d_wholebody"))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", type=float, default=8.0, help="GPU memory to plan for, GB (default 8)")
    budget.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: plan a network and patch that train in minutes on a CPU")
    p.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="with --device cpu: the time one fold will train (e.g. 20m); the patch is the largest that "
                        "gets ~1,500 estimated iterations in it (measured best on a CPU; README), and `train` "
                        "without --epochs trains for it")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="redo the fingerprint, plans and every case")
    p.add_argument("--plans", default="auto", choices=("auto", "gdfl_paper", "l1dfl_paper"),
                   help="auto (default, plans.json): each method's network sized for the budget; gdfl_paper, "
                        "l1dfl_paper: the paper's spacing, patch, batch, CT window and network "
                        "(plans_<name>.json; an error if the budget cannot hold it)")
    p.add_argument("--raw", help="raw root (default $AUTOPETSEG_RAW)")
    p.add_argument("--preprocessed", help="preprocessed root (default $AUTOPETSEG_PREPROCESSED)")
    _add_suv_check(p)
    p.set_defaults(func=cmd_plan_and_preprocess)

    p = sub.add_parser("train", help="train one fold (or 'all') of a method, its stages in order")
    p.add_argument("dataset", help="Dataset###_Name, id, or path of the preprocessed dataset folder")
    p.add_argument("fold", help="0-4 or 'all'")
    p.add_argument("-tr", "--trainer", "--method", dest="trainer", default="gdfl",
                   help="method (one or several stages): gdfl, l1dfl, dice, dicefocal, cascade_l2s, cascade_3step, multitask")
    p.add_argument("-c", "--configuration", help="configuration of a one-stage method (default: the method's, 3d_fullres)")
    p.add_argument("--stage", default="all", help="train only this stage of the method (default: all, in order)")
    p.add_argument("--stage-inputs", choices=("in_fold", "out_of_fold"), default="in_fold",
                   help="which fold's earlier stage makes a later stage's inputs: the same fold (default, as the "
                        "cascade papers) or the fold that validated each case (nnU-Net's cascade)")
    p.add_argument("--network", help="network architecture (default: the trainer's), e.g. resunet, attention_unet, segresnet")
    p.add_argument("--plans", default="auto", choices=("auto", "gdfl_paper", "l1dfl_paper"),
                   help="which plans of the dataset to train on (default auto; see plan_and_preprocess --plans)")
    p.add_argument("--loss", type=_loss_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the method's loss (value as JSON), e.g. focal_activation=sigmoid "
                        "for dicefocal; the trainer's config.json lists them")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--output-prior", type=float, metavar="P",
                   help="start the output layer at lesion probability P (e.g. 0.01): much faster early learning "
                        "for focal losses on short CPU runs; default off (the papers' initialisation)")
    p.add_argument("--label-column", metavar="COLUMN",
                   help="clinical.csv column of the patient-level 0/1 label of a trainer with a prognosis head "
                        "(multitask; default: prognosis); the folds are stratified by it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="iterations per epoch")
    p.add_argument("--continue", dest="continue_training", action="store_true", help="resume from checkpoint_latest")
    p.add_argument("--overwrite", action="store_true",
                   help="train a fold that was trained before again from scratch (its old checkpoints are removed)")
    p.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="wall-clock time for the whole command, validation included, e.g. 20m or 1h30m: the "
                        "schedule is fitted to it (at most --epochs); several stages share it by their iterations")
    p.add_argument("--num-workers", type=int, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preprocessed", help="preprocessed root (default $AUTOPETSEG_PREPROCESSED)")
    p.add_argument("--results", help="results root (default $AUTOPETSEG_RESULTS)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score predictions with the autoPET challenge metrics")
    p.add_argument("-p", "--predictions", required=True, help="folder of <case>.nii.gz masks")
    p.add_argument("-g", "--ground-truth", required=True, help="folder of cases with labels (any accepted layout)")
    p.add_argument("-o", "--output", help="where metrics.csv and summary.json go (default: the predictions folder)")
    p.add_argument("--report", action="store_true",
                   help="also write the L1DFL paper's lesion-level analysis (CSV + PNG) to <output>/report/")
    p.add_argument("--png", action="store_true", help="a coronal PET MIP per case with ground-truth (green) and "
                   "predicted (red) contours in <output>/png/")
    p.add_argument("--label-column", default="prognosis", metavar="COLUMN",
                   help="clinical.csv column of the patient-level label scored against predictions.csv's "
                        "prognosis_probability and prognosis_label (AUC, ROC, bootstrap CIs; default prognosis)")
    p.add_argument("--time-column", default="time", metavar="COLUMN",
                   help="clinical.csv column of the follow-up time for Kaplan-Meier curves (default time)")
    p.add_argument("--event-column", default="event", metavar="COLUMN",
                   help="clinical.csv column: 1 = event at that time, 0 = censored (default event)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="lesion masks and clinical numbers for a folder of cases, from an ensemble of folds")
    p.add_argument("-i", "--input", required=True, help="folder of cases (any accepted layout; labels not needed)")
    p.add_argument("-o", "--output", required=True, help="where <case>.nii.gz and predictions.csv go")
    p.add_argument("-m", "--model", required=True, help="model folder <results>/<Dataset>/<method>__<configuration>")
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: every trained fold)")
    p.add_argument("--checkpoint", choices=("best", "final"), default="best")
    p.add_argument("--ensemble", choices=("mean", "dice_weighted"), default="mean",
                   help="dice_weighted: folds weighted by their validation mean DSC (GDFL paper)")
    p.add_argument("--ensemble-space", choices=("probabilities", "logits"), default="probabilities",
                   help="average the folds' probabilities (default, as nnU-Net) or their logits (as autosegnet)")
    p.add_argument("--blending", choices=("gaussian", "constant"), default="gaussian",
                   help="weights of overlapping windows: gaussian (default, nnU-Net) or constant (MONAI's "
                        "default, which the GDFL authors used)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="test-time mirroring along the trained mirror axes (default off, as in the GDFL paper)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    p.add_argument("--min-suv", type=float, metavar="SUV",
                   help="skip windows whose PET never exceeds this SUV (faster; lesions below it are missed)")
    p.add_argument("--save-probabilities", action="store_true", help="also write probabilities/<case>.nii.gz (float32)")
    p.add_argument("--png", action="store_true", help="a coronal PET MIP per case with the contours in <output>/png/")
    p.add_argument("--overwrite", action="store_true", help="redo cases finished by an earlier run")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts (GPUs, jobs)")
    p.add_argument("--part-id", type=int, default=0, help="which part this run predicts (0-based)")
    p.add_argument("--dicom-seg", action="store_true", help="also <output>/<case>_seg.dcm: a DICOM SEG of the mask "
                   "referencing the source PET series (cases made by import-dicom; needs .[dicom])")
    _add_suv_check(p)
    p.set_defaults(func=cmd_predict)
    from autopetseg.demo import DemoSettings  # light: no torch at import

    p = sub.add_parser("demo", help="synth → plan → train → predict → evaluate on synthetic phantoms, on a CPU, in minutes")
    p.add_argument("work_dir", nargs="?", default="autopetseg_demo", type=Path, help="folder for everything the demo writes")
    p.add_argument("--num-train", type=int, default=DemoSettings.n_train)
    p.add_argument("--num-test", type=int, default=DemoSettings.n_test)
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=DemoSettings.epochs)
    p.add_argument("--iterations", type=int, default=DemoSettings.iterations_per_epoch, help="iterations per epoch")
    p.add_argument("-tr", "--trainer", default="gdfl")
    p.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=_duration, default=DemoSettings.time_budget_s, metavar="DURATION",
                   help=f"wall-clock time of the whole demo (default {DemoSettings.time_budget_s / 60:g}m): training "
                        "is fitted into what the other stages leave (at most --epochs x --iterations per fold)")
    p.add_argument("--no-time-budget", action="store_true", help="train exactly --epochs x --iterations per fold")
    p.set_defaults(func=cmd_demo)
    return parser


def _environment_fault(error: BaseException) -> str | None:
    """One line for a fault of the machine the user can fix (a folder that cannot be written, a full
    disk, no memory), also when a per-case worker hit it; ``None`` for anything else (a bug)."""
    case = None
    if type(error).__name__ == "CaseFailed" and error.__cause__ is not None:  # data.parallel.CaseFailed
        case, error = getattr(error, "case", None), error.__cause__
    if isinstance(error, MemoryError):
        what = "out of memory"
    elif isinstance(error, OSError) and error.errno is not None:
        name = Path(error.filename) if error.filename else None
        if name is not None and name.name.startswith(".") and (".tmp-" in name.name or name.suffix == ".lock"):
            name = name.parent  # an atomic write's temporary or a lock file: the folder is what matters
        what = f"{error.strerror}: {name}" if name is not None else f"{error.strerror}"
    else:
        return None
    return f"case {case!r}: {what}" if case else what


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except InputError as error:
        print(f"autopetseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a fault of the machine, not of the code, is one line too
        line = _environment_fault(error)
        if line is None:
            raise  # a bug: its traceback is what a maintainer needs
        if args.verbose:
            log.exception("details")
        print(f"autopetseg {args.command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"autopetseg {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
