"""Inference strategies: how a stage's networks are run over a whole preprocessed volume.

One entry point, ``run_strategy(strategy, networks, image, patch_size, output=...)``, shared by
training validation and inference. It returns named outputs on the CPU:

* ``"probabilities"``: float32 (channels, z, y, x) on the input volume's grid, after the
  activation of ``output`` (``OutputSpec``); the ensemble is the weighted mean of the networks'
  (and mirrored copies') probabilities.
* for ``whole_image`` networks that return a dict, one entry per extra head: ``name`` → float32
  (K,) = softmax of the head's (1, K) logits, averaged like the segmentation.

The three kinds (``StrategySpec.kind``):

* ``sliding_window``: ``sliding_window_predict`` with ``fill=output.background()`` (so a
  one-channel sigmoid model gets 0 where no window ran).
* ``slices``: a 2D network run on whole slices across array axis ``strategy.axis``. The input of
  slice s holds, for each image channel c, the slices s-k..s+k (k = ``strategy.neighbours``, zeros
  outside the volume), channel-major: channel ``c·(2k+1) + (j+k)`` is channel c of slice s+j.
  **Padding rule**: each in-plane size is padded with 0 (centred, like the sliding window) up to
  at least the in-plane patch size and then up to a multiple of ``divisor`` (default 32, the total
  stride of a 5-level U-Net), and the output cropped back. Slices whose own plane is air (PET ≤
  ``empty_pet_max`` and CT ≤ ``empty_ct_max``), and with a ``region`` the slices without any of
  its voxels, are not run and get ``output.background()``. The slabs are a strided view of the
  padded volume; each batch is gathered from it in one copy.
  Mirroring TTA uses the in-plane axes among ``mirror_axes`` (the slice axis is dropped).
* ``whole_image``: the volume resized to ``strategy.grid`` (trilinear, ``align_corners=False``),
  every network run once on it (batch of 1, mirroring TTA if asked), the probabilities resized
  back to the volume's shape (trilinear).

Patient-level heads of dict outputs are reported by ``whole_image`` only; the window and slice
strategies use the ``"segmentation"`` entry and ignore the heads (a head per window or slice has
no rule to combine it into one patient value).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autopetseg.models.methods import OutputSpec, StrategySpec
from autopetseg.models.sliding_window import (
    EMPTY_CT_MAX,
    EMPTY_PET_MAX,
    SlidingWindowStats,
    _activation,
    _flip_combinations,
    default_device,
    ensemble_probabilities,
    normalized_weights,
    sliding_window_predict,
)
from autopetseg.options import check_option

DEFAULT_SLICE_DIVISOR = 32  # in-plane sizes of 2D slices are padded to a multiple of this


@torch.inference_mode()
def run_strategy(
    strategy: StrategySpec,
    networks: Sequence[nn.Module] | nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    *,
    output: OutputSpec,
    network_weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 2,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
    skip_empty: bool = True,
    empty_pet_max: float = EMPTY_PET_MAX,
    empty_ct_max: float = EMPTY_CT_MAX,
    channels_last_3d: bool = False,
    divisor: int | Sequence[int] | None = None,
    stats: SlidingWindowStats | None = None,
    region: torch.Tensor | np.ndarray | None = None,
    slice_batch_pixels: int | None = None,
    ensemble_space: str = "probabilities",
    blending: str = "gaussian",
) -> dict[str, torch.Tensor]:
    """Named outputs (``"probabilities"`` and any patient-level heads) of ``networks`` on ``image``.

    ``image``: (C, z, y, x) float32, channel 0 PET, 1 CT (scaled), then any extra channels.
    ``patch_size``: the 3D window (sliding window); for slices the 2D in-plane patch (2 sizes, or
    3 of which the slice axis is dropped); unused by whole_image. ``amp_dtype``: autocast dtype
    (None = float32; see ``runtime.amp_dtype``). ``mirror_axes``: 3D array axes (0 = z) for
    test-time mirroring. ``divisor``: slices only, the in-plane multiple (int, 2 sizes, or 3 with
    the slice axis dropped; default 32). ``channels_last_3d``: channels-last memory format for the
    batches (``channels_last`` for 2D slices). ``stats`` counts windows (or slices, or the one
    whole image) run and skipped, and forward calls. ``region`` (slices only): bool (z, y, x), the
    voxels whose output the caller reads; a slice without any is not run. ``slice_batch_pixels``
    (slices only): slices per forward pass are as many as fit this many padded in-plane pixels, at
    least ``batch_size`` (None: ``batch_size``). ``ensemble_space``: average the networks'
    probabilities (default) or logits; ``blending`` (sliding window only): "gaussian" or "constant"
    weights of overlapping windows (``sliding_window_predict``).
    """
    check_option("ensemble_space", ensemble_space)
    kind = check_option("strategy", strategy.kind)
    nets = [networks] if isinstance(networks, nn.Module) else list(networks)
    if not nets:
        raise ValueError("no network given")
    weights = normalized_weights(len(nets), network_weights)
    device = default_device(nets) if device is None else torch.device(device)
    stats = stats if stats is not None else SlidingWindowStats()
    image = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, z, y, x), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if slice_batch_pixels is not None and slice_batch_pixels < 1:
        raise ValueError(f"slice_batch_pixels must be >= 1, got {slice_batch_pixels}")
    if region is not None and kind != "slices":
        raise ValueError(f"a region restricts the slices strategy only, not {kind!r}")

    if kind == "sliding_window":
        probs = sliding_window_predict(
            nets, image, patch_size, batch_size=batch_size, overlap=overlap, mirror_axes=mirror_axes,
            skip_empty=skip_empty, device=device, amp=amp_dtype is not None, amp_dtype=amp_dtype,
            network_weights=weights, activation=output.activation, fill=output.background(),
            empty_pet_max=empty_pet_max, empty_ct_max=empty_ct_max, channels_last_3d=channels_last_3d,
            output_device="cpu", stats=stats, ensemble_space=ensemble_space, blending=blending,
        )
        return {"probabilities": probs}
    if kind == "slices":
        probs = _run_slices(
            strategy, nets, weights, image, patch_size, output, device, amp_dtype, batch_size, mirror_axes,
            skip_empty, empty_pet_max, empty_ct_max, channels_last_3d, divisor, stats, region, slice_batch_pixels,
            ensemble_space,
        )
        return {"probabilities": probs}
    if kind == "whole_image":
        return _run_whole_image(strategy, nets, weights, image, output, device, amp_dtype, mirror_axes,
                                channels_last_3d, stats, ensemble_space)
    raise ValueError(f"unknown strategy {kind!r}")  # listed in options but not handled here


# ---------------------------------------------------------------------------- slices
def _in_plane(values: int | Sequence[int], axis: int, what: str) -> list[int]:
    """2 in-plane sizes from an int, 2 sizes, or 3 sizes with the slice axis dropped."""
    if isinstance(values, (int, np.integer)):
        return [int(values)] * 2
    values = [int(v) for v in values]
    if len(values) == 3:
        return [v for a, v in enumerate(values) if a != axis]
    if len(values) != 2:
        raise ValueError(f"{what} must give 2 in-plane sizes (or 3 with the slice axis), got {values}")
    return values


def slice_padding(size: Sequence[int], patch: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Padded in-plane sizes: at least the patch, rounded up to a multiple of the divisor."""
    return [-(-max(s, p) // d) * d for s, p, d in zip(size, patch, divisor)]


def _slices_in_region(region, axis: int, shape, device) -> torch.Tensor:
    """Per slice across ``axis``: whether ``region`` (bool, the volume's shape) has a voxel in it."""
    region = torch.as_tensor(np.asarray(region, dtype=bool) if isinstance(region, np.ndarray) else region)
    if tuple(region.shape) != tuple(shape):
        raise ValueError(f"region must have the volume's shape {tuple(shape)}, got {tuple(region.shape)}")
    return region.to(device=device, dtype=torch.bool).any(dim=[a for a in range(3) if a != axis])


def _run_slices(strategy, nets, weights, image, patch_size, output: OutputSpec, device, dtype, batch_size,
                mirror_axes, skip_empty, empty_pet_max, empty_ct_max, channels_last, divisor, stats, region,
                slice_batch_pixels, ensemble_space="probabilities"):
    axis = int(strategy.axis)
    k = int(strategy.neighbours)
    patch = _in_plane(patch_size, axis, "patch_size")
    div = _in_plane(DEFAULT_SLICE_DIVISOR if divisor is None else divisor, axis, "divisor")
    if min(div) < 1:
        raise ValueError(f"divisor must be positive, got {div}")
    act = _activation(output.activation)
    background = output.background()

    vol = image.to(device=device, dtype=torch.float32).movedim(axis + 1, 1)  # (C, S, H, W)
    n_channels, n_slices, h, w = vol.shape
    padded = slice_padding((h, w), patch, div)
    pad_hw = []
    for s, p in zip((w, h), (padded[1], padded[0])):  # F.pad wants the last axis first
        pad_hw += [(p - s) // 2, p - s - (p - s) // 2]
    vol_p = F.pad(vol, pad_hw + [k, k], value=0.0)  # (C, S + 2k, H', W')
    off_h, off_w = (padded[0] - h) // 2, (padded[1] - w) // 2

    run = torch.ones(n_slices, dtype=torch.bool, device=device)
    if skip_empty:
        empty = vol[0].amax(dim=(1, 2)) <= empty_pet_max
        if n_channels > 1:
            empty &= vol[1].amax(dim=(1, 2)) <= empty_ct_max
        run &= ~empty
    if region is not None:
        run &= _slices_in_region(region, axis, image.shape[1:], device)
    run = torch.nonzero(run).flatten()
    stats.n_windows += n_slices
    stats.n_skipped += n_slices - len(run)

    in_plane_axes = [a for a in range(3) if a != axis]
    flips = _flip_combinations([in_plane_axes.index(int(a)) for a in (mirror_axes or ()) if int(a) != axis])
    result = torch.tensor(background, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    result = result.expand(len(background), n_slices, h, w).clone()
    # Slab of slice s = padded slices s .. s + 2k (= s-k .. s+k of the volume), as a strided view of the
    # padded volume: (S, C, 2k+1, H', W'); indexing a batch out of it is the only copy.
    slabs = vol_p.unfold(1, 2 * k + 1, 1).permute(1, 0, 4, 2, 3)
    per_forward = max(batch_size, slice_batch_pixels // (padded[0] * padded[1])) if slice_batch_pixels else batch_size
    for first in range(0, len(run), per_forward):
        chunk = run[first : first + per_forward]
        batch = slabs[chunk].reshape(len(chunk), n_channels * (2 * k + 1), padded[0], padded[1])
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        probs = ensemble_probabilities(nets, weights, batch, flips, act, device, dtype, stats, space=ensemble_space)
        if probs.shape[1] != output.channels:
            raise ValueError(f"the network puts out {probs.shape[1]} channels, the output spec says {output.channels}")
        probs = probs[:, :, off_h : off_h + h, off_w : off_w + w]
        result[:, chunk] = probs.movedim(0, 1).to(torch.float32)
    return result.movedim(1, axis + 1).contiguous().cpu()


# ---------------------------------------------------------------------------- whole image
def _run_whole_image(strategy, nets, weights, image, output: OutputSpec, device, dtype, mirror_axes,
                     channels_last, stats, ensemble_space="probabilities"):
    grid = [int(g) for g in strategy.grid]
    shape = list(image.shape[1:])
    act = _activation(output.activation)
    x = image.to(device=device, dtype=torch.float32)[None]
    if grid != shape:
        x = F.interpolate(x, size=grid, mode="trilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    heads: dict[str, torch.Tensor] = {}
    probs = ensemble_probabilities(nets, weights, x, _flip_combinations(mirror_axes), act, device, dtype, stats,
                                   heads=heads, space=ensemble_space)
    stats.n_windows += 1
    if probs.shape[1] != output.channels:
        raise ValueError(f"the network puts out {probs.shape[1]} channels, the output spec says {output.channels}")
    if list(probs.shape[2:]) != shape:
        probs = F.interpolate(probs, size=shape, mode="trilinear", align_corners=False)
    outputs = {"probabilities": probs[0].float().contiguous().cpu()}
    for name, value in heads.items():
        if name in outputs:
            raise ValueError(f"a network head may not be called {name!r}")
        if value.ndim != 2 or value.shape[0] != 1:
            raise ValueError(f"head {name!r} must be (B, K) logits, got shape {tuple(value.shape)}")
        outputs[name] = value[0].float().contiguous().cpu()
    return outputs
