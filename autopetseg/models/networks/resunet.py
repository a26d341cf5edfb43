"""Residual U-Net of Kerfoot et al. (2018), the network of the GDFL paper (via MONAI's ``UNet``).

Block layout (MONAI ``UNet`` with ``num_res_units > 0``; written here from its description):

- encoder block k (k = 0 .. n-2) is a residual unit with ``num_res_units`` conv-norm-act subunits;
  its first subunit is strided, so *every* encoder block downsamples, the first one included;
- the bottleneck (features[-1]) is a residual unit with stride 1;
- decoder block k concatenates [encoder k output, deeper output] on the channel axis, upsamples
  with a strided transposed conv-norm-act to the channels of level k-1 (``out_channels`` at the
  top) and refines with a one-subunit residual unit; the top one ends in a bare convolution
  (no norm, no activation) so that it yields logits;
- a residual unit's shortcut is the identity when neither stride nor channels change, a 1x1 conv
  when only the channels change, and a conv with the unit's kernel and stride when it downsamples.

Mapping onto the plans' :class:`NetworkTopology` (where stage 0 is at full resolution and stage s
downsamples by ``strides[s]``): MONAI's network has no full-resolution feature stage, so encoder
block k applies ``strides[k + 1]`` and uses ``kernel_sizes[k + 1]`` (the stride and kernel of the
stage whose resolution it produces), the bottleneck uses ``kernel_sizes[-1]``, decoder block k
inverts encoder block k (same stride and kernel for its transposed conv) and refines with
``kernel_sizes[k]`` at the resolution it returns to. ``strides[0]`` must be all ones. With
features (32, 64, 128, 256, 512), strides 1, 2, 2, 2, 2 and kernels 3 this is exactly the paper's
MONAI ``UNet(channels=(32..512), strides=(2, 2, 2, 2), num_res_units=2)``: 19,223,525 trainable
parameters with batch norm (the released autosegnet code uses ``Norm.BATCH``) or affine instance
norm; MONAI's default non-affine instance norm has 4,868 fewer.

Activation PReLU (one shared slope per layer, as ``nn.PReLU()``), order conv -> norm -> dropout
-> activation, biases on every convolution (as MONAI does, even before a norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from autopetseg.planning.plans import NetworkTopology, total_stride
from autopetseg.models.networks.attention_unet import check_input_size

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
}


@dataclass
class ResidualUNetOptions:
    """Choices the topology does not fix.

    ``norm``: "batch" (the paper's released code) or "instance". ``affine_instance_norm``: learn a
    scale and shift per channel in instance norm (nnU-Net does; MONAI's default does not).
    ``dropout`` 0 as in the paper.
    """

    norm: str = "batch"
    affine_instance_norm: bool = True
    dropout: float = 0.0


def _same_padding(kernel: Sequence[int]) -> list[int]:
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel sizes must be odd to keep the grid aligned, got {list(kernel)}")
    return [(k - 1) // 2 for k in kernel]


def _norm_layer(ndim: int, channels: int, options: ResidualUNetOptions) -> nn.Module:
    if options.norm not in _NORM:
        raise ValueError(f"norm must be one of {sorted(_NORM)}, got {options.norm!r}")
    if options.norm == "instance":
        return _NORM["instance"][ndim](channels, affine=options.affine_instance_norm)
    return _NORM["batch"][ndim](channels)


def conv_norm_act(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    options: ResidualUNetOptions,
    transposed: bool = False,
    conv_only: bool = False,
) -> nn.Sequential:
    """Convolution (or transposed convolution that multiplies the size by ``stride``) -> norm -> dropout -> PReLU."""
    padding = _same_padding(kernel)
    if transposed:
        # (n - 1) s - 2p + k + (s - 1) = n s for odd k and p = (k - 1) / 2.
        conv = _CONV_T[ndim](
            in_channels, out_channels, tuple(kernel), tuple(stride), tuple(padding),
            output_padding=tuple(s - 1 for s in stride), bias=True,
        )
    else:
        conv = _CONV[ndim](in_channels, out_channels, tuple(kernel), tuple(stride), tuple(padding), bias=True)
    layers: list[nn.Module] = [conv]
    if not conv_only:
        layers.append(_norm_layer(ndim, out_channels, options))
        if options.dropout > 0:
            layers.append(nn.Dropout(options.dropout))
        layers.append(nn.PReLU())
    return nn.Sequential(*layers)


class ResidualUnit(nn.Module):
    """``subunits`` conv-norm-act layers (the first one strided) plus a shortcut, summed."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        subunits: int,
        options: ResidualUNetOptions,
        last_conv_only: bool = False,
    ):
        super().__init__()
        n = max(1, subunits)
        ones = [1] * ndim
        self.conv = nn.Sequential(
            *(
                conv_norm_act(
                    ndim,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride if i == 0 else ones,
                    options,
                    conv_only=last_conv_only and i == n - 1,
                )
                for i in range(n)
            )
        )
        if any(s != 1 for s in stride):
            self.shortcut: nn.Module = _CONV[ndim](
                in_channels, out_channels, tuple(kernel), tuple(stride), tuple(_same_padding(kernel)), bias=True
            )
        elif in_channels != out_channels:
            self.shortcut = _CONV[ndim](in_channels, out_channels, 1, bias=True)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)


