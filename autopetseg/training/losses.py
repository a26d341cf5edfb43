"""Segmentation losses: the GDFL paper's Generalized Dice focal loss (this docstring) and the L1DFL
paper's Dice, Dice + focal and L1-weighted Dice focal losses (second half of the module).

Generalized Dice Focal loss of the GDFL paper (Ahamed & Rahmim, §2.4, equations (1) and (2)).

``L = L_GDL + L_FL`` on logits (B, C, *spatial) and integer labels (B, 1, *spatial); the paper
has C = 2 (background, lesion). Everything is computed in float32 with autocast disabled, so the
loss is the same under fp16/bf16 mixed precision.

Generalized Dice, equation (1), per patch i (no pooling over the batch), p = softmax(logits) over
the classes, g = one-hot labels, sums over the voxels j:

    w_il  = 1 / (sum_j g_ilj)^2
    GDL   = 1 - mean_i (k * sum_l w_il sum_j p g + eps) / (sum_l w_il sum_j (p + g) + eta)

Choices, each a reading of the paper's MONAI implementation where the printed equation is silent
or differs:

- ``overlap_factor`` k = 2 (default) as in Sudre et al. (the paper's ref. [12]) and MONAI's
  ``GeneralizedDiceLoss``; the printed equation (1) has no factor 2, under which a perfect
  prediction scores 1/2. ``overlap_factor=1`` gives the printed form.
- A class absent from a patch (sum g = 0) has an infinite weight; it gets the largest finite
  weight of that patch instead (MONAI's convention), so a lesion-free patch weighs both classes
  by 1/(background voxels)^2. With two one-hot classes at least one class is present; if none is
  (an empty patch), all weights are 0 and the patch ratio is eps/eta (loss 0 for eps = eta).
- At 192^3 the weighted sums are about 1/(number of voxels), far below eps = eta = 1e-5, so on a
  lesion-free patch the Dice ratio is close to 1 whatever the prediction: the focal term then
  carries the gradient. This is the paper's loss as published and is kept.

Focal, equation (2), sigmoid of each class's logit x (not the softmax), class weights v = (1, 100),
gamma = 2, computed with log-sigmoid for stability:

- ``focal_form="binary"`` (default): per class channel the binary focal loss of Lin et al.,
  ``-v_l (1 - q_t)^gamma log q_t`` with ``q_t = sigmoid(x)`` where g = 1 and ``1 - sigmoid(x)``
  where g = 0, which is what MONAI's ``FocalLoss`` (sigmoid mode, per-channel weight) computes.
  The printed equation (2) keeps only the g = 1 terms.
- ``focal_form="positive"``: equation (2) as printed, g = 1 terms only. Alone it is minimised by
  sending every logit to +inf, so it does not separate the classes; offered for comparison.
- ``focal_reduction="mean"`` (default): the mean over batch, class and voxel elements, i.e.
  equation (2) divided by C * number of voxels, as MONAI's ``reduction="mean"`` does. The
  literal form (``"sum"``: sum over classes and voxels, mean over patches) is ~10^6 times the Dice
  term at 192^3 and ties the loss scale to the patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FOCAL_FORMS = ("binary", "positive")
FOCAL_REDUCTIONS = ("mean", "sum")


def one_hot_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (B, *spatial) -> float32 one-hot (B, C, *spatial).

    A label outside 0..C-1 gives an all-zero column (the voxel counts for no class).
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * (labels.ndim - 1)))
    return (labels.unsqueeze(1).long() == classes).float()


class GeneralizedDiceFocalLoss(nn.Module):
    """Generalized Dice + focal loss of the GDFL paper; see the module docstring for the choices."""

    def __init__(
        self,
        focal_weights: tuple[float, ...] = (1.0, 100.0),
        gamma: float = 2.0,
        epsilon: float = 1e-5,
        eta: float = 1e-5,
        focal_reduction: str = "mean",
        focal_form: str = "binary",
        overlap_factor: float = 2.0,
    ):
        super().__init__()
        if focal_reduction not in FOCAL_REDUCTIONS:
            raise ValueError(f"focal_reduction must be one of {FOCAL_REDUCTIONS}, got {focal_reduction!r}")
        if focal_form not in FOCAL_FORMS:
            raise ValueError(f"focal_form must be one of {FOCAL_FORMS}, got {focal_form!r}")
        self.register_buffer("focal_weights", torch.tensor(focal_weights, dtype=torch.float32), persistent=False)
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.eta = float(eta)
        self.focal_reduction = focal_reduction
        self.focal_form = focal_form
        self.overlap_factor = float(overlap_factor)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice, focal = self.terms(logits, target)
        return dice + focal

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(generalized Dice loss, focal loss), both float32 scalars."""
        num_classes = logits.shape[1]
        if self.focal_weights.numel() != num_classes:
            raise ValueError(f"{self.focal_weights.numel()} focal weights for {num_classes} classes")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.float()
            labels = target[:, 0] if target.ndim == logits.ndim else target  # (B, 1, ...) or (B, ...)
            g = one_hot_labels(labels, num_classes)
            if g.shape != x.shape:
                raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(x.shape)}")
            return self._dice(x, g), self._focal(x, g)

    def _dice(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x, dim=1)
        voxels = tuple(range(2, x.ndim))
        intersection = (p * g).sum(voxels)  # (B, C)
        ground = g.sum(voxels)
        total = p.sum(voxels) + ground
        w = 1.0 / ground.square()
        absent = torch.isinf(w)
        w = torch.where(absent, torch.zeros_like(w), w)
        w = torch.where(absent, w.amax(dim=1, keepdim=True), w)
        ratio = (self.overlap_factor * (w * intersection).sum(1) + self.epsilon) / ((w * total).sum(1) + self.eta)
        return 1.0 - ratio.mean()

    def _focal(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            x, g, self.gamma, "sigmoid", self.focal_weights,
            positive_only=self.focal_form == "positive", reduction=self.focal_reduction,
        )


