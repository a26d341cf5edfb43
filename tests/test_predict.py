"""``autopetseg predict``: geometry of the masks, ensembling, re-runs, bad cases, parts, a trained model.

Most tests use "constant" folds: a registered test trainer whose network outputs the same class
probabilities everywhere, set by its checkpoint, so the ensemble's answer is known exactly. One
test (marked slow) trains a tiny model on the synthetic cache and checks it finds the lesions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _cache_helpers import tiny_plans, write_tiny_cache
from _image_helpers import Grid, csv_rows, read, write_flat_case
from torch import nn

from autopetseg.cli import main
from autopetseg.data.discovery import discover
from autopetseg.data.records import CaseRecord
from autopetseg.scoring.metrics import dice
from autopetseg.inference.ensemble import ensemble_weights, load_ensemble
from autopetseg.inference.predictor import PREDICTIONS_CSV, Predictor, PredictorSettings, predict_folder, split_cases
from autopetseg.io_utils import write_json
from autopetseg.models.checkpoints import save_checkpoint
from autopetseg.models.folders import FoldRecord, NetworkSpec, model_dir_name, plans_hash, write_method
from autopetseg.models.methods import OutputSpec, StrategySpec, one_stage
from autopetseg.models.networks import NETWORKS

# ----------------------------------------------------------------------------- constant folds


class ConstantNet(nn.Module):
    """In the body (PET > 0.5 SUV) logits (log p0, log p1), so softmax gives back (p0, p1); outside
    it a sure background. The lesion probability ``p`` comes from the checkpoint."""

    def __init__(self, topology=None, in_channels=2, out_channels=2):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        inside = (x[:, :1] > 0.5).float()
        outside = torch.tensor([0.0, -30.0], device=x.device).view(1, 2, 1, 1, 1)
        return inside * self.logits.view(1, 2, 1, 1, 1) + (1 - inside) * outside


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(NETWORKS, "constant_test", ConstantNet)


def write_constant_model(root: Path, lesion_probabilities: dict[int, float], dscs: dict[int, float | None],
                         threshold: float = 0.5) -> Path:
    """A model folder whose fold k predicts lesion probability ``lesion_probabilities[k]`` everywhere."""
    method = one_stage("constant_test")
    model_dir = root / model_dir_name(method)
    plans = tiny_plans(patch=(8, 8, 8))
    plans.save(model_dir / "plans.json")
    write_method(model_dir, method)
    raw_plans = json.loads((model_dir / "plans.json").read_text())
    for fold, p in lesion_probabilities.items():
        net = ConstantNet()
        with torch.no_grad():
            net.logits.copy_(torch.tensor([math.log(1 - p), math.log(p)]))
        fold_dir = model_dir / f"fold_{fold}"
        fold_dir.mkdir(parents=True)
        FoldRecord(
            method=method.name, stage="segmenter", trainer="constant_test", fold=fold, configuration="3d_fullres",
            plans=raw_plans, plans_sha256=plans_hash(raw_plans),
            network=NetworkSpec("constant_test", plans.configuration("3d_fullres").network),
            output=OutputSpec(threshold=threshold), strategy=StrategySpec("sliding_window"), patch_size=[8, 8, 8],
            preprocessing=None,
        ).save(fold_dir)
        save_checkpoint(fold_dir / "checkpoint_best.pt", {"network": net.state_dict(), "epoch": 0})
        if dscs.get(fold) is not None:
            write_json(fold_dir / "validation.json", {"mean_dsc": dscs[fold]})
    return model_dir


def body_of(paths) -> np.ndarray:
    """Where the constant folds speak: PET above 0.5 SUV."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(paths["pet"]))) > 0.5


def on_finer_grid(image: sitk.Image, factor: int, shift_mm=(0.0, 0.0, 0.0), fill: float = -1024.0) -> sitk.Image:
    """``image`` resampled onto a ``factor``× finer grid over the same field of view, shifted by ``shift_mm``."""
    ref = sitk.Image([s * factor for s in image.GetSize()], sitk.sitkFloat32)
    ref.SetSpacing([s / factor for s in image.GetSpacing()])
    ref.SetDirection(image.GetDirection())
    corner = image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 / factor] * 3)
    ref.SetOrigin([c + d for c, d in zip(corner, shift_mm)])
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, fill)


