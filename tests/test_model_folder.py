"""Model folders: self-describing, safe to share, read back as before, and methods made of stages.

* a model folder written before methods had stages (``tests/data/legacy_model``) predicts the same
  mask, voxel for voxel, as it did then;
* folds trained on different plans are refused by name; a checkpoint carrying a pickled object
  does not run it;
* a two-stage toy method (a 2D coronal stage whose lesion probability is an extra input channel
  of a 3D stage) trains, resumes and predicts through the stage machinery on tiny phantoms.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _cache_helpers import DATASET, tiny_plans, write_tiny_cache
from _image_helpers import csv_rows, read

from autopetseg.errors import InputError
from autopetseg.inference.ensemble import load_ensemble
from autopetseg.inference.predictor import PREDICTIONS_CSV, PredictorSettings, predict_folder
from autopetseg.models import methods
from autopetseg.models.folders import read_method, read_record
from autopetseg.models.methods import MethodSpec, StageSpec
from autopetseg.planning.plans import ConfigurationPlan, NetworkTopology

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_model"


# ----------------------------------------------------------------------------- legacy folders


def test_a_model_folder_from_before_stages_predicts_the_same_mask(tmp_path):
    model = LEGACY / "gdfl__3d_fullres"
    assert not (model / "method.json").exists() and not (model / "fold_0" / "model.json").exists()
    out = tmp_path / "pred"
    report = predict_folder(LEGACY / "case", out, model, PredictorSettings(device="cpu", save_probabilities=True))
    assert report.predicted == ["phantom_000"], report.failures
    expected = read(LEGACY / "expected" / "phantom_000.nii.gz")
    assert expected.sum() > 0  # the fixture finds something, so equality means something
    np.testing.assert_array_equal(read(out / "phantom_000.nii.gz"), expected)
    np.testing.assert_allclose(read(out / "probabilities" / "phantom_000.nii.gz"),
                               read(LEGACY / "expected" / "phantom_000_probability.nii.gz"), atol=1e-6)
    got, want = csv_rows(out / PREDICTIONS_CSV)["phantom_000"], csv_rows(LEGACY / "expected" / PREDICTIONS_CSV)["phantom_000"]
    for key in ("tmtv_ml", "tlg", "suvmax", "lesion_count"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6), key
    # read as the one-stage method of its name
    assert read_method(model).name == "gdfl" and len(read_method(model).stages) == 1


# ----------------------------------------------------------------------------- safety


def _copy_legacy(tmp_path: Path, folds=(0, 1)) -> Path:
    model = tmp_path / "gdfl__3d_fullres"
    shutil.copytree(LEGACY / "gdfl__3d_fullres", model)
    for fold in folds:
        if fold != 0:
            shutil.copytree(model / "fold_0", model / f"fold_{fold}")
    return model


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path):
    model = _copy_legacy(tmp_path, folds=(0,))
    marker = tmp_path / "ran"
    state = torch.load(model / "fold_0" / "checkpoint_best.pt", weights_only=False)
    state["extra"] = _Evil(marker)
    torch.save(state, model / "fold_0" / "checkpoint_best.pt")
    with pytest.raises(InputError, match="checkpoint_best.pt"):
        load_ensemble(model, device="cpu")
    assert not marker.exists()


def test_folds_trained_on_different_plans_are_refused_by_name(tmp_path):
    from autopetseg.training.run import run_training

    results, cache = tmp_path / "results", tmp_path / "preprocessed"
    write_tiny_cache(cache, n_cases=6, n_lesion_free=1, plans=tiny_plans(features=(4, 8)))

    for fold in (0, 1):
        run_training(cache / DATASET, fold, "gdfl", preprocessed_root=cache, results_root=results, device="cpu",
                     epochs=1, iterations_per_epoch=1, num_workers=0)
        plans = json.loads((cache / DATASET / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["batch_size"] += 1  # the dataset is planned again
        (cache / DATASET / "plans.json").write_text(json.dumps(plans))
    model = results / DATASET / "gdfl__3d_fullres"
    records = [read_record(model / f"fold_{k}") for k in (0, 1)]
    assert records[0].plans_sha256 != records[1].plans_sha256
    with pytest.raises(InputError, match="folds 0 and 1 were trained on different plans"):
        load_ensemble(model, device="cpu")
    assert len(load_ensemble(model, folds=[1], device="cpu").folds) == 1  # one plan: fine


# ----------------------------------------------------------------------------- two stages


def _with_coronal_2d(plans):
    """The tiny plans plus a 2D coronal configuration on the same cache (patch (z, x))."""
    topology = NetworkTopology([8, 16], [[1, 1], [2, 2]], [[3, 3], [3, 3]], num_res_units=1)
    plans.configurations["2d"] = ConfigurationPlan("2d", "3d_fullres", list(plans.target_spacing_zyx), [32, 32], 4,
                                                   topology, slice_axis=1)
    return plans


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    write_tiny_cache(root, n_cases=10, n_lesion_free=3, seed=0, plans=_with_coronal_2d(tiny_plans(features=(8, 16))))
    return root


TOY = MethodSpec("toy_cascade", (
    StageSpec("localizer", "gdfl", "2d"),
    StageSpec("segmenter", "gdfl", "3d_fullres", inputs=("localizer",)),
))


def _lesion_case(folder: Path, case_id: str, rng: np.random.Generator) -> None:
    """A raw case drawn like the tiny cache (4 mm voxels, body 1 SUV, CT 0 HU, lesions SUV 6-9)."""
    shape = (32, 32, 32)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    body = (((z - 16) / 13.4) ** 2 + ((y - 16) / 13.4) ** 2 + ((x - 16) / 13.4) ** 2) <= 1
    pet = np.where(body, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    sphere = ((z - 14) ** 2 + (y - 18) ** 2 + (x - 15) ** 2) <= 3.3 ** 2
    seg[sphere], pet[sphere] = 1, 7.5
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("pet", pet), ("ct", np.where(body, 0.0, -1024.0).astype(np.float32)), ("seg", seg)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(image, str(folder / f"{case_id}_{name}.nii.gz"))


@pytest.mark.slow
def test_a_two_stage_method_trains_resumes_and_predicts(tmp_path, cache, monkeypatch):
    from autopetseg.training.run import run_training

    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)
    results = tmp_path / "results"
    common = dict(preprocessed_root=cache, results_root=results, device="cpu", iterations_per_epoch=4,
                  num_workers=0, foreground_share=0.5)
    # Interrupted after the first stage: the second resumes from there.
    run_training(cache / DATASET, 0, TOY.name, stage="localizer", epochs=2, **common)
    model = results / DATASET / "toy_cascade__3d_fullres"
    localizer, segmenter = model / "fold_0" / "localizer", model / "fold_0" / "segmenter"
    assert (localizer / "checkpoint_best.pt").is_file() and not segmenter.exists()
    assert read_record(localizer).strategy.kind == "slices" and read_record(localizer).network.in_channels == 2
    run_training(cache / DATASET, 0, TOY.name, epochs=2, continue_training=True, **common)
    record = read_record(segmenter)
    assert record.inputs == ["localizer"] and record.network.in_channels == 3
    cases = json.loads((cache / DATASET / "dataset.json").read_text())["cases"]
    cues = sorted(p.name for p in (segmenter / "inputs").iterdir())
    assert cues == sorted(f"{c['case_id']}_localizer.npy" for c in cases)  # fold 0's training and validation cases
    cue = np.load(segmenter / "inputs" / cues[0])
    assert cue.shape == (32, 32, 32) and cue.dtype == np.float16 and 0.0 <= cue.min() and cue.max() <= 1.0
    stamps = {p: p.stat().st_mtime_ns for p in (localizer / "checkpoint_final.pt", segmenter / "checkpoint_final.pt")}
    run_training(cache / DATASET, 0, TOY.name, epochs=2, continue_training=True, **common)  # finished: nothing redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert read_method(model) == TOY

    raw = tmp_path / "raw"
    _lesion_case(raw, "new", np.random.default_rng(3))
    report = predict_folder(raw, tmp_path / "pred", model, PredictorSettings(device="cpu", save_probabilities=True))
    assert report.predicted == ["new"], report.failures
    probability = read(tmp_path / "pred" / "probabilities" / "new.nii.gz")
    assert probability.shape == (32, 32, 32) and np.isfinite(probability).all()
    mask = read(tmp_path / "pred" / "new.nii.gz")
    np.testing.assert_array_equal(mask, (probability > 0.5).astype(np.uint8))


def test_out_of_fold_inputs_come_from_the_fold_that_validated_each_case(tmp_path, cache, monkeypatch):
    from autopetseg.models.trained import ensemble_probabilities, load_trained_stage
    from autopetseg.preprocessing.preprocessor import map_between_caches
    from autopetseg.training.run import run_training
    from autopetseg.training.splits import fold_cases

    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)
    results = tmp_path / "results"
    common = dict(preprocessed_root=cache, results_root=results, device="cpu", iterations_per_epoch=2, epochs=1,
                  num_workers=0)
    for fold in range(5):
        run_training(cache / DATASET, fold, TOY.name, stage="localizer", seed=fold, **common)
    model = results / DATASET / "toy_cascade__3d_fullres"
    shutil.move(model / "fold_3" / "localizer", tmp_path / "fold_3_localizer")
    with pytest.raises(InputError, match="stage 'localizer' of fold 3"):
        run_training(cache / DATASET, 0, TOY.name, stage="segmenter", stage_inputs="out_of_fold", **common)
    shutil.move(tmp_path / "fold_3_localizer", model / "fold_3" / "localizer")
    run_training(cache / DATASET, 0, TOY.name, stage="segmenter", stage_inputs="out_of_fold", **common)

    splits = json.loads((cache / DATASET / "splits.json").read_text())
    case = fold_cases(splits, 2)[1][0]  # validated by fold 2, a training case of fold 0
    assert case in fold_cases(splits, 0)[0]
    data_dir = cache / DATASET / "3d_fullres"
    props = json.loads((data_dir / f"{case}.json").read_text())
    image = torch.from_numpy(np.array(np.load(data_dir / f"{case}.npy")))

    def cue_of(fold):
        stage = load_trained_stage(model / f"fold_{fold}" / "localizer", fold, model)
        lesion = ensemble_probabilities([stage], image, device=torch.device("cpu"))["probabilities"][1].numpy()
        return map_between_caches(lesion, props, props).astype(np.float16)

    written = np.load(model / "fold_0" / "segmenter" / "inputs" / f"{case}_localizer.npy")
    np.testing.assert_array_equal(written, cue_of(2))
    assert not np.array_equal(written, cue_of(0))


def test_a_trainer_with_a_label_column_carries_case_labels(tmp_path, cache, monkeypatch):
    from autopetseg.training import variants
    from autopetseg.training.run import prepare_trainer

    class LabelledTrainer(variants.GDFLTrainer):
        name = "labelled_test"
        label_column = "prognosis"

    monkeypatch.setitem(variants.TRAINERS, LabelledTrainer.name, LabelledTrainer)
    monkeypatch.setitem(methods.METHODS, LabelledTrainer.name, methods.one_stage(LabelledTrainer.name))
    dataset = tmp_path / "preprocessed" / DATASET
    shutil.copytree(cache / DATASET, dataset)
    listing = json.loads((dataset / "dataset.json").read_text())
    for i, case in enumerate(listing["cases"]):
        case["clinical"] = {"prognosis": str(i % 2)} if i != 4 else {}
    (dataset / "dataset.json").write_text(json.dumps(listing))
    trainer = prepare_trainer(dataset, 0, LabelledTrainer.name, preprocessed_root=tmp_path / "preprocessed",
                              results_root=tmp_path / "results", device="cpu", num_workers=0, batch_size=6)
    trainer.setup()
    labels = {c["case_id"]: c["clinical"].get("prognosis") for c in listing["cases"]}
    assert {c.case_id: c.case_label for c in trainer.train_cases} == {
        k: (None if v is None else int(v)) for k, v in labels.items() if k in trainer.train_case_ids}
    batch = next(trainer.train_loader)
    assert batch["case_label"].dtype == torch.int64 and set(batch["case_label"].tolist()) <= {-1, 0, 1}

    listing["cases"][0]["clinical"] = {"prognosis": "maybe"}
    (dataset / "dataset.json").write_text(json.dumps(listing))
    other = prepare_trainer(dataset, 0, LabelledTrainer.name, preprocessed_root=tmp_path / "preprocessed",
                            results_root=tmp_path / "results2", device="cpu", num_workers=0)
    with pytest.raises(InputError, match="'prognosis' of clinical.csv must hold 0 or 1"):
        other.setup()
