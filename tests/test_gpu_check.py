"""``benchmarks/gpu_check.py`` (issue #16): its CPU dry run fills every section, and a failing row
is recorded without stopping the run. Needs neither a GPU nor nnunetv2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("e", "data", "a", "b", "c", "d")


def _load_script():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _ok(rows: list[dict], name_part: str) -> list[dict]:
    return [r for r in rows if name_part in r["name"] and r["status"] == "ok"]


@pytest.mark.slow
def test_dry_run_fills_every_section_with_numbers_or_an_explained_skip(tmp_path):
    from autopetseg.models.methods import METHODS

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=1500)
    log = done.stdout[-6000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == report["exit_code"] and done.returncode in (0, 2), log
    assert report["profile"] == "dry-run" and report["device"] == "cpu"

    sections = report["sections"]
    for key in SECTIONS:
        assert sections[key]["rows"], key
        for row in sections[key]["rows"]:
            # Every row ran, or says why not: by design (the dry run's reduced set, nnunetv2 not
            # installed), because a method's trainer cannot be built, or because the budget's time
            # was spent (a slow CI machine; the core rows below must run); nothing failed.
            assert row["status"] in ("ok", "skipped"), row
            if row["status"] == "skipped":
                assert row["skip"] in ("n/a", "unbuildable", "time") and row["reason"], row

    assert sections["e"]["rows"][0]["torch"] == torch.__version__
    plans = sections["data"]["rows"][1]["plans"]["3d_fullres"]
    assert plans["planned_gb"] > 0 and len(plans["patch_size"]) == 3

    training = sections["a"]["rows"]
    for method in METHODS:  # every method has its eager rows: numbers, or why it cannot be built
        rows = [r for r in training if r["name"].startswith(f"{method} (") or r["name"].startswith(f"{method}/")]
        assert rows, method
        for row in rows:
            if row["status"] == "ok":
                assert row["iterations_per_s"] > 0 and row["peak_gb"] > 0
                # The planner's own networks have a planned memory; the cascades' and the multitask
                # model's configurations are sized by their own planners, which may not write one.
                sized = method in ("gdfl", "l1dfl", "dice", "dicefocal")
                assert (row["planned_gb"] or 0) > 0 if sized else row["planned_gb"] is None or row["planned_gb"] > 0
                assert row["timed_iterations"] == 3
    assert _ok(training, "gdfl (resunet), eager") and _ok(training, "gdfl (resunet), compiled")
    assert _ok(training, "l1dfl (segresnet), eager")
    nnunet = [r for r in training if r["name"].startswith("nnU-Net PlainConvUNet")]
    assert nnunet and all(r["status"] == "ok" or "not installed" in r["reason"] for r in nnunet)

    loading = _ok(sections["b"]["rows"], "gdfl")
    assert loading[0]["iterations_per_s"] > 0 and loading[0]["best_training_iterations_per_s"] > 0

    inference = sections["c"]["rows"]
    assert inference[0]["status"] == "ok" and inference[0]["folds"] == 2
    default, tta, warm = (_ok(inference, tag)[0] for tag in ("TTA off", "--tta", "warm"))
    assert tta["tta"] and not default["tta"] and default["folds"] == 2
    for row in (default, tta, warm):
        parts = row["read_s"] + row["preprocess_s"] + row["network_s"] + row["export_s"]
        assert row["wall_s"] > 0 and parts == pytest.approx(row["wall_s"], rel=1e-6)
        assert row["windows_run"] >= 1

    (ddp,) = sections["d"]["rows"]
    assert ddp["status"] == "ok" and ddp["processes"] == 2 and ddp["samples_per_s"] > 0

    for title in ("(a) training throughput", "(c) inference", "== goals"):
        assert title in done.stdout


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path):
    gpu_check = _load_script()
    report = gpu_check.Report(tmp_path, gpu_check.DRY_RUN, 100.0, {})
    report.set_deadlines({"data": True, "a": True})
    report.row("a", "fails", lambda: 1 / 0)
    report.row("a", "too long", lambda: {"iterations_per_s": 1.0}, needs_s=1e6)
    report.row("a", "by design", lambda: None, skip="dry run")
    report.row("a", "works", lambda: {"iterations_per_s": 2.5})
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["name"]: r for r in saved["sections"]["a"]["rows"]}
    assert rows["fails"]["status"] == "error" and "ZeroDivisionError" in rows["fails"]["error"]
    assert rows["too long"]["status"] == "skipped" and rows["too long"]["skip"] == "time"
    assert rows["by design"]["skip"] == "n/a"
    assert rows["works"]["status"] == "ok" and rows["works"]["iterations_per_s"] == 2.5
    assert report.exit_code() == 1
    text = gpu_check.table(report)
    assert "ERROR ZeroDivisionError" in text and "would not fit the time budget" in text and "2.50" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --dry-run this would run the whole GPU check")
def test_without_a_gpu_every_section_says_so_and_the_exit_code_is_not_zero(tmp_path):
    gpu_check = _load_script()
    assert gpu_check.main(["--out", str(tmp_path)]) != 0
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"]["e"]["rows"][0]["status"] == "ok"
    for key in ("data", "a", "b", "c", "d"):
        assert "no CUDA device" in saved["sections"][key]["rows"][0]["reason"]