def test_ensemble_weights_follow_the_validation_dsc_with_a_fallback(caplog):
    assert ensemble_weights([0.8, 0.2, None], "mean") == pytest.approx([1 / 3] * 3)
    assert ensemble_weights([0.6, 0.2], "dice_weighted") == pytest.approx([0.75, 0.25])
    with caplog.at_level(logging.WARNING):
        weights = ensemble_weights([0.6, 0.2, None, 0.0], "dice_weighted", ["f0", "f1", "f2", "f3"])
    # a fold without a DSC counts as an average fold ((0.6 + 0.2 + 0) / 3); a DSC of 0 is weight 0
    mean = 0.8 / 3
    assert weights == pytest.approx([0.6 / (0.8 + mean), 0.2 / (0.8 + mean), mean / (0.8 + mean), 0.0])
    assert "f2" in caplog.text and "f3" not in caplog.text
    assert ensemble_weights([0.5, 0.0], "dice_weighted") == pytest.approx([1.0, 0.0])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ensemble_weights([None, float("nan")], "dice_weighted") == pytest.approx([0.5, 0.5])
    assert "equal weights" in caplog.text
    with pytest.raises(ValueError):
        ensemble_weights([0.5], "median")


def test_mean_and_dice_weighted_ensembles_on_known_folds(tmp_path, registered):
    # fold 0 says lesion 0.7 (validation DSC 0.9), fold 1 says 0.2 (DSC 0.1):
    # mean 0.45 -> no lesion; DSC-weighted (0.9·0.7 + 0.1·0.2) / 1.0 = 0.65 -> lesion.
    model = write_constant_model(tmp_path / "model", {0: 0.7, 1: 0.2}, {0: 0.9, 1: 0.1})
    cases = tmp_path / "cases"
    paths = write_flat_case(cases, "c1", seg_ext=None, grid=Grid(shape_zyx=(10, 12, 12)))
    body = body_of(paths)
    expected = {"mean": 0.45, "dice_weighted": 0.65}
    for method, p in expected.items():
        out = tmp_path / method
        report = predict_folder(cases, out, model, PredictorSettings(ensemble=method, device="cpu", save_probabilities=True))
        assert report.predicted == ["c1"] and not report.failures
        prob = read(out / "probabilities" / "c1.nii.gz")
        assert prob.dtype == np.float32
        np.testing.assert_allclose(prob[body], p, atol=1e-5)
        assert prob[~body].max() <= p + 1e-5
        mask = read(out / "c1.nii.gz")
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask > 0, body if p > 0.5 else np.zeros_like(body))
    # one fold only: the ensemble is that fold
    single = Predictor(model, PredictorSettings(folds=[1], device="cpu"))
    assert single.model.folds == [1] and single.model.weights == [1.0]


def test_the_recorded_threshold_is_used(tmp_path, registered):
    model = write_constant_model(tmp_path / "model", {0: 0.7, 1: 0.2}, {}, threshold=0.4)
    ensemble = load_ensemble(model, device="cpu")
    assert ensemble.last.record.output.threshold == 0.4
    cases = tmp_path / "cases"
    paths = write_flat_case(cases, "c1", seg_ext=None)
    predict_folder(cases, tmp_path / "out", model, PredictorSettings(device="cpu"))  # mean 0.45 > 0.4
    np.testing.assert_array_equal(read(tmp_path / "out" / "c1.nii.gz") > 0, body_of(paths))


def test_missing_checkpoint_or_model_folder_is_an_input_error(tmp_path, registered):
    model = write_constant_model(tmp_path / "model", {0: 0.7}, {})
    from autopetseg.errors import InputError

    with pytest.raises(InputError, match="checkpoint"):
        load_ensemble(model, folds=[3], device="cpu")
    with pytest.raises(InputError, match="not a model folder"):
        load_ensemble(tmp_path, device="cpu")
    with pytest.raises(InputError, match="checkpoint"):
        load_ensemble(model, checkpoint="final", device="cpu")


