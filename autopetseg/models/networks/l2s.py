"""The two networks of L2SNet (Cai et al., autoPET 2023): a 2D localizer U-Net and a 3D segmenter U-Net.

**Localizer** (``L2SLocalizerUNet``, paper §2.1). A 2D U-Net on slices. The paper's encoder is an
ImageNet-pretrained Res2Net-50; no pretrained weights can be downloaded here, so the encoder is a
residual encoder trained from scratch and sized by the plans' 2D topology: stage s has
``features_per_stage[s]`` channels and ``blocks_per_stage`` basic residual blocks (two 3×3
conv-BN with a ReLU between and after the sum; the first block of a stage applies the stage's
stride and a 1×1 strided projection shortcut), after a 3×3 conv-BN-ReLU stem at full resolution.
The decoder is the paper's: each stage upsamples bilinearly to the skip's size, concatenates the
encoder features of that size and applies two 3×3 conv-BN-ReLU; its widths are the paper's
``(320, 256, 128, 64, 32)`` from the deepest to the finest stage, of which a topology with n
stages (n - 1 decoder stages) takes the last n - 1. A 1×1 convolution makes the logits.

**Segmenter** (``L2SUNet3D``, paper §2.2). A 3D U-Net with four levels: an initial 3×3×3
convolution with 16 filters, then per level a block of two 3×3×3 conv-norm-ReLU (features 16, 32,
64, 128), max-pooling down between levels (kernel = stride), a symmetric decoder (transposed
convolution up, kernel = stride, concatenation, a block of two conv-norm-ReLU) and a 1×1×1
convolution for the logits. ``norm="layer"`` (the paper) is ``GroupNorm(1, C)``: one mean and
variance over all channels and voxels of a sample. ``segmenter_topology`` builds its topology
from the plans' (their strides, the paper's features and 3×3×3 kernels).

**Inputs.** Both read the cached arrays through ``InputWindows``: a selection of input channels
(``read_channels``: the localizer keeps the PET slices of a slab of PET and CT slices) and
intensity windows (``windows``: [channel, low, high, to_low, to_high], the channel clipped to
[low, high] and mapped linearly onto [to_low, to_high], in the cache's units). They are network
options, recorded in ``model.json``, so inference applies exactly what training did.

Convolutions followed by a norm have no bias; the last convolution (the logits) has one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autopetseg.models.networks.attention_unet import check_input_size, topology_lists
from autopetseg.planning.plans import NetworkTopology, total_stride

PAPER_DECODER_FEATURES = (320, 256, 128, 64, 32)
PAPER_SEGMENTER_LEVELS = 4
PAPER_SEGMENTER_FEATURES = 16


class InputWindows(nn.Module):
    """Intensity windows on some input channels, then the channels the network reads (module doc)."""

    def __init__(self, in_channels: int, read_channels: Sequence[int] | None = None,
                 windows: Sequence[Sequence[float]] = ()):
        super().__init__()
        self.in_channels = int(in_channels)
        self.read = list(range(self.in_channels)) if read_channels is None else [int(c) for c in read_channels]
        if not self.read or any(not 0 <= c < self.in_channels for c in self.read):
            raise ValueError(f"read_channels {self.read} must be channels of the {self.in_channels} inputs")
        low = torch.full((self.in_channels,), -torch.inf)
        high = torch.full((self.in_channels,), torch.inf)
        scale, shift = torch.ones(self.in_channels), torch.zeros(self.in_channels)
        self.has_windows = bool(windows)
        for window in windows:
            if len(window) != 5:
                raise ValueError(f"a window is [channel, low, high, to_low, to_high], got {list(window)}")
            c, lo, hi, a, b = int(window[0]), float(window[1]), float(window[2]), float(window[3]), float(window[4])
            if not 0 <= c < self.in_channels or not lo < hi:
                raise ValueError(f"window {list(window)}: channel must be an input channel and low < high")
            low[c], high[c], scale[c] = lo, hi, (b - a) / (hi - lo)
            shift[c] = a - lo * scale[c]
        for name, value in (("low", low), ("high", high), ("scale", scale), ("shift", shift)):
            self.register_buffer(name, value, persistent=False)  # rebuilt from the options, not the weights

    @property
    def out_channels(self) -> int:
        return len(self.read)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_windows:
            view = (1, -1) + (1,) * (x.ndim - 2)
            x = torch.clamp(x, self.low.view(view), self.high.view(view)) * self.scale.view(view) + self.shift.view(view)
        if self.read != list(range(self.in_channels)):
            x = x[:, self.read]
        return x


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def _checked_lists(topology: NetworkTopology, network: str, ndim: int):
    """(features, strides, kernels) of a valid ``ndim``-D topology."""
    features, strides, kernels, found = topology_lists(topology, network)
    if found != ndim:
        raise ValueError(f"{network} is a {ndim}D network; the topology is {found}D")
    return features, strides, kernels


def _pad(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple((int(k) - 1) // 2 for k in kernel)


def _norm(kind: str, ndim: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"norm must be 'layer', 'instance' or 'batch', got {kind!r}")


def conv_norm_relu(ndim: int, c_in: int, c_out: int, kernel, norm: str, stride=1) -> nn.Sequential:
    return nn.Sequential(_CONV[ndim](c_in, c_out, tuple(kernel), stride, _pad(kernel), bias=False),
                         _norm(norm, ndim, c_out), nn.ReLU(inplace=True))


def double_conv(ndim: int, c_in: int, c_out: int, kernel, norm: str) -> nn.Sequential:
    """Two conv-norm-ReLU: the block of both U-Nets' decoders and of the 3D encoder."""
    return nn.Sequential(conv_norm_relu(ndim, c_in, c_out, kernel, norm), conv_norm_relu(ndim, c_out, c_out, kernel, norm))


