"""``cascade_3step`` (Ahamed et al., DLBCL): slice classifier → lesion detector → 2D ROI segmenter.

* the planner plans ``2d_axial`` (the paper's sizes on a GPU, lighter ones on a CPU);
* boxes map back to the right voxels through the square padding, the resize, the ROI crop and the paste;
* fold fusion, box scores and the classifier threshold follow their definitions;
* a slice the classifier rejects yields no mask (and does with the classifier bypassed);
* the losses are the paper's (focal α 0.25, γ 2; GDL + 10 × focal; detection with λ = 10);
* each module learns on tiny phantoms, stores its thresholds with its weights, and the trained
  cascade predicts through the fold ensemble;
* without torchvision everything else imports and ``train -tr cascade_3step`` names the install line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _cache_helpers import DATASET, tiny_plans, write_tiny_cache
from torch import nn

from autopetseg.models.cascade3 import Cascade3Settings, Ensemble, run_cascade
from autopetseg.models.roi import (
    SliceFrame,
    axial_images,
    boxes_from_mask,
    crop_rois,
    fuse_boxes,
    paste_rois,
    roi_window,
)
from autopetseg.planning.axial2d import AxialCascadePlan, plan_2d_axial
from autopetseg.planning.plans import ConfigurationPlan, NetworkTopology
from autopetseg.scoring.boxes import average_precision, box_iou, gmean_threshold, match_boxes, rates_at

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- planning


def test_the_planner_plans_2d_axial_with_the_papers_sizes_on_a_gpu_and_lighter_ones_on_a_cpu():
    from test_planner import cpu, gpu, whole_body

    from autopetseg.planning.planner import PlannerSettings, plan_experiment

    fingerprint = whole_body()
    on_gpu = plan_experiment(fingerprint, gpu(24), ("3d_fullres", "2d_axial")).configuration("2d_axial")
    plan = AxialCascadePlan.of(on_gpu)
    assert on_gpu.slice_axis == 0 and on_gpu.data_identifier == "3d_fullres" and on_gpu.patch_size == [224, 224]
    assert (plan.classifier_backbone, plan.detector_backbone, plan.roi_size) == ("resnet152", "resnet50_fpn", 128)
    assert (plan.classifier_batch, plan.detector_batch, plan.roi_batch) == (64, 16, 32) == (on_gpu.batch_size, 16, 32)
    assert plan.canvas == 220 and len(plan.anchor_sizes) == 5  # whole-body x extent, voxels
    # anchors: the diameter of the 5th-percentile lesion (0.08 ml: 5.3 mm) in pixels of 224 for 440 mm
    assert plan.anchor_sizes[0] == pytest.approx(5.35 * 224 / 440, abs=0.1)
    assert [b / a for a, b in zip(plan.anchor_sizes, plan.anchor_sizes[1:])] == [2.0] * 4
    on_cpu = AxialCascadePlan.of(plan_2d_axial(fingerprint, cpu(), [2.0, 2.0, 2.0], PlannerSettings()))
    assert (on_cpu.classifier_backbone, on_cpu.detector_backbone, on_cpu.roi_size) == ("resnet18", "resnet18_fpn", 64)
    assert on_cpu.slice_size == 224 and 4 <= on_cpu.classifier_batch < 64  # the time model shrinks the batch
    small = AxialCascadePlan.of(plan_2d_axial(whole_body(shape=(80, 16, 40), spacing=(4.0, 4.0, 4.0)), cpu(),
                                              [4.0, 4.0, 4.0], PlannerSettings()))
    assert (small.canvas, small.slice_size) == (40, 64)  # small slices are not blown up to 224 on a CPU
    with pytest.raises(ValueError, match="2d_axial"):
        AxialCascadePlan.of(plan_experiment(fingerprint, gpu(8), ("3d_fullres",)).configuration("3d_fullres"))
    from autopetseg.cli import build_parser

    args = build_parser().parse_args(["plan_and_preprocess", "-d", "X", "-c", "3d_fullres", "2d_axial"])
    assert args.configurations == ["3d_fullres", "2d_axial"]


# ----------------------------------------------------------------------------- geometry


def test_boxes_map_back_to_the_right_voxels_through_resize_and_paste():
    h, w = 20, 30
    seg = np.zeros((h, w), bool)
    seg[6:11, 17:21] = True
    seg[14:16, 3:5] = True
    pet = np.where(seg, 8.0, 0.0).astype(np.float32)
    boxes = boxes_from_mask(seg)
    assert boxes.tolist() == [[17, 6, 21, 11], [3, 14, 5, 16]]  # [x1, y1, x2, y2], pixel edges
    frame = SliceFrame.of(h, w, canvas=36, size=64)  # a 36-voxel square, 64 pixels: 16/9 pixels per voxel
    assert frame.offset == (8, 3) and frame.scale == pytest.approx(64 / 36)
    in_image = frame.to_image(boxes)
    np.testing.assert_allclose(in_image[0], [(17 + 3) * 64 / 36, (6 + 8) * 64 / 36, (21 + 3) * 64 / 36, (11 + 8) * 64 / 36])
    np.testing.assert_allclose(frame.to_slice(in_image), boxes)
    image = axial_images(pet[None], frame)[0][0, 0].numpy()
    bright = image > image.min() + 0.5 * (image.max() - image.min())
    from scipy import ndimage

    found = sorted(boxes_from_mask(bright).tolist())
    for got, want in zip(found, sorted(in_image.tolist())):  # the bright pixels lie in the mapped boxes
        assert got[0] >= math.floor(want[0]) and got[2] <= math.ceil(want[2])
        assert got[1] >= math.floor(want[1]) and got[3] <= math.ceil(want[3])
    assert ndimage.label(bright)[1] == 2
    # ROIs: the window holds the box and its margin; a "segmenter" that thresholds the crop pastes the mask back.
    windows = [roi_window(b, margin_fraction=0.25, min_margin=2) for b in boxes]
    assert windows[0] == (4, 14, 10)  # 5 rows high: longest side 5, margin max(2, 1.25) on each side
    rois = crop_rois(torch.from_numpy(pet), windows, mean=0.0, std=1.0, size=32)
    assert rois.shape == (2, 1, 32, 32)
    probability = torch.zeros(h, w)
    paste_rois(probability, torch.sigmoid(20 * (rois[:, 0] - 4.0)), windows)
    np.testing.assert_array_equal(probability.numpy() > 0.5, seg)
    # Overlapping ROIs keep the maximum; a window reaching outside the slice pastes its inside part.
    target = torch.zeros(h, w)
    paste_rois(target, torch.full((2, 8, 8), 0.3), [(0, 0, 8), (-4, -4, 8)])
    paste_rois(target, torch.full((1, 8, 8), 0.2), [(2, 2, 8)])
    assert float(target[0, 0]) == pytest.approx(0.3) and float(target[9, 9]) == pytest.approx(0.2)
    assert float(target[12, 12]) == 0.0


def test_fold_fusion_weighs_what_the_folds_agree_on():
    a = (np.array([[10.0, 10, 20, 20], [40, 40, 50, 50]]), np.array([0.8, 0.9]))
    b = (np.array([[12.0, 10, 22, 20]]), np.array([0.6]))
    boxes, scores = fuse_boxes([a, b], [0.5, 0.5], "wbf", iou=0.55, keep_score=0.5)
    # the two overlapping boxes fuse (score-weighted coordinates, score = mean over folds); the lone one,
    # found by one fold of two, scores 0.45 < 0.5 and is dropped
    np.testing.assert_allclose(boxes, [[(10 * 0.8 + 12 * 0.6) / 1.4, 10, (20 * 0.8 + 22 * 0.6) / 1.4, 20]])
    assert scores.tolist() == pytest.approx([0.7])
    union, union_scores = fuse_boxes([a, b], [0.5, 0.5], "nms", iou=0.55)
    assert len(union) == 2 and sorted(union_scores.tolist()) == [0.8, 0.9]
    one, one_scores = fuse_boxes([a], [1.0], "wbf", keep_score=0.5)  # one fold: its boxes as they are
    np.testing.assert_array_equal(one, a[0][::-1]) and np.testing.assert_array_equal(one_scores, [0.9, 0.8])
    with pytest.raises(ValueError, match="fusion"):
        fuse_boxes([a], [1.0], "mean")


def test_box_and_slice_scores_follow_their_definitions():
    assert box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [5, 5, 6, 6]]).tolist() == [[pytest.approx(1 / 3), 0.0]]
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    hit, found = match_boxes([[0, 0, 10, 9], [1, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7], truth)
    assert hit.tolist() == [True, False, False] and found.tolist() == [True, False]  # one match per true box
    perfect = [(truth, np.array([0.9, 0.8]), truth)]
    assert average_precision(perfect) == pytest.approx(1.0)
    # one of two found at rank 2 after a false positive: precision 1/2 at recall 1/2
    assert average_precision([(np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.9, 0.8]), truth)]) == \
        pytest.approx(0.25)
    assert math.isnan(average_precision([(truth, np.array([0.9, 0.8]), np.zeros((0, 4)))]))
    scores, labels = [0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7], [0, 0, 0, 1, 0, 1, 1]
    threshold = gmean_threshold(scores, labels)
    # from 0.3 up: all three positives and three of four negatives, sqrt(1 · 3/4) > sqrt(2/3 · 1) from 0.6 up;
    # the threshold halfway down to the next score
    assert threshold == pytest.approx(0.25)
    assert rates_at(scores, labels, threshold) == pytest.approx((1.0, 3 / 4))
    assert math.isnan(gmean_threshold([0.1, 0.2], [1, 1]))


# ----------------------------------------------------------------------------- the cascade on stubs


class _Classifier(nn.Module):
    """Probability 0.9 for slices whose corner voxel is marked (bright), 0.01 for the others."""

    def __init__(self):
        super().__init__()
        self.canvas, self.image_size = 1, 32
        self.register_buffer("decision_threshold", torch.tensor(0.5))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        marked = x[:, 0, 0, 0] > x[:, 0].mean(dim=(1, 2)) + 1.0
        return torch.logit(torch.where(marked, 0.9, 0.01))[:, None]


class _Detector(nn.Module):
    """One box around the slice's bright voxels on every slice it sees."""

    def __init__(self):
        super().__init__()
        self.canvas, self.image_size = 1, 32
        self.register_buffer("score_threshold", torch.tensor(0.5))
        self.register_buffer("nms_iou", torch.tensor(0.5))
        self.calls = 0

    def forward(self, images):
        self.calls += len(images)
        out = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > (image[0].max() + image[0].mean()) / 2, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out

    def keep(self, candidates, score_threshold=None, nms_iou=None):
        return [(c["boxes"].numpy().astype(float), c["scores"].numpy().astype(float)) for c in candidates]


