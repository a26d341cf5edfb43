"""Sliding-window prediction: exact reconstruction, ensembles, skipping air windows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from autopetseg.models.sliding_window import (
    SlidingWindowStats,
    gaussian_importance_map,
    sliding_window_predict,
    window_starts,
)


class PointwiseNet(nn.Module):
    """Logits that are a fixed per-voxel function of the input; counts the windows it sees."""

    def __init__(self, a: float = 2.0, b: float = 0.5):
        super().__init__()
        self.a, self.b = a, b
        self.windows_seen = 0
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        self.windows_seen += x.shape[0]
        return torch.stack([self.a * x[:, 0] - x[:, 1], x[:, 1] + self.b * x[:, 0] ** 2], dim=1) + self.anchor

    def direct(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(image[None])[0], dim=0)


def _random_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2,) + tuple(shape), generator=g) * 3


@pytest.mark.parametrize("size,patch,overlap", [(50, 16, 0.5), (16, 16, 0.5), (37, 16, 0.25), (100, 32, 0.5)])
def test_window_starts_cover_the_axis_with_the_overlap(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    steps = np.diff(starts)
    assert np.all(steps > 0) and np.all(steps <= patch * (1 - overlap))
    # the fewest windows that respect the step bound: one window fewer would need a longer step
    if size == patch:
        assert starts == [0]
    if len(starts) > 2:
        assert (size - patch) / (len(starts) - 2) > patch * (1 - overlap)


def test_gaussian_map_peaks_in_the_centre_and_is_positive():
    g = gaussian_importance_map((9, 8, 7))
    assert g.shape == (9, 8, 7)
    assert float(g.max()) == pytest.approx(1.0)
    assert float(g.min()) > 0
    assert float(g[4, 3, 3]) == pytest.approx(float(g.max()), rel=0.05)
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1)) and torch.allclose(g, g.flip(2))


@pytest.mark.parametrize("mirror_axes", [None, (0, 2)])
def test_pointwise_network_is_reconstructed_exactly(mirror_axes):
    net = PointwiseNet()
    image = _random_image((40, 37, 50))
    probs = sliding_window_predict(net, image, (16, 16, 16), batch_size=3, overlap=0.5, mirror_axes=mirror_axes, skip_empty=False)
    assert probs.shape == (2, 40, 37, 50)
    torch.testing.assert_close(probs, net.direct(image), atol=1e-5, rtol=1e-5)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    net = PointwiseNet()
    image = _random_image((10, 20, 12), seed=1)
    probs = sliding_window_predict(net, image, (16, 16, 16), batch_size=2, skip_empty=False)
    assert probs.shape == (2, 10, 20, 12)
    torch.testing.assert_close(probs, net.direct(image), atol=1e-5, rtol=1e-5)


def test_ensemble_weights_average_the_networks_probabilities():
    nets = [PointwiseNet(2.0, 0.5), PointwiseNet(-1.0, 1.5)]
    image = _random_image((24, 24, 24), seed=2)
    probs = sliding_window_predict(nets, image, (16, 16, 16), network_weights=[1.0, 3.0], skip_empty=False)
    expected = 0.25 * nets[0].direct(image) + 0.75 * nets[1].direct(image)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_ensembles_average_logits_when_asked():
    """Three folds with lesion logits 5, -1 and -1.5 (background 0): 0.41 by probabilities, 0.51 by logits."""

    class ConstantNet(nn.Module):
        def __init__(self, lesion: float):
            super().__init__()
            self.lesion = nn.Parameter(torch.tensor(lesion))

        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0]) + self.lesion], dim=1)

    nets = [ConstantNet(5.0), ConstantNet(-1.0), ConstantNet(-1.5)]
    image = _random_image((8, 8, 8))
    by_probs = sliding_window_predict(nets, image, (8, 8, 8), skip_empty=False)[1]
    by_logits = sliding_window_predict(nets, image, (8, 8, 8), skip_empty=False, ensemble_space="logits")[1]
    sig = torch.sigmoid(torch.tensor([5.0, -1.0, -1.5]))
    assert float(by_probs.mean()) == pytest.approx(float(sig.mean()), abs=1e-6)
    assert float(by_logits.mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(2.5 / 3))), abs=1e-6)
    assert abs(float(by_probs.mean()) - float(by_logits.mean())) > 0.05


def test_constant_blending_weighs_overlapping_windows_equally():
    class PositionNet(nn.Module):  # logits that depend on the position inside the window
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            ramp = torch.linspace(-3, 3, x.shape[2]).view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[3], x.shape[4])
            return torch.stack([torch.zeros_like(ramp), ramp], dim=1) + self.anchor

    image = _random_image((24, 8, 8))
    gaussian = sliding_window_predict(PositionNet(), image, (16, 8, 8), skip_empty=False)[1]
    constant = sliding_window_predict(PositionNet(), image, (16, 8, 8), skip_empty=False, blending="constant")[1]
    ramp = torch.sigmoid(torch.linspace(-3, 3, 16))
    # z = 8..15 is covered by the windows starting at 0 and 8: constant weights give the plain mean.
    torch.testing.assert_close(constant[8:16, 0, 0], (ramp[8:16] + ramp[0:8]) / 2)
    assert not torch.allclose(gaussian[8:16, 0, 0], constant[8:16, 0, 0])
    with pytest.raises(ValueError, match="blending"):
        sliding_window_predict(PositionNet(), image, (16, 8, 8), blending="linear")


def test_air_windows_are_skipped_and_get_background_probability_one():
    shape, patch = (48, 48, 48), (16, 16, 16)
    image = torch.zeros((2,) + shape)
    body = (slice(20, 30), slice(4, 14), slice(30, 44))
    image[(slice(None),) + body] = _random_image((10, 10, 14), seed=3) + 0.5
    net = PointwiseNet()
    stats = SlidingWindowStats()
    probs = sliding_window_predict(net, image, patch, batch_size=4, overlap=0.5, skip_empty=True, stats=stats)

    starts = [window_starts(s, p, 0.5) for s, p in zip(shape, patch)]
    occupied = np.zeros(shape, dtype=bool)
    occupied[body] = True
    covered = np.zeros(shape, dtype=bool)
    n_non_empty = 0
    for z, y, x in itertools.product(*starts):
        box = (slice(z, z + 16), slice(y, y + 16), slice(x, x + 16))
        if occupied[box].any():
            n_non_empty += 1
            covered[box] = True
    n_all = int(np.prod([len(s) for s in starts]))
    assert n_non_empty < n_all
    assert net.windows_seen == n_non_empty
    assert stats.n_windows == n_all and stats.n_skipped == n_all - n_non_empty

    # Not covered by any run window: pure background.
    assert torch.all(probs[0][~torch.from_numpy(covered)] == 1.0)
    assert torch.all(probs[1][~torch.from_numpy(covered)] == 0.0)
    # Every window holding a body voxel was run, so the body is reconstructed exactly.
    direct = net.direct(image)
    torch.testing.assert_close(probs[(slice(None),) + body], direct[(slice(None),) + body], atol=1e-5, rtol=1e-5)


def test_all_air_volume_is_background_without_running_windows_on_it():
    net = PointwiseNet()
    probs = sliding_window_predict(net, torch.zeros((2, 20, 20, 20)), (16, 16, 16), skip_empty=True)
    assert torch.all(probs[0] == 1.0) and torch.all(probs[1] == 0.0)
    assert net.windows_seen <= 1  # at most the one probe that learns the number of classes


def test_fill_sets_the_probabilities_where_no_window_ran():
    image = torch.zeros((2, 32, 16, 16))
    image[:, :8] = _random_image((8, 16, 16), seed=4) + 0.5
    net = PointwiseNet()
    probs = sliding_window_predict(net, image, (16, 16, 16), overlap=0.5, fill=[0.25, 0.75])
    assert torch.all(probs[0, 24:] == 0.25) and torch.all(probs[1, 24:] == 0.75)
    torch.testing.assert_close(probs[:, :8], net.direct(image)[:, :8], atol=1e-5, rtol=1e-5)
    # everything skipped: the fill tells the number of channels, no probe forward
    net = PointwiseNet()
    probs = sliding_window_predict(net, torch.zeros((2, 20, 20, 20)), (16, 16, 16), fill=[1.0, 0.0])
    assert net.windows_seen == 0 and probs.shape == (2, 20, 20, 20) and torch.all(probs[0] == 1.0)
    with pytest.raises(ValueError, match="fill"):
        sliding_window_predict(PointwiseNet(), image, (16, 16, 16), fill=[0.0])


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="activation"):
        sliding_window_predict(PointwiseNet(), _random_image((16, 16, 16)), (16, 16, 16), activation="softmx")
