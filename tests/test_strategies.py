"""Inference strategies: sliding window with a background fill, 2D slices along an axis, whole image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopetseg.models.methods import OutputSpec, StrategySpec
from autopetseg.models.sliding_window import SlidingWindowStats
from autopetseg.models.strategies import run_strategy, slice_padding

SOFTMAX = OutputSpec()  # 2 channels, channel 0 background
SIGMOID = OutputSpec(activation="sigmoid", channels=1, lesion_channel=0)


class ChannelNet(nn.Module):
    """Pointwise logits read from one input channel: softmax (0, a·x[c]) or sigmoid (a·x[c]).

    Works for 2D (B, C, H, W) and 3D (B, C, z, y, x) batches; records the input shapes it sees.
    """

    def __init__(self, channel: int = 0, a: float = 1.0, sigmoid: bool = False, expect_channels: int | None = None):
        super().__init__()
        self.channel, self.a, self.sigmoid, self.expect_channels = channel, a, sigmoid, expect_channels
        self.seen: list[tuple[int, ...]] = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        if self.expect_channels is not None:
            assert x.shape[1] == self.expect_channels
        v = self.a * x[:, self.channel : self.channel + 1] + self.anchor
        return v if self.sigmoid else torch.cat([torch.zeros_like(v), v], dim=1)

    @property
    def n_seen(self) -> int:
        return sum(s[0] for s in self.seen)


def _image(shape, seed=0, air=None):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((2,) + tuple(shape), generator=g) * 3 + 0.2
    if air is not None:
        image[(slice(None),) + air] = 0.0
    return image


def _softmax_of_pet(pet: torch.Tensor, a: float = 1.0) -> torch.Tensor:
    return torch.softmax(torch.stack([torch.zeros_like(pet), a * pet]), dim=0)


# ---------------------------------------------------------------------------- background fill
def test_sigmoid_model_is_background_zero_outside_the_body_with_windows_and_slices():
    image = _image((24, 20, 20), seed=1, air=(slice(12, None),))  # upper half body, lower half air
    net = ChannelNet(sigmoid=True)
    win = run_strategy(StrategySpec("sliding_window"), net, image, (8, 8, 8), output=SIGMOID)["probabilities"]
    assert win.shape == (1, 24, 20, 20)
    assert torch.all(win[:, 16:] == 0.0)  # no window ran there
    torch.testing.assert_close(win[0, :12], torch.sigmoid(image[0, :12]))
    sl = run_strategy(StrategySpec("slices", axis=0), net, image, (8, 8), output=SIGMOID)["probabilities"]
    assert torch.all(sl[:, 12:] == 0.0)
    torch.testing.assert_close(sl[0, :12], torch.sigmoid(image[0, :12]))


def test_softmax_model_keeps_background_one_in_channel_zero_outside_the_body():
    image = _image((24, 20, 20), seed=2, air=(slice(12, None),))
    net = ChannelNet()
    for strategy, patch in ((StrategySpec("sliding_window"), (8, 8, 8)), (StrategySpec("slices", axis=0), (8, 8))):
        probs = run_strategy(strategy, net, image, patch, output=SOFTMAX)["probabilities"]
        assert torch.all(probs[0, 16:] == 1.0) and torch.all(probs[1, 16:] == 0.0)
        torch.testing.assert_close(probs[:, :12], _softmax_of_pet(image[0, :12]))


# ---------------------------------------------------------------------------- slices
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis_reproduce_a_pointwise_network(axis):
    image = _image((6, 7, 9), seed=axis)
    net = ChannelNet(a=1.5, expect_channels=2)
    stats = SlidingWindowStats()
    out = run_strategy(StrategySpec("slices", axis=axis), net, image.numpy(), (4, 4), output=SOFTMAX,
                       batch_size=4, skip_empty=False, stats=stats)
    assert set(out) == {"probabilities"}
    probs = out["probabilities"]
    assert probs.shape == (2, 6, 7, 9) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, _softmax_of_pet(image[0], 1.5))
    n_slices = image.shape[axis + 1]
    assert net.n_seen == n_slices and stats.n_windows == n_slices and stats.n_skipped == 0
    # whole slices, padded to a multiple of 32 in plane
    assert all(s[2] % 32 == 0 and s[3] % 32 == 0 for s in net.seen)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_neighbour_slices_come_channel_major_with_zeros_outside(axis):
    k = 2
    image = _image((6, 5, 7), seed=10 + axis)
    # channel c·(2k+1) + (j+k): PET of slice s-1 is channel 1, CT of slice s+2 is channel 5 + 4 = 9
    for channel, c, j in ((1, 0, -1), (9, 1, 2), (k, 0, 0)):
        net = ChannelNet(channel=channel, expect_channels=2 * (2 * k + 1))
        probs = run_strategy(StrategySpec("slices", axis=axis, neighbours=k), net, image, (4, 4),
                             output=SOFTMAX, skip_empty=False, batch_size=3)["probabilities"]
        source = image[c].movedim(axis, 0)
        shifted = torch.zeros_like(source)  # shifted[s] = source[s + j], 0 outside the volume
        n = source.shape[0]
        for s in range(n):
            if 0 <= s + j < n:
                shifted[s] = source[s + j]
        torch.testing.assert_close(probs, _softmax_of_pet(shifted.movedim(0, axis)))


def test_air_slices_are_skipped_and_get_the_background():
    image = _image((8, 6, 5), seed=3)
    image[:, :, 2] = 0.0  # coronal slice 2 is air
    image[0, :, 4] = 0.0  # coronal slice 4: no PET but CT (body): run
    net = ChannelNet(sigmoid=True)
    stats = SlidingWindowStats()
    probs = run_strategy(StrategySpec("slices", axis=1), net, image, (4, 4), output=SIGMOID, stats=stats)["probabilities"]
    assert net.n_seen == 5 and stats.n_windows == 6 and stats.n_skipped == 1
    assert torch.all(probs[:, :, 2] == 0.0)
    torch.testing.assert_close(probs[0, :, 4], torch.full((8, 5), 0.5))
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(probs[0][:, keep], torch.sigmoid(image[0][:, keep]))


def test_batch_size_does_not_change_slice_results():
    image = _image((7, 6, 5), seed=4, air=(slice(None), slice(None), slice(0, 1)))
    nets = [nn.Conv2d(6, 2, 3, padding=1).eval(), nn.Conv2d(6, 2, 3, padding=1).eval()]
    strategy = StrategySpec("slices", axis=2, neighbours=1)
    results = [run_strategy(strategy, nets, image, (4, 4), output=SOFTMAX, batch_size=b, mirror_axes=(0, 1))["probabilities"]
               for b in (1, 2, 5)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-6, rtol=1e-6)


def test_slice_ensemble_weights_and_mirroring():
    image = _image((5, 6, 7), seed=5)
    nets = [ChannelNet(a=2.0), ChannelNet(a=-1.0)]
    stats = SlidingWindowStats()
    probs = run_strategy(StrategySpec("slices", axis=0), nets, image, (4, 4), output=SOFTMAX,
                         network_weights=[1.0, 3.0], mirror_axes=(0, 1, 2), batch_size=5, stats=stats)["probabilities"]
    expected = 0.25 * _softmax_of_pet(image[0], 2.0) + 0.75 * _softmax_of_pet(image[0], -1.0)
    torch.testing.assert_close(probs, expected)
    # one batch, 2 networks × 4 flips of the two in-plane axes (the slice axis 0 is dropped)
    assert stats.n_forward_calls == 8


def test_slice_mirroring_flips_the_plane_and_back():
    class RampNet(nn.Module):  # logits depend on the position along the last in-plane axis
        def forward(self, x):
            ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
            return torch.cat([torch.zeros_like(ramp), x[:, :1] * 0 + ramp], dim=1)

    image = _image((3, 4, 32), seed=6)  # x = 32: no padding along the last axis
    strategy = StrategySpec("slices", axis=0)
    plain = run_strategy(strategy, RampNet(), image, (4, 32), output=SOFTMAX)["probabilities"]
    mirrored = run_strategy(strategy, RampNet(), image, (4, 32), output=SOFTMAX, mirror_axes=(2,))["probabilities"]
    ramp = torch.arange(32, dtype=torch.float32)
    torch.testing.assert_close(plain[1, 0, 0], torch.sigmoid(ramp))
    torch.testing.assert_close(mirrored[1, 0, 0], 0.5 * (torch.sigmoid(ramp) + torch.sigmoid(ramp.flip(0))))


def test_slice_padding_rule():
    assert slice_padding((7, 33), (4, 4), (32, 32)) == [32, 64]
    assert slice_padding((7, 33), (40, 4), (8, 16)) == [40, 48]
    image = _image((3, 10, 20), seed=7)
    net = ChannelNet()
    run_strategy(StrategySpec("slices", axis=0), net, image, (3, 24, 4), output=SOFTMAX, divisor=(1, 8, 16))
    assert net.seen[0][2:] == (24, 32)


# ---------------------------------------------------------------------------- whole image
class HeadNet(nn.Module):
    """Pointwise segmentation logits and a fixed patient-level head (or deep-supervision list)."""

    def __init__(self, head_logits=(0.0, 1.0, 2.0), as_list=False):
        super().__init__()
        self.head = torch.tensor(head_logits)
        self.as_list = as_list
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        seg = torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], dim=1)
        if self.as_list:
            return [seg, seg[:, :, ::2, ::2, ::2]]
        return {"segmentation": seg, "prognosis": self.head.expand(x.shape[0], -1)}


def test_whole_image_shape_and_heads():
    image = _image((10, 12, 14), seed=8)
    nets = [HeadNet((0.0, 1.0, 2.0)), HeadNet((2.0, 0.0, 0.0))]
    out = run_strategy(StrategySpec("whole_image", grid=(8, 8, 8)), nets, image, (8, 8, 8), output=SOFTMAX,
                       network_weights=[3.0, 1.0], mirror_axes=(0,))
    assert set(out) == {"probabilities", "prognosis"}
    assert out["probabilities"].shape == (2, 10, 12, 14)
    assert nets[0].seen == [(1, 2, 8, 8, 8)] * 2  # batch of one, plus its mirrored copy
    assert out["prognosis"].shape == (3,)
    expected = 0.75 * torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0) + 0.25 * torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    torch.testing.assert_close(out["prognosis"], expected)
    torch.testing.assert_close(out["probabilities"].sum(0), torch.ones(10, 12, 14))


def test_whole_image_resize_round_trip_of_a_smooth_volume_is_close_to_identity():
    z, y, x = torch.meshgrid(*(torch.linspace(0, 1, n) for n in (20, 30, 26)), indexing="ij")
    pet = 2.0 * torch.sin(2 * z) * torch.cos(1.5 * y) + x
    image = torch.stack([pet, torch.ones_like(pet)])
    out = run_strategy(StrategySpec("whole_image", grid=(16, 24, 32)), HeadNet(as_list=True), image, (8, 8, 8),
                       output=SOFTMAX)
    assert set(out) == {"probabilities"}
    torch.testing.assert_close(out["probabilities"], _softmax_of_pet(pet), atol=0.02, rtol=0)
    # the same grid: no resizing at all
    same = run_strategy(StrategySpec("whole_image", grid=(20, 30, 26)), HeadNet(as_list=True), image, (8, 8, 8),
                        output=SOFTMAX)["probabilities"]
    torch.testing.assert_close(same, _softmax_of_pet(pet))


# ---------------------------------------------------------------------------- errors
def test_unknown_kinds_and_wrong_channels_are_errors():
    with pytest.raises(ValueError):
        StrategySpec("patches")
    image = _image((4, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        run_strategy(StrategySpec("slices", axis=0), ChannelNet(), image, (4, 4), output=SIGMOID)
    with pytest.raises(ValueError, match="fill"):
        run_strategy(StrategySpec("sliding_window"), ChannelNet(), image, (4, 8, 8), output=SIGMOID)
    with pytest.raises(ValueError, match="network_weights"):
        run_strategy(StrategySpec("sliding_window"), [ChannelNet()], image, (4, 8, 8), output=SOFTMAX,
                     network_weights=[1.0, 2.0])
