#!/usr/bin/env python
"""Benchmark: ``autopetseg predict`` against ``nnUNetv2_predict`` on the CPU (issue #4, item 7).

Part 1, held-out whole-body phantoms (``--n-test``, default 3) at 6 mm isotropic PET:

1. Writes ``--n-train`` training phantoms and ``--n-test`` held-out phantoms (preset
   ``wholebody``, PET spacing ``--spacing``, CT on its own finer grid) in the nnU-Net raw layout,
   with different seeds. Not timed; reused on a re-run with the same settings.
2. Trains ONE fold (fold 0) of each tool, each with its own default plan, briefly (not timed;
   prediction time does not depend on how long a model was trained, its DSC does):
   * autopetseg, default plan (``plan_and_preprocess --gpu-memory 8``) and, as a second row, the
     CPU plan (``--device cpu``): ``autopetseg train ... 0 --device cpu --epochs E --iterations I``;
   * nnU-Net v2: ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` on a copy whose CT was resampled
     onto the PET grid, then ``nnUNetTrainer_1epoch`` (or ``_Xepochs``) on the CPU with its
     iterations per epoch set to ``--iterations`` (nnU-Net has no flag for that, so the trainer is
     built in a subprocess with nnU-Net's own ``get_trainer_from_args`` and the attribute set
     before ``run_training``; the result folder and checkpoint are the ordinary ones, so the
     standard ``nnUNetv2_predict -tr nnUNetTrainer_1epoch`` loads them).
3. Times on the same held-out cases, on the CPU, each in its own subprocess, with
   ``OMP_NUM_THREADS=--threads``:
   * the user's CT -> PET grid conversion for nnU-Net (SimpleITK linear, -1024 HU fill), own row;
   * ``nnUNetv2_predict -f 0 -device cpu`` with its defaults (mirroring TTA on, step 0.5);
   * ``autopetseg predict -f 0 --device cpu`` with its defaults (TTA off, as in the GDFL paper),
     for the default plan and for the CPU plan; plus, like for like with nnU-Net's default, the
     default plan with ``--tta`` (``--no-tta-row`` leaves it out).
   Wall time, peak RSS of the whole process tree (``/proc`` sampled every ``--poll`` s, the
   helper of ``preprocess_vs_nnunet.py``), seconds per case, the ratio to nnU-Net, and the DSC of
   each tool's masks by ``autopetseg evaluate`` (same metric code for both).

Part 2, ``--autopet-case``: one autoPET-sized case (PET 400x400 at 2.04x2.04 mm, 3 mm slices,
cropped to ``--autopet-slices`` = 326 slices, two channels) predicted by ``autopetseg predict``
with 5 folds on the CPU. The model is planned with the default plan (``--gpu-memory 8``) on
``--autopet-train`` phantoms on that same grid and fold 0 trained for a few iterations; folds 1-4
are COPIES of fold 0 (the run times a 5-fold ensemble, its DSC means nothing).

``--profile``: afterwards (not timed) runs ``autopetseg predict`` (default plan) under cProfile
on the held-out cases and prints the top functions. cProfile sees only the main thread: the next
case's loading, done in a prefetch thread, is missing from it.

The load average (1 min) is recorded before and after every timed run: the timings are only
comparable when it stayed low.

Example (the run reported in the issue)::

    python benchmarks/predict_vs_nnunet.py --n-test 3 --autopet-case --work /tmp/autopetseg_bench_predict

``--spacing`` is in x y z order (mm); arrays and spacings are (z, y, x) inside.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

# The measuring helper and the data helpers of the preprocessing benchmark, and nnU-Net's trainer run (same folder).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import nnunet_train_only  # noqa: E402
from preprocess_vs_nnunet import Measurement, convert_for_nnunet, make_phantoms, measure  # noqa: E402

DATASET_ID = 988
DATASET_NAME = f"Dataset{DATASET_ID:03d}_BenchPredict"
AUTOPET_DATASET = "Dataset989_BenchAutoPETGrid"
TRAINER = "gdfl"
CONFIGURATION = "3d_fullres"


# --------------------------------------------------------------------------- small helpers


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_untimed(name: str, command: list[str], env: dict, log_file: Path) -> None:
    """Run a preparation step (training, planning); stop the benchmark with the log tail if it fails."""
    print(f"\n[{name}] {' '.join(command)}  (not timed, log {log_file})", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "wb") as log:
        rc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"[{name}] failed (exit {rc}):\n{_log_tail(log_file)}")
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)


def _settings_match(marker: Path, settings: dict) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == settings


def measure_with_load(name: str, command: list[str], env: dict, log_file: Path, poll: float) -> tuple[Measurement, dict]:
    """``measure`` plus the 1-minute load average before and after (the machine may be shared)."""
    before = os.getloadavg()[0]
    m = measure(name, command, env, log_file, poll)
    after = os.getloadavg()[0]
    print(f"[{name}] load average (1 min) {before:.2f} before, {after:.2f} after", flush=True)
    return m, {"load_before": before, "load_after": after}


def evaluate(pred: Path, ground_truth: Path, out: Path, env: dict, logs: Path) -> dict:
    """``autopetseg evaluate`` of a prediction folder (the same metric code for both tools)."""
    if out.exists():
        shutil.rmtree(out)
    run_untimed(f"evaluate {pred.name}", [sys.executable, "-m", "autopetseg", "evaluate", "-p", str(pred),
                                          "-g", str(ground_truth), "-o", str(out)], env, logs / f"evaluate_{pred.name}.log")
    return json.loads((out / "summary.json").read_text())


def windows_run(log_file: Path) -> tuple[int, int] | None:
    """(windows run, windows in all) summed over the cases of an ``autopetseg predict`` log."""
    hits = re.findall(r"(\d+) of (\d+) windows run", log_file.read_text(errors="replace"))
    if not hits:
        return None
    return sum(int(a) for a, _ in hits), sum(int(b) for _, b in hits)


# --------------------------------------------------------------------------- autopetseg


def autopetseg_model(raw: Path, work: Path, name: str, plan_flags: list[str], epochs: int, iterations: int,
                     num_processes: int, env: dict, logs: Path) -> Path:
    """Plan, preprocess and train fold 0 (not timed); returns the model folder. Reused when done."""
    pre, res = work / f"autopetseg_{name}_preprocessed", work / f"autopetseg_{name}_results"
    model_dir = res / raw.name / f"{TRAINER}__{CONFIGURATION}"
    settings = {"raw": str(raw), "plan": plan_flags, "epochs": epochs, "iterations": iterations,
                "raw_settings": json.loads((raw / "benchmark_settings.json").read_text())}
    marker = work / f"autopetseg_{name}_settings.json"
    if _settings_match(marker, settings) and (model_dir / "fold_0" / "checkpoint_final.pt").is_file():
        print(f"reusing the autopetseg {name} model in {model_dir}")
        return model_dir
    for folder in (pre, res):
        shutil.rmtree(folder, ignore_errors=True)
    marker.unlink(missing_ok=True)
    run_untimed(f"autopetseg plan_and_preprocess ({name})",
                [sys.executable, "-m", "autopetseg", "plan_and_preprocess", "-d", str(raw), "-c", CONFIGURATION,
                 *plan_flags, "-np", str(num_processes), "--preprocessed", str(pre)], env, logs / f"ap_{name}_plan.log")
    run_untimed(f"autopetseg train ({name})",
                [sys.executable, "-m", "autopetseg", "train", raw.name, "0", "--device", "cpu", "--epochs", str(epochs),
                 "--iterations", str(iterations), "--preprocessed", str(pre), "--results", str(res)],
                env, logs / f"ap_{name}_train.log")
    if not (model_dir / "fold_0" / "checkpoint_final.pt").is_file():
        raise SystemExit(f"autopetseg training wrote no checkpoint in {model_dir}/fold_0")
    marker.write_text(json.dumps(settings))
    return model_dir


def plan_summary(model_dir: Path) -> dict:
    plans = json.loads((model_dir / "plans.json").read_text()) if (model_dir / "plans.json").is_file() else None
    if plans is None:  # the plans live beside the preprocessed data
        candidates = list(model_dir.parent.parent.parent.glob(f"*preprocessed/{model_dir.parent.name}/plans.json"))
        plans = json.loads(candidates[0].read_text()) if candidates else {}
    conf = plans.get("configurations", {}).get(CONFIGURATION, {})
    return {"spacing_zyx": conf.get("spacing_zyx"), "patch_size": conf.get("patch_size"),
            "features": (conf.get("network") or {}).get("features_per_stage")}


# --------------------------------------------------------------------------- nnU-Net


def nnunet_trainer_name(epochs: int) -> str:
    return "nnUNetTrainer_1epoch" if epochs == 1 else f"nnUNetTrainer_{epochs}epochs"


def nnunet_model(raw: Path, work: Path, epochs: int, iterations: int, num_processes: int, env: dict,
                 logs: Path) -> tuple[dict, str]:
    """Convert, plan, preprocess and train fold 0 with nnU-Net (not timed); (env, trainer name)."""
    nn_raw, nn_pre, nn_res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    nn_env = dict(env, nnUNet_raw=str(nn_raw), nnUNet_preprocessed=str(nn_pre), nnUNet_results=str(nn_res))
    trainer = nnunet_trainer_name(epochs)
    fold_dir = nn_res / DATASET_NAME / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    prep = {"raw": str(raw), "raw_settings": json.loads((raw / "benchmark_settings.json").read_text())}
    settings = {**prep, "trainer": trainer, "iterations": iterations}
    marker, prep_marker = work / "nnunet_settings.json", work / "nnunet_prep_settings.json"
    if _settings_match(marker, settings) and (fold_dir / "checkpoint_final.pth").is_file():
        print(f"reusing the nnU-Net model in {fold_dir}")
        return nn_env, trainer
    marker.unlink(missing_ok=True)
    shutil.rmtree(nn_res, ignore_errors=True)
    nn_res.mkdir(parents=True)
    if not _settings_match(prep_marker, prep):  # convert, plan and preprocess only when the data changed
        prep_marker.unlink(missing_ok=True)
        for folder in (nn_raw, nn_pre):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        print("converting the training cases for nnU-Net (not timed) ...", flush=True)
        convert_for_nnunet(raw, nn_raw / DATASET_NAME, num_processes)
        run_untimed("nnUNetv2_plan_and_preprocess",
                    ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np",
                     str(num_processes), "-npfp", str(num_processes)], nn_env, logs / "nn_plan.log")
        prep_marker.write_text(json.dumps(prep))
    run_untimed(f"nnU-Net train ({trainer}, {iterations} iterations/epoch)",
                [sys.executable, str(Path(__file__).resolve()), "--nnunet-train-only", str(DATASET_ID), trainer,
                 str(iterations)],
                dict(nn_env, nnUNet_n_proc_DA="0"),  # augmentation in the training process: shared 2-core machine
                logs / "nn_train.log")
    if not (fold_dir / "checkpoint_final.pth").is_file():
        raise SystemExit(f"nnU-Net training wrote no checkpoint_final.pth in {fold_dir}")
    marker.write_text(json.dumps(settings))
    return nn_env, trainer


def nnunet_plan_summary(work: Path) -> dict:
    plans = json.loads((work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json").read_text())
    conf = plans["configurations"][CONFIGURATION]
    back = plans["transpose_backward"]
    return {"spacing_zyx": [conf["spacing"][i] for i in back], "patch_size": [conf["patch_size"][i] for i in back],
            "features": conf.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage")}


# --------------------------------------------------------------------------- the autoPET-sized case


def crop_case_slices(src: Path, dst: Path, n_slices: int) -> None:
    """Copy of an nnU-Net-layout phantom folder keeping the top ``n_slices`` PET slices (head end).

    The phantoms span mid-thigh to above the head (about 390 slices at 3 mm); autoPET's typical
    scan has 326. The CT (its own grid) is cropped to the same z range plus 10 mm.
    """
    import SimpleITK as sitk

    meta = json.loads((src / "dataset.json").read_text())
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    ct_key = [k for k, v in meta["channel_names"].items() if str(v).lower() == "ct"][0]
    for label_path in sorted((src / "labelsTr").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        pet_paths = [p for p in (src / "imagesTr").glob(f"{case}_*.nii.gz") if not p.name.endswith(f"_{int(ct_key):04d}.nii.gz")]
        pet = sitk.ReadImage(str(pet_paths[0]))
        z0 = max(0, pet.GetSize()[2] - n_slices)
        pet_c = pet[:, :, z0:]
        sitk.WriteImage(pet_c, str(dst / "imagesTr" / pet_paths[0].name), True)
        sitk.WriteImage(sitk.ReadImage(str(label_path))[:, :, z0:], str(dst / "labelsTr" / label_path.name), True)
        ct_path = src / "imagesTr" / f"{case}_{int(ct_key):04d}.nii.gz"
        ct = sitk.ReadImage(str(ct_path))
        lo_z = pet_c.GetOrigin()[2] - 10.0
        ct_z0 = max(0, int(ct.TransformPhysicalPointToContinuousIndex((ct.GetOrigin()[0], ct.GetOrigin()[1], lo_z))[2]))
        sitk.WriteImage(ct[:, :, ct_z0:], str(dst / "imagesTr" / ct_path.name), True)
    meta["name"] = dst.name
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))


def autopet_part(args, work: Path, env: dict, timed_env: dict, logs: Path) -> dict:
    """5-fold ensemble timing on one autoPET-sized case (folds 1-4 are copies of fold 0)."""
    raw = work / "raw" / AUTOPET_DATASET
    make_phantoms(raw, args.autopet_train, "wholebody", (3.0, 2.04, 2.04), args.seed + 2, args.num_processes)
    model_dir = autopetseg_model(raw, work, "autopet_grid", ["--gpu-memory", "8"], 1, args.autopet_iterations,
                                 args.num_processes, env, logs)
    for k in range(1, 5):  # the copies that make the ensemble 5 folds wide
        if not (model_dir / f"fold_{k}" / "checkpoint_final.pt").is_file():
            shutil.rmtree(model_dir / f"fold_{k}", ignore_errors=True)
            shutil.copytree(model_dir / "fold_0", model_dir / f"fold_{k}")
    full = work / "raw" / "autopet_case_full"
    make_phantoms(full, 1, "wholebody", (3.0, 2.04, 2.04), args.seed + 3, 1)
    case_dir = work / "raw" / f"autopet_case_{args.autopet_slices}"
    if not (case_dir / "dataset.json").is_file():
        crop_case_slices(full, case_dir, args.autopet_slices)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(next(p for p in (case_dir / "imagesTr").glob("*_0001.nii.gz"))))
    reader.ReadImageInformation()
    size_xyz, spacing_xyz = reader.GetSize(), reader.GetSpacing()
    out = {"pet_size_xyz": list(size_xyz), "pet_spacing_xyz": [round(s, 3) for s in spacing_xyz],
           "plan": plan_summary(model_dir), "runs": {}}
    for folds in args.autopet_folds:
        fold_list = [str(k) for k in range(folds)]
        pred = work / f"pred_autopet_{folds}folds"
        shutil.rmtree(pred, ignore_errors=True)
        m, load = measure_with_load(
            f"autopetseg predict autoPET-sized case, {folds} fold(s)",
            [sys.executable, "-m", "autopetseg", "predict", "-i", str(case_dir), "-o", str(pred), "-m", str(model_dir),
             "-f", *fold_list, "--device", "cpu"], timed_env, logs / f"ap_autopet_{folds}folds.log", args.poll)
        out["runs"][str(folds)] = {**asdict(m), **load, "windows": windows_run(logs / f"ap_autopet_{folds}folds.log")}
    return out


# --------------------------------------------------------------------------- main


def profile_autopetseg(model_dir: Path, test_raw: Path, work: Path, env: dict, logs: Path, top: int = 30) -> str:
    """cProfile of ``autopetseg predict`` on the held-out cases (not timed); the top functions as text."""
    import pstats
    import io

    prof = work / "predict.prof"
    pred = work / "pred_profile"
    shutil.rmtree(pred, ignore_errors=True)
    run_untimed("cProfile autopetseg predict",
                [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "autopetseg", "predict", "-i", str(test_raw),
                 "-o", str(pred), "-m", str(model_dir), "-f", "0", "--device", "cpu"], env, logs / "profile.log")
    text = io.StringIO()
    stats = pstats.Stats(str(prof), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    (work / "profile.txt").write_text(text.getvalue())
    return text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-test", type=int, default=3, help="held-out cases predicted by both tools")
    parser.add_argument("--n-train", type=int, default=10, help="training cases (fold 0 of 5 is trained)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(6.0, 6.0, 6.0), metavar=("X", "Y", "Z"),
                        help="PET voxel size in mm, x y z (default 6 6 6, the issue's reference)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs, both tools' default plans")
    parser.add_argument("--iterations", type=int, default=3,
                        help="iterations per epoch, both tools' default plans (nnU-Net: ~3 min each on 2 cores)")
    parser.add_argument("--cpu-epochs", type=int, default=2, help="epochs for the autopetseg CPU plan")
    parser.add_argument("--cpu-iterations", type=int, default=50, help="iterations per epoch, autopetseg CPU plan")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the timed runs")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for data preparation")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autopetseg_bench_predict"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-nnunet", action="store_true", help="run only autopetseg")
    parser.add_argument("--skip-cpu-plan", action="store_true", help="no autopetseg CPU-plan row")
    parser.add_argument("--no-tta-row", action="store_true",
                        help="no extra row for autopetseg's default plan with --tta (nnU-Net's default is TTA on)")
    parser.add_argument("--skip-phantoms", action="store_true", help="skip part 1 (only with --autopet-case)")
    parser.add_argument("--autopet-case", action="store_true", help="also time one autoPET-sized case, 5 folds")
    parser.add_argument("--autopet-slices", type=int, default=326)
    parser.add_argument("--autopet-train", type=int, default=5, help="autoPET-grid training phantoms")
    parser.add_argument("--autopet-iterations", type=int, default=2, help="training iterations of that model")
    parser.add_argument("--autopet-folds", type=int, nargs="+", default=[5], help="ensemble widths to time")
    parser.add_argument("--profile", action="store_true", help="cProfile autopetseg predict afterwards")
    parser.add_argument("--poll", type=float, default=0.2, help="memory sampling interval, s")
    parser.add_argument("--convert-only", nargs=2, type=Path, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--nnunet-train-only", nargs=3, metavar=("ID", "TRAINER", "ITERATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.convert_only:  # the timed CT regridding runs as its own measured subprocess
        convert_for_nnunet(*args.convert_only, args.num_processes)
        return 0
    if args.nnunet_train_only:
        nnunet_train_only(args.nnunet_train_only[0], args.nnunet_train_only[1], int(args.nnunet_train_only[2]))
        return 0

    work = args.work.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    timed_env = dict(env, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k not in ("convert_only", "nnunet_train_only")},
                     "cpus": os.cpu_count()}
    failed = []
    lines = []

    if not args.skip_phantoms:
        spacing_zyx = tuple(float(v) for v in args.spacing[::-1])
        train_raw = work / "raw" / DATASET_NAME
        test_raw = work / "raw" / "heldout"
        make_phantoms(train_raw, args.n_train, "wholebody", spacing_zyx, args.seed, args.num_processes)
        make_phantoms(test_raw, args.n_test, "wholebody", spacing_zyx, args.seed + 1, args.num_processes)

        # ---- training (not timed)
        models = {"default plan (--gpu-memory 8)": autopetseg_model(
            train_raw, work, "gpu_plan", ["--gpu-memory", "8"], args.epochs, args.iterations, args.num_processes, env, logs)}
        if not args.skip_cpu_plan:
            models["CPU plan (--device cpu)"] = autopetseg_model(
                train_raw, work, "cpu_plan", ["--device", "cpu"], args.cpu_epochs, args.cpu_iterations,
                args.num_processes, env, logs)
        if not args.skip_nnunet:
            nn_env, nn_trainer = nnunet_model(train_raw, work, args.epochs, args.iterations, args.num_processes, env, logs)

        # ---- timed predictions
        rows: dict[str, dict] = {}
        if not args.skip_nnunet:
            nn_test = work / "nnunet_heldout"
            m, load = measure_with_load(
                "CT->PET grid conversion (held-out)",
                [sys.executable, str(Path(__file__).resolve()), "--convert-only", str(test_raw), str(nn_test),
                 "-np", str(args.num_processes)], timed_env, logs / "convert_heldout.log", args.poll)
            rows["CT->PET conversion (user step)"] = {**asdict(m), **load}
            pred = work / "pred_nnunet"
            shutil.rmtree(pred, ignore_errors=True)
            m, load = measure_with_load(
                "nnUNetv2_predict",
                ["nnUNetv2_predict", "-i", str(nn_test / "imagesTr"), "-o", str(pred), "-d", str(DATASET_ID), "-c",
                 CONFIGURATION, "-f", "0", "-tr", nn_trainer, "-device", "cpu"],
                dict(timed_env, **{k: v for k, v in nn_env.items() if k.startswith("nnUNet_")}),
                logs / "nn_predict.log", args.poll)
            rows["nnU-Net v2 (TTA on)"] = {**asdict(m), **load, "pred": str(pred),
                                           "plan": nnunet_plan_summary(work)}
        runs = [(label, model_dir, "gpu" if "gpu" in label else "cpu", []) for label, model_dir in models.items()]
        if not args.no_tta_row:  # like for like with nnU-Net's default: the same model with mirroring TTA
            runs.insert(1, ("default plan (--gpu-memory 8)", models["default plan (--gpu-memory 8)"], "gpu_tta", ["--tta"]))
        for label, model_dir, tag, flags in runs:
            pred = work / f"pred_autopetseg_{tag}"
            shutil.rmtree(pred, ignore_errors=True)
            log_file = logs / f"ap_predict_{tag}.log"
            tta = "TTA on, --tta" if flags else "TTA off"
            m, load = measure_with_load(
                f"autopetseg predict, {label}, {tta}",
                [sys.executable, "-m", "autopetseg", "predict", "-i", str(test_raw), "-o", str(pred), "-m",
                 str(model_dir), "-f", "0", "--device", "cpu", *flags], timed_env, log_file, args.poll)
            rows[f"autopetseg, {label} ({tta})"] = {**asdict(m), **load, "pred": str(pred),
                                                    "windows": windows_run(log_file), "plan": plan_summary(model_dir)}
        failed += [k for k, r in rows.items() if r["returncode"] != 0]

        # ---- DSC (same evaluation code for both tools)
        for label, r in rows.items():
            if "pred" in r and r["returncode"] == 0:
                summary = evaluate(Path(r["pred"]), test_raw, work / "eval" / Path(r["pred"]).name, env, logs)
                r["mean_dsc"], r["n_positive"] = summary.get("mean_dsc"), summary.get("n_positive")
                r["mean_fpv_ml"], r["mean_fnv_ml"] = summary.get("mean_fpv_ml"), summary.get("mean_fnv_ml")
        results["phantoms"] = rows

        # ---- table
        n = args.n_test
        nn_key = "nnU-Net v2 (TTA on)"
        nn_wall = rows[nn_key]["wall_s"] if nn_key in rows else None
        lines.append(f"{n} held-out wholebody phantoms, PET {tuple(args.spacing)} mm (x,y,z), fold 0, CPU, "
                     f"OMP_NUM_THREADS={args.threads}, {os.cpu_count()} CPUs")
        lines.append(f"{'':58s} {'wall s':>7s} {'s/case':>7s} {'/nnU':>7s} {'RSS GB':>7s} {'PSS GB':>7s} "
                     f"{'DSC':>6s} {'load':>10s}")
        for label, r in rows.items():
            ratio = f"{r['wall_s'] / nn_wall:7.4f}" if nn_wall and "pred" in r else f"{'':7s}"
            dsc = f"{r['mean_dsc']:6.3f}" if isinstance(r.get("mean_dsc"), (int, float)) else f"{'-':>6s}"
            lines.append(f"{label:58s} {r['wall_s']:7.1f} {r['wall_s'] / n:7.1f} {ratio} {r['peak_tree_rss_gb']:7.2f} "
                         f"{r['peak_tree_pss_gb']:7.2f} {dsc} {r['load_before']:4.1f}->{r['load_after']:4.1f}")
        for label, r in rows.items():
            extra = []
            if r.get("plan"):
                extra.append(f"spacing {r['plan']['spacing_zyx']} patch {r['plan']['patch_size']}")
            if r.get("windows"):
                extra.append(f"windows run {r['windows'][0]}/{r['windows'][1]}")
            if extra:
                lines.append(f"  {label}: {'; '.join(extra)}")
        if nn_wall:
            ap_key = next(k for k in rows if k.startswith("autopetseg, default") and "TTA off" in k)
            ratio = rows[ap_key]["wall_s"] / nn_wall
            d_ap, d_nn = rows[ap_key].get("mean_dsc"), rows[nn_key].get("mean_dsc")
            dsc = "DSC " + " vs ".join(f"{d:.4f}" if isinstance(d, (int, float)) else str(d) for d in (d_ap, d_nn))
            lines.append(f"target: autopetseg (default plan) wall <= 1/4 of nnU-Net -> {ratio:.4f} = 1/{1 / ratio:.0f} "
                         f"({'met' if ratio <= 0.25 else 'MISSED'}); {dsc} "
                         f"(both from short training: {args.epochs} epoch(s) x {args.iterations} iterations)")

    if args.autopet_case:
        ap = autopet_part(args, work, env, timed_env, logs)
        results["autopet_case"] = ap
        lines.append(f"\nautoPET-sized case: PET {ap['pet_size_xyz']} voxels (x,y,z) at {ap['pet_spacing_xyz']} mm, "
                     f"default plan spacing {ap['plan']['spacing_zyx']} patch {ap['plan']['patch_size']}; "
                     f"folds 1-4 are copies of fold 0")
        for folds, r in ap["runs"].items():
            w = f", windows run {r['windows'][0]}/{r['windows'][1]}" if r.get("windows") else ""
            lines.append(f"  autopetseg predict, {folds} fold(s), CPU: {r['wall_s']:.1f} s, peak tree RSS "
                         f"{r['peak_tree_rss_gb']:.2f} GB (PSS {r['peak_tree_pss_gb']:.2f}){w}, "
                         f"load {r['load_before']:.1f}->{r['load_after']:.1f}")
            if r["returncode"] != 0:
                failed.append(f"autoPET {folds} folds")

    if args.profile and not args.skip_phantoms:
        print(profile_autopetseg(models["default plan (--gpu-memory 8)"], test_raw, work, env, logs))

    print("\n" + "\n".join(lines))
    results["table"] = lines
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults and logs in {work}")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