def test_mask_has_exactly_the_pet_geometry(tmp_path, registered):
    """Oblique direction, non-zero origin, anisotropic spacing, and a CT on a finer shifted grid."""
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {})
    cases = tmp_path / "cases"
    grid = Grid(shape_zyx=(9, 11, 13), spacing_zyx=(5.0, 3.0, 4.0), origin_xyz=(-101.5, 37.25, 812.0))
    paths = write_flat_case(cases, "oblique", seg_ext=None, grid=grid)
    angle = math.radians(30)
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, -1.0)
    pet, ct = (sitk.ReadImage(str(paths[k])) for k in ("pet", "ct"))
    for image in (pet, ct):
        image.SetDirection(direction)
    sitk.WriteImage(pet, str(paths["pet"]))
    sitk.WriteImage(on_finer_grid(ct, 2, shift_mm=(0.7, -0.4, 0.9)), str(paths["ct"]))  # CT on its own grid

    report = predict_folder(cases, tmp_path / "out", model, PredictorSettings(device="cpu", save_probabilities=True))
    assert report.predicted == ["oblique"], report.failures
    for path in (tmp_path / "out" / "oblique.nii.gz", tmp_path / "out" / "probabilities" / "oblique.nii.gz"):
        mask = sitk.ReadImage(str(path))
        assert mask.GetSize() == pet.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), pet.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(mask.GetOrigin(), pet.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(mask.GetDirection(), pet.GetDirection(), atol=1e-6)
    mask = read(tmp_path / "out" / "oblique.nii.gz")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    # the folds call the body a lesion: after resampling to 4 mm and back the mask is still the body
    assert dice(body_of(paths), mask) > 0.9


def test_rerun_skips_finished_cases_and_keeps_rows(tmp_path, registered):
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {})
    cases, out = tmp_path / "cases", tmp_path / "out"
    for i, case in enumerate(("a", "b", "c")):
        write_flat_case(cases, case, seg_ext=None, seed=i)
    first = predict_folder(cases, out, model, PredictorSettings(device="cpu"))
    assert first.predicted == ["a", "b", "c"]
    rows = csv_rows(out / PREDICTIONS_CSV)
    assert sorted(rows) == ["a", "b", "c"]
    assert float(rows["a"]["tmtv_ml"]) > 0 and int(rows["a"]["lesion_count"]) == 1
    stamp = (out / "a.nii.gz").stat().st_mtime_ns

    (out / "b.nii.gz").unlink()  # an interrupted run: b's mask is gone, its row is stale
    second = predict_folder(cases, out, model, PredictorSettings(device="cpu"))
    assert second.skipped == ["a", "c"] and second.predicted == ["b"]
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp
    assert sorted(csv_rows(out / PREDICTIONS_CSV)) == ["a", "b", "c"]

    third = predict_folder(cases, out, model, PredictorSettings(device="cpu", overwrite=True))
    assert third.predicted == ["a", "b", "c"] and not third.skipped


