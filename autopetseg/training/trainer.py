"""The one training loop every method shares; variants override small hooks (``variants.py``).

``Trainer.run()`` is the whole story:

    setup (network, loss, optimizer + schedule, AMP, DDP, data loader, resume)
    for epoch in start .. epochs-1:
        train ``iterations_per_epoch`` steps on random patches
        every ``validation_interval`` epochs (and after the last): sliding-window validation of
            the whole validation volumes, autoPET DSC/FPV/FNV (rank 0 only)
        log row, progress plot, checkpoint_latest (and checkpoint_best on a new best mean DSC)
    checkpoint_final, validation.json of the best checkpoint

Hooks a variant may override: ``build_network``, ``build_loss``, ``configure_optimizer``,
``make_train_loader``, ``prepare_batch``, ``compute_loss``, ``output_to_mask``; class attributes
``name``, ``config_defaults`` (the variant's hyper-parameters) and ``inference_activation``.

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

Files in the fold folder: ``config.json``, ``checkpoint_latest.pt`` (every epoch),
``checkpoint_best.pt`` (highest mean validation DSC; ties keep the earlier epoch),
``checkpoint_final.pt``, ``validation.json``, ``training_log.csv``, ``progress.png``. All written
atomically, by rank 0 only.
"""

from __future__ import annotations

import contextlib
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

from autopetseg.scoring.metrics import aggregate, case_metrics
from autopetseg.models.sliding_window import sliding_window_predict
from autopetseg.io_utils import atomic_path, nan_to_none, write_json
from autopetseg.planning.plans import ConfigurationPlan, Plans
from autopetseg.training.config import TrainerConfig
from autopetseg.training.data_loader import CachedCase, make_train_loader
from autopetseg.training.progress import plot_progress, write_training_log

logger = logging.getLogger(__name__)

CHECKPOINT_LATEST = "checkpoint_latest.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CHECKPOINT_FINAL = "checkpoint_final.pt"


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


