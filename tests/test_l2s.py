"""``cascade_l2s`` (L2SNet, Cai et al.): networks, cue, weighted loss, adaptive threshold, the trained cascade.

* the networks have the parameter counts their layouts give, the input windows clip and scale;
* the location cue lands in the right voxels: slices stacked across the slice axis, then mapped
  through crop and resampling onto another grid;
* the weight map changes the loss as the formula (1 + P_loc) says;
* the adaptive threshold keeps a 0.3-probability voxel under a cue and drops it elsewhere; the
  component rules act as documented on hand-made arrays;
* both stages learn on tiny phantoms, an interrupted cascade resumes at the right stage, the fold
  ensemble of each stage is averaged before the cue and the threshold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cache_helpers import DATASET, tiny_plans, write_tiny_cache
from torch import nn

from autopetseg.data.imageio import Geometry
from autopetseg.inference.combine import COMBINERS, StageOutput, combine_l2s_adaptive, l2s_cue_region
from autopetseg.inference.predictor import Predictor, PredictorSettings
from autopetseg.models.adaptive_threshold import AdaptiveThreshold, ComponentRules, L2SSettings
from autopetseg.models.folders import read_record
from autopetseg.models.methods import METHODS, MethodSpec, OutputSpec, StrategySpec
from autopetseg.models.networks import build_network, count_parameters
from autopetseg.models.networks.l2s import InputWindows, segmenter_topology
from autopetseg.models.sliding_window import SlidingWindowStats
from autopetseg.models.strategies import run_strategy
from autopetseg.planning.plans import ComputeBudget, NetworkTopology
from autopetseg.preprocessing.preprocessor import map_between_caches
from autopetseg.preprocessing.resampling import crop_geometry, resampled_geometry
from autopetseg.training.config import TrainerConfig
from autopetseg.training.l2s import CueWeightedBCEDiceLoss, input_windows

SIGMOID = OutputSpec("sigmoid", 1, 0)
CASCADE = METHODS["cascade_l2s"]


# ----------------------------------------------------------------------------- networks


def _conv(c_in, c_out, k, bias=False):
    return c_in * c_out * k + (c_out if bias else 0)


def localizer_formula_count(features, decoder, in_ch, out_ch, blocks):
    k = 9
    total = _conv(in_ch, features[0], k) + 2 * features[0]  # stem conv + BN
    for s, f in enumerate(features):
        c_in = features[max(s - 1, 0)]
        for b in range(blocks):
            cin = c_in if b == 0 else f
            total += _conv(cin, f, k) + 2 * f + _conv(f, f, k) + 2 * f
            if b == 0 and (cin != f or s > 0):
                total += _conv(cin, f, 1) + 2 * f  # projection shortcut + BN
    below = features[-1]
    for j, width in enumerate(decoder):
        skip = features[len(features) - 2 - j]
        total += _conv(below + skip, width, k) + 2 * width + _conv(width, width, k) + 2 * width
        below = width
    return total + _conv(below, out_ch, 1, bias=True)


def unet3d_formula_count(features, in_ch, out_ch, strides):
    k = 27
    norm = lambda c: 2 * c  # noqa: E731  (GroupNorm: scale and shift per channel)
    total = _conv(in_ch, features[0], k) + norm(features[0])
    for s, f in enumerate(features):
        c_in = features[max(s - 1, 0)]
        total += _conv(c_in, f, k) + norm(f) + _conv(f, f, k) + norm(f)
    for s in range(len(features) - 1):
        total += _conv(features[s + 1], features[s], math.prod(strides[s + 1]), bias=True)  # transposed conv
        total += _conv(2 * features[s], features[s], k) + norm(features[s]) + _conv(features[s], features[s], k)
        total += norm(features[s])
    return total + _conv(features[0], out_ch, 1, bias=True)


def test_networks_have_the_parameter_counts_of_their_layouts():
    plan2d = NetworkTopology([16, 32, 64, 128], [[1, 1], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 4)
    localizer = build_network("l2s_localizer", plan2d, 10, 1, read_channels=list(range(5)))
    # 4 stages: the last 3 of the paper's decoder widths (320, 256, 128, 64, 32)
    assert count_parameters(localizer) == localizer_formula_count([16, 32, 64, 128], [128, 64, 32], 5, 1, 2)
    six = NetworkTopology([32, 64, 128, 256, 320, 320], [[1, 1]] + [[2, 2]] * 5, [[3, 3]] * 6)
    wide = build_network("l2s_localizer", six, 1, 1, blocks_per_stage=1)
    assert count_parameters(wide) == localizer_formula_count([32, 64, 128, 256, 320, 320], [320, 256, 128, 64, 32],
                                                             1, 1, 1)
    # The paper's segmenter: 4 levels, 16 initial filters, PET + CT in, one sigmoid channel out.
    plan3d = NetworkTopology([32, 64, 128, 256, 320], [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5)
    topology = segmenter_topology(plan3d)
    assert topology.features_per_stage == [16, 32, 64, 128] and topology.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    segmenter = build_network("l2s_unet3d", topology, 2, 1)
    assert count_parameters(segmenter) == unet3d_formula_count([16, 32, 64, 128], 2, 1, topology.strides) == 1_408_641
    assert sum(isinstance(m, nn.MaxPool3d) for m in segmenter.modules()) == 3
    assert all(m.num_groups == 1 for m in segmenter.modules() if isinstance(m, nn.GroupNorm))  # layer norm
    # Fewer plan stages than levels: 2 on every axis for the rest.
    assert segmenter_topology(NetworkTopology([8, 16], [[1, 1, 1], [1, 2, 2]], [[1, 3, 3], [3, 3, 3]])).strides == \
        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_networks_give_logits_at_input_size_and_gradients_flow():
    torch.manual_seed(0)
    localizer = build_network("l2s_localizer", NetworkTopology([8, 16, 32], [[1, 1], [2, 2], [2, 2]], [[3, 3]] * 3),
                              10, 1, read_channels=list(range(5)))
    x = torch.randn(2, 10, 32, 24, requires_grad=True)
    out = localizer(x)
    assert out.shape == (2, 1, 32, 24)
    out.sum().backward()
    assert x.grad[:, :5].abs().sum() > 0 and x.grad[:, 5:].abs().sum() == 0  # the CT slices are not read
    segmenter = build_network("l2s_unet3d", segmenter_topology(NetworkTopology([8, 16], [[1, 1, 1], [2, 2, 2]],
                                                                               [[3, 3, 3]] * 2), 3, 4), 2, 1)
    assert segmenter(torch.randn(1, 2, 16, 8, 16)).shape == (1, 1, 16, 8, 16)
    with pytest.raises(ValueError, match="divisible"):
        segmenter(torch.randn(1, 2, 15, 8, 16))
    with pytest.raises(ValueError, match="2D"):
        build_network("l2s_localizer", NetworkTopology([8, 16], [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2), 1, 1)


def test_input_windows_clip_scale_and_select_channels():
    windows = InputWindows(3, read_channels=[0, 2], windows=[[0, 0.0, 35.0, -1.0, 1.0]])
    x = torch.tensor([[-5.0, 0.0, 17.5, 35.0, 70.0], [1.0] * 5, [2.0, 3.0, 4.0, 5.0, 6.0]]).reshape(1, 3, 5, 1)
    out = windows(x)
    assert out.shape == (1, 2, 5, 1)
    assert out[0, 0, :, 0].tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    assert out[0, 1, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # no window: unchanged
    assert not InputWindows(2).state_dict()  # rebuilt from the options, not stored with the weights
    # HU windows in the cache's units (CT cached as (HU + 1024) / 2048), one per slice of a slab
    got = input_windows({"PET": [0, 15, 0, 1], "CT": [100, 250, 0, 1]},
                        SimpleNamespace(ct_clip_hu=(-1024.0, 1024.0)), slab=2)
    assert got[:2] == [[0, 0.0, 15.0, 0.0, 1.0], [1, 0.0, 15.0, 0.0, 1.0]]
    assert [w[0] for w in got[2:]] == [2, 3] and got[2][1:3] == pytest.approx([1124 / 2048, 1274 / 2048])
    with pytest.raises(ValueError, match="unknown channel"):
        input_windows({"MR": [0, 1, 0, 1]}, SimpleNamespace(ct_clip_hu=(-1024.0, 1024.0)))


# ----------------------------------------------------------------------------- the cue


class _SliceReader(nn.Module):
    """A "2D network" whose logit is high where one input channel (a slice of the slab) is bright."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel

    def forward(self, x):
        return 10.0 * (x[:, self.channel : self.channel + 1] - 4.0)