# ---------------------------------------------------------------------------------------------
# L1DFL paper (Dzikunu et al.): Dice, Dice + focal and the L1-weighted Dice focal loss.
#
# Conventions shared by the three losses, each the paper's (§2.6) or, where it is silent, that of
# the MONAI losses its released code uses:
#
# - logits (B, C, *spatial) and integer labels (B, 1, *spatial) or (B, *spatial); p = softmax over
#   the classes, g = one-hot labels; float32 with autocast disabled.
# - Dice, equation (1): per patch and class, (2 sum p g + s_nr) / (sum p + sum g + s_dr), or with
#   sum p^2 + sum g^2 in the denominator (``squared_denominator``); 1 minus the mean over patches
#   and classes, background included (the paper averages over c in {0, 1}); s_nr = s_dr = 1e-5
#   (MONAI's defaults; the paper names a small epsilon). ``batch_dice`` pools the sums over the
#   batch instead.
# - Focal, equation (2), gamma = 2, alpha = 1 (§2.6): ``focal_activation="softmax"`` (default)
#   is -alpha_c (1 - p_c)^gamma log p_c at each voxel's true class c, averaged over all batch x
#   class x voxel elements (the paper's 1/2 sum over the two classes; MONAI's softmax
#   ``FocalLoss``, which the authors' L1DFL code uses); ``"sigmoid"`` is the binary focal loss of
#   each class channel's sigmoid, what MONAI's ``DiceFocalLoss`` computes.


