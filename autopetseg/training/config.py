"""Training settings as dataclasses that round-trip through JSON (``fold_k/config.json``).

Every hyper-parameter the training loop uses lives here; the ``Trainer`` and its variants read
them, none is written into a method body. Defaults are the GDFL paper's (Ahamed & Rahmim,
autoPET 2023) where it gives one, nnU-Net's otherwise; each field says where its value comes from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from autopetseg.options import check_option


@dataclass
class AugmentationConfig:
    """Random transforms applied to both channels of a training patch (batchgenerators).

    Ranges from the GDFL paper §2.2; the probability of each transform per sample follows nnU-Net
    (rotation/scaling 0.2, gamma 0.3, noise 0.1, mirroring 0.5 per axis). Elastic deformation is
    the paper's MONAI setting (Gaussian sigma and magnitude drawn from (0, 1) voxels, i.e. a small
    jitter), applied with probability 0.2 because it is the most expensive transform.
    """

    enabled: bool = True
    rotation_axial_rad: tuple[float, float] = (-math.pi / 12, math.pi / 12)  # about the z (axial) axis
    p_rotation: float = 0.2
    scale_range: tuple[float, float] = (0.9, 1.1)
    p_scale: float = 0.2
    elastic_alpha: tuple[float, float] = (0.0, 1.0)  # deformation magnitude (voxels)
    elastic_sigma: tuple[float, float] = (0.0, 1.0)  # smoothing of the deformation field (voxels)
    p_elastic: float = 0.2
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_gamma: float = 0.3
    noise_variance: tuple[float, float] = (0.0, 1.0)  # paper: N(0, sigma<=1)
    p_noise: float = 0.1
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes of (z, y, x), each flipped with p = 0.5; () disables
    data_interpolation_order: int = 1  # paper resamples (bi)linearly; order 3 (nnU-Net) costs ~3x CPU time
    max_shift_voxels: int = 10  # paper: 3D translation in (0, 10) voxels, applied when sampling the patch centre


@dataclass
class TrainerConfig:
    """Everything the training loop needs besides the plans and the data.

    ``batch_size`` and ``patch_size`` default to the plans' configuration (``None`` = take from the
    plans); ``batch_size`` is per process, so DDP with N processes trains on N x batch_size patches
    per step.

    The learning-rate schedule is applied **per iteration**: ``cosine`` falls from ``learning_rate``
    to 0 over ``epochs x iterations_per_epoch`` steps (GDFL paper: 1e-3 → 0 over 300 epochs),
    ``poly`` is nnU-Net's (1 - t/T)^0.9, ``constant`` keeps it.
    """

    network: str = "resunet"
    epochs: int = 300  # GDFL paper
    iterations_per_epoch: int = 250  # nnU-Net
    batch_size: int | None = None  # None: plans
    patch_size: list[int] | None = None  # None: plans
    optimizer: str = "adam"  # OPTIONS["optimizer"]: "adam", "adamw" or "sgd"
    learning_rate: float = 1e-3  # GDFL paper
    weight_decay: float = 0.0
    momentum: float = 0.99  # SGD only (nnU-Net)
    schedule: str = "cosine"  # OPTIONS["schedule"]: "cosine", "poly", "constant"; stepped per iteration
    grad_clip_norm: float | None = 12.0  # nnU-Net's clipping; None disables
    # Focal-loss "prior" initialisation (Lin et al., RetinaNet §4.1): the output layer's biases start
    # at the log-odds of background 1 - p and lesion p, so training starts from "all background"
    # instead of p = 0.5 everywhere. None keeps PyTorch's initialisation (the papers' setting).
    output_prior: float | None = None
    foreground_share: float = 0.33  # share of patches centred on a lesion voxel (nnU-Net's oversampling)
    validation_interval: int = 1  # validate every k epochs (and always after the last epoch)
    validation_batch_size: int = 2  # sliding-window windows per forward pass
    validation_overlap: float = 0.5  # GDFL paper §2.5
    amp: bool | None = None  # None: on for CUDA, off on CPU
    amp_dtype: str = "auto"  # "auto" (bf16 if supported, else fp16 + GradScaler), "bf16", "fp16"
    channels_last_3d: bool = False
    compile: bool = False  # torch.compile the training forward
    seed: int = 0
    # Data-loading processes per training process; 0 = in the main process. None: with CUDA the
    # cores this process may use minus one, at most 12 (nnU-Net's default); on the CPU 0 up to 4
    # cores and 1 above (workers there compete with the training threads).
    num_workers: int | None = None
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the variant's loss
    # Read by the variants that use them (the L2SNet trainers, ``l2s.py``); the others ignore them.
    # The schedule's factor held constant within each epoch (L2SNet: poly decay "in each epoch").
    schedule_per_epoch: bool = False
    # 2D stages: the array axis slices are cut across (None: the configuration's ``slice_axis``; another
    # axis needs ``patch_size`` for its plane) and the slices on each side of the centre one that are
    # read as extra channels (2 = 5 slices, L2SNet's released code).
    slice_axis: int | None = None
    slice_neighbours: int = 0
    # Keyword options of the variant's network (merged over the variant's own).
    network_options: dict[str, Any] = field(default_factory=dict)
    # Intensity windows the network applies to its input: image channel ("PET" in SUV, "CT" in HU) ->
    # [low, high, to_low, to_high]: clipped to [low, high], mapped linearly onto [to_low, to_high].
    input_windows: dict[str, list[float]] = field(default_factory=dict)
    # Settings of a variant's own that fit no field above (``cascade_3step``: ROI jitter, the detector's
    # threshold search; ``training/cascade3.py``), merged over the variant's.
    stage_settings: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds this stage may take, validation included (``train --time-budget``): the
    # schedule's length is fitted to it (``time_budget.py``), at most ``epochs x iterations_per_epoch``.
    time_budget_s: float | None = None
    # A patient-level 0/1 label: the clinical.csv column read by a variant with a classification head
    # (multitask: "prognosis"); None for segmentation-only variants. It also stratifies the folds.
    label_column: str | None = None
    # Settings of a variant's own dataclass (multitask: ``MultitaskSettings``), checked by the variant.
    method_settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown trainer settings: {unknown}")
        raw = dict(raw)
        aug = raw.pop("augmentation", None)
        if isinstance(aug, dict):
            aug = AugmentationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
        config = cls(**raw) if aug is None else cls(**raw, augmentation=aug)
        config.validate()
        return config

    def replace(self, **changes: Any) -> "TrainerConfig":
        """A copy with ``changes``; ``augmentation`` may be given as a dict of its fields to change, and
        ``loss`` as a dict of the loss settings to change (the others keep the trainer's values)."""
        if isinstance(changes.get("loss"), dict):
            changes["loss"] = {**self.loss, **changes["loss"]}
        aug = changes.pop("augmentation", None)
        if isinstance(aug, dict):
            aug = dataclasses.replace(self.augmentation, **aug)
        config = dataclasses.replace(self, **changes)
        if aug is not None:
            config = dataclasses.replace(config, augmentation=aug)
        config.validate()
        return config

    def validate(self) -> None:
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise ValueError("epochs and iterations_per_epoch must be >= 1")
        if not 0.0 <= self.foreground_share <= 1.0:
            raise ValueError(f"foreground_share must be in [0, 1], got {self.foreground_share}")
        check_option("schedule", self.schedule)
        check_option("optimizer", self.optimizer)
        check_option("amp_dtype", self.amp_dtype)
        if self.validation_interval < 1:
            raise ValueError("validation_interval must be >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.output_prior is not None and not 0.0 < self.output_prior < 0.5:
            raise ValueError(f"output_prior must be in (0, 0.5), got {self.output_prior}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1, 2 or None, got {self.slice_axis!r}")
        if self.slice_neighbours < 0:
            raise ValueError(f"slice_neighbours must be >= 0, got {self.slice_neighbours}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        for channel, window in self.input_windows.items():
            if len(window) != 4 or not window[0] < window[1]:
                raise ValueError(f"input_windows[{channel!r}] must be [low, high, to_low, to_high] with low < high, "
                                 f"got {window!r}")
