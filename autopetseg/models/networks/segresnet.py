"""SegResNet (Myronenko 2018, without the VAE branch) as the L1DFL paper uses it (§2.5, via MONAI).

Block layout (MONAI's ``SegResNet``, written here from its description):

- an initial convolution takes the input to ``features[0]`` channels at full resolution;
- encoder stage s: (s > 0) a strided convolution from ``features[s-1]`` to ``features[s]``
  channels, then ``blocks_down[s]`` residual blocks; a residual block is pre-activation,
  ``x + conv(ReLU(GN(conv(ReLU(GN(x))))))``;
- decoder level k (back to stage k, for k = n-2 .. 0): a 1x1 convolution to ``features[k]``
  channels, linear upsampling by stage k+1's stride (not trainable, MONAI's default mode),
  *addition* of the encoder's stage-k output, then ``blocks_up`` residual blocks;
- a final GN -> ReLU -> 1x1 convolution (with bias) gives the logits.

Convolutions have no bias except the last; GroupNorm with 8 groups (MONAI's default; the largest
divisor of the channel count not above 8 when 8 does not divide it); ReLU.

Mapping onto the plans' :class:`NetworkTopology`: stage s has ``features_per_stage[s]``
channels, downsamples by ``strides[s]`` (``strides[0]`` all ones) and uses ``kernel_sizes[s]``
for its convolutions (the initial one uses ``kernel_sizes[0]``). The paper's network (16 initial
filters doubled per level, blocks down 1, 2, 2, 4, up 1, 1, 1) is
``features_per_stage=[16, 32, 64, 128]``, ``strides=[[1]*3] + [[2]*3]*3``, kernels 3: 4,701,346
trainable parameters, as MONAI 1.6.1 counts ``SegResNet(blocks_down=[1, 2, 2, 4], init_filters=16,
in_channels=2, out_channels=2)``.

The block counts follow the number of stages n: ``blocks_down`` (paper: 1, 2, 2, 4) is used as
given when it has n entries; otherwise the deepest stage keeps the last count and the stages above
it take the leading counts, the last but one repeated when there are more stages (n = 3:
1, 2, 4; n = 5: 1, 2, 2, 2, 4). ``blocks_up`` is listed from the deepest decoder level up and is
cut or padded with its last count to n - 1 entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autopetseg.planning.plans import NetworkTopology, total_stride
from autopetseg.models.networks.attention_unet import check_input_size, topology_lists

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_INTERP = {2: "bilinear", 3: "trilinear"}


@dataclass
class SegResNetOptions:
    """Choices the topology does not fix (defaults: the paper's / MONAI's)."""

    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    num_groups: int = 8


def stage_block_counts(blocks_down: Sequence[int], blocks_up: Sequence[int], n_stages: int) -> tuple[list[int], list[int]]:
    """(residual blocks per encoder stage, per decoder level from the deepest) for ``n_stages``."""
    down, up = [int(b) for b in blocks_down], [int(b) for b in blocks_up]
    if not down or not up or min(down + up) < 0:
        raise ValueError(f"blocks_down and blocks_up need non-negative counts, got {down} and {up}")
    if len(down) != n_stages:
        upper = down[:-1] or down
        head = [upper[min(i, len(upper) - 1)] for i in range(n_stages - 1)]
        down = head + [down[-1]]
    up = [up[min(i, len(up) - 1)] for i in range(n_stages - 1)]
    return down, up


def _group_norm(ndim: int, channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


def _conv(ndim: int, c_in: int, c_out: int, kernel, stride=1, bias: bool = False) -> nn.Module:
    kernel = [kernel] * ndim if isinstance(kernel, int) else list(kernel)
    return _CONV[ndim](c_in, c_out, tuple(kernel), stride, tuple((k - 1) // 2 for k in kernel), bias=bias)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(ReLU(GN(conv(ReLU(GN(x))))))."""

    def __init__(self, ndim: int, channels: int, kernel, num_groups: int):
        super().__init__()
        self.norm1 = _group_norm(ndim, channels, num_groups)
        self.norm2 = _group_norm(ndim, channels, num_groups)
        self.conv1 = _conv(ndim, channels, channels, kernel)
        self.conv2 = _conv(ndim, channels, channels, kernel)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(y)))


class _Upsample(nn.Module):
    """1x1 convolution to the upper stage's channels, then linear upsampling by its stride."""

    def __init__(self, ndim: int, c_in: int, c_out: int, scale: Sequence[int]):
        super().__init__()
        self.conv = _conv(ndim, c_in, c_out, 1)
        self.scale = tuple(float(s) for s in scale)
        self.mode = _INTERP[ndim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if all(s == 1.0 for s in self.scale):
            return x
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=False)


class SegResNet(nn.Module):
    """The L1DFL paper's SegResNet for a plans topology (see the module docstring)."""

    def __init__(
        self,
        topology: NetworkTopology,
        in_channels: int = 2,
        out_channels: int = 2,
        options: SegResNetOptions | None = None,
    ):
        super().__init__()
        options = options or SegResNetOptions()
        features, strides, kernels, ndim = topology_lists(topology, "segresnet")
        n = len(features)
        down, up = stage_block_counts(options.blocks_down, options.blocks_up, n)
        self.ndim = ndim
        self.total_stride = total_stride(strides)
        groups = options.num_groups
        # Registered in MONAI's order (init, down, up blocks, upsamplers, final).
        self.conv_init = _conv(ndim, in_channels, features[0], kernels[0])
        self.down_layers = nn.ModuleList(
            nn.Sequential(
                _conv(ndim, features[s - 1], features[s], kernels[s], strides[s]) if s > 0 else nn.Identity(),
                *(ResBlock(ndim, features[s], kernels[s], groups) for _ in range(down[s])),
            )
            for s in range(n)
        )
        # Decoder lists run from the deepest level (k = n-2) up to k = 0, as MONAI's do.
        levels = list(range(n - 2, -1, -1))
        self.up_layers = nn.ModuleList(
            nn.Sequential(*(ResBlock(ndim, features[k], kernels[k], groups) for _ in range(up[i])))
            for i, k in enumerate(levels)
        )
        self.up_samples = nn.ModuleList(_Upsample(ndim, features[k + 1], features[k], strides[k + 1]) for k in levels)
        self.conv_final = nn.Sequential(
            _group_norm(ndim, features[0], groups), nn.ReLU(), _conv(ndim, features[0], out_channels, 1, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.ndim, self.total_stride)
        x = self.conv_init(x)
        skips = []
        for layer in self.down_layers:
            x = layer(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, refine in zip(self.up_samples, self.up_layers):
            x = refine(upsample(x) + skips.pop())
        return self.conv_final(x)
