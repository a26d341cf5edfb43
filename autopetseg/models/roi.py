"""Axial slices, boxes and ROIs of ``cascade_3step``: from a cached slice to the networks' inputs and back.

Coordinates: a slice is (h, w) = (y, x) of the cache grid; boxes are ``[x1, y1, x2, y2]`` in
pixel-edge coordinates (``scoring/boxes.py``), in slice voxels unless said otherwise.

* **Slice → S×S image** (``SliceFrame``, ``axial_images``): the slice is padded with air (SUV 0),
  centred, to a square of side max(canvas, h, w), z-scored over that square (the paper z-scores
  every slice), then resized to S×S (bilinear, ``align_corners=False``; antialiased when it
  shrinks). An edge coordinate u of the square is u · S / side in the image, so a box maps
  between slice and image by a shift and a scale (``to_image``, ``to_slice``).
* **Boxes of a mask** (``boxes_from_mask``): one box per connected component of the slice's lesion
  mask (8-connectivity in the plane).
* **ROIs** (``roi_window``, ``crop_rois``, ``paste_rois``): a box grows by a margin on every side,
  max(``min_margin`` voxels, ``margin_fraction`` × its longer side), and becomes the square
  around its centre (a lesion keeps its aspect ratio when the ROI is resized to R×R). The window
  is cut from the slice (air outside it), z-scored with the slice's statistics, and resized to
  R×R; a probability of R×R goes back by the inverse resize onto the window, and overlapping
  ROIs keep the maximum per voxel.
* **Fold fusion** (``fuse_boxes``): each fold's kept boxes of a slice are merged by weighted box
  fusion (``"wbf"``: clusters of IoU >= ``iou`` with the fused box; its coordinates are the
  score-weighted mean of its boxes, its score the fold-weighted sum of each fold's best score in
  the cluster, so a box only some folds found scores lower; fused boxes below ``keep_score`` are
  dropped) or by non-maximum suppression of their union (``"nms"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autopetseg.scoring.boxes import as_boxes, box_iou

STD_FLOOR = 1e-6  # a slice of pure air has std 0: it is mapped to 0 everywhere
FUSIONS = ("wbf", "nms")


@dataclass(frozen=True)
class SliceFrame:
    """Where an (h, w) slice sits in the S×S image (module doc)."""

    height: int
    width: int
    side: int  # of the padded square
    size: int  # S

    @classmethod
    def of(cls, height: int, width: int, canvas: int, size: int) -> "SliceFrame":
        return cls(int(height), int(width), max(int(canvas), int(height), int(width)), int(size))

    @property
    def offset(self) -> tuple[int, int]:
        """(y, x) of the slice's first voxel in the square."""
        return (self.side - self.height) // 2, (self.side - self.width) // 2

    @property
    def scale(self) -> float:
        return self.size / self.side

    def _shift(self) -> np.ndarray:
        oy, ox = self.offset
        return np.array([ox, oy, ox, oy], dtype=np.float64)

    def to_image(self, boxes) -> np.ndarray:
        return (as_boxes(boxes) + self._shift()) * self.scale

    def to_slice(self, boxes) -> np.ndarray:
        return as_boxes(boxes) / self.scale - self._shift()


def _resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(n, c, h, w) → (n, c, *size), bilinear, antialiased when shrinking."""
    size = [int(s) for s in size]
    if list(images.shape[-2:]) == size:
        return images
    shrink = any(s < h for s, h in zip(size, images.shape[-2:]))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _squares(pet: np.ndarray | torch.Tensor, frame: SliceFrame) -> torch.Tensor:
    """PET slices (n, h, w) padded with air to the frame's centred square (n, side, side), float32."""
    pet = pet.float() if isinstance(pet, torch.Tensor) else torch.tensor(np.asarray(pet), dtype=torch.float32)
    n, h, w = pet.shape
    if (h, w) != (frame.height, frame.width):
        raise ValueError(f"slices are {h}×{w}, the frame is for {frame.height}×{frame.width}")
    oy, ox = frame.offset
    return F.pad(pet, (ox, frame.side - w - ox, oy, frame.side - h - oy), value=0.0)


def _statistics(squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return squares.mean(dim=(1, 2)), squares.std(dim=(1, 2), unbiased=False).clamp_min(STD_FLOOR)


def slice_statistics(pet: np.ndarray | torch.Tensor, frame: SliceFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (n,), stds (n,)) of PET slices (n, h, w) over their padded squares: the z-score of each slice."""
    return _statistics(_squares(pet, frame))


def axial_images(pet: np.ndarray | torch.Tensor, frame: SliceFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n, 1, S, S) float32, means (n,), stds (n,)) of PET slices (n, h, w) in SUV (module doc)."""
    square = _squares(pet, frame)
    mean, std = _statistics(square)
    square = (square - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return _resize(square[:, None], (frame.size, frame.size)), mean, std


def boxes_from_mask(mask: np.ndarray, with_labels: bool = False):
    """(n, 4) boxes of the connected components (8-connectivity) of a 2D mask, in slice voxels; with
    ``with_labels`` also the component image (component k + 1 has box k)."""
    labels, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), dtype=bool))
    boxes = as_boxes([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)])
    return (boxes, labels) if with_labels else boxes