class _Segmenter(nn.Module):
    """Probability 1 on the bright voxels of the ROI."""

    roi_size, margin_fraction, min_margin, canvas = 16, 0.25, 2.0, 1

    def forward(self, x):
        return 50.0 * (x - x.mean(dim=(2, 3), keepdim=True) - x.std(dim=(2, 3), keepdim=True))


def test_a_slice_the_classifier_rejects_yields_no_mask():
    pet = np.full((6, 32, 32), 1.0, np.float32)
    pet[0] = 0.0  # air: never run
    pet[1:, 10:14, 12:15] = 9.0  # the same hot spot on every slice with uptake
    pet[[2, 4], 0, 0] = 3.0  # the mark the stub classifier accepts
    classifier, detector = _Classifier(), _Detector()
    settings = Cascade3Settings(slice_batch=8)
    stages = Ensemble([classifier], [1.0]), Ensemble([detector], [1.0]), Ensemble([_Segmenter()], [1.0])
    result = run_cascade(pet, *stages, settings, torch.device("cpu"))
    assert classifier.seen == 5 and result.kept.tolist() == [False, False, True, False, True, False]
    assert detector.calls == 2 and sorted(result.boxes) == [2, 4]
    mask = result.probability > settings.threshold
    assert mask[[2, 4]].sum() == 2 * 12 and not mask[[0, 1, 3, 5]].any()
    assert mask[2, 10:14, 12:15].all()  # the box and the ROI land on the hot voxels
    assert result.slice_probability[0] == 0.0 and result.slice_threshold == pytest.approx(0.5)
    # With the classifier bypassed every slice with uptake is boxed and segmented.
    detector.calls = 0
    bypass = run_cascade(pet, *stages, Cascade3Settings(bypass_classifier=True), torch.device("cpu"))
    assert detector.calls == 5 and (bypass.probability > 0.5)[1:].sum() == 5 * 12


