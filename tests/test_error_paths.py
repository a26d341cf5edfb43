"""Issue #17, items 5-8: files get the user's permissions, killed runs' temporaries go, every
command's error path is one line with a non-zero exit (real subprocesses), ``train`` checks its
arguments before writing anything, the smaller faults, and one dataset argument for every command.

The whole table of bad inputs is ``benchmarks/bad_inputs.py``; the slow test here runs its rows
that need a trained model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _cache_helpers import DATASET, write_tiny_cache
from _image_helpers import Grid, write_dataset_json, write_flat_case, write_nnunet_case, write_volume
from autopetseg.cli import _environment_fault, main
from autopetseg.data.discovery import discover
from autopetseg.data.parallel import CaseFailed
from autopetseg.errors import InputError
from autopetseg.inference.predictor import PredictorSettings
from autopetseg.io_utils import atomic_path, file_lock, host_tag, remove_stale_temporaries, write_json
from autopetseg.planning.plans import Plans
from autopetseg.training.progress import plot_progress
from autopetseg.training.run import resolve_preprocessed_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bad_inputs.py"
GRID = Grid((12, 14, 14), (4.0, 4.0, 4.0))


def _script():
    """``benchmarks/bad_inputs.py`` as a module (its CLI runner and the table's rows)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.append(str(SCRIPT.parent))
    import bad_inputs

    return bad_inputs


# --------------------------------------------------------------------------- item 5: permissions
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    import torch

    from autopetseg.data.imageio import Geometry, write_image
    from autopetseg.models.checkpoints import save_checkpoint

    before = os.umask(umask)
    try:
        write_json(tmp_path / "plans.json", {"a": 1})
        save_checkpoint(tmp_path / "checkpoint_best.pt", {"w": torch.zeros(2)})
        write_image(tmp_path / "mask.nii.gz", np.zeros((2, 3, 4), np.uint8),
                    Geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    finally:
        os.umask(before)
    for name in ("plans.json", "checkpoint_best.pt", "mask.nii.gz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# --------------------------------------------------------------------------- item 7: stale temporaries
def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    host = host_tag()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = tmp_path / f".checkpoint_latest.pt.tmp-999999999@{host}-abcdefgh.pt"  # its writer is gone
        alive = tmp_path / f".case.nii.gz.tmp-{sleeper.pid}@{host}-abcdefgh.nii.gz"  # still being written
        other_host = tmp_path / ".case.nii.gz.tmp-12@elsewhere-abcdefgh.nii.gz"
        old_name = tmp_path / ".predictions.csv.k3j4h5g6.csv"  # an earlier version's temporary
        old_lock = tmp_path / ".predictions.csv.lock"
        young_old_name = tmp_path / ".x.json.a1b2c3d4.json"
        user_file = tmp_path / ".hidden_settings"
        for path in (dead, alive, other_host, old_name, old_lock, young_old_name, user_file):
            path.write_bytes(b"x")
        two_hours_ago = time.time() - 7200
        for path in (old_name, old_lock, user_file):
            os.utime(path, (two_hours_ago, two_hours_ago))
        (tmp_path / "sub").mkdir()
        nested = tmp_path / "sub" / f".p.png.tmp-999999999@{host}-zzzzzzzz.png"
        nested.write_bytes(b"x")

        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(p.name for p in (dead, old_name, old_lock))
        assert all(p.exists() for p in (alive, other_host, young_old_name, user_file, nested))
        assert remove_stale_temporaries(tmp_path, recursive=True) == [nested]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_write_names_its_writer_and_the_lock_file_goes(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        assert f".tmp-{os.getpid()}@" in tmp.name and tmp.name.endswith(".json")
        tmp.write_text("{}")
    with file_lock(tmp_path / ".predictions.csv.lock"):
        assert (tmp_path / ".predictions.csv.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# --------------------------------------------------------------------------- item 6: one line
def test_machine_faults_are_one_line_and_bugs_keep_their_traceback():
    denied = PermissionError(13, "Permission denied", "/out/.c1.nii.gz.tmp-12@h-abcdefgh.nii.gz")
    assert _environment_fault(denied) == "Permission denied: /out"
    wrapped = CaseFailed("c1", denied)
    wrapped.__cause__ = denied
    assert _environment_fault(wrapped) == "case 'c1': Permission denied: /out"
    assert _environment_fault(OSError(28, "No space left on device", "/out/c1.nii.gz")) == \
        "No space left on device: /out/c1.nii.gz"
    bug = CaseFailed("c1", IndexError("oops"))
    bug.__cause__ = IndexError("oops")
    assert _environment_fault(bug) is None and _environment_fault(ValueError("x")) is None


@pytest.mark.parametrize("args, message", [
    (["abc"], "fold must be a number"),
    (["0", "-tr", "nope"], "unknown method 'nope'"),
    (["0", "--network", "nope"], "unknown network 'nope'"),
    (["0", "--epochs", "0"], "epochs and iterations_per_epoch must be >= 1"),
    (["0", "--output-prior", "2"], r"output_prior must be in \(0, 0.5\)"),
    (["0", "--stage", "nope"], "has no stage 'nope'"),
    (["9"], "fold 9 does not exist; the splits have folds 0..4"),
])
def test_train_checks_its_arguments_before_writing_anything(tmp_path, capsys, args, message):
    write_tiny_cache(tmp_path / "pp", n_cases=6)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["train", DATASET, *args, "--device", "cpu", "--preprocessed", str(tmp_path / "pp"),
                 "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("autopetseg train: error:") and "\n" not in err
    assert re.search(message, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no splits.json, no results


@pytest.mark.parametrize("args, message", [
    (["--time-budget", "10m"], r"a time budget sizes a CPU plan \(--device cpu\)"),
    (["--gpu-memory", "8", "--time-budget", "10m"], "a time budget sizes a CPU plan"),
])
def test_plan_and_preprocess_time_budget_is_for_a_cpu(tmp_path, capsys, args, message):
    code = main(["plan_and_preprocess", "-d", str(tmp_path), *args, "--preprocessed", str(tmp_path / "pp")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("autopetseg plan_and_preprocess: error:") and "\n" not in err
    assert re.search(message, err) and not (tmp_path / "pp").exists()


# --------------------------------------------------------------------------- item 7: smaller faults
def test_duplicate_file_of_one_case_fails_that_case_only(tmp_path):
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget

    raw = tmp_path / "Dataset043_Dup"
    for i, case in enumerate(("a", "b", "c")):
        write_flat_case(raw, case, grid=GRID, seed=i)
    (raw / "a_pet.nii").write_bytes((raw / "a_pet.nii.gz").read_bytes())  # x_pet.nii beside x_pet.nii.gz
    result = plan_and_preprocess(raw, budget=ComputeBudget(device="cpu"), num_processes=1,
                                 preprocessed_root=tmp_path / "pp")
    assert [(f.case, "two files for the pet of this case" in f.reason) for f in result.failures] == [("a", True)]
    manifest = json.loads((result.output_dir / "dataset.json").read_text())
    assert [c["case_id"] for c in manifest["cases"]] == ["b", "c"]


def test_file_ending_mismatch_names_dataset_json(tmp_path, caplog):
    write_nnunet_case(tmp_path, "x", file_ending=".nii")
    write_dataset_json(tmp_path, {"0": "CT", "1": "PET"}, file_ending=".nii.gz")
    with pytest.raises(InputError, match=r"file_ending is '.nii.gz' but imagesTr holds .*2 '.nii'") as info:
        discover(tmp_path)
    assert info.value.file == str(tmp_path / "dataset.json")
    write_nnunet_case(tmp_path, "y", file_ending=".nii.gz")  # some match: a warning names the others
    assert [c.case_id for c in discover(tmp_path).cases] == ["y"]
    assert "file_ending is '.nii.gz'" in caplog.text


def test_num_parts_zero_and_two_entry_patch_messages(tmp_path):
    with pytest.raises(InputError, match="^--num-parts must be at least 1, got 0$"):
        PredictorSettings(num_parts=0).validate()
    write_tiny_cache(tmp_path, n_cases=2)
    path = tmp_path / DATASET / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 32]
    path.write_text(json.dumps(plans))
    with pytest.raises(InputError, match="has 2 entries; '3d_fullres' is a 3D configuration and needs 3") as info:
        Plans.load(path)
    assert "slice_axis" not in str(info.value)


def _green_pixels(path: Path) -> int:
    import matplotlib.image as mpimg

    image = mpimg.imread(path)[..., :3]
    return int((np.abs(image - np.array([0x2C, 0xA0, 0x2C]) / 255).sum(-1) < 0.05).sum())


def test_validation_dsc_of_zero_shows_on_progress_png(tmp_path):
    for value in (0.0, 0.5):
        rows = [{"epoch": e, "train_loss": 1 - 0.05 * e, "lr": 1e-3, "val_mean_dsc": value} for e in range(10)]
        plot_progress(tmp_path / f"p{value}.png", rows)
    zero, half = _green_pixels(tmp_path / "p0.0.png"), _green_pixels(tmp_path / "p0.5.png")
    assert zero >= 0.9 * half > 0  # before: the curve at 0 lay under the frame (36 vs 76 pixels)


# --------------------------------------------------------------------------- item 8: one dataset argument
def test_train_takes_what_plan_and_preprocess_takes(tmp_path, monkeypatch):
    write_tiny_cache(tmp_path / "pp", n_cases=2)
    raw = tmp_path / "raw" / DATASET
    raw.mkdir(parents=True)
    expected = (tmp_path / "pp" / DATASET).resolve()
    for given in (str(raw), DATASET, "900", str(expected)):
        assert resolve_preprocessed_dataset(given, tmp_path / "pp") == expected, given
    monkeypatch.chdir(tmp_path / "raw")
    assert resolve_preprocessed_dataset(DATASET, tmp_path / "pp") == expected


# --------------------------------------------------------------------------- every command, a subprocess
def _tiny_dataset_with_scaled_pet(folder: Path) -> Path:
    write_flat_case(folder, "good", grid=GRID)
    paths = write_flat_case(folder, "bad", grid=GRID, seed=1)
    import SimpleITK as sitk

    pet = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["pet"])))
    write_volume(paths["pet"], pet * np.float32(5), GRID)
    return folder


@pytest.mark.parametrize("command", ["synth", "plan_and_preprocess", "train", "predict", "evaluate", "demo",
                                     "import-dicom"])
def test_every_command_fails_with_one_line_in_a_subprocess(tmp_path, command):
    run_cli = _script().run_cli
    cases = {
        "synth": (["synth", str(tmp_path / "s"), "-n", "0"], 2, "autopetseg synth: error: -n must be at least 1"),
        "plan_and_preprocess": (["plan_and_preprocess", "-d", str(_tiny_dataset_with_scaled_pet(tmp_path / "raw")),
                                 "--device", "cpu", "-np", "1", "--preprocessed", str(tmp_path / "pp")], 1,
                                "case 'bad', file .*bad_pet.nii.gz: PET does not look like SUV"),
        "train": (["train", "Dataset001_X", "abc"], 2, "autopetseg train: error: fold must be a number"),
        "predict": (["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path), "--num-parts", "0"],
                    2, "autopetseg predict: error: --num-parts must be at least 1, got 0"),
        "evaluate": (["evaluate", "-p", str(tmp_path), "-g", str(tmp_path / "nowhere")], 2,
                     "autopetseg evaluate: error: .*the dataset folder does not exist"),
        "demo": (["demo", str(tmp_path / "d"), "--folds", "7"], 2, "autopetseg demo: error: the demo needs --folds within"),
        "import-dicom": (["import-dicom", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], 2,
                         "autopetseg import-dicom: error: .*DICOM folder does not exist"),
    }
    args, code, message = cases[command]
    done = run_cli(args, tmp_path)
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    line = _script().user_line(done, message)
    assert re.search(message, line), line
    if command == "plan_and_preprocess":  # the good case was finished; the bad one named with its statistic
        assert "body median SUV" in line and (tmp_path / "pp" / "raw" / "3d_fullres" / "good.json").is_file()


@pytest.mark.slow
def test_bad_input_rows_that_need_a_trained_model(tmp_path):
    """The rows of ``benchmarks/bad_inputs.py`` around a trained fold, through the real CLI."""
    keys = ["truncated_latest", "truncated_both", "read_only_output", "stale_temporaries", "modes_umask_027",
            "predict_pet_x5", "train_raw_path", "one_slice"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--only", *keys,
                           "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, env=env, timeout=1500)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted(r["key"] for r in rows) == sorted(keys), done.stderr[-3000:]  # in the table's order
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert done.returncode == 0