def roi_window(box, margin_fraction: float, min_margin: float) -> tuple[int, int, int]:
    """(y0, x0, side) of the square ROI window of a box (module doc); it may reach outside the slice."""
    x1, y1, x2, y2 = (float(v) for v in as_boxes(box)[0])
    longest = max(x2 - x1, y2 - y1, 1.0)
    half = longest / 2 + max(float(min_margin), float(margin_fraction) * longest)
    cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
    y0, x0 = math.floor(cy - half), math.floor(cx - half)
    side = max(1, math.ceil(cy + half) - y0, math.ceil(cx + half) - x0)
    return y0, x0, side


def _overlap(window: tuple[int, int, int], height: int, width: int):
    """(slice region, window region) as slices of the part of the window inside the slice; None if none."""
    y0, x0, side = window
    ys, ye, xs, xe = max(y0, 0), min(y0 + side, height), max(x0, 0), min(x0 + side, width)
    if ys >= ye or xs >= xe:
        return None
    return (slice(ys, ye), slice(xs, xe)), (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))


def crop_windows(plane: torch.Tensor, windows: Sequence[tuple[int, int, int]], size: int,
                 fill: float = 0.0) -> torch.Tensor:
    """(k, 1, size, size): each window of a 2D ``plane`` (``fill`` outside it), resized bilinearly."""
    h, w = plane.shape
    crops = []
    for window in windows:
        crop = torch.full((window[2], window[2]), float(fill), dtype=torch.float32, device=plane.device)
        regions = _overlap(window, h, w)
        if regions is not None:
            crop[regions[1]] = plane[regions[0]].float()
        crops.append(_resize(crop[None, None], (size, size))[0])
    if not crops:
        return torch.zeros((0, 1, size, size), dtype=torch.float32, device=plane.device)
    return torch.stack(crops)


def crop_rois(pet_slice: torch.Tensor, windows: Sequence[tuple[int, int, int]], mean: float, std: float,
              size: int) -> torch.Tensor:
    """(k, 1, R, R) network inputs: the windows of a PET slice (SUV; air outside), z-scored with the slice's statistics."""
    return (crop_windows(pet_slice, windows, size, fill=0.0) - float(mean)) / float(std)


def paste_rois(target: torch.Tensor, probabilities: torch.Tensor, windows: Sequence[tuple[int, int, int]]) -> None:
    """Paste (k, R, R) probabilities back onto their windows of the 2D ``target``, keeping the maximum."""
    h, w = target.shape
    for probability, window in zip(probabilities, windows):
        regions = _overlap(window, h, w)
        if regions is None:
            continue
        back = _resize(probability[None, None].float(), (window[2], window[2]))[0, 0]
        target[regions[0]] = torch.maximum(target[regions[0]], back[regions[1]].to(target))


def jitter_box(box, rng: np.random.Generator, std_fraction: Sequence[float]) -> np.ndarray:
    """A box whose x1, y1, x2, y2 each move by N(0, (std · its width or height)²); at least 1 voxel wide."""
    x1, y1, x2, y2 = as_boxes(box)[0]
    size = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
    moved = np.array([x1, y1, x2, y2]) + rng.standard_normal(4) * np.asarray(std_fraction, dtype=np.float64) * size
    for low, high in ((0, 2), (1, 3)):
        if moved[high] - moved[low] < 1.0:
            centre = (moved[high] + moved[low]) / 2
            moved[low], moved[high] = centre - 0.5, centre + 0.5
    return moved


def nms(boxes, scores, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    boxes, order = as_boxes(boxes), list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    keep = []
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        if order:
            overlaps = box_iou(boxes[[best]], boxes[order])[0]
            order = [o for o, v in zip(order, overlaps) if v <= iou]
    return np.asarray(keep, dtype=np.int64)


def fuse_boxes(per_fold: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float], method: str = "wbf",
               iou: float = 0.55, keep_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n, 4), scores (n,)) of one slice from each fold's kept (boxes, scores) (module doc)."""
    if method not in FUSIONS:
        raise ValueError(f"fold fusion must be one of {FUSIONS}, got {method!r}")
    boxes = np.concatenate([as_boxes(b) for b, _ in per_fold]) if per_fold else np.zeros((0, 4))
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, s in per_fold]) if per_fold else np.zeros(0)
    folds = np.concatenate([np.full(len(as_boxes(b)), k) for k, (b, _) in enumerate(per_fold)]) if per_fold else np.zeros(0)
    if method == "nms" or len(per_fold) == 1:
        keep = nms(boxes, scores, iou)
        keep = keep[scores[keep] >= keep_score] if len(keep) else keep
        return boxes[keep], scores[keep]
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    clusters: list[list[int]] = []
    fused: list[np.ndarray] = []
    for i in np.argsort(-scores, kind="stable"):
        overlaps = box_iou(boxes[[i]], np.array(fused))[0] if fused else np.zeros(0)
        j = int(np.argmax(overlaps)) if overlaps.size else -1
        if j < 0 or overlaps[j] < iou:
            clusters.append([i])
            fused.append(boxes[i].copy())
            continue
        clusters[j].append(i)
        members = clusters[j]
        fused[j] = (scores[members, None] * boxes[members]).sum(0) / max(scores[members].sum(), 1e-12)
    out_boxes, out_scores = [], []
    for members, box in zip(clusters, fused):
        best = {}
        for m in members:
            best[int(folds[m])] = max(best.get(int(folds[m]), 0.0), float(scores[m]))
        score = float(sum(weights[f] * s for f, s in best.items()))
        if score >= keep_score:
            out_boxes.append(box)
            out_scores.append(score)
    return as_boxes(out_boxes), np.asarray(out_scores, dtype=np.float64)
