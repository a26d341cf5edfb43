"""``multitask`` (Liu et al.): the network, the loss, the ``3d_wholebody`` plan, labels, whole-image
batches, and a trained model whose prognosis separates the classes.

* the network returns 4 deep-supervision outputs and 3 heads in training, the fused head in eval,
  and has the parameter count the planner's cost model counts;
* the deep-supervision targets are the down-sampled masks (the lesion share of each coarse voxel);
* the loss weights are the paper's and the loss is the formula of eq. 1-6, labels missing or not;
* the planner's grid follows the median body and the budget, lowering the paper's batch 12 when
  the budget needs it;
* a missing label column, or one class only, is an error naming the column; folds are stratified
  by label;
* on tiny phantoms whose label depends on the tumour burden, the trained model's validation AUC
  is clearly above 0.5 and its probabilities of the two classes far apart, and prediction averages
  the folds' probabilities and Youden thresholds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autopetseg.errors import InputError
from autopetseg.io_utils import save_npy, write_json
from autopetseg.models.methods import METHODS
from autopetseg.models.networks import build_network, count_parameters
from autopetseg.planning.plans import ComputeBudget, ConfigurationPlan, NetworkTopology, NormalizationPlan, Plans
from autopetseg.planning.planner import PlannerSettings
from autopetseg.planning.wholebody import WholebodyPlanSettings, count_multitask_parameters, plan_3d_wholebody
from autopetseg.training.multitask import MultitaskLoss, MultitaskSettings, class_weights
from autopetseg.training.splits import make_splits
from autopetseg.training.whole_image_loader import WholeImageAugmentation, WholeImageBatchStream, GridCase

DATASET = "Dataset901_Burden"
CONFIGURATION = "3d_wholebody"
GRID = (16, 16, 16)
TOPOLOGY = NetworkTopology([8, 16, 32, 64], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 0)


# ----------------------------------------------------------------------------- network


def test_the_network_gives_deep_supervision_and_fused_heads():
    torch.manual_seed(0)
    net = build_network("multitask_unet", TOPOLOGY, 2, 2)
    x = torch.randn(2, 2, *GRID)
    out = net(x)
    assert [tuple(s.shape) for s in out["segmentation"]] == [(2, 2, 16, 16, 16), (2, 2, 8, 8, 8), (2, 2, 4, 4, 4),
                                                             (2, 2, 2, 2, 2)]
    heads = out["prognosis_heads"]
    assert heads.shape == (2, 3, 2)
    fused = sum(w * torch.softmax(heads[:, i], 1) for i, w in enumerate((0.1, 0.2, 0.7)))
    torch.testing.assert_close(out["prognosis"].exp(), fused)
    net.eval()
    with torch.no_grad():
        plain = net(x)
        assert set(plain) == {"segmentation", "prognosis"} and plain["segmentation"].shape == (2, 2, *GRID)
        moved_ct = x.clone()
        moved_ct[:, 1] += 5.0
        torch.testing.assert_close(net(moved_ct)["prognosis"], plain["prognosis"])  # PET only (the paper)


@pytest.mark.parametrize("options, planned", [
    ({}, WholebodyPlanSettings()),
    ({"read_channels": [0, 1], "head_levels": 0, "deep_supervision_scales": 1},
     WholebodyPlanSettings(input_channels=2, head_levels=0, deep_supervision_scales=1)),
])
def test_the_planner_counts_the_networks_parameters(options, planned):
    net = build_network("multitask_unet", TOPOLOGY, 2, 2, **options)
    assert count_parameters(net) == count_multitask_parameters(TOPOLOGY, planned)


# ----------------------------------------------------------------------------- loss


def _block_mean(mask: np.ndarray, k: int) -> np.ndarray:
    b, c, z, y, x = mask.shape
    return mask.reshape(b, c, z // k, k, y // k, k, x // k, k).mean(axis=(3, 5, 7))


def test_deep_supervision_targets_are_the_down_sampled_masks():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 1, *GRID)) > 0.9).astype(np.float32)
    loss = MultitaskLoss(MultitaskSettings(), (0.5, 0.5), TOPOLOGY.strides)
    targets = loss.segmentation_targets(torch.from_numpy(mask))
    assert len(targets) == 4
    for target, k in zip(targets, (1, 2, 4, 8)):
        np.testing.assert_allclose(target.numpy(), _block_mean(mask, k), atol=1e-6)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    p = torch.softmax(logits, 1)[:, 1].numpy().astype(np.float64)
    y = target[:, 0].numpy().astype(np.float64)
    per_case = [1 - (2 * (a * b).sum() + 1) / (a.sum() + b.sum() + 1) for a, b in zip(p, y)]
    return float(np.mean(per_case))


def test_the_loss_weights_are_the_papers_and_the_loss_is_their_formula():
    s = MultitaskSettings()
    assert (s.segmentation_weight, s.segmentation_scale_weights, s.head_weights) == (0.1, (0.53, 0.27, 0.13, 0.07),
                                                                                      (0.1, 0.2, 0.7))
    assert s.augmentation.rotation_deg == 8.0 and s.augmentation.scale_range == (0.8, 1.2)
    assert class_weights([1, 0, 0, 0]) == (0.25, 0.75)  # eq. 3: w_n = N_p / N, w_p = N_n / N
    torch.manual_seed(1)
    target = (torch.rand(3, 1, *GRID) > 0.8).float()
    seg = [torch.randn(3, 2, *(g // k for g in GRID)) for k in (1, 2, 4, 8)]
    heads = torch.randn(3, 3, 2)
    net = build_network("multitask_unet", TOPOLOGY, 2, 2)
    outputs = {"segmentation": seg, "prognosis": net.fuse(heads), "prognosis_heads": heads}
    labels = torch.tensor([1, 0, -1])  # the third case has no label
    loss = MultitaskLoss(s, class_weights([1, 0, 0, 0]), TOPOLOGY.strides)
    targets = loss.segmentation_targets(target)
    l_seg = sum(w * _dice(o, t) for w, o, t in zip((0.53, 0.27, 0.13, 0.07), seg, targets))
    fused = sum(w * torch.softmax(heads[:, i], 1) for i, w in enumerate((0.1, 0.2, 0.7)))
    l_cls = (-0.75 * math.log(fused[0, 1]) - 0.25 * math.log(fused[1, 0])) / 2  # mean over the labelled cases
    assert float(loss(outputs, target, labels)) == pytest.approx(0.1 * l_seg + 0.9 * l_cls, rel=1e-5)
    # no label in the batch: the segmentation alone
    assert float(loss(outputs, target, torch.tensor([-1, -1, -1]))) == pytest.approx(0.1 * l_seg, rel=1e-5)
    # each head supervised on its own, weighted like the fusion
    per_head = MultitaskLoss(MultitaskSettings(classification_loss="per_head"), (0.25, 0.75), TOPOLOGY.strides)
    ce = [-(0.75 * torch.log_softmax(heads[0, i], 0)[1] + 0.25 * torch.log_softmax(heads[1, i], 0)[0]) / 2
          for i in range(3)]
    expected = 0.1 * l_seg + 0.9 * sum(w * float(c) for w, c in zip((0.1, 0.2, 0.7), ce))
    assert float(per_head(outputs, target, labels)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="segmentation_weight to 1"):
        MultitaskSettings(heads=False)


# ----------------------------------------------------------------------------- planning


def _fingerprint(shape, spacing, n=5):
    shapes = np.array([[s + d for s in shape] for d in range(-2, n - 2)], dtype=float)
    return SimpleNamespace(shapes_after_crop_zyx=shapes, spacings_zyx=np.tile(np.asarray(spacing, float), (n, 1)))


def test_the_wholebody_grid_follows_the_body_and_the_budget():
    # the paper's data: 247 x 80 x 64 voxels of 3.3 x 5.5 x 5.5 mm after its crop
    fingerprint = _fingerprint((247, 80, 64), (3.3, 5.5, 5.5))
    extent = np.array([247 * 3.3, 80 * 5.5, 64 * 5.5])
    big = plan_3d_wholebody(fingerprint, ComputeBudget("cuda", 140.0), [3.3, 5.5, 5.5], PlannerSettings())
    assert big.batch_size == 12 and "batch_lowered_for_budget" not in big.notes
    assert math.prod(big.patch_size) <= 224 * 64 * 64 and all(g % 8 == 0 for g in big.patch_size)
    assert math.prod(big.patch_size) > 0.8 * 224 * 64 * 64  # the finest grid under the paper's size
    np.testing.assert_allclose(np.multiply(big.spacing_zyx, big.patch_size), extent)  # the median body fills the grid
    assert big.data_identifier == "3d_wholebody" and big.network_name == "multitask_unet"
    assert len(big.network.strides) == 4  # 3 poolings
    small = plan_3d_wholebody(fingerprint, ComputeBudget("cuda", 8.0), [3.3, 5.5, 5.5], PlannerSettings())
    assert small.batch_size < 12 and small.notes["batch_lowered_for_budget"] == f"12 -> {small.batch_size}"
    assert small.notes["estimated_gpu_memory_gb"] <= 8.0
    cpu = plan_3d_wholebody(fingerprint, ComputeBudget("cpu"), [3.3, 5.5, 5.5], PlannerSettings())
    assert cpu.notes["estimated_seconds_per_iteration"] <= 1.0 and cpu.network.features_per_stage == [16, 32, 64, 128]
    assert math.prod(cpu.patch_size) < math.prod(big.patch_size)


# ----------------------------------------------------------------------------- data and labels


def _burden_case(rng, label: int, shape):
    """A body with one lesion whose size makes the label: big and bright (1) or small or none (0)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.asarray(shape, np.float32)[:, None, None, None] / 2
    body = (((grid - centre) / (0.45 * np.asarray(shape, np.float32)[:, None, None, None])) ** 2).sum(0) <= 1
    pet = np.where(body, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    ct = np.where(body, 0.5, 0.0).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    radius = rng.uniform(3.0, 4.0) if label else rng.choice([0.0, 1.2])
    if radius:
        c = rng.uniform(0.4, 0.6, 3) * np.asarray(shape)
        sphere = ((grid - c[:, None, None, None]) ** 2).sum(0) <= radius**2
        seg[sphere], pet[sphere] = 1, rng.uniform(6.0, 9.0)
    return np.stack([pet, ct]), seg


def write_burden_cache(root: Path, n_cases: int = 30, seed: int = 0) -> Path:
    """``<root>/<DATASET>``: a ``3d_wholebody`` cache of volumes near the grid, label = tumour burden."""
    rng = np.random.default_rng(seed)
    dataset_dir = root / DATASET
    data_dir = dataset_dir / CONFIGURATION
    cases = []
    for i in range(n_cases):
        case_id, label = f"case_{i:03d}", i % 2
        shape = tuple(int(s) for s in rng.integers(17, 21, 3))
        image, seg = _burden_case(rng, label, shape)
        save_npy(data_dir / f"{case_id}.npy", image)
        save_npy(data_dir / f"{case_id}_seg.npy", seg)
        save_npy(data_dir / f"{case_id}_fg.npy", np.argwhere(seg > 0).astype(np.int32).reshape(-1, 3))
        write_json(data_dir / f"{case_id}.json", {
            "case_id": case_id, "spacing_zyx": [4.0] * 3, "bbox_zyx": [[0, s] for s in shape],
            "geometry": {"shape_zyx": list(shape), "spacing_zyx": [4.0] * 3, "origin_xyz": [0.0] * 3,
                         "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]},
            "shape_after_crop_zyx": list(shape), "shape_after_resample_zyx": list(shape)})
        cases.append({"case_id": case_id, "patient": case_id, "cohort": "LYMPHOMA", "clinical": {"prognosis": str(label)}})
    write_json(dataset_dir / "dataset.json", {"layout": "synthetic", "root": str(root), "cases": cases})
    conf = ConfigurationPlan(CONFIGURATION, CONFIGURATION, [4.0] * 3, list(GRID), 6, TOPOLOGY,
                             network_name="multitask_unet")
    Plans(DATASET, ComputeBudget("cpu"), [4.0] * 3, NormalizationPlan(), {CONFIGURATION: conf}).save(
        dataset_dir / "plans.json")
    return dataset_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    write_burden_cache(root)
    return root


def test_folds_are_stratified_by_label_and_cohort():
    cases = [{"case_id": f"c{i:02d}", "cohort": "A" if i < 20 else "B", "clinical": {"prognosis": str(int(i % 4 == 0))}}
             for i in range(40)]
    splits = make_splits(cases, n_folds=5, label_column="prognosis")
    label = {c["case_id"]: c["clinical"]["prognosis"] for c in cases}
    cohort = {c["case_id"]: c["cohort"] for c in cases}
    for split in splits:  # 10 positives (5 per cohort) and 30 negatives over 5 folds
        assert sorted(label[c] for c in split["val"]).count("1") == 2
        assert [cohort[c] for c in split["val"]].count("A") == 4


def test_a_missing_or_one_class_label_column_is_an_error_naming_it(cache, tmp_path):
    from autopetseg.training.run import prepare_trainer

    common = dict(preprocessed_root=cache, results_root=tmp_path, device="cpu", num_workers=0)
    with pytest.raises(InputError, match="no case has a value in column 'relapse' of clinical.csv .*prognosis"):
        prepare_trainer(cache / DATASET, 0, "multitask", label_column="relapse", **common)
    trainer = prepare_trainer(cache / DATASET, 0, "multitask", **common)
    assert trainer.selection_metric == "mean_dsc_auc" and trainer.strategy().grid == GRID
    cfg = trainer.config
    assert (cfg.optimizer, cfg.learning_rate, cfg.epochs, cfg.label_column) == ("adam", 1e-4, 200, "prognosis")
    positives = [c for c in trainer.train_case_ids if trainer.case_labels()[c] == 1]
    trainer.train_case_ids = positives
    with pytest.raises(InputError, match=r"column 'prognosis' of clinical.csv must hold both classes .* found \[1\]"):
        trainer.training_labels()
    assert (cache / DATASET / "splits_prognosis.json").is_file()


def test_whole_image_batches_are_reproducible_and_augmented():
    rng = np.random.default_rng(0)
    cases = [GridCase(f"c{i}", rng.random((2, *GRID)).astype(np.float32), (rng.random(GRID) > 0.7).astype(np.float32),
                      label) for i, label in enumerate([0, 1, -1])]
    plain = WholeImageBatchStream(cases, 3, WholeImageAugmentation(enabled=False), seed=1)
    batch = plain.batch(0)
    assert batch["data"].shape == (3, 2, *GRID) and batch["target"].shape == (3, 1, *GRID)
    assert sorted(batch["case_label"].tolist()) == [-1, 0, 1]  # one pass: every case once
    ids = {c.case_id: c for c in cases}
    for i in range(3):
        case = plain.case_at(i)
        np.testing.assert_array_equal(batch["data"][i].numpy(), ids[case.case_id].image)
    stream = WholeImageBatchStream(cases, 2, WholeImageAugmentation(), seed=1)
    transform = stream._transform()
    a, b = stream.batch(5, transform), stream.batch(5, transform)
    torch.testing.assert_close(a["data"], b["data"])  # the same batch index, the same batch
    assert not torch.equal(a["data"], stream.batch(6, transform)["data"])
    assert 0.0 <= float(a["target"].min()) and float(a["target"].max()) <= 1.0


# ----------------------------------------------------------------------------- trained


FAST = dict(epochs=5, iterations_per_epoch=6, learning_rate=3e-3, num_workers=0)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    from autopetseg.training.run import run_training

    results = tmp_path_factory.mktemp("results")
    run_training(cache / DATASET, 0, "multitask", preprocessed_root=cache, results_root=results, device="cpu", **FAST)
    return results / DATASET / "multitask__3d_wholebody"


@pytest.mark.slow
def test_the_trained_prognosis_separates_the_classes_on_validation_cases(trained):
    validation = json.loads((trained / "fold_0" / "validation.json").read_text())
    assert validation["selection_metric"] == "mean_dsc_auc" and validation["n_labelled"] == 6
    assert validation["auc"] >= 0.8  # chance is 0.5
    # An untrained network ranks these cases too (its probabilities differ in the 4th decimal, burden
    # shifts every activation), so the AUC alone proves little: training must move them apart.
    probability = {label: np.mean([c["prognosis_probability"] for c in validation["cases"].values()
                                   if c["label"] == label]) for label in (0, 1)}
    assert probability[1] - probability[0] > 0.5
    assert validation["head_thresholds"] == {"prognosis": validation["youden_threshold"]}
    assert validation["mean_dsc_auc"] == pytest.approx((validation["mean_dsc"] + validation["auc"]) / 2)
    record = json.loads((trained / "fold_0" / "model.json").read_text())
    assert record["strategy"] == {"kind": "whole_image", "axis": None, "neighbours": 0, "grid": list(GRID)}
    assert json.loads((trained / "method.json").read_text())["combine"] == "prognosis" == METHODS["multitask"].combine


@pytest.mark.slow
def test_prediction_averages_the_folds_probabilities_and_thresholds(trained, cache, tmp_path):
    from autopetseg.inference.predictor import Predictor, PredictorSettings
    from autopetseg.models.sliding_window import SlidingWindowStats

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    shutil.copytree(model / "fold_0", model / "fold_1")
    validation = json.loads((model / "fold_1" / "validation.json").read_text())
    validation["head_thresholds"] = {"prognosis": 0.9}
    (model / "fold_1" / "validation.json").write_text(json.dumps(validation))
    path = model / "fold_1" / "checkpoint_best.pt"  # fold 1: other head biases
    state = torch.load(path, weights_only=True)
    state["network"]["heads.2.classifier.2.bias"] += torch.tensor([0.0, 2.0])
    torch.save(state, path)
    data_dir = cache / DATASET / CONFIGURATION
    prepared = [(np.load(data_dir / "case_001.npy"), json.loads((data_dir / "case_001.json").read_text()))]

    def values(folds):
        predictor = Predictor(model, PredictorSettings(device="cpu", folds=folds))
        return predictor.combine(predictor.model.method, predictor.stage_outputs(prepared, SlidingWindowStats())).values

    one, two, both = values([0]), values([1]), values([0, 1])
    assert both["prognosis_probability"] == pytest.approx((one["prognosis_probability"] + two["prognosis_probability"]) / 2,
                                                          abs=1e-6)
    assert both["prognosis_threshold"] == pytest.approx((validation["youden_threshold"] + 0.9) / 2)
    assert both["prognosis_label"] == float(both["prognosis_probability"] >= both["prognosis_threshold"])
    assert set(both) == {"prognosis_probability", "prognosis_threshold", "prognosis_label"}
