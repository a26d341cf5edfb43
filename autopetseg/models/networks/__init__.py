"""Segmentation networks, built by name from a plans topology.

Every network maps (B, in_channels, *spatial) to logits (B, out_channels, *spatial) at the input
size; 2D or 3D follows from ``len(topology.strides[0])``.
"""

from __future__ import annotations

from torch import nn

from autopetseg.planning.plans import NetworkTopology
from autopetseg.models.networks.attention_unet import AttentionUNet, AttentionUNetOptions
from autopetseg.models.networks.cascade3 import LesionDetector, RoiUNet, SliceClassifier
from autopetseg.models.networks.l2s import L2SLocalizerUNet, L2SUNet3D
from autopetseg.models.networks.multitask_unet import MultitaskUNet
from autopetseg.models.networks.resunet import ResidualUNet, ResidualUNetOptions
from autopetseg.models.networks.segresnet import SegResNet, SegResNetOptions

# Explicit name -> class registry.
NETWORKS: dict[str, type[nn.Module]] = {
    "resunet": ResidualUNet,  # GDFL paper
    "attention_unet": AttentionUNet,  # L1DFL paper
    "segresnet": SegResNet,  # L1DFL paper
    "l2s_localizer": L2SLocalizerUNet,  # L2SNet paper, 2D localizer
    "l2s_unet3d": L2SUNet3D,  # L2SNet paper, 3D segmenter
    # cascade_3step (Ahamed et al.): torchvision is imported when one of them is built
    "cascade3_classifier": SliceClassifier,
    "cascade3_detector": LesionDetector,
    "cascade3_roi_unet": RoiUNet,
    "multitask_unet": MultitaskUNet,  # Liu et al., segmentation + prognosis heads
}


def build_network(
    name: str, topology: NetworkTopology, in_channels: int = 2, out_channels: int = 2, **options
) -> nn.Module:
    """Instantiate network ``name``; ``options`` go to the class (e.g. ``options=ResidualUNetOptions(...)``)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    return NETWORKS[name](topology, in_channels=in_channels, out_channels=out_channels, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what papers report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "NETWORKS",
    "build_network",
    "count_parameters",
    "ResidualUNet",
    "ResidualUNetOptions",
    "AttentionUNet",
    "AttentionUNetOptions",
    "SegResNet",
    "SegResNetOptions",
    "L2SLocalizerUNet",
    "L2SUNet3D",
]
