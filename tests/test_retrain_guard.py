"""Issue 17, item 4: training a stage that was trained before, without ``--continue``, is refused
before anything is written, unless ``--overwrite`` (which removes the earlier run's files first)."""

from __future__ import annotations

import csv

import pytest
import torch
from _cache_helpers import DATASET, tiny_plans, write_tiny_cache

from autopetseg.cli import main
from autopetseg.errors import InputError
from autopetseg.training.run import run_training


def test_a_trained_fold_needs_continue_or_overwrite(tmp_path, capsys):
    cache = tmp_path / "pre"
    write_tiny_cache(cache, n_cases=6, n_lesion_free=1, plans=tiny_plans(features=(4, 8)))
    common = dict(preprocessed_root=cache, results_root=tmp_path / "res", device="cpu", num_workers=0,
                  iterations_per_epoch=2)
    fold = run_training(cache / DATASET, 0, "gdfl", epochs=2, **common)
    files = sorted(fold.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    with pytest.raises(InputError, match=r"trained before \(finished: checkpoint_final.pt.*--continue.*--overwrite"):
        run_training(cache / DATASET, 0, "gdfl", epochs=1, **common)
    with pytest.raises(InputError, match="give one of them"):
        run_training(cache / DATASET, 0, "gdfl", epochs=1, continue_training=True, overwrite=True, **common)
    capsys.readouterr()
    code = main(["train", str(cache / DATASET), "0", "--epochs", "1", "--iterations", "2", "--device", "cpu",
                 "--num-workers", "0", "--preprocessed", str(cache), "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and str(fold) in err[0], err
    assert sorted(fold.iterdir()) == files and {p: p.stat().st_mtime_ns for p in files} == stamps  # untouched

    run_training(cache / DATASET, 0, "gdfl", epochs=1, overwrite=True, **common)
    with open(fold / "training_log.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0"]  # a new run, not the old one's rows
    assert torch.load(fold / "checkpoint_best.pt", weights_only=True)["epoch"] == 0