# ----------------------------------------------------------------------------- losses


def test_the_losses_are_the_papers():
    pytest.importorskip("torchvision")
    from autopetseg.training.cascade3 import FocalLoss, GeneralizedDiceFocalRoiLoss

    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    target = torch.tensor([[1.0], [0.0], [0.0]])
    p = torch.sigmoid(logits)
    alpha = torch.where(target > 0, 0.25, 0.75)
    p_t = torch.where(target > 0, p, 1 - p)
    want = (-alpha * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert float(FocalLoss()(logits, target)) == pytest.approx(float(want), rel=1e-5)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    g = (torch.rand(2, 1, 8, 8) > 0.6).long()
    q = torch.sigmoid(x)
    gdl = []
    for i in range(2):  # per ROI: weights 1 / (sum g)^2 over the lesion and background classes
        fg, bg = g[i].float(), 1 - g[i].float()
        w = [1 / fg.sum() ** 2, 1 / bg.sum() ** 2]
        num = w[0] * (q[i] * fg).sum() + w[1] * ((1 - q[i]) * bg).sum()
        den = w[0] * (q[i] + fg).sum() + w[1] * ((1 - q[i]) + bg).sum()
        gdl.append(1 - (2 * num + 1e-5) / (den + 1e-5))
    want = sum(gdl) / 2 + 10 * FocalLoss()(x, g)
    assert float(GeneralizedDiceFocalRoiLoss()(x, g)) == pytest.approx(float(want), rel=1e-4)


# ----------------------------------------------------------------------------- trainers on tiny phantoms

AXIAL = AxialCascadePlan(canvas=32, slice_size=32, roi_size=32, classifier_backbone="resnet18",
                         detector_backbone="resnet18_fpn", classifier_batch=8, detector_batch=4, roi_batch=8,
                         anchor_sizes=(4.0, 8.0, 16.0, 32.0, 64.0), detector_fpn_channels=32, detector_head_size=64)


def _with_axial(plans):
    topology = NetworkTopology([8, 16, 32], [[1, 1], [2, 2], [2, 2]], [[3, 3]] * 3)
    plans.configurations["2d_axial"] = ConfigurationPlan(
        "2d_axial", "3d_fullres", list(plans.target_spacing_zyx), [32, 32], AXIAL.classifier_batch, topology,
        notes={"cascade_3step": AXIAL.to_dict()}, slice_axis=0)
    return plans


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    write_tiny_cache(root, n_cases=20, n_lesion_free=2, seed=1, plans=_with_axial(tiny_plans()))
    return root


def test_the_trainers_follow_the_paper_and_their_batches_hold_what_they_should(tmp_path, cache):
    pytest.importorskip("torchvision")
    from autopetseg.training.run import prepare_trainer

    common = dict(preprocessed_root=cache, results_root=tmp_path, device="cpu", num_workers=0)
    stages = {name: prepare_trainer(cache / DATASET, 0, "cascade_3step", stage=name, **common)
              for name in ("classifier", "detector", "roi_segmenter")}
    classifier, detector, segmenter = stages.values()
    assert (classifier.config.learning_rate, classifier.config.epochs, classifier.batch_size) == (1e-5, 200, 8)
    assert classifier.config.loss == {"alpha": 0.25, "gamma": 2.0} and classifier.config.optimizer == "adam"
    assert (detector.config.learning_rate, detector.config.epochs, detector.batch_size) == (1e-3, 200, 4)
    losses = {"loss_classifier": torch.tensor(0.5), "loss_box_reg": torch.tensor(0.1),
              "loss_objectness": torch.tensor(0.2), "loss_rpn_box_reg": torch.tensor(0.3)}
    assert float(detector.compute_loss(losses, {})) == pytest.approx(0.5 + 10 * 0.1 + 0.2 + 0.3)  # λ = 10
    assert (segmenter.config.epochs, segmenter.batch_size, segmenter.patch_size) == (40, 8, [32, 32])
    assert segmenter.config.loss == {"focal_weight": 10.0, "alpha": 0.25, "gamma": 2.0}
    assert (segmenter.settings.negative_roi_share, segmenter.settings.negative_roi_suv) == (0.0, 2.5)  # paper: off
    spec = detector.network_spec()
    assert (spec.name, spec.in_channels, spec.out_channels) == ("cascade3_detector", 1, 2)
    assert spec.options["anchor_sizes"] == [4.0, 8.0, 16.0, 32.0, 64.0] and spec.options["canvas"] == 32
    assert classifier.network_spec().options["backbone"] == "resnet18"
    assert segmenter.selection_metric == "roi_dice"  # no classifier and detector trained yet

    cases = [classifier.load_case(c) for c in classifier.train_case_ids]
    batch = next(classifier.make_train_loader(cases, seed=0))
    assert batch["data"].shape == (8, 1, 32, 32) and batch["target"].sum() == 4  # both classes, half each
    assert torch.allclose(batch["data"].mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-4)  # z-scored per slice
    batch = next(detector.make_train_loader(cases, seed=0))
    for image, boxes in zip(batch["data"], batch["boxes"]):  # the hot lesion lies in its box (flips included)
        hottest = torch.nonzero(image[0] == image[0].max())[0]
        inside = [(b[0] <= hottest[1] + 0.5 <= b[2]) and (b[1] <= hottest[0] + 0.5 <= b[3]) for b in boxes]
        assert any(inside)
    batch = next(segmenter.make_train_loader(cases, seed=0))
    assert batch["data"].shape == batch["target"].shape == (8, 1, 32, 32)
    lesion = batch["target"].bool()
    assert lesion.any(dim=(1, 2, 3)).all() and (batch["data"][lesion].mean() > batch["data"][~lesion].mean() + 1)


def test_negative_rois_box_hot_spots_that_are_not_lesion():
    """A share of the ROI segmenter's batches boxes normal uptake (the detector's false boxes land on
    it) with an empty target; the lesion itself is never a negative."""
    from autopetseg.training.cascade3 import RoiSampler, hot_spot_boxes

    pet = np.ones((6, 32, 32), np.float32)
    seg = np.zeros((6, 32, 32), np.uint8)
    pet[2, 4:8, 4:10] = 5.0  # a hot organ, not lesion
    pet[2:4, 20:24, 20:24] = 8.0  # the lesion, on two slices
    seg[2:4, 20:24, 20:24] = 1
    case = SimpleNamespace(image=np.stack([pet, np.zeros_like(pet)]), seg=seg)
    found = hot_spot_boxes(case, 2.5)
    assert len(found) == 1 and found[0][0] == 2 and found[0][1].tolist() == [4, 4, 10, 8]  # x1, y1, x2, y2
    sampler = RoiSampler([case], AXIAL, (), (0.0,) * 4, 0.25, 2.0, negative_share=1.0, hot_suv=2.5)
    batch = sampler.batch(np.random.default_rng(0), 4)
    assert batch["target"].sum() == 0 and (batch["data"].amax(dim=(1, 2, 3)) > 1).all()  # hot, empty target
    paper = RoiSampler([case], AXIAL, (), (0.0,) * 4, 0.25, 2.0, negative_share=0.0)
    assert not paper.negatives and paper.batch(np.random.default_rng(0), 4)["target"].any(dim=(1, 2, 3)).all()


# Short CPU runs: a larger learning rate for the classifier (the paper's 1e-5 is for an ImageNet-initialised
# ResNet152 over 200 epochs), a few dozen iterations per module, two epochs (checkpoints of a ResNet18 and its
# Adam state are ~130 MB each).
FAST = dict(num_workers=0, epochs=2, device="cpu")
CLASSIFIER_FAST = dict(iterations_per_epoch=15, learning_rate=1e-3)
DETECTOR_FAST = dict(iterations_per_epoch=50)
SEGMENTER_FAST = dict(iterations_per_epoch=15)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    pytest.importorskip("torchvision")
    from autopetseg.training.run import run_training

    results = tmp_path_factory.mktemp("results")
    common = dict(preprocessed_root=cache, results_root=results, **FAST)
    for stage, overrides in (("classifier", CLASSIFIER_FAST), ("detector", DETECTOR_FAST),
                             ("roi_segmenter", SEGMENTER_FAST)):
        run_training(cache / DATASET, 0, "cascade_3step", stage=stage, **common, **overrides)
    model = results / DATASET / "cascade_3step__2d_axial"
    return SimpleNamespace(model=model, fold=model / "fold_0")


def _validation(folder: Path) -> dict:
    return json.loads((folder / "validation.json").read_text())


@pytest.mark.slow
def test_each_module_learns_and_stores_its_thresholds_with_its_weights(trained):
    classifier = _validation(trained.fold / "classifier")
    detector = _validation(trained.fold / "detector")
    segmenter = _validation(trained.fold / "roi_segmenter")
    assert classifier["auc"] > 0.85 and classifier["sensitivity"] > 0.6
    # untrained, the detector finds nothing (mAP@0.5 0); 100 iterations from scratch find part of the lesions
    assert detector["lesion_recall"] >= 0.5 and detector["map50"] > 0.2
    assert segmenter["roi_dice"] > 0.5
    assert segmenter["selection_metric"] == "mean_dsc" and segmenter["mean_dsc"] > 0.2  # the whole cascade, 3D
    state = torch.load(trained.fold / "classifier" / "checkpoint_best.pt", weights_only=True)
    assert float(state["network"]["decision_threshold"]) == pytest.approx(classifier["threshold"])
    state = torch.load(trained.fold / "detector" / "checkpoint_best.pt", weights_only=True)
    assert float(state["network"]["score_threshold"]) == pytest.approx(detector["score_threshold"])
    assert float(state["network"]["nms_iou"]) == pytest.approx(detector["nms_iou"])


@pytest.mark.slow
def test_the_trained_cascade_predicts_through_the_fold_ensemble(trained, cache, tmp_path):
    import shutil

    from autopetseg.inference.combine import STAGE_RUNNERS, RunContext, get_combiner
    from autopetseg.inference.predictor import Predictor, PredictorSettings

    model = tmp_path / "model"
    shutil.copytree(trained.model, model)
    shutil.copytree(model / "fold_0", model / "fold_1")
    path = model / "fold_1" / "classifier" / "checkpoint_best.pt"
    state = torch.load(path, weights_only=True)
    state["network"]["decision_threshold"] /= 2  # fold 1: another threshold (lower: it keeps what fold 0 keeps)
    torch.save(state, path)
    predictor = Predictor(model, PredictorSettings(device="cpu", folds=[0, 1]))
    assert get_combiner("cascade3") is None and predictor.model.method.combine == "cascade3"
    case = "case_005"  # a training case of fold 0: the cascade of 100 iterations per module finds its lesion
    assert case in json.loads((model / "fold_0" / "roi_segmenter" / "config.json").read_text())["train_cases"]
    data = np.load(cache / DATASET / "3d_fullres" / f"{case}.npy")
    props = json.loads((cache / DATASET / "3d_fullres" / f"{case}.json").read_text())
    context = RunContext(torch.device("cpu"))
    combined = STAGE_RUNNERS["cascade3"](predictor.model.method, predictor.model.stages, [(data, props)] * 3, context)
    seg = np.load(cache / DATASET / "3d_fullres" / f"{case}_seg.npy")
    mask, _ = predictor.to_original(combined.lesion_probability, combined.properties, combined.threshold)
    assert mask.shape == seg.shape and 2 * (mask & seg).sum() / (mask.sum() + seg.sum()) > 0.3
    assert combined.values["cascade_boxes"] >= 1 and context.stats.n_windows == 32
    # the ensemble's classifier threshold is the mean of the folds' thresholds
    from autopetseg.models.cascade3 import classify_slices

    networks = [f.network for f in predictor.model.stages[0].folds]
    _, threshold = classify_slices(Ensemble(networks, [0.5, 0.5]), data[0], torch.device("cpu"))
    stored = [float(n.decision_threshold) for n in networks]
    assert threshold == pytest.approx(sum(stored) / 2) and stored[1] == pytest.approx(stored[0] / 2)


# ----------------------------------------------------------------------------- without torchvision

WITHOUT_TORCHVISION = """
import sys
sys.modules["torchvision"] = None  # import torchvision now raises ImportError
import autopetseg.cli, autopetseg.training.variants, autopetseg.inference.predictor, autopetseg.models.networks
from autopetseg.models.methods import METHODS
from autopetseg.training.variants import TRAINERS
TRAINERS["gdfl"].check_requirements()  # other methods need nothing more
sys.exit(autopetseg.cli.main(["train", "Dataset001_None", "0", "-tr", "cascade_3step"]))
"""


def test_without_torchvision_everything_else_works_and_the_cascade_names_the_install_line():
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCHVISION], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert 'pip install -e ".[detection]"' in done.stderr and "torchvision" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
