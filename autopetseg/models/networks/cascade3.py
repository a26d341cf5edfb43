"""The three networks of ``cascade_3step`` (Ahamed et al., DLBCL): slice classifier, lesion detector, ROI U-Net.

All three read one channel, the z-scored PET (``models/roi.py``); the classifier and the detector
carry the slice framing (``image_size`` S and ``canvas``) as options, recorded in ``model.json``.
No ImageNet weights can be downloaded here, so the torchvision backbones are built with
``weights=None`` and trained from scratch; their first convolution is built for one channel (with
pretrained weights one would repeat the PET into three channels to reuse the RGB filters; from
scratch a 1-channel layer is the same model without two dead inputs).

* ``SliceClassifier``: a torchvision ResNet (paper: ResNet152; the CPU plan: ResNet18) whose
  fully-connected layer gives one logit (sigmoid: "this slice holds a lesion"). Its decision
  threshold is a buffer (``decision_threshold``), saved with the weights: the trainer sets it on
  the fold's validation slices, so every fold carries its own (paper: 0.16).
* ``LesionDetector``: torchvision's Faster R-CNN with a ResNet-FPN backbone (paper: ResNet50-FPN;
  the CPU plan: ResNet18-FPN), batch norm trained (frozen batch norm, torchvision's default for
  pretrained backbones, would leave a from-scratch backbone unnormalised), one lesion class. The
  transform keeps the S×S slices as they are (min and max size S, mean 0 and std 1: the input is
  z-scored already); anchors (one size per FPN level, aspect ratios 0.5, 1, 2) come from the
  plans. In eval mode it returns candidates (score >= ``candidate_score``, no NMS); ``keep``
  applies the fold's own NMS IoU and score threshold, buffers set on validation like the
  classifier's. In train mode it returns torchvision's loss dict (the trainer weights it).
* ``RoiUNet``: a plain 2D U-Net (two 3×3 conv-BN-ReLU per level, max-pooling down, transposed
  convolution up, skip concatenation, 1×1 logits), sized by the plans' topology; it carries the
  ROI settings (``roi_size``, ``margin_fraction``, ``min_margin``, and the ``canvas`` its slices are
  z-scored over) so that prediction crops exactly as training did.

``require_torchvision`` turns a missing torchvision into an ``InputError`` naming the install line.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from autopetseg.errors import InputError
from autopetseg.models.networks.attention_unet import check_input_size
from autopetseg.models.networks.l2s import _checked_lists, double_conv
from autopetseg.planning.plans import NetworkTopology, total_stride

INSTALL_LINE = 'pip install -e ".[detection]"'
CLASSIFIER_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DETECTOR_BACKBONES = tuple(f"{name}_fpn" for name in CLASSIFIER_BACKBONES)
PAPER_THRESHOLD = 0.16  # the classifier's threshold before any validation (the paper's, on DLBCL)


def require_torchvision(what: str = "cascade_3step"):
    """The torchvision module; an ``InputError`` with the install line when it is missing."""
    try:
        import torchvision
    except ImportError:
        raise InputError(f"{what} needs torchvision (ResNet, Faster R-CNN), which is not installed; "
                         f"install it with: {INSTALL_LINE}") from None
    return torchvision


def _one_channel_stem(in_channels: int) -> nn.Conv2d:
    """ResNet's first convolution (64 filters, 7×7, stride 2) for ``in_channels`` inputs."""
    return nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