class BasicBlock(nn.Module):
    """ResNet's basic block (2D): conv-BN-ReLU, conv-BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=(1, 1)):
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, tuple(kernel), stride, _pad(kernel), bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, tuple(kernel), 1, _pad(kernel), bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or any(s != 1 for s in stride):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class L2SLocalizerUNet(nn.Module):
    """L2SNet's 2D localizer: residual encoder from scratch, the paper's decoder (module doc)."""

    def __init__(self, topology: NetworkTopology, in_channels: int = 1, out_channels: int = 1,
                 decoder_features: Sequence[int] = PAPER_DECODER_FEATURES, blocks_per_stage: int = 2,
                 read_channels: Sequence[int] | None = None, windows: Sequence[Sequence[float]] = ()):
        super().__init__()
        features, strides, kernels = _checked_lists(topology, "l2s_localizer", 2)
        n = len(features)
        if len(decoder_features) < n - 1:
            raise ValueError(f"{n} stages need {n - 1} decoder widths, got {list(decoder_features)}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.total_stride = total_stride(strides)
        self.inputs = InputWindows(in_channels, read_channels, windows)
        self.stem = conv_norm_relu(2, self.inputs.out_channels, features[0], kernels[0], "batch")
        self.encoder = nn.ModuleList()
        for s in range(n):
            c_in = features[0] if s == 0 else features[s - 1]
            blocks = [BasicBlock(c_in, features[s], kernels[s], strides[s])]
            blocks += [BasicBlock(features[s], features[s], kernels[s]) for _ in range(blocks_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
        widths = [int(w) for w in decoder_features][len(decoder_features) - (n - 1):] if n > 1 else []
        self.decoder = nn.ModuleList()
        below = features[-1]
        for j, width in enumerate(widths):
            skip = features[n - 2 - j]
            self.decoder.append(double_conv(2, below + skip, width, kernels[n - 2 - j], "batch"))
            below = width
        self.head = nn.Conv2d(below, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, 2, self.total_stride)
        x = self.stem(self.inputs(x))
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for j, block in enumerate(self.decoder):
            skip = skips[-2 - j]
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def segmenter_topology(plan: NetworkTopology, levels: int = PAPER_SEGMENTER_LEVELS,
                       base_features: int = PAPER_SEGMENTER_FEATURES) -> NetworkTopology:
    """The segmenter's topology: ``levels`` levels with ``base_features`` · 2^s features, 3×3×3
    kernels, and the strides of the plans' first ``levels`` stages (2 on every axis for levels the
    plans do not have)."""
    if levels < 1 or base_features < 1:
        raise ValueError(f"levels and base_features must be >= 1, got {levels}, {base_features}")
    ndim = len(plan.strides[0])
    strides = [[int(v) for v in s] for s in plan.strides[:levels]]
    strides += [[2] * ndim for _ in range(levels - len(strides))]
    return NetworkTopology(
        features_per_stage=[base_features * 2**s for s in range(levels)],
        strides=strides,
        kernel_sizes=[[3] * ndim for _ in range(levels)],
        num_res_units=0,
    )


class L2SUNet3D(nn.Module):
    """L2SNet's 3D segmenter U-Net (module doc)."""

    def __init__(self, topology: NetworkTopology, in_channels: int = 2, out_channels: int = 1, norm: str = "layer",
                 read_channels: Sequence[int] | None = None, windows: Sequence[Sequence[float]] = ()):
        super().__init__()
        features, strides, kernels = _checked_lists(topology, "l2s_unet3d", 3)
        n = len(features)
        self.total_stride = total_stride(strides)
        self.inputs = InputWindows(in_channels, read_channels, windows)
        self.stem = conv_norm_relu(3, self.inputs.out_channels, features[0], kernels[0], norm)
        self.pools = nn.ModuleList([nn.MaxPool3d(tuple(strides[s]), tuple(strides[s])) for s in range(1, n)])
        self.encoder = nn.ModuleList([double_conv(3, features[max(s - 1, 0)], features[s], kernels[s], norm)
                                      for s in range(n)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(features[s + 1], features[s], tuple(strides[s + 1]),
                                                    tuple(strides[s + 1])) for s in range(n - 1)])
        self.decoder = nn.ModuleList([double_conv(3, 2 * features[s], features[s], kernels[s], norm)
                                      for s in range(n - 1)])
        self.head = nn.Conv3d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, 3, self.total_stride)
        x = self.stem(self.inputs(x))
        skips = []
        for s, block in enumerate(self.encoder):
            if s > 0:
                x = self.pools[s - 1](x)
            x = block(x)
            skips.append(x)
        for s in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[s](torch.cat([skips[s], self.up[s](x)], dim=1))
        return self.head(x)
