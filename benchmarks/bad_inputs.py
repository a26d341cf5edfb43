#!/usr/bin/env python
"""Bad inputs and faults through the real command line, one row each (issue #17, "Must show").

Every row runs ``python -m autopetseg ...`` in a subprocess on tiny synthetic phantoms and prints
the exit code and the one line the user reads: the ``autopetseg <command>: error: ...`` line, the
line of the failed case (a folder run finishes the good cases and lists the bad ones), or, for an
input that is accepted, the warning or result line. A row is ``ok`` when the exit code and the
line are the expected ones and nothing printed a traceback; the script exits 1 otherwise.

Setup, once, under ``--work`` (default: a temporary folder): 5 training and 2 test phantoms
(``synth --layout flat``), ``plan_and_preprocess --device cpu``, one fold trained for 1 epoch of 2
iterations, and the test phantoms predicted. Each row then builds its own input from those
(a PET scaled by 5, a truncated checkpoint, a read-only output folder, ...). About 3-4 minutes on
2 shared cores; ``--only KEY ...`` runs some rows.

Rows are for the items of issue #17 handled with it: 1 (PET units), 5 (file permissions),
6 (one-line errors), 7 (smaller faults), 8 (same dataset paths everywhere), plus the input
checks that were there before (rows marked "-"). Items 2, 3, 4 and 9 and the memory check of hand-
edited plans (item 6) are other rows, added by their own changes.

    python benchmarks/bad_inputs.py [--work DIR] [--only KEY ...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autopetseg.io_utils import default_file_mode, host_tag  # noqa: E402 - this checkout, found above
DATASET = "Dataset917_Bad"
N_TRAIN, N_TEST = 5, 2


# --------------------------------------------------------------------------- running the CLI
def run_cli(args: list[str], cwd: Path, env: dict | None = None, umask: int | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m autopetseg *args`` in a subprocess (this checkout first on the path)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.pop("AUTOPETSEG_SUV_CHECK", None)
    full_env.update(env or {})
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "autopetseg", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


_ERROR_LINE = re.compile(r"^autopetseg \S+: (error|interrupted)")


def user_line(done: subprocess.CompletedProcess, pattern: str) -> str:
    """The line a user reads: the error line, the first failed case, else the line matching ``pattern``."""
    lines = (done.stderr + "\n" + done.stdout).splitlines()
    if "Traceback (most recent call last)" in done.stderr:
        return "TRACEBACK: " + next((l for l in reversed(done.stderr.splitlines()) if l.strip()), "")
    for line in lines:
        if _ERROR_LINE.match(line):
            return line
    failed = [i for i, l in enumerate(lines) if re.match(r"^\d+ case\(s\) failed during", l)]
    if failed and failed[0] + 1 < len(lines):
        return lines[failed[0] + 1].strip()
    matching = [l for l in lines if re.search(pattern, l)]
    if matching:
        return re.sub(r"^\d\d:\d\d:\d\d ", "", matching[0]).strip()
    return next((l for l in reversed(done.stdout.splitlines()) if l.strip()), "").strip()


# --------------------------------------------------------------------------- the shared inputs
@dataclass
class Work:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw" / DATASET

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def pp(self) -> Path:
        return self.root / "pp"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def model(self) -> Path:
        return self.results / DATASET / "gdfl__3d_fullres"

    @property
    def predictions(self) -> Path:
        return self.root / "pred"

    def row_dir(self, key: str) -> Path:
        path = self.root / "rows" / key
        if path.exists():
            _make_writable(path)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def base(self) -> list[str]:
        return ["--preprocessed", str(self.pp), "--results", str(self.results)]


def setup(work: Work) -> None:
    """Phantoms, cache, one trained fold and its predictions of the test phantoms (skipped when there)."""
    if (work.predictions / "predictions.csv").is_file():
        return
    steps = [
        ["synth", str(work.raw), "-n", str(N_TRAIN), "--layout", "flat", "--seed", "1"],
        ["synth", str(work.test), "-n", str(N_TEST), "--layout", "flat", "--seed", "2", "--no-labels"],
        ["plan_and_preprocess", "-d", str(work.raw), "--device", "cpu", "-np", "1", "--preprocessed", str(work.pp)],
        ["train", DATASET, "0", "--epochs", "1", "--iterations", "2", "--device", "cpu", *work.base()],
        ["predict", "-i", str(work.test), "-o", str(work.predictions), "-m", str(work.model), "--device", "cpu"],
    ]
    for args in steps:
        done = run_cli(args, work.root)
        if done.returncode != 0:
            raise SystemExit(f"setup step {' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def case_files(folder: Path, case: str) -> dict[str, Path]:
    return {role: folder / f"{case}_{role}.nii.gz" for role in ("pet", "ct", "seg") if (folder / f"{case}_{role}.nii.gz").exists()}


def copy_case(src: Path, case: str, dst: Path, new_id: str | None = None) -> dict[str, Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, path in case_files(src, case).items():
        out[role] = dst / f"{new_id or case}_{role}.nii.gz"
        shutil.copyfile(path, out[role])
    return out


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], dtype=None) -> None:
    """Apply ``change`` to the voxels of ``path`` (geometry kept)."""
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image))
    if dtype is not None:
        array = array.astype(dtype)
    out = sitk.GetImageFromArray(array)
    if out.GetDimension() == image.GetDimension() and array.shape == sitk.GetArrayViewFromImage(image).shape:
        out.CopyInformation(image)
    else:
        out.SetSpacing(image.GetSpacing())
        out.SetOrigin(image.GetOrigin())
        out.SetDirection(image.GetDirection())
    sitk.WriteImage(out, str(path), useCompression=True)


def first_train_case(work: Work) -> str:
    return sorted(p.name[: -len("_pet.nii.gz")] for p in work.raw.glob("*_pet.nii.gz"))[0]


def first_test_case(work: Work) -> str:
    return sorted(p.name[: -len("_pet.nii.gz")] for p in work.test.glob("*_pet.nii.gz"))[0]


def dataset_with_bad_case(work: Work, key: str, change: Callable[[dict[str, Path]], None]) -> Path:
    """A dataset folder: one good training case and ``bad`` made by ``change`` from another."""
    folder = work.row_dir(key) / DATASET
    cases = sorted(p.name[: -len("_pet.nii.gz")] for p in work.raw.glob("*_pet.nii.gz"))
    copy_case(work.raw, cases[0], folder)
    change(copy_case(work.raw, cases[1], folder, "bad"))
    return folder


def plan_args(work: Work, dataset: Path, key: str) -> list[str]:
    return ["plan_and_preprocess", "-d", str(dataset), "--device", "cpu", "-np", "1",
            "--preprocessed", str(work.root / "rows" / key / "pp")]


def test_input_with(work: Work, key: str, change: Callable[[dict[str, Path]], None]) -> Path:
    """A prediction input folder holding one test case changed by ``change``."""
    folder = work.row_dir(key) / "in"
    change(copy_case(work.test, first_test_case(work), folder))
    return folder


def predict_args(work: Work, inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(inputs), "-o", str(out), "-m", str(work.model), "--device", "cpu", *extra]


def scale_pet(factor: float) -> Callable[[dict[str, Path]], None]:
    return lambda files: rewrite(files["pet"], lambda a: a * np.float32(factor))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------- read-only folders
def make_read_only(folder: Path) -> bool:
    """``chmod a-w``; as root (who ignores modes) also ``chattr +i``. True when writing now fails."""
    folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return True
    probe.unlink()
    return False


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            if os.geteuid() == 0 and shutil.which("chattr"):
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    key: str
    item: str  # issue #17 item, "-" for a check that was there before
    what: str  # the input or fault
    exit_code: int  # expected
    message: str  # regex the user's line must match
    prepare: Callable[[Work], list[str] | None]  # builds the input, returns the CLI arguments (None: cannot here)
    check: Callable[[Work], str | None] | None = None  # after the run: None if fine, else what is wrong
    env: dict | None = None
    umask: int | None = None


@dataclass
class Result:
    key: str
    item: str
    what: str
    command: str
    exit_code: int
    line: str
    ok: bool
    note: str = ""


def _pp_without_splits(work: Work) -> Path:
    """A copy of the preprocessed dataset with no splits.json (to see that nothing is written)."""
    root = work.root / "rows" / "_pp_fresh"
    if not (root / DATASET).exists():
        shutil.copytree(work.pp / DATASET, root / DATASET, ignore=shutil.ignore_patterns("splits.json"))
    return root


def train_args(work: Work, *extra: str) -> list[str]:
    return ["train", DATASET, *extra, "--device", "cpu", "--preprocessed", str(_pp_without_splits(work)),
            "--results", str(work.root / "rows" / "_results_untouched")]


def nothing_written(work: Work) -> str | None:
    written = [p for p in ((_pp_without_splits(work) / DATASET / "splits.json"), work.root / "rows" / "_results_untouched")
               if p.exists()]
    return f"written before the check: {', '.join(map(str, written))}" if written else None


def _copy_results(work: Work, key: str) -> Path:
    dst = work.row_dir(key) / "results"
    shutil.copytree(work.results, dst)
    return dst


def _continue_args(work: Work, results: Path) -> list[str]:
    return ["train", DATASET, "0", "--continue", "--epochs", "2", "--iterations", "2", "--device", "cpu",
            "--preprocessed", str(work.pp), "--results", str(results)]


def _read_only_after_first_case(work: Work) -> list[str] | None:
    row = work.row_dir("read_only_output")
    inputs, out = row / "in", row / "out"
    first = first_test_case(work)
    copy_case(work.test, first, inputs)
    done = run_cli(predict_args(work, inputs, out), work.root)
    if done.returncode != 0:
        raise RuntimeError(f"the first case did not predict: {done.stderr[-500:]}")
    copy_case(work.test, first, inputs, "second")
    return predict_args(work, inputs, out) if make_read_only(out) else None


def _stale_temporaries(work: Work) -> list[str]:
    row = work.row_dir("stale_temporaries")
    out = row / "out"
    shutil.copytree(work.predictions, out)
    gone = out / f".{first_test_case(work)}.nii.gz.tmp-999999999@{host_tag()}-abcdefgh.nii.gz"  # writer not running
    old = out / ".predictions.csv.k3j4h5g6.csv"  # an earlier version's name, two hours old
    for path in (gone, old):
        path.write_bytes(b"\0" * 1024)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    return predict_args(work, work.test, out)


def _no_temporaries(work: Work) -> str | None:
    left = [p.name for p in (work.root / "rows" / "stale_temporaries" / "out").glob(".*")]
    return f"left: {left}" if left else None


def _modes(work: Work, key: str, expected: int) -> str | None:
    out = work.root / "rows" / key / "out"
    files = [out / f"{first_test_case(work)}.nii.gz", out / "predictions.csv"]
    wrong = {p.name: oct(p.stat().st_mode & 0o777) for p in files if (p.stat().st_mode & 0o777) != expected}
    return f"modes {wrong}, expected {oct(expected)}" if wrong else None


def _setup_modes(work: Work) -> str | None:
    """The files the setup wrote (umask 022 unless the caller's differs): checkpoint, plans, mask, CSV."""
    expected = default_file_mode()
    files = [work.model / "fold_0" / "checkpoint_best.pt", work.pp / DATASET / "plans.json",
             work.predictions / "predictions.csv", work.model / "fold_0" / "progress.png"]
    wrong = {p.name: oct(p.stat().st_mode & 0o777) for p in files if (p.stat().st_mode & 0o777) != expected}
    return f"modes {wrong}, expected {oct(expected)}" if wrong else None


def _one_slice(files: dict[str, Path]) -> None:
    """The middle PET slice alone, and the CT resampled onto it (the CT has its own, finer grid)."""
    pet = sitk.ReadImage(str(files["pet"]))
    middle = pet.GetSize()[2] // 2
    slab = pet[:, :, middle : middle + 1]  # ITK slicing keeps the slice's position
    ct = sitk.Resample(sitk.ReadImage(str(files["ct"])), slab, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(slab, str(files["pet"]), useCompression=True)
    sitk.WriteImage(ct, str(files["ct"]), useCompression=True)


def _duplicate_pet(work: Work) -> list[str]:
    folder = work.row_dir("duplicate_pet") / DATASET
    for case in sorted(p.name[: -len("_pet.nii.gz")] for p in work.raw.glob("*_pet.nii.gz"))[:2]:
        copy_case(work.raw, case, folder)
    first = next(iter(sorted(folder.glob("*_pet.nii.gz"))))
    sitk.WriteImage(sitk.ReadImage(str(first)), str(first.with_name(first.name[: -len(".gz")])))  # x_pet.nii too
    return plan_args(work, folder, "duplicate_pet")


def _file_ending_mismatch(work: Work) -> list[str]:
    folder = work.row_dir("file_ending") / DATASET
    images = folder / "imagesTr"
    images.mkdir(parents=True)
    case = first_train_case(work)
    for role, channel in (("ct", 0), ("pet", 1)):
        with gzip.open(work.raw / f"{case}_{role}.nii.gz", "rb") as src:
            (images / f"{case}_{channel:04d}.nii").write_bytes(src.read())
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                     "labels": {"background": 0, "lesion": 1},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    return plan_args(work, folder, "file_ending")


def _hand_edited_plans(work: Work, key: str, edit: Callable[[dict], None]) -> list[str]:
    row = work.row_dir(key)
    pp = row / "pp"
    shutil.copytree(work.pp / DATASET, pp / DATASET)
    plans_path = pp / DATASET / "plans.json"
    plans = json.loads(plans_path.read_text())
    edit(plans)
    plans_path.write_text(json.dumps(plans, indent=2))
    return ["train", DATASET, "0", "--epochs", "1", "--iterations", "1", "--device", "cpu",
            "--preprocessed", str(pp), "--results", str(row / "results")]


def _two_entry_patch(plans: dict) -> None:
    plans["configurations"]["3d_fullres"]["patch_size"] = plans["configurations"]["3d_fullres"]["patch_size"][1:]


def _label_value_2(files: dict[str, Path]) -> None:
    rewrite(files["seg"], lambda a: np.where(a > 0, 2, 0).astype(a.dtype))


def _nan_pet(files: dict[str, Path]) -> None:
    def change(a):
        a = a.astype(np.float32)
        a[a.shape[0] // 2, a.shape[1] // 2, a.shape[2] // 2] = np.nan
        return a
    rewrite(files["pet"], change)


def _ct_elsewhere(files: dict[str, Path]) -> None:
    image = sitk.ReadImage(str(files["ct"]))
    image.SetOrigin(tuple(o + 500.0 for o in image.GetOrigin()))
    sitk.WriteImage(image, str(files["ct"]), useCompression=True)


def _label_other_grid(files: dict[str, Path]) -> None:
    image = sitk.ReadImage(str(files["seg"]))
    image.SetSpacing(tuple(s * 2 for s in image.GetSpacing()))
    sitk.WriteImage(image, str(files["seg"]), useCompression=True)


def rows() -> list[Row]:
    return [
        # ---- item 1: PET units
        Row("pet_x5", "1", "PET ×5 (kBq/ml-like)", 1, "case 'bad'.*body median SUV .* above 2",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_x5", scale_pet(5)), "pet_x5")),
        Row("pet_x60", "1", "PET ×60 (int16 with a lost slope)", 1, "case 'bad'.*above 2.*SUVmax .* above 150",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_x60", scale_pet(60)), "pet_x60")),
        Row("pet_x100", "1", "PET ×100", 1, "case 'bad'.*body median SUV .* above 2",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_x100", scale_pet(100)), "pet_x100")),
        Row("pet_bq", "-", "PET in Bq/ml (×5000)", 1, "case 'bad'.*looks like Bq/ml",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_bq", scale_pet(5000)), "pet_bq")),
        Row("pet_negated", "1", "PET negated", 1, "case 'bad'.*% of the body voxels are negative",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_negated", scale_pet(-1)), "pet_negated")),
        Row("pet_milli", "1", "PET ÷1000 (weight in kg where g was expected)", 1, "case 'bad'.*body median SUV .* below 0.05",
            lambda w: plan_args(w, dataset_with_bad_case(w, "pet_milli", scale_pet(1e-3)), "pet_milli")),
        Row("predict_pet_x5", "1", "PET ×5 given to predict", 1, "case '.*'.*body median SUV .* above 2",
            lambda w: predict_args(w, test_input_with(w, "predict_pet_x5", scale_pet(5)), w.root / "rows/predict_pet_x5/out")),
        Row("suv_check_off", "1", "PET ×5, predict --suv-check off (unusual tracer)", 0, "predicted 1 case",
            lambda w: predict_args(w, test_input_with(w, "suv_check_off", scale_pet(5)), w.root / "rows/suv_check_off/out",
                                   "--suv-check", "off")),
        Row("suv_check_env", "1", "PET ×5, AUTOPETSEG_SUV_CHECK=warn", 0, "WARNING.*does not look like SUV",
            lambda w: plan_args(w, dataset_with_bad_case(w, "suv_check_env", scale_pet(5)), "suv_check_env"),
            env={"AUTOPETSEG_SUV_CHECK": "warn"}),
        Row("pet_zero", "1", "all-zero PET (predict)", 0, "WARNING.*PET is constant \\(0 everywhere\\)",
            lambda w: predict_args(w, test_input_with(w, "pet_zero", scale_pet(0)), w.root / "rows/pet_zero/out")),
        Row("one_slice", "1", "one-slice PET and CT (predict)", 0, "WARNING.*one voxel thick along z",
            lambda w: predict_args(w, test_input_with(w, "one_slice", _one_slice), w.root / "rows/one_slice/out")),
        # ---- input checks that were there before
        Row("ct_as_pet", "-", "CT given as PET (channels swapped)", 1, "case 'bad'.*channels swapped",
            lambda w: plan_args(w, dataset_with_bad_case(w, "ct_as_pet", lambda f: shutil.copyfile(f["ct"], f["pet"])),
                                "ct_as_pet")),
        Row("nan_pet", "-", "NaN voxel in the PET", 1, "case 'bad'.*NaN or infinite",
            lambda w: plan_args(w, dataset_with_bad_case(w, "nan_pet", _nan_pet), "nan_pet")),
        Row("truncated_pet", "-", "PET .nii.gz cut short", 1, "case 'bad'.*truncated or corrupt",
            lambda w: plan_args(w, dataset_with_bad_case(w, "truncated_pet", lambda f: _truncate(f["pet"])), "truncated_pet")),
        Row("label_2", "-", "label holds a 2", 1, "case 'bad'.*label values must be 0 and 1",
            lambda w: plan_args(w, dataset_with_bad_case(w, "label_2", _label_value_2), "label_2")),
        Row("label_grid", "-", "label on another grid", 1, "case 'bad'.*differs from the PET grid",
            lambda w: plan_args(w, dataset_with_bad_case(w, "label_grid", _label_other_grid), "label_grid")),
        Row("ct_elsewhere", "-", "CT of another study (no overlap)", 1, "case 'bad'.*CT covers only",
            lambda w: plan_args(w, dataset_with_bad_case(w, "ct_elsewhere", _ct_elsewhere), "ct_elsewhere")),
        Row("missing_ct", "-", "CT file missing", 1, "case 'bad'.*no CT image",
            lambda w: plan_args(w, dataset_with_bad_case(w, "missing_ct", lambda f: f["ct"].unlink()), "missing_ct")),
        Row("not_an_image", "-", "text file named _pet.nii.gz", 1, "case 'bad'.*(unreadable|truncated|not)",
            lambda w: plan_args(w, dataset_with_bad_case(w, "not_an_image", lambda f: f["pet"].write_text("hello")),
                                "not_an_image")),
        Row("empty_folder", "-", "empty dataset folder", 2, "error:.*the folder is empty",
            lambda w: plan_args(w, _mkdir(w.row_dir("empty_folder") / DATASET), "empty_folder")),
        Row("no_dataset", "-", "dataset path that does not exist", 2, "error:.*no dataset folder found",
            lambda w: plan_args(w, w.root / "nowhere", "no_dataset")),
        # ---- item 7: smaller faults
        Row("duplicate_pet", "7", "x_pet.nii and x_pet.nii.gz in one folder", 1, "two files for the pet of this case",
            _duplicate_pet),
        Row("file_ending", "7", "dataset.json file_ending .nii.gz, files .nii", 2, "error:.*file_ending is '.nii.gz'",
            _file_ending_mismatch),
        Row("num_parts_0", "7", "predict --num-parts 0", 2, "error: --num-parts must be at least 1, got 0",
            lambda w: predict_args(w, w.test, w.root / "rows/num_parts_0", "--num-parts", "0")),
        Row("part_id", "-", "predict --num-parts 2 --part-id 2", 2, "error: --part-id must be in 0..1",
            lambda w: predict_args(w, w.test, w.root / "rows/part_id", "--num-parts", "2", "--part-id", "2")),
        Row("two_entry_patch", "7", "plans.json: 3d_fullres patch with 2 entries", 2,
            "error:.*has 2 entries; '3d_fullres' is a 3D configuration",
            lambda w: _hand_edited_plans(w, "two_entry_patch", _two_entry_patch)),
        Row("plans_not_json", "-", "plans.json not JSON", 2, "error:.*plans",
            _plans_not_json),
        Row("stale_temporaries", "7", "temporaries of a killed predict in the output folder", 0, "predicted 0 case",
            _stale_temporaries, check=_no_temporaries),
        # ---- item 6: one line, not a traceback
        Row("fold_abc", "6", "train fold abc", 2, "error: fold must be a number", lambda w: train_args(w, "abc"),
            check=nothing_written),
        Row("unknown_trainer", "6", "train -tr nope", 2, "error: unknown method 'nope'",
            lambda w: train_args(w, "0", "-tr", "nope"), check=nothing_written),
        Row("unknown_network", "6", "train --network nope", 2, "error: unknown network 'nope'",
            lambda w: train_args(w, "0", "--network", "nope"), check=nothing_written),
        Row("epochs_0", "6", "train --epochs 0", 2, "error: epochs and iterations_per_epoch must be >= 1",
            lambda w: train_args(w, "0", "--epochs", "0"), check=nothing_written),
        Row("output_prior_2", "6", "train --output-prior 2", 2, "error: output_prior must be in \\(0, 0.5\\)",
            lambda w: train_args(w, "0", "--output-prior", "2"), check=nothing_written),
        Row("fold_9", "6", "train fold 9 (5 folds)", 2, "error:.*fold 9 does not exist", lambda w: train_args(w, "9"),
            check=nothing_written),
        Row("unknown_stage", "6", "train --stage nope", 2, "error: method 'gdfl' has no stage 'nope'",
            lambda w: train_args(w, "0", "--stage", "nope"), check=nothing_written),
        Row("unplanned_configuration", "-", "train -c 2d (not planned)", 2, "error: configuration '2d' is not in the plans",
            lambda w: train_args(w, "0", "-c", "2d"), check=nothing_written),
        Row("truncated_latest", "6", "train --continue, checkpoint_latest.pt cut short", 0,
            "WARNING.*checkpoint_latest.pt is unreadable.*resuming from checkpoint_best.pt",
            lambda w: _continue_with_truncated(w, "truncated_latest", ("checkpoint_latest.pt",))),
        Row("truncated_both", "6", "train --continue, latest and best checkpoints cut short", 2, "error:.*cannot resume",
            lambda w: _continue_with_truncated(w, "truncated_both", ("checkpoint_latest.pt", "checkpoint_best.pt"))),
        Row("read_only_output", "6", "predict: output folder read-only after the first case", 1,
            "error: Permission denied|error: Operation not permitted|error:.*Read-only", _read_only_after_first_case),
        Row("output_is_file", "6", "predict -o names a file", 1, "error: (File exists|Not a directory)",
            lambda w: predict_args(w, w.test, _touch(w.row_dir("output_is_file") / "out"))),
        Row("missing_model", "-", "predict -m folder that does not exist", 2, "error:",
            lambda w: ["predict", "-i", str(w.test), "-o", str(w.root / "rows/x"), "-m", str(w.root / "nomodel")]),
        Row("missing_fold", "-", "predict -f 3 (not trained)", 2, "error:.*fold",
            lambda w: predict_args(w, w.test, w.root / "rows/missing_fold", "-f", "3")),
        Row("truncated_best", "6", "predict with checkpoint_best.pt cut short", 2, "error:.*checkpoint_best.pt",
            _predict_with_truncated_best),
        Row("no_input", "-", "predict -i folder that does not exist", 2, "error:.*does not exist",
            lambda w: predict_args(w, w.root / "nowhere", w.root / "rows/no_input")),
        Row("overlap", "-", "predict --overlap 1.5", 2, "error: overlap must be in \\[0, 1\\)",
            lambda w: predict_args(w, w.test, w.root / "rows/overlap", "--overlap", "1.5")),
        Row("evaluate_no_gt", "-", "evaluate -g folder that does not exist", 2, "error:.*does not exist",
            lambda w: ["evaluate", "-p", str(w.predictions), "-g", str(w.root / "nowhere")]),
        Row("evaluate_missing_prediction", "-", "evaluate: a labelled case has no prediction", 1,
            "missing|no prediction",
            lambda w: ["evaluate", "-p", str(_empty_dir(w, "evaluate_missing_prediction")), "-g", str(w.raw),
                       "-o", str(w.root / "rows/evaluate_missing_prediction/eval")]),
        Row("evaluate_pred_grid", "-", "evaluate: a predicted mask on another grid", 1, "case 'phantom_000'.*grid",
            lambda w: _evaluate_with_prediction(w, "evaluate_pred_grid", _label_other_grid)),
        Row("evaluate_pred_values", "-", "evaluate: a predicted mask holding a 2", 1, "case 'phantom_000'.*0 and 1",
            lambda w: _evaluate_with_prediction(w, "evaluate_pred_values", _label_value_2)),
        Row("clinical_no_case", "-", "clinical.csv without a case column", 2, "error:.*'case' or 'case_id' column",
            lambda w: plan_args(w, dataset_with_bad_case(w, "clinical_no_case", lambda f: (
                f["pet"].parent / "clinical.csv").write_text("id,cohort\nbad,a\n")), "clinical_no_case")),
        Row("import_dicom_none", "-", "import-dicom: a folder without DICOM files", 1, "no PET study found",
            lambda w: ["import-dicom", str(_mkdir(w.row_dir("import_dicom_none") / "dicom")), "-o",
                       str(w.root / "rows/import_dicom_none/out")]),
        Row("import_dicom_missing", "-", "import-dicom: no such folder", 2, "error:.*DICOM folder does not exist",
            lambda w: ["import-dicom", str(w.root / "nowhere"), "-o", str(w.root / "rows/import_dicom_missing")]),
        Row("synth_zero", "-", "synth -n 0", 2, "error:", lambda w: ["synth", str(w.root / "rows/synth0"), "-n", "0"]),
        Row("demo_bad_fold", "-", "demo --folds 9", 2, "error:", lambda w: ["demo", str(w.root / "rows/demo"), "--folds", "9",
                                                                            "--num-train", "4", "--num-test", "1"]),
        # ---- item 8: the same dataset argument everywhere
        Row("train_raw_path", "8", "train <raw dataset path> (as given to plan_and_preprocess -d)", 0, "trained fold 0",
            lambda w: ["train", str(w.raw), "0", "--epochs", "1", "--iterations", "1", "--device", "cpu",
                       "--preprocessed", str(w.pp), "--results", str(w.row_dir("train_raw_path") / "results")]),
        Row("train_id", "8", "train 917 (the dataset id)", 0, "trained fold 0",
            lambda w: ["train", "917", "0", "--epochs", "1", "--iterations", "1", "--device", "cpu",
                       "--preprocessed", str(w.pp), "--results", str(w.row_dir("train_id") / "results")]),
        # ---- item 5: permissions of written files
        Row("modes_umask_027", "5", "predict under umask 027", 0, "predicted 1 case",
            lambda w: predict_args(w, _one_test_case(w, "modes_umask_027"), w.root / "rows/modes_umask_027/out"),
            check=lambda w: _modes(w, "modes_umask_027", 0o640), umask=0o027),
        Row("modes_setup", "5", "setup's checkpoint, plans, mask CSV, progress.png (umask of this shell)", 0,
            "predicted 0 case", lambda w: predict_args(w, w.test, w.predictions), check=_setup_modes),
    ]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _empty_dir(work: Work, key: str) -> Path:
    return _mkdir(work.row_dir(key) / "pred")


def _one_test_case(work: Work, key: str) -> Path:
    folder = work.row_dir(key) / "in"
    copy_case(work.test, first_test_case(work), folder)
    return folder


def _plans_not_json(work: Work) -> list[str]:
    args = _hand_edited_plans(work, "plans_not_json", lambda plans: None)
    (work.root / "rows" / "plans_not_json" / "pp" / DATASET / "plans.json").write_text("{ not json")
    return args


def _evaluate_with_prediction(work: Work, key: str, change: Callable[[dict[str, Path]], None]) -> list[str]:
    """evaluate -g <one training phantom> with its label, changed, as the prediction."""
    row = work.row_dir(key)
    case = first_train_case(work)
    copy_case(work.raw, case, row / "gt")
    mask = _mkdir(row / "pred") / f"{case}.nii.gz"
    shutil.copyfile(work.raw / f"{case}_seg.nii.gz", mask)
    change({"seg": mask})
    return ["evaluate", "-p", str(row / "pred"), "-g", str(row / "gt"), "-o", str(row / "eval")]


def _continue_with_truncated(work: Work, key: str, names: tuple[str, ...]) -> list[str]:
    results = _copy_results(work, key)
    for name in names:
        _truncate(results / DATASET / "gdfl__3d_fullres" / "fold_0" / name)
    return _continue_args(work, results)


def _predict_with_truncated_best(work: Work) -> list[str]:
    results = _copy_results(work, "truncated_best")
    model = results / DATASET / "gdfl__3d_fullres"
    _truncate(model / "fold_0" / "checkpoint_best.pt")
    return ["predict", "-i", str(work.test), "-o", str(work.root / "rows/truncated_best/out"), "-m", str(model),
            "--device", "cpu"]


# --------------------------------------------------------------------------- the table
def run_row(work: Work, row: Row) -> Result:
    try:
        args = row.prepare(work)
    except Exception as exc:  # noqa: BLE001 - a row that cannot be set up is reported, not fatal
        return Result(row.key, row.item, row.what, "", -1, f"setup failed: {type(exc).__name__}: {exc}", False)
    if args is None:
        return Result(row.key, row.item, row.what, "", -1, "skipped: cannot make a read-only folder here", True,
                      "skipped")
    done = run_cli(args, work.root, env=row.env, umask=row.umask)
    line = user_line(done, row.message)
    ok = done.returncode == row.exit_code and re.search(row.message, line) is not None and "TRACEBACK" not in line
    note = ""
    if row.check is not None:
        problem = row.check(work)
        if problem:
            ok, note = False, problem
    if row.key == "read_only_output":
        _make_writable(work.root / "rows" / row.key)
    command = "autopetseg " + args[0] + " " + " ".join(shorten(a, work) for a in args[1:])
    return Result(row.key, row.item, row.what, command, done.returncode, shorten(line, work), ok, note)


def shorten(text: str, work: Work) -> str:
    return text.replace(str(work.root), "$W")


def markdown(results: list[Result]) -> str:
    out = ["| # | item | input or fault | command | exit | what the user reads | ok |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        line = r.line.replace("|", "\\|")
        verdict = "ok" if r.ok and not r.note else (r.note or "UNEXPECTED")
        out.append(f"| {i} | {r.item} | {r.what} | `{r.command}` | {r.exit_code} | {line} | {verdict} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    p.add_argument("--only", nargs="+", help="run only these row keys")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    work = Work((args.work or Path(tempfile.mkdtemp(prefix="bad_inputs_"))).resolve())
    work.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup(work)
    selected = [r for r in rows() if not args.only or r.key in args.only]
    unknown = set(args.only or ()) - {r.key for r in rows()}
    if unknown:
        raise SystemExit(f"unknown row(s): {sorted(unknown)}")
    results = []
    for row in selected:
        result = run_row(work, row)
        results.append(result)
        print(f"{'ok ' if result.ok else 'BAD'} {row.key}: exit {result.exit_code}: {result.line[:200]}", file=sys.stderr)
    print(markdown(results))
    print(f"\n{sum(r.ok for r in results)} of {len(results)} rows as expected; "
          f"{time.perf_counter() - started:.0f} s (work folder {work.root})")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