class SliceClassifier(nn.Module):
    """ResNet → one logit per slice (module doc)."""

    def __init__(self, topology: NetworkTopology | None = None, in_channels: int = 1, out_channels: int = 1,
                 backbone: str = "resnet18", image_size: int = 224, canvas: int = 1, threshold: float = PAPER_THRESHOLD):
        super().__init__()
        tv = require_torchvision()
        self.image_size, self.canvas = int(image_size), int(canvas)
        self.backbone = getattr(tv.models, _check_choice("classifier backbone", backbone, CLASSIFIER_BACKBONES))(
            weights=None, num_classes=out_channels)
        self.backbone.conv1 = _one_channel_stem(in_channels)
        self.register_buffer("decision_threshold", torch.tensor(float(threshold)))

    @property
    def output_layer(self) -> nn.Linear:
        return self.backbone.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class LesionDetector(nn.Module):
    """Faster R-CNN with a ResNet-FPN backbone, one lesion class (module doc)."""

    def __init__(self, topology: NetworkTopology | None = None, in_channels: int = 1, out_channels: int = 2,
                 backbone: str = "resnet18_fpn", image_size: int = 224, canvas: int = 1,
                 anchor_sizes: Sequence[float] = (8.0, 16.0, 32.0, 64.0, 128.0),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), candidate_score: float = 0.05,
                 detections_per_image: int = 50, rpn_top_n: Sequence[int] = (600, 300, 300, 150),
                 box_batch_size_per_image: int = 128, fpn_channels: int = 256, box_head_size: int = 1024,
                 score_threshold: float = 0.5, nms_iou: float = 0.5):
        super().__init__()
        tv = require_torchvision()
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        name = _check_choice("detector backbone", backbone, DETECTOR_BACKBONES).removesuffix("_fpn")
        resnet = getattr(tv.models, name)(weights=None, norm_layer=nn.BatchNorm2d)
        resnet.conv1 = _one_channel_stem(in_channels)
        widths = [resnet.inplanes // 8 * 2**k for k in range(4)]  # layer1..4 outputs (x4 for bottlenecks)
        features = BackboneWithFPN(resnet, {f"layer{k + 1}": str(k) for k in range(4)}, widths, int(fpn_channels))
        levels = 5  # the four layers + the max-pooled level
        if len(anchor_sizes) != levels:
            raise ValueError(f"{levels} FPN levels need {levels} anchor sizes, got {list(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((float(a),) for a in anchor_sizes), (tuple(float(r) for r in aspect_ratios),) * levels)
        pool_size = 7  # torchvision's MultiScaleRoIAlign output
        pre_train, pre_test, post_train, post_test = (int(n) for n in rpn_top_n)
        self.image_size, self.canvas = int(image_size), int(canvas)
        self.model = FasterRCNN(
            features, min_size=self.image_size, max_size=self.image_size,
            image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels, rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(int(fpn_channels) * pool_size**2, int(box_head_size)),
            box_predictor=FastRCNNPredictor(int(box_head_size), out_channels),
            rpn_pre_nms_top_n_train=pre_train, rpn_pre_nms_top_n_test=pre_test,
            rpn_post_nms_top_n_train=post_train, rpn_post_nms_top_n_test=post_test,
            box_score_thresh=float(candidate_score), box_nms_thresh=1.0,  # NMS: ours, at the fold's IoU (``keep``)
            box_detections_per_img=int(detections_per_image), box_batch_size_per_image=int(box_batch_size_per_image),
        )
        self.register_buffer("score_threshold", torch.tensor(float(score_threshold)))
        self.register_buffer("nms_iou", torch.tensor(float(nms_iou)))

    def forward(self, images, targets: list[dict[str, torch.Tensor]] | None = None):
        """Train mode: the loss dict of (images, targets); eval mode: the candidates of each image."""
        return self.model(list(images), targets)

    def keep(self, candidates: Sequence[dict[str, torch.Tensor]], score_threshold: float | None = None,
             nms_iou: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(boxes (n, 4), scores (n,)) per image after NMS at ``nms_iou`` and scores >= ``score_threshold``
        (default: the fold's stored values)."""
        from torchvision.ops import nms

        iou = float(self.nms_iou) if nms_iou is None else float(nms_iou)
        threshold = float(self.score_threshold) if score_threshold is None else float(score_threshold)
        kept = []
        for found in candidates:
            boxes, scores = found["boxes"].float().cpu(), found["scores"].float().cpu()
            index = nms(boxes, scores, iou)
            index = index[scores[index] >= threshold]
            kept.append((boxes[index].numpy().astype(np.float64), scores[index].numpy().astype(np.float64)))
        return kept


class RoiUNet(nn.Module):
    """Plain 2D U-Net for the R×R ROIs (module doc)."""

    def __init__(self, topology: NetworkTopology, in_channels: int = 1, out_channels: int = 1, roi_size: int = 128,
                 margin_fraction: float = 0.25, min_margin: float = 2.0, canvas: int = 1):
        super().__init__()
        features, strides, kernels = _checked_lists(topology, "cascade3_roi_unet", 2)
        self.roi_size, self.margin_fraction, self.min_margin = int(roi_size), float(margin_fraction), float(min_margin)
        self.canvas = int(canvas)
        if self.margin_fraction < 0 or self.min_margin < 0:
            raise ValueError("margin_fraction and min_margin must be >= 0")
        self.total_stride = total_stride(strides)
        if any(self.roi_size % t for t in self.total_stride):
            raise ValueError(f"roi_size {self.roi_size} is not divisible by the network's total stride {self.total_stride}")
        n = len(features)
        self.down = nn.ModuleList([nn.MaxPool2d(tuple(s), tuple(s)) for s in strides[1:]])
        self.encoder = nn.ModuleList([double_conv(2, in_channels if s == 0 else features[s - 1], features[s], kernels[s],
                                                  "batch") for s in range(n)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(features[s + 1], features[s], tuple(strides[s + 1]),
                                                    tuple(strides[s + 1])) for s in range(n - 1)])
        self.decoder = nn.ModuleList([double_conv(2, 2 * features[s], features[s], kernels[s], "batch")
                                      for s in range(n - 1)])
        self.head = nn.Conv2d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, 2, self.total_stride)
        levels = []
        for s, block in enumerate(self.encoder):
            x = block(x if s == 0 else self.down[s - 1](x))
            levels.append(x)
        for s in reversed(range(len(self.decoder))):
            x = self.decoder[s](torch.cat([levels[s], self.up[s](x)], dim=1))
        return self.head(x)