class ResidualUNet(nn.Module):
    """The GDFL paper's residual U-Net for a plans topology (see the module docstring).

    ``num_res_units == 0`` gives MONAI's plain variant: single strided conv-norm-act blocks down,
    transposed conv-norm-act blocks up, the top one a bare transposed conv.
    """

    def __init__(
        self,
        topology: NetworkTopology,
        in_channels: int = 2,
        out_channels: int = 2,
        options: ResidualUNetOptions | None = None,
    ):
        super().__init__()
        options = options or ResidualUNetOptions()
        features = list(topology.features_per_stage)
        strides = [list(s) for s in topology.strides]
        kernels = [list(k) for k in topology.kernel_sizes]
        n = len(features)
        ndim = len(strides[0]) if strides else 0
        if n < 2:
            raise ValueError(f"a U-Net needs at least 2 stages, got features_per_stage={features}")
        if ndim not in (2, 3) or len(strides) != n or len(kernels) != n:
            raise ValueError("topology needs one 2D or 3D stride and kernel per stage")
        if any(len(s) != ndim for s in strides) or any(len(k) != ndim for k in kernels):
            raise ValueError(f"every stride and kernel must have {ndim} entries")
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"strides[0] must be all ones for the residual U-Net, got {strides[0]}")
        res_units = topology.num_res_units
        self.ndim = ndim
        self.total_stride = total_stride(strides)

        def block(c_in: int, c_out: int, kernel: list[int], stride: list[int]) -> nn.Module:
            if res_units > 0:
                return ResidualUnit(ndim, c_in, c_out, kernel, stride, res_units, options)
            return conv_norm_act(ndim, c_in, c_out, kernel, stride, options)

        self.encoder = nn.ModuleList(
            block(in_channels if k == 0 else features[k - 1], features[k], kernels[k + 1], strides[k + 1])
            for k in range(n - 1)
        )
        self.bottleneck = block(features[n - 2], features[n - 1], kernels[n - 1], [1] * ndim)

        decoder = []
        for k in range(n - 1):
            c_in = features[k] + (features[n - 1] if k == n - 2 else features[k])
            c_out = out_channels if k == 0 else features[k - 1]
            top = k == 0
            up = conv_norm_act(
                ndim, c_in, c_out, kernels[k + 1], strides[k + 1], options,
                transposed=True, conv_only=top and res_units == 0,
            )
            if res_units > 0:
                refine = ResidualUnit(ndim, c_out, c_out, kernels[k], [1] * ndim, 1, options, last_conv_only=top)
                up = nn.Sequential(up, refine)
            decoder.append(up)
        self.decoder = nn.ModuleList(decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.ndim, self.total_stride)
        skips = []
        for down in self.encoder:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(x)
        for k in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[k](torch.cat([skips[k], x], dim=1))
        return x
