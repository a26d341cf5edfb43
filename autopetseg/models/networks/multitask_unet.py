"""The multitask 3D U-Net of Liu et al. (IEEE Access 2022): lesion segmentation and a patient-level
prognosis from one whole-body volume, with deep supervision on both tasks (paper §III-A/B, Fig. 1).

**Backbone.** A 3D U-Net: per level two 3×3×3 conv-BN-ReLU, max-pooling down between levels
(kernel = stride; the paper's 3 poolings = a topology of 4 stages), and in the decoder a
transposed convolution up (kernel = stride) with BN and ReLU (the paper's "deconvolutional
blocks"), concatenation with the encoder features of that level and two conv-BN-ReLU.

**Segmentation deep supervision.** A 3×3×3 convolution to ``out_channels`` (2: background,
lesion) on the bottleneck and on each decoder level: ``deep_supervision_scales`` outputs from
the finest (full resolution) to the coarsest. In training mode all of them are returned (finest
first), in eval mode the finest only.

**Prognosis heads.** On the ``head_levels`` coarsest decoder resolutions (the paper: 3; the
bottleneck, 1/4 and 1/2 for 3 poolings, not the full resolution): two 3×3×3 conv-BN-ReLU to
``head_features`` (64, the paper's feature size) each followed by a 2×2×2 max-pooling, except at
the bottleneck, where one max-pooling follows the two convolutions (the paper's "only applied
once max pooling"); global average pooling to ``head_features`` values; two fully connected
layers (``head_hidden`` units, ReLU, ``head_classes``) and a softmax. The heads' probabilities
are fused with ``head_weights`` (paper eq. 2), listed like the segmentation scales from the
finest head resolution to the bottleneck: (0.1, 0.2, 0.7) gives the bottleneck 0.7.

**Outputs.** A dict: ``"segmentation"`` (the logits, or the list of deep-supervision logits in
training mode) and, with heads, ``"prognosis"``: the log of the fused class probabilities
(B, classes), so that a softmax of it (what the inference strategies apply to every head) is
the fused probability itself; in training mode also ``"prognosis_heads"``: each head's logits
(B, heads, classes) in the order of ``head_weights``.

**Inputs.** ``read_channels`` selects the cached channels the network reads (PET only: [0], the
paper; PET and CT: [0, 1]) through ``InputWindows``, so inference feeds the whole cache array.
Max-poolings round up (``ceil_mode``) so that a coarse head resolution of odd or unit size pools.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from autopetseg.models.networks.attention_unet import check_input_size, topology_lists
from autopetseg.models.networks.l2s import InputWindows, conv_norm_relu, double_conv
from autopetseg.planning.plans import NetworkTopology, total_stride

PAPER_HEAD_WEIGHTS = (0.1, 0.2, 0.7)  # eq. 2, finest head resolution first
PAPER_HEAD_FEATURES = 64  # §III-B: "a 64-dimensional feature vector"
HEAD_HIDDEN = 32  # units of the first fully connected layer: not given by the paper


class PrognosisHead(nn.Module):
    """Convolutions, max-pooling, global average pooling and two fully connected layers (module doc)."""

    def __init__(self, c_in: int, features: int, hidden: int, classes: int, kernel: Sequence[int], lowest: bool):
        super().__init__()
        pool = lambda: nn.MaxPool3d(2, 2, ceil_mode=True)  # noqa: E731
        first = [conv_norm_relu(3, c_in, features, kernel, "batch")] + ([] if lowest else [pool()])
        self.features = nn.Sequential(*first, conv_norm_relu(3, features, features, kernel, "batch"), pool(),
                                      nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MultitaskUNet(nn.Module):
    """Segmentation U-Net with deep supervision and fused prognosis heads (module doc)."""

    def __init__(
        self,
        topology: NetworkTopology,
        in_channels: int = 2,
        out_channels: int = 2,
        read_channels: Sequence[int] | None = (0,),
        deep_supervision_scales: int = 4,
        head_levels: int = 3,
        head_weights: Sequence[float] = PAPER_HEAD_WEIGHTS,
        head_features: int = PAPER_HEAD_FEATURES,
        head_hidden: int = HEAD_HIDDEN,
        head_classes: int = 2,
    ):
        super().__init__()
        features, strides, kernels, ndim = topology_lists(topology, "multitask_unet")
        if ndim != 3:
            raise ValueError("multitask_unet is a 3D network; the topology is 2D")
        n = len(features)
        if not 1 <= deep_supervision_scales <= n:
            raise ValueError(f"deep_supervision_scales must be in 1..{n} (the decoder levels), got {deep_supervision_scales}")
        if not 0 <= head_levels <= n - 1:
            raise ValueError(f"head_levels must be in 0..{n - 1} (decoder levels below full resolution), got {head_levels}")
        weights = [float(w) for w in head_weights]
        if head_levels and (len(weights) != head_levels or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6):
            raise ValueError(f"head_weights must be {head_levels} non-negative weights summing to 1, got {weights}")
        self.total_stride = total_stride(strides)
        self.inputs = InputWindows(in_channels, read_channels)
        self.pools = nn.ModuleList([nn.MaxPool3d(tuple(strides[s]), tuple(strides[s])) for s in range(1, n)])
        self.encoder = nn.ModuleList([
            double_conv(3, self.inputs.out_channels if s == 0 else features[s - 1], features[s], kernels[s], "batch")
            for s in range(n)])
        self.up = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose3d(features[s + 1], features[s], tuple(strides[s + 1]), tuple(strides[s + 1]),
                                             bias=False), nn.BatchNorm3d(features[s]), nn.ReLU(inplace=True))
            for s in range(n - 1)])
        self.decoder = nn.ModuleList([double_conv(3, 2 * features[s], features[s], kernels[s], "batch")
                                      for s in range(n - 1)])
        # Level s of the decoder (s = n - 1: the bottleneck); outputs and heads listed finest first.
        self.seg_levels = list(range(deep_supervision_scales))
        self.seg_outputs = nn.ModuleList([nn.Conv3d(features[s], out_channels, 3, padding=1) for s in self.seg_levels])
        self.head_levels = list(range(n - head_levels, n))
        self.heads = nn.ModuleList([
            PrognosisHead(features[s], head_features, head_hidden, head_classes, kernels[s], lowest=s == n - 1)
            for s in self.head_levels])
        self.register_buffer("log_head_weights", torch.log(torch.tensor(weights or [1.0])), persistent=False)

    def fuse(self, head_logits: torch.Tensor) -> torch.Tensor:
        """log Σ_i w_i softmax(logits_i): (B, heads, K) → (B, K), computed in log space for stability."""
        log_p = torch.log_softmax(head_logits.float(), dim=2)
        return torch.logsumexp(log_p + self.log_head_weights.view(1, -1, 1), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        check_input_size(x, 3, self.total_stride)
        x = self.inputs(x)
        skips = []
        for s, block in enumerate(self.encoder):
            x = block(x if s == 0 else self.pools[s - 1](x))
            skips.append(x)
        n = len(skips)
        level_features = {n - 1: x}
        for s in range(n - 2, -1, -1):
            x = self.decoder[s](torch.cat([skips[s], self.up[s](x)], dim=1))
            level_features[s] = x
        scales = self.seg_levels if self.training else self.seg_levels[:1]
        segmentation = [self.seg_outputs[i](level_features[s]) for i, s in enumerate(scales)]
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "segmentation": segmentation if self.training else segmentation[0]}
        if self.heads:
            logits = torch.stack([head(level_features[s]) for head, s in zip(self.heads, self.head_levels)], dim=1)
            out["prognosis"] = self.fuse(logits)
            if self.training:
                out["prognosis_heads"] = logits
        return out
