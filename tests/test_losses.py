"""Generalized Dice Focal loss against an independent numpy evaluation of equations (1) and (2)."""

import math

import numpy as np
import pytest
import torch

from autopetseg.training.losses import GeneralizedDiceFocalLoss

# Two 2x2x2 patches: patch 0 has 3 lesion voxels, patch 1 has none (empty class 1).
LABELS = np.array(
    [
        [[[0, 1], [0, 0]], [[1, 1], [0, 0]]],
        [[[0, 0], [0, 0]], [[0, 0], [0, 0]]],
    ]
)
LOGITS = np.array(
    [
        [  # patch 0: class 0 logits, class 1 logits
            [[[2.0, -1.0], [1.5, 0.5]], [[-0.5, 0.0], [3.0, 1.0]]],
            [[[-1.0, 2.5], [0.0, -2.0]], [[1.0, 0.5], [-3.0, 0.2]]],
        ],
        [  # patch 1
            [[[1.0, 0.3], [-0.7, 2.2]], [[0.1, 1.7], [0.0, -1.2]]],
            [[[-0.4, 0.9], [1.1, -2.5]], [[0.6, -0.3], [2.0, 0.8]]],
        ],
    ]
)


def numpy_gdl(logits, labels, factor=2.0, eps=1e-5, eta=1e-5):
    ratios = []
    for x, lab in zip(logits, labels):
        p = np.exp(x) / np.exp(x).sum(axis=0, keepdims=True)
        g = np.stack([(lab == c).astype(float) for c in range(x.shape[0])])
        counts = g.reshape(len(g), -1).sum(1)
        w = np.array([1.0 / c**2 if c > 0 else np.nan for c in counts])
        w[np.isnan(w)] = np.nanmax(w)  # absent class: the patch's largest finite weight
        num = factor * sum(w[c] * (p[c] * g[c]).sum() for c in range(len(g))) + eps
        den = sum(w[c] * (p[c] + g[c]).sum() for c in range(len(g))) + eta
        ratios.append(num / den)
    return 1.0 - np.mean(ratios)


def numpy_focal(logits, labels, weights=(1.0, 100.0), gamma=2.0, form="binary", reduction="mean"):
    total = 0.0
    for x, lab in zip(logits, labels):
        for c in range(x.shape[0]):
            s = 1.0 / (1.0 + np.exp(-x[c]))
            g = (lab == c).astype(float)
            term = -((1 - s) ** gamma) * g * np.log(s)
            if form == "binary":
                term = term - (s**gamma) * (1 - g) * np.log(1 - s)
            total += weights[c] * term.sum()
    if reduction == "sum":
        return total / logits.shape[0]
    return total / logits.size


def as_torch(logits=LOGITS, labels=LABELS):
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels[:, None], dtype=torch.int64)


@pytest.mark.parametrize("factor", [2.0, 1.0])
def test_dice_term_matches_equation_1(factor):
    x, y = as_torch()
    dice, _ = GeneralizedDiceFocalLoss(overlap_factor=factor).terms(x, y)
    assert dice.item() == pytest.approx(numpy_gdl(LOGITS, LABELS, factor), rel=1e-5)
    # the lesion-free patch alone: both weights are 1/8^2
    dice_empty, _ = GeneralizedDiceFocalLoss(overlap_factor=factor).terms(x[1:], y[1:])
    assert dice_empty.item() == pytest.approx(numpy_gdl(LOGITS[1:], LABELS[1:], factor), rel=1e-5)


@pytest.mark.parametrize("form", ["binary", "positive"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_focal_term_matches_equation_2(form, reduction):
    x, y = as_torch()
    _, focal = GeneralizedDiceFocalLoss(focal_reduction=reduction, focal_form=form).terms(x, y)
    assert focal.item() == pytest.approx(numpy_focal(LOGITS, LABELS, form=form, reduction=reduction), rel=1e-5)


def test_sum_is_mean_times_classes_times_voxels():
    x, y = as_torch()
    _, mean = GeneralizedDiceFocalLoss(focal_reduction="mean").terms(x, y)
    _, total = GeneralizedDiceFocalLoss(focal_reduction="sum").terms(x, y)
    assert total.item() == pytest.approx(mean.item() * 2 * 8, rel=1e-6)


def test_total_is_dice_plus_focal_and_accepts_labels_without_channel_axis():
    x, y = as_torch()
    loss = GeneralizedDiceFocalLoss()
    expected = numpy_gdl(LOGITS, LABELS) + numpy_focal(LOGITS, LABELS)
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert loss(x, y[:, 0]).item() == pytest.approx(expected, rel=1e-5)


def test_closed_form_at_zero_logits_on_background_patch():
    # p = sigmoid = 1/2 everywhere, 8 background voxels: w0 = w1 = 1/64,
    # Dice ratio = (2 * 4/64 + eps) / ((12 + 4)/64 + eta); focal element = (1/2)^2 ln 2, weights 1 and 100.
    x = torch.zeros(1, 2, 2, 2, 2)
    y = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    dice, focal = GeneralizedDiceFocalLoss().terms(x, y)
    assert dice.item() == pytest.approx(1 - (0.125 + 1e-5) / (0.25 + 1e-5), rel=1e-6)
    assert focal.item() == pytest.approx((1 + 100) / 2 * 0.25 * math.log(2), rel=1e-6)


def test_confident_correct_prediction_scores_near_zero():
    y = torch.tensor(LABELS[:1, None])
    x = torch.cat([(y == 0), (y == 1)], dim=1).float() * 40 - 20  # +20 for the true class, -20 otherwise
    dice, focal = GeneralizedDiceFocalLoss().terms(x, y)
    assert dice.item() == pytest.approx(0.0, abs=1e-5)
    assert focal.item() == pytest.approx(0.0, abs=1e-7)
    dice_printed, _ = GeneralizedDiceFocalLoss(overlap_factor=1.0).terms(x, y)
    assert dice_printed.item() == pytest.approx(0.5, abs=1e-5)  # the printed eq. (1) bottoms out at 1/2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_background_batch_and_low_precision_logits_stay_finite(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 2, 6, 6, 6) * 30).to(dtype).requires_grad_(True)  # large logits: saturated sigmoids
    y = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    loss = GeneralizedDiceFocalLoss()(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    reference = GeneralizedDiceFocalLoss()(x.detach().float(), y)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)  # computed in float32 from the same values


def test_channels_last_logits_give_the_same_loss():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 4, 4, 4)
    y = (torch.rand(2, 1, 4, 4, 4) > 0.8).long()
    loss = GeneralizedDiceFocalLoss()
    assert loss(x.contiguous(memory_format=torch.channels_last_3d), y).item() == pytest.approx(loss(x, y).item(), rel=1e-6)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="focal_reduction"):
        GeneralizedDiceFocalLoss(focal_reduction="none")
    x, y = as_torch()
    with pytest.raises(ValueError, match="focal weights"):
        GeneralizedDiceFocalLoss(focal_weights=(1.0, 2.0, 3.0))(x, y)
