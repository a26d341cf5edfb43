"""Issue 17, item 3: an output folder records what produced its predictions; another producer is
refused (unless ``--overwrite``, which replaces the earlier predictions) instead of reporting the
old masks as "finished before".

The folds are "constant" networks (``test_predict``): each predicts one lesion probability in the
whole body, so which model made a mask is visible in the mask itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _image_helpers import csv_rows, read, write_flat_case
from test_predict import ConstantNet, write_constant_model

from autopetseg.cli import main
from autopetseg.errors import InputError
from autopetseg.inference.output_record import PRODUCER_FILE
from autopetseg.inference.predictor import PREDICTIONS_CSV, PredictorSettings, predict_folder
from autopetseg.models.checkpoints import save_checkpoint
from autopetseg.models.networks import NETWORKS


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(NETWORKS, "constant_test", ConstantNet)


def _mirrored(model):
    """The folds as if trained with mirroring (so that --tta means something)."""
    for record in model.glob("fold_*/model.json"):
        raw = json.loads(record.read_text())
        record.write_text(json.dumps({**raw, "mirror_axes": [0, 1, 2]}))
    return model


def _settings(**changes):
    return PredictorSettings(device="cpu", **changes)


def test_another_producer_is_refused_and_overwrite_replaces_its_predictions(tmp_path, registered, capsys):
    cases, out = tmp_path / "cases", tmp_path / "out"
    for i, case in enumerate(("a", "b")):
        write_flat_case(cases, case, seg_ext=None, seed=i)
    lesion = _mirrored(write_constant_model(tmp_path / "lesion", {0: 0.9, 1: 0.9}, {}))
    nothing = _mirrored(write_constant_model(tmp_path / "nothing", {0: 0.1, 1: 0.1}, {}))

    assert predict_folder(cases, out, lesion, _settings()).predicted == ["a", "b"]
    record = json.loads((out / PRODUCER_FILE).read_text())
    assert record["model_dir"] == str(lesion.resolve())
    assert record["producer"]["stages"][0]["folds"] == [0, 1] and record["producer"]["tta"] is False
    assert read(out / "a.nii.gz").any()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert predict_folder(cases, out, lesion, _settings()).skipped == ["a", "b"]  # the same producer: resumed

    for model, changes, says in [
        (nothing, {}, "other weights"),
        (lesion, {"folds": [0]}, r"folds \[0, 1\] -> \[0\]"),
        (lesion, {"tta": True}, "tta False -> True"),
        (lesion, {"min_suv": 2.0}, "min_suv None -> 2.0"),
    ]:
        with pytest.raises(InputError, match=says):
            predict_folder(cases, out, model, _settings(**changes))
    # The same model folder, fold 1 trained again: other weights, refused.
    net = ConstantNet()
    with torch.no_grad():
        net.logits.copy_(torch.tensor([0.0, -5.0]))
    save_checkpoint(lesion / "fold_1" / "checkpoint_best.pt", {"network": net.state_dict(), "epoch": 3})
    with pytest.raises(InputError, match="other weights"):
        predict_folder(cases, out, lesion, _settings())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes  # nothing was touched

    capsys.readouterr()
    code = main(["predict", "-i", str(cases), "-o", str(out), "-m", str(nothing), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0], err

    report = predict_folder(cases, out, nothing, _settings(overwrite=True))
    assert report.predicted == ["a", "b"] and not report.skipped
    assert not read(out / "a.nii.gz").any() and not read(out / "b.nii.gz").any()
    assert json.loads((out / PRODUCER_FILE).read_text())["model_dir"] == str(nothing.resolve())


def test_overwrite_removes_the_earlier_producers_other_cases_and_a_legacy_folder_is_refused(tmp_path, registered):
    cases, fewer, out = tmp_path / "cases", tmp_path / "fewer", tmp_path / "out"
    for i, case in enumerate(("a", "b")):
        write_flat_case(cases, case, seg_ext=None, seed=i)
    write_flat_case(fewer, "a", seg_ext=None, seed=0)
    lesion = write_constant_model(tmp_path / "lesion", {0: 0.9}, {})
    nothing = write_constant_model(tmp_path / "nothing", {0: 0.1}, {})
    predict_folder(cases, out, lesion, _settings())
    predict_folder(fewer, out, nothing, _settings(overwrite=True))
    # b was the other model's: gone, so the folder never mixes two producers
    assert sorted(csv_rows(out / PREDICTIONS_CSV)) == ["a"] and not (out / "b.nii.gz").exists()

    (out / PRODUCER_FILE).unlink()  # a folder written before predictions recorded their producer
    with pytest.raises(InputError, match=f"no {PRODUCER_FILE}"):
        predict_folder(cases, out, nothing, _settings())


def test_asking_for_probabilities_redoes_cases_finished_without_them(tmp_path, registered):
    cases, out = tmp_path / "cases", tmp_path / "out"
    write_flat_case(cases, "a", seg_ext=None)
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {})
    predict_folder(cases, out, model, _settings())
    report = predict_folder(cases, out, model, _settings(save_probabilities=True))
    assert report.predicted == ["a"]
    assert np.isclose(read(out / "probabilities" / "a.nii.gz").max(), 0.9, atol=1e-3)