def _properties(geometry: Geometry, bbox, spacing) -> dict:
    crop = crop_geometry(geometry, bbox)
    cache = resampled_geometry(crop, spacing)
    return {"geometry": {"shape_zyx": list(geometry.shape_zyx), "spacing_zyx": list(geometry.spacing_zyx),
                         "origin_xyz": list(geometry.origin_xyz), "direction": list(geometry.direction)},
            "bbox_zyx": [list(b) for b in bbox], "shape_after_crop_zyx": list(crop.shape_zyx),
            "spacing_zyx": list(spacing), "shape_after_resample_zyx": list(cache.shape_zyx)}


def _centre_mm(array: np.ndarray, props: dict) -> np.ndarray:
    """Probability-weighted centre (x, y, z) in mm of an array on the cache grid of ``props`` (identity direction)."""
    cache = resampled_geometry(crop_geometry(Geometry.from_dict(props["geometry"]), props["bbox_zyx"]),
                               props["spacing_zyx"])
    index = np.stack(np.nonzero(array > 0.5)).astype(float)
    weights = array[array > 0.5]
    zyx = (index * weights).sum(1) / weights.sum()
    return np.asarray(cache.origin_xyz) + zyx[::-1] * np.asarray(cache.spacing_zyx)[::-1]


def test_the_cue_lands_in_the_right_voxels_after_slicing_crop_and_resampling():
    # A PET volume (z, y, x) = (40, 24, 30) at 4 mm with a bright 3-voxel cube at a known place.
    geometry = Geometry((40, 24, 30), (4.0, 4.0, 4.0), (-50.0, 20.0, 300.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    image = np.zeros((2, 40, 24, 30), np.float32)
    image[0, 4:36, 2:22, 3:27] = 1.0  # body
    image[1, 4:36, 2:22, 3:27] = 0.5
    blob = (slice(20, 23), slice(10, 13), slice(7, 10))
    image[(0,) + blob] = 8.0
    strategy = StrategySpec("slices", axis=1, neighbours=2)
    cue = run_strategy(strategy, [_SliceReader(2)], image, [40, 30], output=SIGMOID, divisor=[8, 8])["probabilities"][0]
    expected = np.zeros((40, 24, 30), bool)
    expected[blob] = True
    np.testing.assert_array_equal(cue.numpy() > 0.5, expected)  # slice s of the output is slice s of the input
    # channel 3 is slice s + 1 (channels c·(2k+1) + j + k): its output sits one coronal slice earlier
    shifted = run_strategy(strategy, [_SliceReader(3)], image, [40, 30], output=SIGMOID, divisor=8)["probabilities"][0]
    np.testing.assert_array_equal(shifted.numpy() > 0.5, np.roll(expected, -1, axis=1))

    # Onto another grid of the same case: body box cropped, 2 mm (as another configuration's cache).
    source = _properties(geometry, [[0, 40], [0, 24], [0, 30]], [4.0, 4.0, 4.0])
    target = _properties(geometry, [[4, 36], [2, 22], [3, 27]], [2.0, 2.0, 2.0])
    mapped = map_between_caches(cue.numpy(), source, target)
    assert mapped.shape == tuple(target["shape_after_resample_zyx"]) == (64, 40, 48)
    # blob voxels 20..22 (z), 10..12 (y), 7..9 (x) at 4 mm: centre index (21, 11, 8)
    want_xyz = np.asarray(geometry.origin_xyz) + np.asarray([8.0, 11.0, 21.0]) * 4.0
    np.testing.assert_allclose(_centre_mm(mapped, target), want_xyz, atol=0.5)
    # the blob's centre on the 2 mm grid (first voxel centre 1 mm before the box): index 34.5, 18.5, 10.5
    assert mapped[34:36, 18:20, 10:12].min() > 0.9 and mapped[:25].max() < 0.01


# ----------------------------------------------------------------------------- the loss


def test_the_weight_map_changes_the_loss_as_the_formula_says():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 5, 4)
    target = (torch.rand(2, 1, 6, 5, 4) > 0.7).long()
    cue = torch.rand(2, 1, 6, 5, 4)
    loss = CueWeightedBCEDiceLoss()
    p, g, w = torch.sigmoid(logits), target.float(), 1.0 + cue
    bce = -(w * (g * torch.log(p) + (1 - g) * torch.log(1 - p))).mean()
    dice = 1 - (2 * (w * p * g).sum() + 1e-5) / ((w * (p + g)).sum() + 1e-5)  # batch Dice
    assert float(loss(logits, target, cue)) == pytest.approx(float(bce + dice), rel=1e-5)
    plain = float(loss(logits, target))
    assert float(loss(logits, target, torch.zeros_like(cue))) == pytest.approx(plain, rel=1e-6)  # P_loc = 0: weight 1
    assert float(CueWeightedBCEDiceLoss(cue_weight=False)(logits, target, cue)) == pytest.approx(plain, rel=1e-6)
    # Doubling the weight of every voxel doubles the BCE and leaves the Dice unchanged.
    ones = torch.ones_like(cue)
    bce1 = F.binary_cross_entropy_with_logits(logits, g)
    assert float(loss(logits, target, ones)) == pytest.approx(float(2 * bce1 + (plain - bce1)), rel=1e-5)


# ----------------------------------------------------------------------------- threshold and components


def _tiny_properties(shape=(16, 16, 16)) -> dict:
    geometry = Geometry(shape, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return _properties(geometry, [[0, s] for s in shape], [4.0, 4.0, 4.0])


def test_the_adaptive_threshold_keeps_a_0_3_voxel_under_the_cue_and_drops_it_elsewhere():
    props = _tiny_properties()
    probability = np.zeros((16, 16, 16), np.float32)
    probability[4, 4, 4] = probability[11, 11, 11] = 0.3
    cue = np.zeros_like(probability)
    cue[3:6, 3:6, 3:6] = 0.8  # the localizer saw something around the first voxel only
    outputs = {"localizer": StageOutput(cue[None], props, SIGMOID), "segmenter": StageOutput(probability[None], props, SIGMOID)}
    combined = COMBINERS[CASCADE.combine](CASCADE, outputs)
    assert combined.threshold[4, 4, 4] == pytest.approx(0.1) and combined.threshold[11, 11, 11] == pytest.approx(0.5)
    fake = SimpleNamespace(settings=SimpleNamespace(save_probabilities=False))
    mask, _ = Predictor.to_original(fake, combined.lesion_probability, combined.properties, combined.threshold)
    assert mask[4, 4, 4] == 1 and mask[11, 11, 11] == 0 and mask.sum() == 1
    # Without the adaptive threshold (both thresholds 0.5): neither.
    plain = MethodSpec(CASCADE.name, CASCADE.stages, CASCADE.combine,
                       {"adaptive_threshold": {"low": 0.5, "high": 0.5}})
    combined = COMBINERS[CASCADE.combine](plain, outputs)
    assert not (combined.lesion_probability > combined.threshold).any()
    # The numbers are settings.
    assert L2SSettings.from_notes(CASCADE.notes) == L2SSettings()
    assert AdaptiveThreshold(cue_above=0.9).map(cue)[4, 4, 4] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="low"):
        AdaptiveThreshold(low=1.5)


def test_component_rules_on_hand_made_arrays():
    probability = np.zeros((12, 12, 12), np.float32)
    cue = np.zeros_like(probability)
    probability[1:3, 1:3, 1:3] = 0.8  # A: 8 voxels, under the cue
    cue[1:3, 1:3, 1:3] = 0.9
    probability[6, 6, 6:8] = 0.7  # B: 2 voxels, under the cue
    cue[6, 6, 6] = 0.9
    probability[9:11, 9, 9:11] = 0.6  # C: 4 voxels, no cue; its peak is (10, 9, 10)
    probability[10, 9, 10] = 0.95
    threshold = AdaptiveThreshold().map(cue)
    assert np.array_equal(ComponentRules().apply(probability, threshold, cue, 0.5), probability)  # off by default
    out = ComponentRules(enabled=True, min_voxels=3).apply(probability, threshold, cue, 0.5)
    assert (out[1:3, 1:3, 1:3] == 0.8).all()  # A kept whole
    assert (out[6, 6, 6:8] == 0).all()  # B below the minimum size: removed
    assert out[10, 9, 10] == pytest.approx(0.95) and (out > 0).sum() == 8 + 1  # C reduced to its peak voxel
    keep_c = ComponentRules(enabled=True, cueless_to_one_voxel=False).apply(probability, threshold, cue, 0.5)
    assert np.array_equal(keep_c, probability)  # min_voxels 0, cue-less kept whole: nothing changes
    # Through the combiner, settings from the method's notes.
    props = _tiny_properties((12, 12, 12))
    spec = MethodSpec(CASCADE.name, CASCADE.stages, CASCADE.combine,
                      {"components": {"enabled": True, "min_voxels": 3}})
    outputs = {"localizer": StageOutput(cue[None], props, SIGMOID), "segmenter": StageOutput(probability[None], props, SIGMOID)}
    np.testing.assert_array_equal(COMBINERS["l2s_adaptive"](spec, outputs).lesion_probability, out)


# ----------------------------------------------------------------------------- the localizer only where its cue is read


def test_the_cue_region_holds_the_voxels_between_the_thresholds_and_their_neighbours():
    p = np.zeros((6, 5, 5), np.float32)
    p[2, 2, 2] = 0.3  # between the thresholds
    p[1:4, 4, 4] = 0.9  # a confident run along z: its middle voxel is above 0.5 whatever its neighbours
    p[5, 0, 0] = 0.05  # below both thresholds
    exact = L2SSettings().cue_region(p, (False, False, False))
    assert exact.sum() == 1 and exact[2, 2, 2]  # no interpolation between cache voxels: the voxel itself
    along_z = L2SSettings().cue_region(p, (True, False, False))
    expected = np.zeros_like(exact)
    expected[1:4, 2, 2] = True  # the 0.3 voxel and its z neighbours
    expected[[0, 1, 3, 4], 4, 4] = True  # the confident run's ends (next to a voxel <= 0.5), the voxels past them
    np.testing.assert_array_equal(along_z, expected)
    components = L2SSettings(components=ComponentRules(enabled=True)).cue_region(p, (True, False, False))
    assert components[0:5, 4, 4].all()  # the rules read the cue on whole components: the middle too
    plain = L2SSettings(AdaptiveThreshold(low=0.5, high=0.5))
    assert not plain.cue_region(p).any()  # one threshold: the cue never matters


@pytest.mark.parametrize("pet_spacing", [(4.0, 4.0, 4.0), (2.0, 4.0, 4.0), (2.0, 2.0, 2.0), (3.0, 2.5, 2.5)])
def test_the_cue_outside_its_region_never_changes_the_mask(pet_spacing):
    # The PET grid of a case, its cache grid at 4 mm; masks made as the predictor makes them.
    shape = tuple(int(round(40 / s)) for s in pet_spacing)
    geometry = Geometry(shape, pet_spacing, (-7.0, 3.0, 11.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    props = _properties(geometry, [[1, s - 1] for s in shape], [4.0, 4.0, 4.0])
    grid = tuple(props["shape_after_resample_zyx"])
    fake = SimpleNamespace(settings=SimpleNamespace(save_probabilities=False))
    rng = np.random.default_rng(0)
    for notes in ({}, {"components": {"enabled": True, "min_voxels": 2}}):
        settings = L2SSettings.from_notes(notes)
        method = MethodSpec(CASCADE.name, CASCADE.stages, CASCADE.combine, notes)
        for _ in range(5):
            # mostly 0, a few scattered voxels below, between and above the thresholds
            probability = np.where(rng.random(grid) < 0.02, rng.random(grid), 0.0).astype(np.float32)
            cue = rng.random(grid).astype(np.float32)
            outputs = {"localizer": StageOutput(cue[None], props, SIGMOID),
                       "segmenter": StageOutput(probability[None], props, SIGMOID)}
            region = l2s_cue_region(method, outputs, "localizer", props)
            assert region is not None and 0 < region.sum() < region.size
            outside = {"localizer": StageOutput(np.where(region, cue, 1 - cue)[None], props, SIGMOID),
                       "segmenter": outputs["segmenter"]}
            masks = [Predictor.to_original(fake, c.lesion_probability, c.properties, c.threshold)[0]
                     for c in (combine_l2s_adaptive(method, o) for o in (outputs, outside))]
            np.testing.assert_array_equal(masks[0], masks[1])
            if pet_spacing == (2.0, 2.0, 2.0) and not notes:
                # The neighbours are needed: the voxels between the thresholds alone are not enough.
                bare = settings.cue_region(probability, (False, False, False))
                changed = combine_l2s_adaptive(method, {**outside, "localizer": StageOutput(
                    np.where(bare, cue, 1 - cue)[None], props, SIGMOID)})
                assert not np.array_equal(masks[0], Predictor.to_original(fake, changed.lesion_probability,
                                                                          props, changed.threshold)[0])


def test_slices_run_only_where_a_region_asks_and_batches_do_not_change_them():
    rng = np.random.default_rng(1)
    image = np.zeros((2, 12, 10, 14), np.float32)
    image[:, 1:11, 1:9, 1:13] = rng.random((2, 10, 8, 12)) * 8
    strategy = StrategySpec("slices", axis=1, neighbours=2)
    full = run_strategy(strategy, [_SliceReader(2)], image, [12, 14], output=SIGMOID, divisor=4)["probabilities"]
    region = np.zeros((12, 10, 14), bool)
    region[5, 3, 7] = region[0, 6, 0] = True  # coronal slices 3 and 6
    stats = SlidingWindowStats()
    part = run_strategy(strategy, [_SliceReader(2)], image, [12, 14], output=SIGMOID, divisor=4, region=region,
                        stats=stats)["probabilities"]
    assert (stats.n_windows, stats.n_skipped, stats.n_forward_calls) == (10, 8, 1)
    torch.testing.assert_close(part[:, :, [3, 6]], full[:, :, [3, 6]], rtol=0, atol=0)
    assert not part[:, :, [0, 1, 2, 4, 5, 7, 8, 9]].any()
    for pixels in (1, 12 * 16 * 3, 10**6):  # one slice per pass (the batch size 2 wins), 3, all
        stats = SlidingWindowStats()
        batched = run_strategy(strategy, [_SliceReader(2)], image, [12, 14], output=SIGMOID, divisor=4,
                               slice_batch_pixels=pixels, stats=stats)["probabilities"]
        torch.testing.assert_close(batched, full, rtol=0, atol=0)
        assert stats.n_forward_calls == {1: 4, 12 * 16 * 3: 3, 10**6: 1}[pixels]
    with pytest.raises(ValueError, match="slices strategy only"):
        run_strategy(StrategySpec("sliding_window"), [_SliceReader(2)], image, [8, 8, 8], output=SIGMOID,
                     region=region)


# ----------------------------------------------------------------------------- planner and trainers


def test_the_planner_plans_2d_coronal_like_2d():
    from test_planner import gpu, whole_body

    from autopetseg.planning.planner import plan_experiment

    plans = plan_experiment(whole_body(), gpu(8), ("3d_fullres", "2d", "2d_coronal"))
    coronal, two = plans.configuration("2d_coronal"), plans.configuration("2d")
    assert coronal.name == "2d_coronal" and coronal.slice_axis == 1 and coronal.data_identifier == "3d_fullres"
    assert (coronal.patch_size, coronal.batch_size, coronal.network) == (two.patch_size, two.batch_size, two.network)
    from autopetseg.cli import build_parser

    args = build_parser().parse_args(["plan_and_preprocess", "-d", "X", "-c", "3d_fullres", "2d_coronal"])
    assert args.configurations == ["3d_fullres", "2d_coronal"]


def _with_coronal(plans, device: str = "cuda"):
    """The tiny plans plus the two-stage test's 2D coronal configuration, named ``2d_coronal``; sized for
    a GPU by default (the segmenter trains on the planned patch; the CPU rule is tested on its own)."""
    from test_model_folder import _with_coronal_2d

    plans = _with_coronal_2d(plans)
    plans.configurations["2d_coronal"] = dataclasses.replace(plans.configurations.pop("2d"), name="2d_coronal")
    return dataclasses.replace(plans, budget=ComputeBudget(device))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    write_tiny_cache(root, n_cases=10, n_lesion_free=3, seed=0,
                     plans=_with_coronal(tiny_plans(patch=(16, 32, 32), features=(8, 16))))
    return root


def test_the_trainers_follow_the_paper(tmp_path, cache):
    from autopetseg.training.run import prepare_trainer

    common = dict(preprocessed_root=cache, results_root=tmp_path, device="cpu", num_workers=0)
    localizer = prepare_trainer(cache / DATASET, 0, "cascade_l2s", stage="localizer", **common)
    cfg = localizer.config
    assert (cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.schedule, cfg.epochs) == ("sgd", 1e-3, 1e-4, "poly", 200)
    assert cfg.foreground_share == 0.2 and cfg.slice_neighbours == 2
    spec = localizer.network_spec()
    assert spec.name == "l2s_localizer" and spec.in_channels == 10 and spec.out_channels == 1
    assert spec.options["read_channels"] == [0, 1, 2, 3, 4]  # the PET slices of the slab
    assert spec.options["windows"] == [[c, 0.0, 35.0, -1.0, 1.0] for c in range(5)]  # SUV 0..35 -> [-1, 1]
    assert localizer.strategy() == StrategySpec("slices", axis=1, neighbours=2)
    batch = next(localizer.make_train_loader([localizer.load_case(c) for c in localizer.train_case_ids[:2]], seed=0))
    assert batch["data"].shape == (4, 10, 32, 32)

    # Poly decay per epoch: constant within an epoch, (1 - n/N)^0.9 at epoch n.
    small = prepare_trainer(cache / DATASET, 0, "cascade_l2s", stage="localizer", epochs=4, iterations_per_epoch=3,
                            **common)
    optimizer, scheduler = small.configure_optimizer([nn.Parameter(torch.zeros(1))])
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    want = [1e-3 * (1 - n / 4) ** 0.9 for n in range(4) for _ in range(3)]
    assert lrs == pytest.approx(want)

    segmenter = prepare_trainer(cache / DATASET, 0, "cascade_l2s", stage="segmenter", **common)
    assert (segmenter.config.epochs, segmenter.batch_size, segmenter.config.optimizer) == (500, 2, "sgd")
    assert localizer.config.output_prior == segmenter.config.output_prior == 0.01
    assert segmenter.patch_size == [16, 32, 32]  # a GPU plan: the planned patch
    spec = segmenter.network_spec()
    assert spec.name == "l2s_unet3d" and spec.in_channels == 2 and spec.topology.features_per_stage == [16, 32, 64, 128]
    assert spec.options["norm"] == "layer" and [w[0] for w in spec.options["windows"]] == [0, 1]
    assert segmenter.strategy().kind == "sliding_window" and segmenter.output == SIGMOID
    for trainer in (localizer, segmenter):  # config.json round trip
        assert TrainerConfig.from_dict(json.loads(json.dumps(trainer.config.to_dict()))) == trainer.config
    # The cue reaches the loss through the batch.
    segmenter.loss = segmenter.build_loss()
    torch.manual_seed(0)
    outputs = torch.randn(2, 1, 8, 8, 8)
    target = (torch.rand(2, 1, 8, 8, 8) > 0.8).long()
    cue = torch.rand(2, 1, 8, 8, 8)
    got = segmenter.compute_loss(outputs, {"target": target, "input_localizer": cue})
    assert float(got) == pytest.approx(float(CueWeightedBCEDiceLoss()(outputs, target, cue)))
    assert float(got) != pytest.approx(float(CueWeightedBCEDiceLoss()(outputs, target)))


def test_on_a_cpu_plan_the_segmenter_patch_costs_what_the_planned_network_costs(tmp_path, cache):
    from autopetseg.models.folders import NetworkSpec
    from autopetseg.training.l2s import CpuPatchRule, network_flops
    from autopetseg.training.run import prepare_trainer

    dataset = tmp_path / DATASET
    shutil.copytree(cache / DATASET, dataset)
    plans = json.loads((dataset / "plans.json").read_text())
    plans["budget"]["device"] = "cpu"
    (dataset / "plans.json").write_text(json.dumps(plans))
    common = dict(preprocessed_root=tmp_path, results_root=tmp_path / "results", device="cpu", num_workers=0)
    segmenter = prepare_trainer(dataset, 0, "cascade_l2s", stage="segmenter", **common)
    conf = segmenter.configuration
    spec = segmenter.network_spec()
    reference = network_flops(NetworkSpec("resunet", conf.network, 2, 2), conf.patch_size)
    patch = segmenter.patch_size
    assert patch == CpuPatchRule().patch(conf, spec) == [8, 8, 8]
    assert all(p % t == 0 for p, t in zip(patch, spec.topology.total_stride))
    assert network_flops(spec, patch) <= reference < network_flops(spec, [16, 16, 16])  # the next candidate
    assert CpuPatchRule(cost_ratio=100.0).patch(conf, spec) == conf.patch_size  # never beyond the planned patch
    assert prepare_trainer(dataset, 0, "cascade_l2s", stage="segmenter", patch_size=[16, 16, 16],
                           **common).patch_size == [16, 16, 16]  # a patch given is kept
    assert prepare_trainer(dataset, 0, "cascade_l2s", stage="localizer", **common).patch_size == [32, 32]


# ----------------------------------------------------------------------------- the trained cascade

# Short CPU runs: Adam (the paper's SGD at 1e-3 needs far more than 40 iterations), starting at 1% lesion
# probability, half the patches on lesions; a segmenter of 3 levels and 8 filters (the paper's 4 and 16, with
# full-resolution convolutions, cost several times as much per iteration).
FAST = dict(iterations_per_epoch=10, optimizer="adam", learning_rate=3e-3, output_prior=0.01, foreground_share=0.5,
            num_workers=0)
TINY_SEGMENTER = {"levels": 3, "base_features": 8, "norm": "layer"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """cascade_l2s fold 0: the localizer alone; then the cascade, interrupted after the segmenter's
    epoch 1; then the cascade again with ``--continue``."""
    from autopetseg.training.l2s import L2SSegmenterTrainer
    from autopetseg.training.run import run_training

    results = tmp_path_factory.mktemp("results")
    common = dict(preprocessed_root=cache, results_root=results, device="cpu", epochs=4, **FAST)
    run_training(cache / DATASET, 0, "cascade_l2s", stage="localizer", **common)
    model = results / DATASET / "cascade_l2s__3d_fullres"
    localizer, segmenter = model / "fold_0" / "localizer", model / "fold_0" / "segmenter"
    assert (localizer / "checkpoint_final.pt").is_file() and not segmenter.exists()
    stamps = {name: (localizer / name).stat().st_mtime_ns for name in ("checkpoint_final.pt", "checkpoint_latest.pt")}
    original = L2SSegmenterTrainer.end_epoch

    def interrupted(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(L2SSegmenterTrainer.config_defaults, "network_options", TINY_SEGMENTER)
        with pytest.MonkeyPatch.context() as interrupt:
            interrupt.setattr(L2SSegmenterTrainer, "end_epoch", interrupted)
            with pytest.raises(KeyboardInterrupt):
                run_training(cache / DATASET, 0, "cascade_l2s", continue_training=True, **common)
        assert not (segmenter / "checkpoint_final.pt").exists()
        run_training(cache / DATASET, 0, "cascade_l2s", continue_training=True, **common)
    return SimpleNamespace(model=model, localizer=localizer, segmenter=segmenter, stamps=stamps)


def _validation(folder: Path) -> dict:
    return json.loads((folder / "validation.json").read_text())


@pytest.mark.slow
def test_both_stages_learn_and_an_interrupted_cascade_resumes_at_the_right_stage(trained, cache):
    # The localizer was not trained again; the segmenter went on from its epoch 2.
    assert {n: (trained.localizer / n).stat().st_mtime_ns for n in trained.stamps} == trained.stamps
    log = (trained.segmenter / "training_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1", "2", "3"]
    assert _validation(trained.localizer)["mean_dsc"] > 0.3
    assert _validation(trained.segmenter)["mean_dsc"] > 0.3
    record = read_record(trained.segmenter)
    assert record.inputs == [] and record.network.in_channels == 2  # the cue is no input channel
    assert read_record(trained.localizer).strategy == StrategySpec("slices", axis=1, neighbours=2)
    # The cue the segmenter trained with, on its grid: high on the lesions, low elsewhere.
    case = "case_005"
    cue = np.load(trained.segmenter / "inputs" / f"{case}_localizer.npy").astype(np.float32)
    seg = np.load(cache / DATASET / "3d_fullres" / f"{case}_seg.npy")
    assert cue.shape == seg.shape and cue[seg > 0].mean() > 0.5 > 10 * cue[seg == 0].mean()


@pytest.mark.slow
def test_each_stage_ensemble_is_averaged_before_the_cue_and_the_threshold(trained, tmp_path, cache):
    model = tmp_path / "model"
    shutil.copytree(trained.model, model)
    shutil.copytree(model / "fold_0", model / "fold_1")
    for stage in ("localizer", "segmenter"):  # fold 1: another bias of the output layer
        path = model / "fold_1" / stage / "checkpoint_best.pt"
        state = torch.load(path, weights_only=True)
        state["network"]["head.bias"] += 2.0
        torch.save(state, path)
    data = np.load(cache / DATASET / "3d_fullres" / "case_005.npy")
    props = json.loads((cache / DATASET / "3d_fullres" / "case_005.json").read_text())

    def stage_outputs(folds):
        predictor = Predictor(model, PredictorSettings(device="cpu", folds=folds))
        return {s.stage.name: StageOutput(predictor.predict_stage(s, data)["probabilities"].numpy(), props, SIGMOID)
                for s in predictor.model.stages}

    one, two, both = stage_outputs([0]), stage_outputs([1]), stage_outputs([0, 1])
    for name in ("localizer", "segmenter"):
        np.testing.assert_allclose(both[name].probabilities, (one[name].probabilities + two[name].probabilities) / 2,
                                   atol=1e-5)
    combined = COMBINERS["l2s_adaptive"](CASCADE, both)
    mean_cue = (one["localizer"].lesion_probability() + two["localizer"].lesion_probability()) / 2
    np.testing.assert_array_equal(combined.threshold, AdaptiveThreshold().map(map_between_caches(mean_cue, props, props)))


class _PetLogit(nn.Module):
    """A "3D segmenter" whose logit rises with the PET averaged over 3×3×3: probability 0.5 at SUV 4,
    between 0.1 and 0.5 on the rim of a lesion."""

    def forward(self, x):
        return 2.0 * (F.avg_pool3d(x[:, :1], 3, stride=1, padding=1) - 4.0)


@pytest.mark.slow
def test_predict_runs_the_localizer_after_the_segmenter_where_its_cue_is_read_with_the_same_masks(
        trained, tmp_path, cache, monkeypatch):
    import autopetseg.inference.combine as combine
    from autopetseg.data.discovery import discover
    from autopetseg.data.imageio import write_image

    # Raw cases from the cache (PET in SUV, CT back in HU): on the cache's 4 mm grid, and at 2 mm along z.
    data = np.load(cache / DATASET / "3d_fullres" / "case_005.npy")
    for name, repeat in (("finer", 2), ("same", 1)):
        geometry = Geometry((32 * repeat, 32, 32), (4.0 / repeat, 4.0, 4.0), (0.0, 0.0, 0.0),
                            (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        for suffix, channel in (("pet", data[0]), ("ct", data[1] * 2048.0 - 1024.0)):
            write_image(tmp_path / "raw" / f"{name}_{suffix}.nii.gz", np.repeat(channel, repeat, axis=0), geometry)
    found = discover(tmp_path / "raw")
    records = found.cases if hasattr(found, "cases") else found
    predictor = Predictor(trained.model, PredictorSettings(device="cpu", folds=[0], save_probabilities=True))
    # Networks with known outputs: the segmenter's probability crosses 0.1 and 0.5 on the lesion's rim,
    # the cue is high on the lesion's coronal slices.
    localizer, segmenter = predictor.model.stages
    localizer.folds[0].network, segmenter.folds[0].network = _SliceReader(2), _PetLogit()
    rule = combine.READ_REGIONS["l2s_adaptive"]
    for record in records:
        case, prepared = predictor.load(record)
        # 2d_coronal shares 3d_fullres's cache: one array, preprocessed once
        assert prepared[0][0] is prepared[1][0] and prepared[0][1]["configuration"] == "2d_coronal"
        monkeypatch.setitem(combine.READ_REGIONS, "l2s_adaptive", lambda *args: None)  # the whole cue
        whole = predictor.predict_loaded(case, prepared)
        monkeypatch.setitem(combine.READ_REGIONS, "l2s_adaptive", rule)
        part = predictor.predict_loaded(case, prepared)
        np.testing.assert_array_equal(part.mask, whole.mask)
        np.testing.assert_array_equal(part.lesion_probability, whole.lesion_probability)
        assert part.windows.n_skipped >= whole.windows.n_skipped + 16  # most coronal slices hold no cue to read
        # The cue decided voxels: without it (one threshold, 0.5) the mask is smaller.
        plain = dataclasses.replace(CASCADE, notes={"adaptive_threshold": {"low": 0.5, "high": 0.5}})
        combined = COMBINERS["l2s_adaptive"](plain, predictor.stage_outputs(prepared, SlidingWindowStats()))
        assert 0 < predictor.to_original(combined.lesion_probability, combined.properties, 0.5)[0].sum() < whole.mask.sum()
