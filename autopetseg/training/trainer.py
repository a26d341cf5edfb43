"""The one training loop every stage of every method shares; variants override small hooks (``variants.py``).

``Trainer.run()`` is the whole story:

    setup (network, loss, optimizer + schedule, AMP, DDP, data loader, resume; the fold record)
    for epoch in start .. epochs-1:
        train ``iterations_per_epoch`` steps on random patches
        every ``validation_interval`` epochs (and after the last): the stage's inference strategy
            over the whole validation volumes, ``validate_case`` per case (rank 0 only)
        log row, progress plot, checkpoint_latest (and checkpoint_best on a new best
            ``selection_metric``)
    checkpoint_final, validation.json of the best checkpoint

A trainer is one stage of a method (``models.methods``): one network on one configuration. A
stage may take earlier stages' outputs (``inputs``): they reach the batch as extra arrays, moved
by the spatial augmentation with the image, and become extra input channels.

Hooks a variant may override: ``network_spec`` (the network, as data: inference rebuilds it from
the fold record without any trainer), ``build_loss``, ``configure_optimizer``,
``make_train_loader``, ``prepare_batch``, ``forward_train(batch)`` (default: the network of
``batch["input"]``), ``compute_loss(outputs, batch)``, ``validate_case``,
``summarize_validation``, ``strategy``; class attributes ``name``, ``config_defaults`` (the
variant's hyper-parameters), ``output`` (``OutputSpec``: activation, channels, lesion channel,
threshold), ``selection_metric`` and ``selection_mode``.

Reproducibility and resuming: every training batch is drawn from a random stream seeded by
(seed, rank, batch index) (``data_loader.py``), and the checkpoint holds network, optimizer,
scheduler, GradScaler and RNG states, so ``--continue`` after an interruption at epoch e starts at
epoch e + 1 and, on the CPU with the same seed, ends bit-identical to an uninterrupted run.
Continuing with more ``epochs`` than the checkpoint was made with keeps the optimizer step count:
the cosine then continues on the longer curve (a warning says so).

Speed options (``TrainerConfig``), all off on the CPU by default:

* ``amp``: autocast (default on for CUDA) in ``amp_dtype`` "auto" = bf16 where the GPU supports
  it, else fp16 with a ``GradScaler`` (its state is checkpointed and restored). Losses are
  computed in float32 outside autocast. bf16 and fp16 also run on the CPU (tested), rarely faster.
* ``channels_last_3d``: network and inputs in the channels-last memory format; whether it is
  faster depends on the GPU and cuDNN, measure with ``benchmarks/train_throughput.py --channels-last``.
* ``compile``: ``torch.compile`` of the training forward (of the DDP wrapper under DDP);
  validation and checkpoints use the eager module. The first iterations compile (about 90 s
  for the tiny CPU network on two busy cores), so it pays off only for long runs.

DDP (torchrun): each rank trains on its own patch stream; gradients are averaged by DDP and the
batch-norm running statistics are averaged at the end of every epoch, so all ranks hold the
same weights; only rank 0 validates and writes.

Files in the stage folder (``models/folders.py``): ``model.json`` (the fold record),
``config.json``, ``checkpoint_latest.pt`` (every epoch), ``checkpoint_best.pt`` (best
``selection_metric``; ties keep the earlier epoch), ``checkpoint_final.pt``, ``validation.json``,
``training_log.csv``, ``progress.png``. All written atomically, by rank 0 only. Checkpoints hold
tensors and JSON-like data only and are read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from autopetseg.errors import InputError
from autopetseg.io_utils import nan_to_none, read_json, write_json
from autopetseg.models.checkpoints import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from autopetseg.models.folders import CHECKPOINT_BEST, CHECKPOINT_FINAL, CHECKPOINT_LATEST, FoldRecord, NetworkSpec, plans_hash
from autopetseg.models.methods import OutputSpec, StageSpec, StrategySpec, one_stage
from autopetseg.models.runtime import amp_dtype, autocast
from autopetseg.models.strategies import run_strategy
from autopetseg.options import check_option
from autopetseg.planning.plans import ConfigurationPlan, Plans
from autopetseg.scoring.metrics import aggregate, case_metrics
from autopetseg.training.config import TrainerConfig
from autopetseg.training.data_loader import CachedCase, load_cached_case, make_train_loader
from autopetseg.training.progress import plot_progress, write_training_log
from autopetseg.training.time_budget import TimeBudget

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_BEST", "CHECKPOINT_FINAL", "CHECKPOINT_LATEST", "DistributedContext", "Trainer"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a DDP run (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def case_volume(case: CachedCase, inputs: Sequence[str] = ()) -> torch.Tensor:
    """A whole cached volume as a stage's network reads it: the image channels, then one channel per
    earlier stage's output (``input_<stage>`` extras of the case)."""
    arrays = [np.asarray(case.image, dtype=np.float32)]
    arrays += [np.asarray(case.extras[f"input_{s}"], dtype=np.float32)[None] for s in inputs]
    return torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else np.array(arrays[0]))