def focal_loss(
    logits: torch.Tensor,
    onehot: torch.Tensor,
    gamma: float = 2.0,
    activation: str = "softmax",
    class_weights: torch.Tensor | None = None,
    positive_only: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss of logits and one-hot labels (B, C, *spatial); the one focal term of both papers.

    ``activation="softmax"``: -(1 - p_c)^gamma log p_c at each voxel's true class c (the L1DFL
    section comment above). ``"sigmoid"``: per class channel the binary focal loss of Lin et al.,
    -(1 - q_t)^gamma log q_t with q_t = sigmoid(x) where the class is present and 1 - sigmoid(x)
    where it is absent, in log-sigmoid form for stability (GDFL's ``focal_form="binary"``).
    ``positive_only`` keeps only the present-class terms (GDFL's ``focal_form="positive"``;
    the softmax form has only those). ``class_weights`` (C,) multiply each class channel.
    ``reduction="mean"``: mean over all (batch, class, voxel) elements; ``"sum"``: sum over
    classes and voxels, mean over the batch.
    """
    if activation == "softmax":
        log_p = torch.log_softmax(logits, dim=1)
        elementwise = -torch.exp(gamma * torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-7))) * log_p * onehot
    elif activation == "sigmoid":
        sign = 2.0 * onehot - 1.0  # +1 where the class is present, -1 where absent
        log_q_t = F.logsigmoid(sign * logits)
        modulation = torch.exp(gamma * F.logsigmoid(-sign * logits))  # (1 - q_t)^gamma
        elementwise = -modulation * log_q_t
    else:
        raise ValueError(f"focal activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if positive_only:
        elementwise = elementwise * onehot
    if class_weights is not None:
        elementwise = elementwise * class_weights.to(logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
    if reduction == "mean":
        return elementwise.mean()
    if reduction == "sum":
        return elementwise.sum() / logits.shape[0]
    raise ValueError(f"focal reduction must be one of {FOCAL_REDUCTIONS}, got {reduction!r}")


def _logits_and_onehot(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    labels = target[:, 0] if target.ndim == logits.ndim else target  # (B, 1, ...) or (B, ...)
    g = one_hot_labels(labels, x.shape[1])
    if g.shape != x.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(x.shape)}")
    return x, g


def _class_weights(weights, num_classes: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() == 1:
        return w.expand(num_classes)
    if w.numel() != num_classes:
        raise ValueError(f"{w.numel()} focal weights for {num_classes} classes")
    return w


class DiceLoss(nn.Module):
    """Soft Dice loss of equation (1), with or without the squared denominator."""

    def __init__(
        self,
        squared_denominator: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch_dice: bool = False,
        include_background: bool = True,
    ):
        super().__init__()
        self.squared_denominator = bool(squared_denominator)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch_dice = bool(batch_dice)
        self.include_background = bool(include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, g = _logits_and_onehot(logits, target)
            return self.from_probabilities(torch.softmax(x, dim=1), g)

    def from_probabilities(self, p: torch.Tensor, g: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """1 - mean Dice of probabilities ``p`` and one-hot ``g`` (B, C, ...); ``weights`` per element."""
        if not self.include_background:
            p, g = p[:, 1:], g[:, 1:]
            weights = None if weights is None else weights[:, 1:]
        w = torch.ones_like(p) if weights is None else weights
        dims = tuple(range(2, p.ndim))
        if self.batch_dice:
            dims = (0,) + dims
        intersection = (w * p * g).sum(dims)
        if self.squared_denominator:
            denominator = (w * (p.square() + g.square())).sum(dims)
        else:
            denominator = (w * (p + g)).sum(dims)
        return 1.0 - ((2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)).mean()


class DiceFocalLoss(nn.Module):
    """Dice + focal, equation (3): ``lambda_dice * Dice + lambda_focal * focal``."""

    def __init__(
        self,
        squared_denominator: bool = False,
        gamma: float = 2.0,
        focal_weights: float | tuple[float, ...] | None = None,
        focal_activation: str = "softmax",
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch_dice: bool = False,
    ):
        super().__init__()
        if focal_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"focal_activation must be 'softmax' or 'sigmoid', got {focal_activation!r}")
        if lambda_dice < 0 or lambda_focal < 0:
            raise ValueError("lambda_dice and lambda_focal must be >= 0")
        self.dice = DiceLoss(squared_denominator, smooth_nr, smooth_dr, batch_dice)
        self.gamma = float(gamma)
        self.focal_weights = focal_weights  # alpha_c; None = 1 for every class (the paper's alpha = 1)
        self.focal_activation = focal_activation
        self.lambda_dice = float(lambda_dice)
        self.lambda_focal = float(lambda_focal)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice, focal = self.terms(logits, target)
        return self.lambda_dice * dice + self.lambda_focal * focal

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Dice loss, focal loss), float32 scalars, before the lambdas."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, g = _logits_and_onehot(logits, target)
            dice = self.dice.from_probabilities(torch.softmax(x, dim=1), g)
            focal = focal_loss(x, g, self.gamma, self.focal_activation, _class_weights(self.focal_weights, x.shape[1]))
            return dice, focal


@dataclass
class L1Histogram:
    """The L1DFL weighting of a set of L1 norms ``delta`` (equations (4)-(10)).

    Per bin k: ``centers`` B_k, ``counts`` C(B_k), effective ``widths`` lambda(B_k) and
    ``densities`` D(B_k) = C / lambda. Per element of delta: ``bin_index`` (the bin whose weight
    it takes), ``density`` D and ``weight`` w = N / D.
    """

    centers: torch.Tensor
    counts: torch.Tensor
    widths: torch.Tensor
    densities: torch.Tensor
    bin_index: torch.Tensor
    density: torch.Tensor
    weight: torch.Tensor


def l1_histogram(delta: torch.Tensor, bin_width: float = 0.1, edge_tolerance: float = 1e-6) -> L1Histogram:
    """Histogram weights of L1 norms in [0, 1] (the paper's equations (5)-(10)).

    Bins are centred at B_k = k * bin_width, k = 0 .. floor(1 / bin_width) (n = floor(1/G + 1)
    bins), with effective widths min(B_k + G/2, 1) - max(B_k - G/2, 0) (G/2 for the end bins when
    G divides 1). A value lying on the edge between two bins (within ``edge_tolerance``, so that a
    float32 0.65 computed as 1 - 0.35 still counts as on the edge) is *counted* in both, as the
    indicator |B_k - delta| <= G/2 of equation (7) says, and takes the *upper* bin's weight. This
    is what reproduces the paper's Figure 1: 0.65 raises the count of bin 0.6 to 5 (density 50)
    while its own density is bin 0.7's 20; 0.15 and 0.55 take densities 80 and 50 from bins 0.2 and
    0.6. When G does not divide 1 a value beyond the last bin's upper edge takes the last bin.
    The weights carry no gradient.
    """
    if not 0.0 < bin_width <= 1.0:
        raise ValueError(f"bin_width must be in (0, 1], got {bin_width}")
    with torch.no_grad():
        d = delta.detach().reshape(-1).float()
        n_bins = int(math.floor(1.0 / bin_width + 1.0 + 1e-9))
        centers = bin_width * torch.arange(n_bins, device=d.device, dtype=torch.float32)
        widths = (centers + bin_width / 2).clamp(max=1.0) - (centers - bin_width / 2).clamp(min=0.0)
        u = d / bin_width  # position in bin units; bin k spans [k - 1/2, k + 1/2]
        tol = edge_tolerance / bin_width
        index = torch.floor(u + 0.5 + tol).long().clamp(0, n_bins - 1)
        on_lower_edge = ((u - (index.float() - 0.5)).abs() <= tol) & (index > 0)
        counts = torch.bincount(index, minlength=n_bins).float()
        # Edge values count in the lower neighbour too (weights instead of masking: no host sync on GPU).
        counts += torch.bincount((index - 1).clamp(min=0), weights=on_lower_edge.float(), minlength=n_bins)
        densities = counts / widths
        density = densities[index]
        weight = d.numel() / density  # every element's own bin holds it, so density > 0
        shape = delta.shape
        return L1Histogram(centers, counts, widths, densities, index.view(shape), density.view(shape), weight.view(shape))


class L1WeightedDiceFocalLoss(nn.Module):
    """L1-weighted Dice focal loss (L1DFL), equations (4)-(12) of the L1DFL paper.

    delta = |g - p| for every (patch, class, voxel) element of the batch (for two classes both
    channels carry the same values, so this is the foreground histogram counted twice with N
    doubled: the same weights); the histogram of ``l1_histogram`` over the whole batch (N = all
    elements, as the authors' code does) gives each element a weight w, detached. Weighted Dice
    with the squared denominator, equation (11), per patch and class:

        (2 sum w g p + s_nr) / (sum w (g^2 + p^2) + s_dr)

    1 minus its mean over patches and classes, plus the focal loss (gamma = 2, alpha = 1; softmax
    form as in the authors' code). Rare, badly predicted voxels (delta near 1) get weights
    far above the abundant easy background (delta near 0).
    """

    def __init__(
        self,
        bin_width: float = 0.1,
        gamma: float = 2.0,
        focal_weights: float | tuple[float, ...] | None = None,
        focal_activation: str = "softmax",
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        edge_tolerance: float = 1e-6,
    ):
        super().__init__()
        if not 0.0 < bin_width <= 1.0:
            raise ValueError(f"bin_width must be in (0, 1], got {bin_width}")
        if focal_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"focal_activation must be 'softmax' or 'sigmoid', got {focal_activation!r}")
        if lambda_dice < 0 or lambda_focal < 0:
            raise ValueError("lambda_dice and lambda_focal must be >= 0")
        self.bin_width = float(bin_width)
        self.gamma = float(gamma)
        self.focal_weights = focal_weights
        self.focal_activation = focal_activation
        self.lambda_dice = float(lambda_dice)
        self.lambda_focal = float(lambda_focal)
        self.edge_tolerance = float(edge_tolerance)
        self.dice = DiceLoss(squared_denominator=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice, focal = self.terms(logits, target)
        return self.lambda_dice * dice + self.lambda_focal * focal

    def voxel_weights(self, probabilities: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The weights w of every element (same shape as ``probabilities``), without gradient."""
        return l1_histogram((onehot - probabilities).abs(), self.bin_width, self.edge_tolerance).weight

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted Dice loss, focal loss), float32 scalars, before the lambdas."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, g = _logits_and_onehot(logits, target)
            p = torch.softmax(x, dim=1)
            dice = self.dice.from_probabilities(p, g, self.voxel_weights(p, g))
            focal = focal_loss(x, g, self.gamma, self.focal_activation, _class_weights(self.focal_weights, x.shape[1]))
            return dice, focal
