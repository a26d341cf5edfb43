"""Gaussian-weighted sliding-window prediction over a whole volume, for one network or an ensemble.

How it works:
* Window positions: per axis, ``ceil((size - patch) / (patch · (1 - overlap))) + 1`` windows
  spread evenly from the first to the last voxel (nnU-Net's rule), so neighbours overlap by at
  least ``overlap`` and the last window ends on the border. A volume smaller than the patch is
  padded with the background value 0 and the result cropped back.
* Windows are predicted ``batch_size`` at a time; every network of the ensemble (and every
  mirrored copy for test-time mirroring) runs on the batch while it is on the device, and the
  class probabilities, multiplied by a Gaussian importance map (σ = patch / 8, max 1), are
  added into accumulators that stay on the device.
* Windows whose whole box is air (PET ≤ ``empty_pet_max`` and CT ≤ ``empty_ct_max``: the CT is
  scaled to [0, 1] from [-1024, 1024] HU, so 0.05 ≈ -920 HU) are not run. Voxels that no run
  window covers get ``fill`` (per-channel probabilities of "surely no lesion", e.g.
  ``OutputSpec.background()``; default: 1 in channel 0, 0 elsewhere, the softmax background);
  voxels covered by some run windows get the weighted mean of those.
* The ensemble step (every network, every mirrored copy, probabilities averaged after the
  activation) is ``ensemble_probabilities``, shared with the other strategies
  (``models/strategies.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from torch import nn

from autopetseg.models import runtime
from autopetseg.options import check_option

logger = logging.getLogger(__name__)

EMPTY_PET_MAX = 0.05  # SUV: below this the PET is "no uptake at all" (air)
EMPTY_CT_MAX = 0.05  # scaled CT: ≈ -920 HU, i.e. air outside the body


@dataclass
class SlidingWindowStats:
    """What one call did; the predictor reports the saving of skipping empty windows."""

    n_windows: int = 0
    n_skipped: int = 0
    n_forward_calls: int = 0


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (``size >= patch``)."""
    if size <= patch:
        return [0]
    step = patch * (1.0 - overlap)
    n = int(math.ceil((size - patch) / step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, device=None) -> torch.Tensor:
    """Separable Gaussian centred on the patch, max 1, min clamped above 0 (so every voxel counts)."""
    axes = []
    for p in patch_size:
        coords = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0]
    for a in axes[1:]:
        weights = weights[..., None] * a
    weights = weights / weights.max()
    weights = torch.clamp(weights, min=float(weights[weights > 0].min()))
    return weights.to(device=device, dtype=torch.float32)


def _activation(name: str | Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, channels, ...) → probabilities: "softmax" (over channels), "sigmoid", a callable or None."""
    if name is None:
        return lambda x: x
    if callable(name):
        return name
    check_option("activation", name)
    if name == "softmax":
        return lambda x: torch.softmax(x, dim=1)
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"unknown activation {name!r}")  # an option listed but not handled here


def resolve_amp_dtype(device: torch.device, amp: bool | None, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (None: on for CUDA) and an explicit ``dtype``; None = float32."""
    use = device.type == "cuda" if amp is None else amp
    if not use:
        return None
    return dtype if dtype is not None else runtime.amp_dtype(device, True)