def test_bad_case_is_reported_and_the_others_finish(tmp_path, registered, capsys):
    model = write_constant_model(tmp_path / "model", {0: 0.9}, {})
    cases, out = tmp_path / "cases", tmp_path / "out"
    for i, case in enumerate(("a", "b", "c")):
        write_flat_case(cases, case, seg_ext=None, seed=i)
    data = (cases / "b_pet.nii.gz").read_bytes()
    (cases / "b_pet.nii.gz").write_bytes(data[: len(data) // 2])  # truncated PET
    code = main(["predict", "-i", str(cases), "-o", str(out), "-m", str(model), "--device", "cpu", "--png"])
    assert code == 1
    assert "'b'" in capsys.readouterr().err
    assert sorted(csv_rows(out / PREDICTIONS_CSV)) == ["a", "c"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    assert sorted(p.name for p in (out / "png").iterdir()) == ["a.png", "c.png"]


def test_parts_split_the_cases_and_share_one_csv(tmp_path, registered):
    ids = [f"c{i}" for i in range(7)]
    records = [CaseRecord(c, None, None) for c in reversed(ids)]
    parts = [[r.case_id for r in split_cases(records, 3, k)] for k in range(3)]
    assert parts == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]  # sorted by id, whatever the input order

    model = write_constant_model(tmp_path / "model", {0: 0.9}, {})
    cases, out = tmp_path / "cases", tmp_path / "out"
    for i, case in enumerate(("a", "b", "c")):
        write_flat_case(cases, case, seg_ext=None, seed=i)
    assert [r.case_id for r in split_cases(discover(cases).cases, 2, 1)] == ["b"]
    for part in (1, 0):
        code = main(["predict", "-i", str(cases), "-o", str(out), "-m", str(model), "--device", "cpu",
                     "--num-parts", "2", "--part-id", str(part)])
        assert code == 0
    assert sorted(csv_rows(out / PREDICTIONS_CSV)) == ["a", "b", "c"]
    assert main(["predict", "-i", str(cases), "-o", str(out), "-m", str(model), "--num-parts", "2", "--part-id", "2"]) == 2


# ----------------------------------------------------------------------------- a trained model


def _lesion_case(folder: Path, case_id: str, rng: np.random.Generator, direction=None, origin=(0.0, 0.0, 0.0),
                 ct_factor: int = 1) -> None:
    """A raw case drawn like the training cache (4 mm voxels, body 1 SUV, CT ~0 HU, lesions SUV 6-9)."""
    shape = (36, 40, 40)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    body = (((z - 18) / 15) ** 2 + ((y - 20) / 16.8) ** 2 + ((x - 20) / 16.8) ** 2) <= 1
    pet = np.where(body, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    for centre in ((12, 14, 24), (24, 26, 15)):
        r = rng.uniform(2.8, 3.6)
        sphere = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= r * r
        seg[sphere] = 1
        pet[sphere] = rng.uniform(6.0, 9.0)

    def image(array, spacing=4.0):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((spacing,) * 3)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
        return img

    pet_img, seg_img = image(pet), image(seg)
    ct_img = image(np.where(body, 0.0, -1024.0).astype(np.float32))
    if ct_factor > 1:
        ct_img = on_finer_grid(ct_img, ct_factor)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(pet_img, str(folder / f"{case_id}_pet.nii.gz"))
    sitk.WriteImage(ct_img, str(folder / f"{case_id}_ct.nii.gz"))
    sitk.WriteImage(seg_img, str(folder / f"{case_id}_seg.nii.gz"))


@pytest.mark.slow
def test_trained_model_finds_the_lesions(tmp_path):
    """The learning test (≈15-60 s on 2 cores): a tiny resunet trained on the synthetic cache
    segments the lesions of raw cases, also when they are stored with a flipped direction, a
    shifted origin and a CT on a finer grid."""
    from autopetseg.training.run import run_training

    dataset = write_tiny_cache(tmp_path / "preprocessed", n_cases=10, n_lesion_free=3)
    fold_dir = run_training(dataset, 0, device="cpu", epochs=12, iterations_per_epoch=10, num_workers=0,
                            results_root=tmp_path / "results", foreground_share=0.5, learning_rate=3e-3,
                            validation_interval=4)
    cases, out = tmp_path / "cases", tmp_path / "out"
    rng = np.random.default_rng(7)
    _lesion_case(cases, "plain", rng)
    _lesion_case(cases, "turned", rng, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), origin=(80.0, 120.0, -300.0),
                 ct_factor=2)
    report = predict_folder(cases, out, fold_dir.parent, PredictorSettings(device="cpu", png=True))
    assert report.predicted == ["plain", "turned"], report.failures
    rows = csv_rows(out / PREDICTIONS_CSV)
    for case in ("plain", "turned"):
        gt = read(cases / f"{case}_seg.nii.gz")
        pred = read(out / f"{case}.nii.gz")
        score = dice(gt, pred)
        assert score > 0.5, f"{case}: DSC {score:.3f}"
        assert int(rows[case]["lesion_count"]) >= 1
        assert float(rows[case]["suvmax"]) > 5.0
        assert (out / "png" / f"{case}.png").stat().st_size > 2000

    # The lesion channel mapped back and thresholded at 0.5 is the argmax of both channels mapped back.
    from autopetseg.preprocessing.preprocessor import invert_probabilities

    predictor = Predictor(fold_dir.parent, PredictorSettings(device="cpu"))
    case, [(data, properties)] = predictor.load(discover(cases).by_id()["turned"])
    probabilities = predictor.predict_array(data).numpy()
    fast, _ = predictor.to_original(probabilities[1], properties, 0.5)
    slow = invert_probabilities(probabilities, properties, fill=(1.0, 0.0)).argmax(0) > 0
    assert fast.any()
    np.testing.assert_array_equal(fast > 0, slow)