class Trainer:
    """Owns data, optimizer, schedule, AMP, checkpoints, validation and DDP for one fold."""

    name = "base"
    config_defaults: dict[str, Any] = {}
    inference_activation = "softmax"  # how validation turns logits into probabilities
    in_channels = 2  # PET, CT
    num_classes = 2  # background, lesion

    @classmethod
    def output_prior_is_safe(cls, loss_settings: dict[str, Any] | None = None) -> bool:
        """Whether starting from ``output_prior`` can train with this variant's loss (see L1DFLTrainer)."""
        return True

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
    ):
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
        self.amp_dtype = self._resolve_amp_dtype()
        self.num_workers = self._resolve_num_workers()
        self._share_cpu_cores()
        # Filled by setup()
        self.network: nn.Module
        self.start_epoch = 0
        self.best_dsc = -math.inf
        self.best_epoch: int | None = None
        self.log_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ configuration
    @classmethod
    def default_config(cls) -> TrainerConfig:
        """``TrainerConfig`` with this variant's ``config_defaults`` applied."""
        return TrainerConfig().replace(**cls.config_defaults)

    def _resolve_amp_dtype(self) -> torch.dtype | None:
        use = self.config.amp if self.config.amp is not None else self.device.type == "cuda"
        if not use:
            return None
        if self.config.amp_dtype == "fp16":
            return torch.float16
        if self.config.amp_dtype == "bf16" or self.device.type != "cuda":
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

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
    def build_network(self) -> nn.Module:
        from autopetseg.models.networks import build_network

        return build_network(self.config.network, self.configuration.network, self.in_channels, self.num_classes)

    def build_loss(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define build_loss()")

    def configure_optimizer(self, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Optimizer from the config, and its schedule stepped once per iteration."""
        cfg = self.config
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
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
        )

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, target) on the device."""
        memory = torch.channels_last_3d if self.config.channels_last_3d else torch.contiguous_format
        inputs = batch["data"].to(self.device, non_blocking=True).contiguous(memory_format=memory)
        target = batch["target"].to(self.device, non_blocking=True)
        return inputs, target

    def compute_loss(self, outputs, target: torch.Tensor) -> torch.Tensor:
        # Outside autocast, in float32: losses with sums over whole patches lose precision in bf16.
        return self.loss(outputs.float(), target)

    def output_to_mask(self, probabilities: torch.Tensor) -> np.ndarray:
        """Lesion mask (z, y, x) uint8 from class probabilities (n_classes, z, y, x)."""
        return (probabilities.argmax(0) > 0).to(torch.uint8).cpu().numpy()

    # ------------------------------------------------------------------ setup
    def setup(self, continue_training: bool = False) -> None:
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
        from autopetseg.training.data_loader import load_cached_case

        self.train_cases = [load_cached_case(self.data_dir, c) for c in self.train_case_ids]
        self.val_cases = [load_cached_case(self.data_dir, c) for c in self.val_case_ids] if self.dist.is_main else []
        # Batches are seeded by (seed, rank, batch index): a resumed run continues the same stream.
        self.train_loader = self.make_train_loader(self.train_cases, seed=self.config.seed)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "config.json", self._description())

    def initialize_output_prior(self, prior: float) -> None:
        """Bias of the layer that makes the logits: log-odds of 1 - ``prior`` (class 0), of ``prior`` (others).

        The output layer is found by running one patch through the network (eval mode, no
        gradient): the last convolution executed with ``num_classes`` output channels. Its bias
        adds directly to the logits in the networks we build (a bare convolution at the end, or
        one inside a residual unit with an identity shortcut).
        """
        executed: list[nn.Module] = []
        hooks = [
            m.register_forward_hook(lambda module, _inp, _out: executed.append(module))
            for m in self.network.modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == self.num_classes
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
        log_odds = math.log(prior / (1.0 - prior))
        with torch.no_grad():
            executed[-1].bias.fill_(log_odds)
            executed[-1].bias[0] = -log_odds

    def _description(self) -> dict[str, Any]:
        return {
            "trainer": self.name,
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
        }

    # ------------------------------------------------------------------ loop
    def run(self, continue_training: bool = False) -> Path:
        """Set up (resuming from ``checkpoint_latest.pt`` if asked) and train; returns the fold folder."""
        self.setup(continue_training)
        return self.fit()

    def fit(self) -> Path:
        """The epoch loop, from ``start_epoch`` (after ``setup``)."""
        cfg = self.config
        if self.start_epoch >= cfg.epochs:
            logger.info("fold already trained to %d epochs; nothing to do", cfg.epochs)
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch()
            due = (epoch + 1) % cfg.validation_interval == 0 or epoch == cfg.epochs - 1
            validation = self.validate() if due and self.dist.is_main and self.val_cases else None
            self.end_epoch(epoch, train_loss, lr, validation, time.perf_counter() - started)
        if self.dist.is_main:
            self._save_checkpoint(CHECKPOINT_FINAL, cfg.epochs - 1)
            if self.best_epoch is None:  # never validated (fold "all" without validation cases)
                self._save_checkpoint(CHECKPOINT_BEST, cfg.epochs - 1)
        self.dist.barrier()
        return self.output_dir

    def train_epoch(self) -> float:
        self.train_network.train()
        total = torch.zeros((), device=self.device)
        for _ in range(self.config.iterations_per_epoch):
            total += self.train_step(next(self.train_loader))
        if self.dist.enabled:
            dist.all_reduce(total)
            total /= self.dist.world_size
            self._sync_buffers()
        return float(total) / self.config.iterations_per_epoch

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

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, target = self.prepare_batch(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.train_network(inputs)
        loss = self.compute_loss(outputs, target)
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

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ validation
    def predict_probabilities(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Sliding-window class probabilities (n_classes, z, y, x) of one preprocessed volume."""
        return sliding_window_predict(
            self.network,
            torch.from_numpy(np.array(image, dtype=np.float32)) if isinstance(image, np.ndarray) else image,
            self.patch_size,
            batch_size=self.config.validation_batch_size,
            overlap=self.config.validation_overlap,
            device=self.device,
            amp=self.amp_dtype is not None,
            amp_dtype=self.amp_dtype,
            activation=self.inference_activation,
            channels_last_3d=self.config.channels_last_3d,
        )

    def validate(self) -> dict[str, Any]:
        """autoPET metrics of every validation case; ``summary`` holds the challenge means."""
        self.network.eval()
        per_case = {}
        with torch.inference_mode():
            for case in self.val_cases:
                mask = self.output_to_mask(self.predict_probabilities(case.image))
                per_case[case.case_id] = case_metrics(np.asarray(case.seg), mask, case.voxel_ml)
        self.network.train()
        return {"summary": aggregate(list(per_case.values())), "cases": per_case}

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
                dsc = summary["mean_dsc"]
                undefined = dsc is None or math.isnan(dsc)
                score = -math.inf if undefined else dsc
                # Strict: ties keep the earlier epoch. Without lesion-positive validation cases the
                # DSC is undefined in every epoch and there is nothing to choose by: keep the latest.
                if self.best_epoch is None or score > self.best_dsc or (undefined and self.best_dsc == -math.inf):
                    self.best_dsc, self.best_epoch = score, epoch
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
                    "fold": self.fold,
                    "epoch": epoch,
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
            "best_dsc": self.best_dsc,
            "best_epoch": self.best_epoch,
            "log": list(self.log_rows),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": self.config.to_dict(),
            "patch_size": self.patch_size,
            "configuration": self.configuration.name,
        }

    def _save_checkpoint(self, filename: str, epoch: int) -> None:
        with atomic_path(self.output_dir / filename, ".pt") as tmp:
            torch.save(self.checkpoint_state(epoch), tmp)

    def _resume(self) -> None:
        path = self.output_dir / CHECKPOINT_LATEST
        if not path.is_file():
            logger.warning("no %s in %s; training from scratch", CHECKPOINT_LATEST, self.output_dir)
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state.get("config", {})
        for key in ("epochs", "iterations_per_epoch", "learning_rate", "schedule"):
            if key in saved and saved[key] != getattr(self.config, key):
                # The schedule is a function of the step and the new total: it continues from the saved
                # step on the new curve (e.g. more epochs raise the cosine's learning rate again).
                logger.warning("resuming with %s = %s (checkpoint: %s)", key, getattr(self.config, key), saved[key])
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
        self.best_dsc = state["best_dsc"]
        self.best_epoch = state["best_epoch"]
        self.log_rows = [r for r in state["log"] if r["epoch"] <= state["epoch"]]
        self.start_epoch = state["epoch"] + 1
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        logger.info("resuming at epoch %d (best mean DSC %.4f at epoch %s)", self.start_epoch, self.best_dsc, self.best_epoch)


def lr_factor_schedule(kind: str, total_steps: int):
    """Multiplier of the base learning rate after ``step`` optimizer steps (per-iteration schedule)."""
    total = max(int(total_steps), 1)

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def poly(step: int) -> float:
        return (1.0 - min(step, total) / total) ** 0.9

    def constant(step: int) -> float:
        return 1.0

    return {"cosine": cosine, "poly": poly, "constant": constant}[kind]

