"""``autopetseg demo`` end to end with very short training: every stage writes what the next reads."""

from __future__ import annotations

import csv

import SimpleITK as sitk

from autopetseg.cli import main
from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry
from autopetseg.demo import DemoSettings, run_demo


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    settings = DemoSettings(n_train=8, n_test=2, folds=(0, 1), epochs=1, iterations_per_epoch=2, num_processes=1)
    result = run_demo(tmp_path, settings)

    held_out = discover(tmp_path / "held_out").cases
    for record in held_out:  # one mask per held-out case, exactly on its PET grid
        mask = sitk.ReadImage(str(result.prediction_dir / f"{record.case_id}.nii.gz"))
        assert Geometry.of(mask).same_grid(Geometry.of(sitk.ReadImage(str(record.pet))))
    with open(result.prediction_dir / "predictions.csv") as f:
        assert sorted(row["case_id"] for row in csv.DictReader(f)) == sorted(r.case_id for r in held_out)
    assert result.summary["n_cases"] == len(held_out)
    assert (result.evaluation_dir / "summary.json").is_file()
    assert len(list((result.evaluation_dir / "png").glob("*.png"))) == len(held_out)
    for fold in settings.folds:
        assert (result.model_dir / f"fold_{fold}" / "checkpoint_best.pt").is_file()

    # A second run reuses the data, the cache, the trained folds and the finished predictions.
    mtimes = {p: p.stat().st_mtime_ns for p in result.prediction_dir.glob("*.nii.gz")}
    assert main(["demo", str(tmp_path), "--num-train", "8", "--num-test", "2", "--epochs", "1", "--iterations", "2", "-np", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in result.prediction_dir.glob("*.nii.gz")} == mtimes
    out = capsys.readouterr().out
    assert "DSC (lesion-positive cases)" in out and "synthesize" not in out.split("time per stage:")[1]


def test_demo_starts_from_the_background_prior():
    assert DemoSettings().resolved_training_overrides() == {"output_prior": 0.01}
    assert DemoSettings(trainer="l1dfl").resolved_training_overrides() == {"output_prior": 0.01}
    assert DemoSettings(trainer="l1dfl", training_overrides={"epochs": 3}).resolved_training_overrides() == {"epochs": 3}