def split_output(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A network's output → (segmentation logits, extra heads).

    A tensor is the logits; a list/tuple is deep supervision (the first is full resolution); a dict
    holds the logits under ``"segmentation"`` and each other key is a patient-level head.
    """
    if isinstance(out, dict):
        if "segmentation" not in out:
            raise ValueError(f"a network returning a dict must have a 'segmentation' key, got {sorted(out)}")
        seg = out["segmentation"]
        if isinstance(seg, (list, tuple)):
            seg = seg[0]
        return seg, {k: v for k, v in out.items() if k != "segmentation"}
    if isinstance(out, (list, tuple)):  # deep supervision: full resolution first
        return out[0], {}
    return out, {}


def _logits(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return split_output(network(x))[0]


def ensemble_probabilities(
    nets: Sequence[nn.Module],
    weights: Sequence[float],
    batch: torch.Tensor,
    flips: Sequence[tuple[int, ...]],
    act: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    stats: "SlidingWindowStats",
    heads: dict[str, torch.Tensor] | None = None,
    space: str = "probabilities",
) -> torch.Tensor:
    """Weighted mean over networks and mirrored copies of the outputs for one batch, activated.

    ``weights`` sum to 1; ``flips`` are tensor dims of ``batch`` (``()`` = no flip). ``space``:
    "probabilities" averages the activated outputs (nnU-Net, MONAI's ensembles), "logits" averages
    the logits and activates the mean (autosegnet's ensembles; folds with lesion logits 5, -1, -1.5
    give 0.51 by logits and 0.41 by probabilities). When ``heads`` is a dict, the extra heads of dict
    outputs ((B, K) logits) are added into it, softmaxed over K and weighted like the segmentation.
    """
    by_logits = check_option("ensemble_space", space) == "logits"
    probs = None
    head_names: set[str] | None = None
    for net, w in zip(nets, weights):
        for dims in flips:
            inp = torch.flip(batch, dims) if dims else batch
            with runtime.autocast(device, dtype):
                out, extra = split_output(net(inp))
            stats.n_forward_calls += 1
            p = out.float() if by_logits else act(out.float())
            if dims:
                p = torch.flip(p, dims)
            p = p * (w / len(flips))
            probs = p if probs is None else probs + p
            if heads is not None:
                if head_names is None:
                    head_names = set(extra)
                elif set(extra) != head_names:
                    raise ValueError(f"the networks of an ensemble return different heads: "
                                     f"{sorted(head_names)} and {sorted(extra)}")
                for name, logits in extra.items():
                    if logits.ndim != 2:
                        raise ValueError(f"head {name!r} must be (B, K) logits, got shape {tuple(logits.shape)}")
                    h = (logits.float() if by_logits else torch.softmax(logits.float(), dim=1)) * (w / len(flips))
                    heads[name] = h + heads[name] if name in heads else h
    if by_logits:
        if heads is not None:
            for name in list(heads):
                heads[name] = torch.softmax(heads[name], dim=1)
        return act(probs)
    return probs


def normalized_weights(n: int, network_weights: Sequence[float] | None) -> list[float]:
    weights = [1.0] * n if network_weights is None else [float(w) for w in network_weights]
    if len(weights) != n or sum(weights) <= 0:
        raise ValueError("network_weights must give one positive-sum weight per network")
    return [w / sum(weights) for w in weights]


def default_device(nets: Sequence[nn.Module]) -> torch.device:
    """The device of the first network's parameters (CPU for a network without any)."""
    param = next(iter(nets[0].parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def sliding_window_predict(
    networks: Sequence[nn.Module] | nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    batch_size: int = 2,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
    skip_empty: bool = True,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    *,
    network_weights: Sequence[float] | None = None,
    amp_dtype: torch.dtype | None = None,
    activation: str | Callable | None = "softmax",
    fill: Sequence[float] | None = None,
    empty_pet_max: float = EMPTY_PET_MAX,
    empty_ct_max: float = EMPTY_CT_MAX,
    channels_last_3d: bool = False,
    output_device: str | torch.device = "cpu",
    stats: SlidingWindowStats | None = None,
    ensemble_space: str = "probabilities",
    blending: str = "gaussian",
) -> torch.Tensor:
    """Class probabilities (n_classes, z, y, x) float32 for ``image`` (C, z, y, x).

    ``networks``: one network or the folds of an ensemble (averaged, with ``network_weights`` if
    given, e.g. the folds' validation DSC). ``mirror_axes``: spatial axes (0 = z) for test-time
    mirroring; all combinations of flips are averaged. ``activation`` turns logits into
    probabilities ("softmax", "sigmoid", a callable or None; another name is a ``ValueError``).
    ``fill``: per-channel probabilities of the voxels no run window covers (None: 1 in channel 0,
    0 elsewhere). ``amp``: autocast (default: on for CUDA) in ``amp_dtype`` (default bf16 where
    supported, else fp16). Networks are used as they are (call ``.eval()`` first). ``stats``, if
    given, is filled with window counts. ``ensemble_space``: average the folds' probabilities or
    their logits (``ensemble_probabilities``). ``blending`` of overlapping windows: "gaussian"
    (nnU-Net; the default) or "constant" (MONAI's default, which the GDFL authors used).
    """
    check_option("blending", blending)
    nets = [networks] if isinstance(networks, nn.Module) else list(networks)
    if not nets:
        raise ValueError("no network given")
    weights = normalized_weights(len(nets), network_weights)
    device = default_device(nets) if device is None else torch.device(device)
    dtype = resolve_amp_dtype(device, amp, amp_dtype)
    act = _activation(activation)
    stats = stats if stats is not None else SlidingWindowStats()

    image = torch.as_tensor(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, z, y, x), got shape {tuple(image.shape)}")
    patch = [int(p) for p in patch_size]
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 3 sizes (z, y, x), got {tuple(patch_size)}")
    # An image smaller than the patch is padded with 0 (centred, the extra voxel after) up to it.
    x, crop = pad_nd_image(image.to(device=device, dtype=torch.float32), patch, "constant", {"value": 0.0},
                           return_slicer=True)
    padded = list(x.shape[1:])

    starts = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    boxes = [(z, y, xx) for z in starts[0] for y in starts[1] for xx in starts[2]]
    n_all = len(boxes)
    if skip_empty:
        boxes = [b for b in boxes if not _is_empty(x, b, patch, empty_pet_max, empty_ct_max)]
    stats.n_windows += n_all
    stats.n_skipped += n_all - len(boxes)

    gaussian = (gaussian_importance_map(patch, device=device) if blending == "gaussian"
                else torch.ones(patch, device=device, dtype=torch.float32))
    flips = _flip_combinations(mirror_axes)
    sums: torch.Tensor | None = None
    weight_sum = torch.zeros(padded, device=device, dtype=torch.float32)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        windows = torch.stack([x[(slice(None),) + _slices(b, patch)] for b in chunk])
        if channels_last_3d:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        probs = ensemble_probabilities(nets, weights, windows, flips, act, device, dtype, stats,
                                       space=ensemble_space)
        if sums is None:
            sums = torch.zeros([probs.shape[1]] + padded, device=device, dtype=torch.float32)
        for b, p in zip(chunk, probs):
            region = _slices(b, patch)
            sums[(slice(None),) + region] += p * gaussian
            weight_sum[region] += gaussian

    if sums is None:  # everything skipped: pure background
        n_classes = len(fill) if fill is not None else _count_classes(nets[0], image.shape[0], patch, device, dtype)
        sums = torch.zeros([n_classes] + padded, device=device, dtype=torch.float32)
    n_classes = sums.shape[0]
    fill_values = [1.0] + [0.0] * (n_classes - 1) if fill is None else [float(f) for f in fill]
    if len(fill_values) != n_classes:
        raise ValueError(f"fill gives {len(fill_values)} values, the network puts out {n_classes} channels")
    covered = weight_sum > 0
    result = sums / torch.where(covered, weight_sum, torch.ones_like(weight_sum))
    for c, value in enumerate(fill_values):
        result[c] = torch.where(covered, result[c], torch.full_like(result[c], value))
    return result[(slice(None),) + tuple(crop[1:])].to(output_device)  # crop[0]: the input's channels


def _slices(start: tuple[int, int, int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))


def _is_empty(x: torch.Tensor, start, patch, pet_max: float, ct_max: float) -> bool:
    window = x[(slice(None),) + _slices(start, patch)]
    return bool(window[0].max() <= pet_max) and bool(window[1].max() <= ct_max)


def _flip_combinations(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """All subsets of the mirror axes, as tensor dims of a (B, C, z, y, x) batch."""
    axes = [int(a) + 2 for a in (mirror_axes or ())]
    combos: list[tuple[int, ...]] = [()]
    for a in axes:
        combos += [c + (a,) for c in combos]
    return combos


def _count_classes(net: nn.Module, in_channels: int, patch, device, dtype: torch.dtype | None) -> int:
    # One dummy forward only when every window was skipped and no ``fill`` tells the channels.
    with runtime.autocast(device, dtype):
        out = _logits(net, torch.zeros([1, in_channels] + list(patch), device=device))
    return int(out.shape[1])