class Trainer:
    """Owns data, optimizer, schedule, AMP, checkpoints, validation and DDP for one fold."""

    name = "base"
    config_defaults: dict[str, Any] = {}
    output = OutputSpec()  # softmax over background and lesion, lesion above 0.5
    image_channels = 2  # PET, CT; each input from an earlier stage adds one
    selection_metric = "mean_dsc"  # key of the validation summary that picks checkpoint_best
    selection_mode = "max"
    label_column: str | None = None  # a clinical.csv column whose 0/1 value rides along as batch["case_label"]

    @classmethod
    def check_requirements(cls) -> None:
        """Raise an ``InputError`` naming the install line when an optional package the variant needs is
        missing (checked before anything is written)."""

    def __init__(
        self,
        plans: Plans,
        configuration: str,
        data_dir: str | Path,
        output_dir: str | Path,
        train_cases: Sequence[str],
        val_cases: Sequence[str],
        config: TrainerConfig | None = None,
        device: str | torch.device = "cpu",
        dist_context: DistributedContext | None = None,
        fold: int | str = 0,
        stage: StageSpec | None = None,
        method: str | None = None,
        inputs_dir: str | Path | None = None,
    ):
        """``stage``: which stage of which ``method`` this is (default: the one stage of the method
        named like the trainer); ``inputs_dir`` holds ``<case>_<stage>.npy``, the outputs of the
        earlier stages this one takes, on this configuration's cache grid."""
        self.stage = stage or one_stage(self.name).with_configuration(configuration).stages[0]
        self.method_name = method or self.name
        self.inputs_dir = None if inputs_dir is None else Path(inputs_dir)
        if self.stage.inputs and self.inputs_dir is None:
            raise ValueError(f"stage {self.stage.name!r} takes {list(self.stage.inputs)} but no inputs_dir was given")
        check_option("selection_mode", self.selection_mode)
        self.plans = plans
        self.configuration: ConfigurationPlan = plans.configuration(configuration)
        self.data_dir = Path(data_dir)
        self.output_dir = Path(output_dir)
        self.train_case_ids = list(train_cases)
        self.val_case_ids = list(val_cases)
        self.config = config if config is not None else self.default_config()
        self.device = torch.device(device)
        self.dist = dist_context or DistributedContext()
        self.fold = fold
        self.patch_size = list(self.config.patch_size or self.configuration.patch_size)
        self.batch_size = int(self.config.batch_size or self.configuration.batch_size)
        self.amp_dtype = amp_dtype(self.device, self.config.amp, self.config.amp_dtype)
        self.num_workers = self._resolve_num_workers()
        # Filled by setup()
        self.network: nn.Module
        self.start_epoch = 0
        self.best_score = self._worst()
        self.best_epoch: int | None = None
        self.log_rows: list[dict[str, Any]] = []
        # ``config.time_budget_s``: the schedule fitted to the time (``time_budget.py``). The deadline
        # (``time.time()``) defaults to set-up time + budget; ``run_training`` sets it for each stage.
        self.budget_deadline: float | None = None
        self.time_budget: TimeBudget | None = None

    # ------------------------------------------------------------------ configuration
    @classmethod
    def default_config(cls) -> TrainerConfig:
        """``TrainerConfig`` with this variant's ``config_defaults`` applied."""
        return TrainerConfig().replace(**cls.config_defaults)

    def _resolve_num_workers(self) -> int:
        if self.config.num_workers is not None:
            return int(self.config.num_workers)
        cores = self._cores_per_process()
        if self.device.type == "cuda":
            return max(0, min(12, cores - 1))
        # On the CPU a worker takes a core from the intra-op threads that do the real work; with few
        # cores preparing the batch in between steps is faster (measured on 2 cores, tiny CPU plan:
        # 8.3 s per 100-iteration epoch with 0 workers and 2 threads, 13.0 s with 1 worker and 1 thread).
        return 0 if cores <= 4 else 1

    def _share_cpu_cores(self) -> None:
        """On the CPU, leave the loader workers their cores: torch's intra-op threads default to every
        core, and with workers beside them the threads wait on each other (measured on 2 cores: a
        tiny-plan iteration took several times longer than with one thread). ``OMP_NUM_THREADS`` wins."""
        if self.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or self.num_workers == 0:
            return
        cores = self._cores_per_process()
        torch.set_num_threads(max(1, cores - self.num_workers))

    def _cores_per_process(self) -> int:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))))

    # ------------------------------------------------------------------ hooks
    @property
    def in_channels(self) -> int:
        return self.image_channels + len(self.stage.channel_inputs)

    def network_spec(self) -> NetworkSpec:
        """The network as data (name, topology, channels, options): recorded in ``model.json``."""
        return NetworkSpec(self.config.network, self.configuration.network, self.in_channels, self.output.channels)

    def build_network(self) -> nn.Module:
        return self.network_spec().build()

    def strategy(self) -> StrategySpec:
        """How validation and prediction run the network over a volume: 3D windows, or 2D slices
        across the configuration's slice axis."""
        if self.configuration.ndim == 2:
            return StrategySpec("slices", axis=self.configuration.slice_axis)
        return StrategySpec("sliding_window")

    def build_loss(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define build_loss()")

    def configure_optimizer(self, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Optimizer from the config, and its schedule stepped once per iteration."""
        cfg = self.config
        kind = check_option("optimizer", cfg.optimizer)
        if kind == "adam":
            optimizer = torch.optim.Adam(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        elif kind == "adamw":
            optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                parameters, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
            )
        total_steps = cfg.epochs * cfg.iterations_per_epoch
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_schedule(cfg.schedule, total_steps))

    def make_train_loader(self, cases: list[CachedCase], seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches; a run resumed at epoch e starts at the batch the uninterrupted run would draw."""
        cfg = self.config
        return make_train_loader(
            cases,
            self.patch_size,
            self.batch_size,
            cfg.foreground_share,
            cfg.augmentation,
            seed=seed,
            rank=self.dist.rank,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            start_batch=self.start_epoch * cfg.iterations_per_epoch,
            slice_axis=self.configuration.slice_axis if self.configuration.ndim == 2 else None,
        )

    def load_case(self, case_id: str) -> CachedCase:
        """One cached case with this stage's inputs (``input_<stage>`` extras) memory-mapped, and its
        patient-level label when the trainer has a ``label_column``."""
        extras = {f"input_{source}": self.inputs_dir / f"{case_id}_{source}.npy" for source in self.stage.inputs}
        label = self.case_labels().get(case_id) if self.label_column else None
        return load_cached_case(self.data_dir, case_id, extras=extras or None, case_label=label)

    def case_labels(self) -> dict[str, int]:
        """``label_column`` of each case's clinical fields (``dataset.json`` beside the cache), as 0/1;
        cases without a value are left out (their batches carry -1)."""
        if not hasattr(self, "_case_labels"):
            path = self.data_dir.parent / "dataset.json"
            labels: dict[str, int] = {}
            for case in read_json(path)["cases"]:
                value = (case.get("clinical") or {}).get(self.label_column)
                if value in (None, ""):
                    continue
                try:
                    label = float(value)
                except ValueError:
                    label = math.nan
                if label not in (0.0, 1.0):
                    raise InputError(f"column {self.label_column!r} of clinical.csv must hold 0 or 1, got {value!r}",
                                     case["case_id"], path)
                labels[case["case_id"]] = int(label)
            if not labels:
                raise InputError(f"no case has a value in column {self.label_column!r} of clinical.csv", file=path)
            self._case_labels = labels
        return self._case_labels

    def network_input(self, image: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The image channels followed by one channel per earlier stage's output."""
        if not self.stage.channel_inputs:
            return image
        return torch.cat([image] + [batch[f"input_{source}"].to(image) for source in self.stage.channel_inputs], dim=1)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch on the device: ``input`` (what the network reads), ``target``, and the rest."""
        memory = torch.channels_last_3d if self.config.channels_last_3d else torch.contiguous_format
        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        inputs = self.network_input(moved["data"], moved)
        moved["input"] = inputs.contiguous(memory_format=memory) if inputs.ndim == 5 else inputs.contiguous()
        return moved

    def forward_train(self, batch: dict[str, Any]):
        """The training network's outputs for a prepared batch (a detector also takes the batch's targets)."""
        return self.train_network(batch["input"])

    def compute_loss(self, outputs, batch: dict[str, Any]) -> torch.Tensor:
        # Outside autocast, in float32: losses with sums over whole patches lose precision in bf16.
        return self.loss(outputs.float(), batch["target"])

    def validate_case(self, case: CachedCase) -> dict[str, Any]:
        """Metrics of one validation case (default: the autoPET DSC/FPV/FNV of the lesion mask)."""
        probabilities = self.predict_probabilities(self.case_input(case))
        mask = (self.output.lesion_probability(probabilities) > self.output.threshold).numpy().astype(np.uint8)
        return case_metrics(np.asarray(case.seg), mask, case.voxel_ml)

    def summarize_validation(self, per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The validation summary; must hold ``selection_metric`` (default: the challenge means)."""
        return aggregate(list(per_case.values()))

    # ------------------------------------------------------------------ setup
    def setup(self, continue_training: bool = False) -> None:
        self._share_cpu_cores()  # here, not in the constructor: building a trainer changes no global state
        torch.manual_seed(self.config.seed + self.dist.rank)
        np.random.seed(self.config.seed + self.dist.rank)
        random.seed(self.config.seed + self.dist.rank)
        self.network = self.build_network().to(self.device)
        if self.config.output_prior is not None:
            self.initialize_output_prior(self.config.output_prior)
        if self.config.channels_last_3d:
            self.network = self.network.to(memory_format=torch.channels_last_3d)
        self.loss = self.build_loss().to(self.device)
        self.optimizer, self.scheduler = self.configure_optimizer(self.network.parameters())
        if self.config.time_budget_s is not None:
            self._start_time_budget(self.budget_deadline or time.time() + self.config.time_budget_s)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if continue_training:
            self._resume()
        train_network: nn.Module = self.network
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_network = nn.parallel.DistributedDataParallel(self.network, device_ids=device_ids)
        if self.config.compile:
            train_network = torch.compile(train_network)
        self.train_network = train_network
        self.train_cases = [self.load_case(c) for c in self.train_case_ids]
        self.val_cases = [self.load_case(c) for c in self.val_case_ids] if self.dist.is_main else []
        # Batches are seeded by (seed, rank, batch index): a resumed run continues the same stream.
        self.train_loader = self.make_train_loader(self.train_cases, seed=self.config.seed)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "config.json", self._description())
            self.fold_record().save(self.output_dir)

    def fold_record(self) -> FoldRecord:
        """What prediction needs besides the weights (``model.json``)."""
        plans = json.loads(json.dumps(dataclasses.asdict(self.plans)))
        aug = self.config.augmentation
        return FoldRecord(
            method=self.method_name,
            stage=self.stage.name,
            trainer=self.name,
            fold=self.fold,
            configuration=self.configuration.name,
            plans=plans,
            plans_sha256=plans_hash(plans),
            network=self.network_spec(),
            output=self.output,
            strategy=self.strategy(),
            patch_size=list(self.patch_size),
            preprocessing=self._cache_signature(),
            mirror_axes=list(aug.mirror_axes) if aug.enabled else [],
            channels_last_3d=self.config.channels_last_3d,
            inputs=list(self.stage.channel_inputs),
        )

    def _cache_signature(self) -> dict[str, Any] | None:
        """The preprocessing settings the training cache was made with (from its first case)."""
        for case_id in self.train_case_ids + self.val_case_ids:
            path = self.data_dir / f"{case_id}.json"
            if path.is_file():
                return read_json(path).get("preprocessing")
        return None

    def initialize_output_prior(self, prior: float) -> None:
        """Bias of the layer that makes the logits, so that the lesion probability at the start is
        ``prior``. Softmax over K channels: log(``prior``) on every foreground channel and
        log(1 - (K - 1)·``prior``) on the background, so softmax(bias) is exactly ``prior`` per
        foreground channel (biases ±logit(``prior``) would give p²/(p² + (1 - p)²), 0.0001 for 0.01);
        sigmoid: the log-odds of ``prior`` on every channel.

        The output layer is found by running one patch through the network (eval mode, no
        gradient): the last convolution executed with ``num_classes`` output channels. Its bias
        adds directly to the logits in the networks we build (a bare convolution at the end, or
        one inside a residual unit with an identity shortcut).
        """
        executed: list[nn.Module] = []
        hooks = [
            m.register_forward_hook(lambda module, _inp, _out: executed.append(module))
            for m in self.network.modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == self.output.channels
        ]
        was_training = self.network.training
        try:
            self.network.eval()
            with torch.no_grad():
                self.network(torch.zeros([1, self.in_channels, *self.patch_size], device=self.device))
        finally:
            for h in hooks:
                h.remove()
            self.network.train(was_training)
        if not executed or executed[-1].bias is None:
            logger.warning("no output convolution with a bias found; output_prior ignored")
            return
        bias = executed[-1].bias
        with torch.no_grad():
            if self.output.activation == "softmax":
                background = 1.0 - (bias.numel() - 1) * prior
                if not background > 0:
                    raise ValueError(f"output_prior {prior} is too large for {bias.numel() - 1} foreground classes")
                bias.fill_(math.log(prior))
                bias[0] = math.log(background)
            else:
                bias.fill_(math.log(prior / (1.0 - prior)))

    def _description(self) -> dict[str, Any]:
        return {
            "trainer": self.name,
            "method": self.method_name,
            "stage": self.stage.name,
            "configuration": self.configuration.name,
            "fold": self.fold,
            "patch_size": self.patch_size,
            "batch_size_per_process": self.batch_size,
            "world_size": self.dist.world_size,
            "num_workers": self.num_workers,
            "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
            "train_cases": self.train_case_ids,
            "val_cases": self.val_case_ids,
            "config": self.config.to_dict(),
            **({"time_budget": self.time_budget.report()} if self.time_budget is not None else {}),
        }

    # ------------------------------------------------------------------ loop
    def run(self, continue_training: bool = False) -> Path:
        """Set up (resuming from ``checkpoint_latest.pt`` if asked) and train; returns the fold folder."""
        self.setup(continue_training)
        return self.fit()

    def fit(self) -> Path:
        """The epoch loop, from ``start_epoch`` (after ``setup``)."""
        cfg = self.config
        budget = self.time_budget
        if self.start_epoch >= self.planned_epochs and (self.output_dir / CHECKPOINT_FINAL).is_file():
            logger.info("%s already trained to %d epochs; nothing to do", self.output_dir, self.planned_epochs)
            return self.output_dir
        if budget is not None:
            budget.start(self.start_epoch * cfg.iterations_per_epoch)
        epoch = self.start_epoch
        while epoch < self.planned_epochs:  # a time budget may move the end while training
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            if budget is not None:
                budget.start_epoch(epoch)
            train_loss = self.train_epoch()
            due = (epoch + 1) % cfg.validation_interval == 0 or epoch == self.planned_epochs - 1
            validation = self.validate() if due and self.dist.is_main and self.val_cases else None
            bookkeeping = time.perf_counter()
            self.end_epoch(epoch, train_loss, lr, validation, time.perf_counter() - started)
            if budget is not None:
                self._record_epoch_times(validation is not None, bookkeeping - started, time.perf_counter() - bookkeeping)
            epoch += 1
        if self.dist.is_main:
            self._save_checkpoint(CHECKPOINT_FINAL, self.planned_epochs - 1)
            if self.best_epoch is None:  # never validated (fold "all" without validation cases)
                self._save_checkpoint(CHECKPOINT_BEST, self.planned_epochs - 1)
            if budget is not None:
                write_json(self.output_dir / "config.json", self._description())
                logger.info("time budget: %d iterations in %d epochs, %.0f s before the deadline",
                            budget.step, self.planned_epochs, budget.deadline - time.time() if budget.deadline else 0)
        self.dist.barrier()
        return self.output_dir

    @property
    def planned_epochs(self) -> int:
        """Epochs of this run: ``config.epochs``, or as many as the time budget plans (the last may be short)."""
        return self.config.epochs if self.time_budget is None else self.time_budget.planned_epochs

    # ------------------------------------------------------------------ time budget
    def _start_time_budget(self, deadline: float | None, state: dict | None = None) -> None:
        """Fit the schedule to the time left before ``deadline`` (``None``: the plan in ``state``)."""
        cfg = self.config
        self.time_budget = TimeBudget(deadline, cfg.time_budget_s, cfg.iterations_per_epoch,
                                      cfg.epochs * cfg.iterations_per_epoch, cfg.validation_interval,
                                      self.estimate_validation_seconds)
        if state is not None:
            self.time_budget.restore(state)
        self.time_budget.warp(self.scheduler)

    def estimate_validation_seconds(self) -> float:
        """A validation's time before one is measured: the median-sized validation case validated
        once, scaled by the voxels of all of them (0 without validation cases)."""
        cases = getattr(self, "val_cases", None)
        if not cases:
            return 0.0
        voxels = [math.prod(case.seg.shape) for case in cases]
        probe = cases[sorted(range(len(cases)), key=voxels.__getitem__)[len(cases) // 2]]
        started = time.perf_counter()
        self.network.eval()
        with torch.inference_mode():
            self.validate_case(probe)
        self.network.train()
        return (time.perf_counter() - started) * sum(voxels) / math.prod(probe.seg.shape)

    def _record_epoch_times(self, validated: bool, until_bookkeeping: float, bookkeeping: float) -> None:
        """Give the budget this epoch's validation and bookkeeping times; record the plan in config.json."""
        budget = self.time_budget
        if validated:
            budget.record_validation(until_bookkeeping - self._last_train_seconds)
        budget.record_overhead(bookkeeping)
        if self.dist.is_main:
            write_json(self.output_dir / "config.json", self._description())

    def _broadcast_from_main(self, values):
        """Rank 0's integers on every rank (the time budget's plan must be the same everywhere)."""
        if not self.dist.enabled:
            return values
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def train_epoch(self) -> float:
        started = time.perf_counter()
        self.train_network.train()
        total = torch.zeros((), device=self.device)
        steps = 0
        for _ in range(self.config.iterations_per_epoch):
            total += self.train_step(next(self.train_loader))
            steps += 1
            if self.time_budget is not None and self.time_budget.after_step(self._broadcast_from_main):
                break  # the planned steps are done: this is the last epoch
        if self.dist.enabled:
            dist.all_reduce(total)
            total /= self.dist.world_size
            self._sync_buffers()
        self._last_train_seconds = time.perf_counter() - started
        return float(total) / steps

    def _sync_buffers(self) -> None:
        """Average the float buffers (batch-norm running statistics) over the ranks.

        DDP keeps the parameters equal, but each rank's last forward updates its own running
        statistics; averaging at the end of the epoch gives every rank (and the checkpoint) the
        same, better-estimated statistics.
        """
        for buffer in self.network.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.dist.world_size
            else:
                dist.broadcast(buffer, src=0)

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        batch = self.prepare_batch(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            outputs = self.forward_train(batch)
        loss = self.compute_loss(outputs, batch)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), self.config.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            # fp16: the scaler skips the optimizer step on overflowing gradients by design; the
            # schedule still advances per iteration, which torch would warn about.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        else:
            self.scheduler.step()
        return loss.detach()

    # ------------------------------------------------------------------ validation
    def case_input(self, case: CachedCase) -> torch.Tensor:
        return case_volume(case, self.stage.channel_inputs)

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (channels, z, y, x) of one preprocessed volume, by the stage's strategy."""
        return run_strategy(
            self.strategy(),
            [self.network],
            image,
            self.patch_size,
            output=self.output,
            device=self.device,
            amp_dtype=self.amp_dtype,
            batch_size=self.config.validation_batch_size,
            overlap=self.config.validation_overlap,
            channels_last_3d=self.config.channels_last_3d,
            divisor=self.configuration.network.total_stride,
        )["probabilities"]

    def validate(self) -> dict[str, Any]:
        """``validate_case`` of every validation case; ``summary`` from ``summarize_validation``."""
        self.network.eval()
        with torch.inference_mode():
            per_case = {case.case_id: self.validate_case(case) for case in self.val_cases}
        self.network.train()
        return {"summary": self.summarize_validation(per_case), "cases": per_case}

    def _worst(self) -> float:
        return -math.inf if self.selection_mode == "max" else math.inf

    def _better(self, score: float, than: float) -> bool:
        return score > than if self.selection_mode == "max" else score < than

    # ------------------------------------------------------------------ bookkeeping
    def end_epoch(self, epoch: int, train_loss: float, lr: float, validation: dict | None, seconds: float) -> None:
        if self.dist.is_main:
            summary = validation["summary"] if validation else {}
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": lr,
                "val_mean_dsc": summary.get("mean_dsc"),
                "val_mean_fpv_ml": summary.get("mean_fpv_ml"),
                "val_mean_fnv_ml": summary.get("mean_fnv_ml"),
                "epoch_seconds": seconds,
            }
            self.log_rows.append(row)
            logger.info(
                "epoch %d: loss %.4f, lr %.2e, val DSC %s (%.1f s)", epoch, train_loss, lr, summary.get("mean_dsc"), seconds
            )
            if validation is not None:
                value = summary.get(self.selection_metric)
                undefined = value is None or math.isnan(value)
                score = self._worst() if undefined else value
                # Strict: ties keep the earlier epoch. Without lesion-positive validation cases the
                # DSC is undefined in every epoch and there is nothing to choose by: keep the latest.
                if (self.best_epoch is None or self._better(score, self.best_score)
                        or (undefined and self.best_score == self._worst())):
                    self.best_score, self.best_epoch = score, epoch
                    self._save_checkpoint(CHECKPOINT_BEST, epoch)
                    self._write_validation(epoch, validation)
            write_training_log(self.output_dir / "training_log.csv", self.log_rows)
            plot_progress(self.output_dir / "progress.png", self.log_rows)
            self._save_checkpoint(CHECKPOINT_LATEST, epoch)
        self.dist.barrier()

    def _write_validation(self, epoch: int, validation: dict) -> None:
        write_json(
            self.output_dir / "validation.json",
            nan_to_none(
                {
                    "trainer": self.name,
                    "stage": self.stage.name,
                    "fold": self.fold,
                    "epoch": epoch,
                    "selection_metric": self.selection_metric,
                    **validation["summary"],
                    "cases": validation["cases"],
                }
            ),
        )

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "trainer": self.name,
            "epoch": epoch,  # last finished epoch
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "log": list(self.log_rows),
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "patch_size": self.patch_size,
            "configuration": self.configuration.name,
            **({"time_budget": self.time_budget.state()} if self.time_budget is not None else {}),
        }

    def _save_checkpoint(self, filename: str, epoch: int) -> None:
        save_checkpoint(self.output_dir / filename, self.checkpoint_state(epoch))

    def _load_resume_state(self, latest: Path) -> dict[str, Any]:
        """The state to resume from: ``latest``, or, when it is unreadable (a truncated file: a full
        disk, a copy cut short), the best checkpoint, which holds the same state at an earlier epoch;
        a warning says so. Neither readable: an ``InputError`` naming both."""
        try:
            return load_checkpoint(latest, map_location=self.device)
        except InputError as error:
            fallback = self.output_dir / CHECKPOINT_BEST
            try:
                state = load_checkpoint(fallback, map_location=self.device)
            except InputError:
                raise InputError(f"cannot resume: {CHECKPOINT_LATEST} is unreadable ({error.reason}) and there is no "
                                 f"readable {CHECKPOINT_BEST} to fall back to; train this fold again without "
                                 "--continue", file=latest) from None
            logger.warning("%s is unreadable (%s); resuming from %s, epoch %s, instead", latest, error.reason,
                           CHECKPOINT_BEST, state.get("epoch"))
            return state

    def _resume(self) -> None:
        path = self.output_dir / CHECKPOINT_LATEST
        if not path.is_file():
            logger.warning("no %s in %s; training from scratch", CHECKPOINT_LATEST, self.output_dir)
            return
        state = self._load_resume_state(path)
        saved = state.get("config", {})
        for key in ("epochs", "iterations_per_epoch", "learning_rate", "schedule"):
            if key in saved and saved[key] != getattr(self.config, key):
                # The schedule is a function of the step and the new total: it continues from the saved
                # step on the new curve (e.g. more epochs raise the cosine's learning rate again).
                logger.warning("resuming with %s = %s (checkpoint: %s)", key, getattr(self.config, key), saved[key])
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("time_budget") is not None:
            if self.time_budget is None:  # a budget run continued without one: to its planned end
                self._start_time_budget(None, state["time_budget"])
            else:
                self.time_budget.restore(state["time_budget"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            # The optimizer comes back with the last learning rate of the saved run; take the next one
            # from this run's schedule (the same value unless epochs or iterations changed).
            step = self.scheduler.last_epoch
            lrs = [base * factor(step) for base, factor in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self.scheduler._last_lr = lrs
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():
            # A checkpoint without fp16 (fp32/bf16 training) has no scale to continue from.
            logger.warning("checkpoint has no GradScaler state; fp16 loss scaling starts afresh")
        self.best_score = state["best_score"] if "best_score" in state else state["best_dsc"]
        self.best_epoch = state["best_epoch"]
        self.log_rows = [r for r in state["log"] if r["epoch"] <= state["epoch"]]
        self.start_epoch = state["epoch"] + 1
        restore_rng_state(state["rng"])
        logger.info("resuming at epoch %d (best %s %.4f at epoch %s)", self.start_epoch, self.selection_metric,
                    self.best_score, self.best_epoch)


def lr_factor_schedule(kind: str, total_steps: int):
    """Multiplier of the base learning rate after ``step`` optimizer steps (per-iteration schedule)."""
    total = max(int(total_steps), 1)

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def poly(step: int) -> float:
        return (1.0 - min(step, total) / total) ** 0.9

    def constant(step: int) -> float:
        return 1.0

    return {"cosine": cosine, "poly": poly, "constant": constant}[check_option("schedule", kind)]

