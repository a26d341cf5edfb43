"""Attention U-Net (Oktay et al. 2018) as the L1DFL paper uses it (Dzikunu et al., §2.5, via MONAI).

Block layout (MONAI's ``AttentionUnet``, written here from its description):

- stage 0 (full resolution) is a conv block: two conv -> BatchNorm -> ReLU layers;
- stage s > 0 is the same conv block whose first convolution is strided by ``strides[s]``;
  the last stage is the bottleneck;
- decoder level k (back to the resolution of stage k, for k = n-2 .. 0): a transposed conv ->
  BN -> ReLU takes stage k+1's output to ``features[k]`` channels at stage k's size (``up``);
  an **attention gate** weighs the encoder's stage-k output x by a voxel-wise coefficient
  computed from x and the upsampled decoder features g::

      alpha = sigmoid(BN(conv1x1(relu(BN(conv1x1(g)) + BN(conv1x1(x))))))   (one channel)

  with ``features[k] // 2`` intermediate channels; ``merge`` convolves [alpha * x, g]
  (2 x features[k] channels) back to ``features[k]``;
- a final 1x1 convolution (no norm, no activation) gives the logits.

Every convolution has a bias (as MONAI's). The paper states BatchNorm and ReLU for every
convolutional layer, so ``merge`` is conv -> BN -> ReLU by default; MONAI's implementation (the
paper's released code) uses non-affine InstanceNorm and a PReLU there, available as
``AttentionUNetOptions(merge_block="monai")``.

Mapping onto the plans' :class:`NetworkTopology`: one stage per entry of
``features_per_stage``; stage s uses ``kernel_sizes[s]`` for its convolutions and downsamples by
``strides[s]`` (``strides[0]`` must be all ones: MONAI's head runs at full resolution); the
transposed conv of decoder level k inverts stage k+1 (its kernel and stride), ``merge`` uses
stage k's kernel. The paper's network (channels 16, 32, 64, 128, 256, stride 2 per level, 3x3x3
kernels) is ``features_per_stage=[16, 32, 64, 128, 256]``, ``strides=[[1]*3] + [[2]*3]*4``:
5,909,562 trainable parameters with ``merge_block="monai"`` (as MONAI 1.6.1 counts
``AttentionUnet(3, 2, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2))``), 5,910,038 with the default
BN + ReLU merge (2 x 240 - 4 more). A CPU plan (e.g. 16..128 in 4 stages) gives a shallower,
narrower network of the same design; ``num_res_units`` of the topology is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from autopetseg.planning.plans import NetworkTopology, total_stride

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
MERGE_BLOCKS = ("batch_relu", "monai")


@dataclass
class AttentionUNetOptions:
    """Choices the topology does not fix.

    ``merge_block``: "batch_relu" (the paper's text: BN and ReLU after every convolution) or
    "monai" (MONAI's non-affine InstanceNorm + PReLU after the merge convolution).
    ``dropout`` after each norm, 0 as in the paper.
    """

    merge_block: str = "batch_relu"
    dropout: float = 0.0


def topology_lists(topology: NetworkTopology, network: str) -> tuple[list[int], list[list[int]], list[list[int]], int]:
    """(features, strides, kernels, ndim) of a topology whose first stage has stride 1, validated."""
    features = [int(f) for f in topology.features_per_stage]
    strides = [[int(v) for v in s] for s in topology.strides]
    kernels = [[int(v) for v in k] for k in topology.kernel_sizes]
    n = len(features)
    ndim = len(strides[0]) if strides else 0
    if n < 2:
        raise ValueError(f"{network} needs at least 2 stages, got features_per_stage={features}")
    if ndim not in (2, 3) or len(strides) != n or len(kernels) != n:
        raise ValueError(f"{network}: the topology needs one 2D or 3D stride and kernel per stage")
    if any(len(s) != ndim for s in strides) or any(len(k) != ndim for k in kernels):
        raise ValueError(f"{network}: every stride and kernel must have {ndim} entries")
    if any(v != 1 for v in strides[0]):
        raise ValueError(f"{network}: strides[0] must be all ones (stage 0 runs at full resolution), got {strides[0]}")
    if any(v < 1 for s in strides for v in s) or any(f < 1 for f in features):
        raise ValueError(f"{network}: strides and features must be positive")
    if any(v % 2 == 0 for k in kernels for v in k):
        raise ValueError(f"{network}: kernel sizes must be odd to keep the grid aligned, got {kernels}")
    return features, strides, kernels, ndim


def check_input_size(x: torch.Tensor, ndim: int, stride: Sequence[int]) -> None:
    spatial = x.shape[2:]
    if len(spatial) != ndim or any(d % t for d, t in zip(spatial, stride)):
        raise ValueError(
            f"input spatial shape {list(spatial)} must be {ndim}D and divisible by the network's total stride {list(stride)}"
        )


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) // 2 for k in kernel)


def _conv_bn_relu(ndim: int, c_in: int, c_out: int, kernel, stride, dropout: float, transposed: bool = False) -> nn.Sequential:
    if transposed:
        # (n - 1) s - 2p + k + (s - 1) = n s for odd k and p = (k - 1) / 2
        conv: nn.Module = _CONV_T[ndim](
            c_in, c_out, tuple(kernel), tuple(stride), _padding(kernel), output_padding=tuple(s - 1 for s in stride)
        )
    else:
        conv = _CONV[ndim](c_in, c_out, tuple(kernel), tuple(stride), _padding(kernel))
    layers = [conv, _BATCH_NORM[ndim](c_out)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvBlock(nn.Sequential):
    """Two conv -> BN -> ReLU layers; the first one strided."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel, stride, dropout: float = 0.0):
        ones = [1] * ndim
        super().__init__(
            _conv_bn_relu(ndim, c_in, c_out, kernel, stride, dropout),
            _conv_bn_relu(ndim, c_out, c_out, kernel, ones, dropout),
        )


class AttentionGate(nn.Module):
    """x * sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x))))): one attention coefficient per voxel."""

    def __init__(self, ndim: int, channels: int, inter_channels: int):
        super().__init__()
        conv, norm = _CONV[ndim], _BATCH_NORM[ndim]
        inter = max(1, inter_channels)
        self.w_g = nn.Sequential(conv(channels, inter, 1), norm(inter))
        self.w_x = nn.Sequential(conv(channels, inter, 1), norm(inter))
        self.psi = nn.Sequential(conv(inter, 1, 1), norm(1), nn.Sigmoid())
        self.relu = nn.ReLU()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.relu(self.w_g(g) + self.w_x(x)))


class AttentionUNet(nn.Module):
    """The L1DFL paper's Attention U-Net for a plans topology (see the module docstring)."""

    def __init__(
        self,
        topology: NetworkTopology,
        in_channels: int = 2,
        out_channels: int = 2,
        options: AttentionUNetOptions | None = None,
    ):
        super().__init__()
        options = options or AttentionUNetOptions()
        if options.merge_block not in MERGE_BLOCKS:
            raise ValueError(f"merge_block must be one of {MERGE_BLOCKS}, got {options.merge_block!r}")
        features, strides, kernels, ndim = topology_lists(topology, "attention_unet")
        n = len(features)
        self.ndim = ndim
        self.total_stride = total_stride(strides)
        drop = options.dropout
        self.encoder = nn.ModuleList(
            ConvBlock(ndim, in_channels if s == 0 else features[s - 1], features[s], kernels[s], strides[s], drop)
            for s in range(n)
        )
        self.up = nn.ModuleList(
            _conv_bn_relu(ndim, features[k + 1], features[k], kernels[k + 1], strides[k + 1], drop, transposed=True)
            for k in range(n - 1)
        )
        self.gates = nn.ModuleList(AttentionGate(ndim, features[k], features[k] // 2) for k in range(n - 1))
        self.merge = nn.ModuleList(self._merge_block(ndim, features[k], kernels[k], options) for k in range(n - 1))
        self.out = _CONV[ndim](features[0], out_channels, 1)

    @staticmethod
    def _merge_block(ndim: int, channels: int, kernel, options: AttentionUNetOptions) -> nn.Sequential:
        if options.merge_block == "batch_relu":
            return _conv_bn_relu(ndim, 2 * channels, channels, kernel, [1] * ndim, options.dropout)
        layers: list[nn.Module] = [
            _CONV[ndim](2 * channels, channels, tuple(kernel), 1, _padding(kernel)),
            _INSTANCE_NORM[ndim](channels),
        ]
        if options.dropout > 0:
            layers.append(nn.Dropout(options.dropout))
        layers.append(nn.PReLU())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.ndim, self.total_stride)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()  # bottleneck output
        for k in range(len(self.up) - 1, -1, -1):
            g = self.up[k](x)
            x = self.merge[k](torch.cat([self.gates[k](g, skips[k]), g], dim=1))
        return self.out(x)
