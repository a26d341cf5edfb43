"""``train --time-budget``: a schedule whose length fits the wall-clock time the run may take.

The budget is a deadline. ``TimeBudget`` decides how many optimizer steps the stage takes and
keeps the learning-rate decay spanning exactly those steps:

1. The first ``warmup_iterations`` are not timed (allocation, first batches, lazy set-up); the
   next ``first_measure_iterations`` (or as many as ``check_seconds`` allow, if fewer) give the
   first throughput, and the first plan is made.
2. A plan is the largest number of steps N, at most the configured ``epochs x
   iterations_per_epoch``, such that the remaining steps x seconds per step, plus the
   validations still due, plus the bookkeeping of each epoch left (checkpoint, log, plot) and the
   final checkpoint, end ``margin`` before the deadline. Epochs keep their configured length;
   only the last one may be shorter.
3. The plan is made again about every ``check_seconds`` of training, from a running mean of the
   recent throughput and the measured time of each validation (the slower of its running mean and
   the last one) and each epoch's bookkeeping, so a machine that slows down or speeds up moves the
   end of training, not past the deadline.
4. The configured schedule (cosine, poly, per-epoch poly, constant) is a function of the
   progress p = step / configured length. With a budget, p runs piecewise linearly from its
   value now to 1 at the planned last step: when the plan changes the learning rate stays
   continuous, and it reaches the schedule's end (0 for the cosine) at the last step.

Until the first validation has been timed, its time is estimated once, at the first plan, by
validating one case (the median-sized) and scaling by the voxels of all of them
(``Trainer.estimate_validation_seconds``): when the budget is shorter than an epoch the only
validation comes after the decision to stop, and a guess would waste or overrun the end. Under
DDP rank 0 plans (it
validates and holds the times) and broadcasts the plan and the step of the next check, so every
rank takes the same number of steps. The state (plan, progress anchor, measured times) is part of
the checkpoint: ``--continue`` carries on the same decay, re-planned for a new budget if one is
given, to the planned end otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

Sync = Callable[[Sequence[int]], Sequence[int]]  # rank 0's values on every rank (identity without DDP)


@dataclass(frozen=True)
class BudgetSettings:
    """How a time budget is measured and kept."""

    warmup_iterations: int = 2  # not timed: the first steps pay for allocation and the first batches
    first_measure_iterations: int = 5  # timed before the first plan
    check_seconds: float = 5.0  # plan again after about this much training
    smoothing: float = 0.5  # weight of the newest measurement in each running mean
    margin_share: float = 0.03  # end this share of the budget early (process exit, timing noise)
    margin_min_s: float = 2.0
    default_overhead_s: float = 1.0  # bookkeeping per epoch until it is measured (checkpoint, log, plot)


class TimeBudget:
    """The plan of one stage's training under a deadline (module doc). ``deadline=None``: a fixed
    plan restored from a checkpoint (a budget run continued without a budget)."""

    def __init__(self, deadline: float | None, budget_s: float | None, iterations_per_epoch: int, max_steps: int,
                 validation_interval: int, validation_estimate: Callable[[], float],
                 settings: BudgetSettings = BudgetSettings(), clock: Callable[[], float] = time.time):
        self.deadline = deadline
        self.budget_s = budget_s
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.max_steps = int(max_steps)
        self.validation_interval = int(validation_interval)
        self.validation_estimate = validation_estimate
        self.settings = settings
        self.clock = clock
        self.planned: int | None = None  # None: the configured length (no plan made yet)
        self.anchor_step, self.anchor_progress = 0, 0.0
        self.step = 0
        self.epoch = 0
        self.seconds_per_step: float | None = None
        self.validation_s: float | None = None
        self.validation_guess_s: float | None = None  # ``validation_estimate()`` until one is measured
        self.overhead_s: float | None = None
        self.replans = 0
        self.next_check: int | None = None
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._timed_from = 0
        self._window: tuple[float, int] | None = None  # (time, step) the current timing window began
        self._last_step: tuple[float, int] | None = None  # (time, step) of the last step
        self._carried = (0.0, 0)  # (seconds, steps) timed in earlier epochs since the last measurement

    # ------------------------------------------------------------------ the plan
    @property
    def total_steps(self) -> int:
        return self.max_steps if self.planned is None else self.planned

    @property
    def planned_epochs(self) -> int:
        return max(1, math.ceil(self.total_steps / self.iterations_per_epoch))

    @property
    def margin_s(self) -> float:
        return max(self.settings.margin_min_s, self.settings.margin_share * (self.budget_s or 0.0))

    def progress(self, step: float) -> float:
        """Share of the schedule done after ``step`` steps (module doc, 4)."""
        if self.planned is None:
            return min(max(step / self.max_steps, 0.0), 1.0)
        if self.planned <= self.anchor_step:
            return 1.0
        share = (step - self.anchor_step) / (self.planned - self.anchor_step)
        return min(max(self.anchor_progress + (1.0 - self.anchor_progress) * share, 0.0), 1.0)

    def warp(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        """Make ``scheduler``'s factors functions of the progress instead of the step."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(f"a time budget needs a per-iteration LambdaLR schedule, got {type(scheduler).__name__}")
        length = self.max_steps

        def warped(factor):
            return lambda step: factor(self.progress(step) * length)  # a function: not saved in state_dict()

        scheduler.lr_lambdas = [warped(f) for f in scheduler.lr_lambdas]
        self._scheduler = scheduler

    def _refresh_learning_rate(self) -> None:
        """The next step's learning rate from the new plan (the scheduler computed it from the old one)."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def cost(self, steps: int) -> float:
        """Seconds from now until training would end after ``steps`` steps in all."""
        per_step = self.seconds_per_step or 0.0
        last_epoch = max(self.epoch, math.ceil(steps / self.iterations_per_epoch) - 1)
        epochs_left = last_epoch - self.epoch + 1
        k = self.validation_interval
        validations = (last_epoch + 1) // k - self.epoch // k + (1 if (last_epoch + 1) % k else 0)
        validation = self.validation_s if self.validation_s is not None else (self.validation_guess_s or 0.0)
        overhead = self.overhead_s if self.overhead_s is not None else self.settings.default_overhead_s
        return (steps - self.step) * per_step + validations * validation + (epochs_left + 1) * overhead

    def plan(self, now: float) -> int:
        """The most steps that end before the deadline (at least the steps taken; at most the configured)."""
        left = self.deadline - now - self.margin_s
        lo, hi = self.step, self.max_steps
        if self.cost(lo) > left:
            return lo
        while lo < hi:  # cost grows with the steps: the largest affordable by bisection
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cost(mid) <= left else (lo, mid - 1)
        return lo

    def _set_plan(self, steps: int) -> None:
        steps = min(max(int(steps), self.step), self.max_steps)
        if steps != self.planned:
            self.anchor_step, self.anchor_progress = self.step, self.progress(self.step)
            first = self.planned is None
            self.planned = steps
            self.replans += 1
            self._refresh_learning_rate()
            (logger.info if first else logger.debug)(
                "time budget: %.3f s per iteration, validation %.1f s: %d iterations in all (%d epochs), %s",
                self.seconds_per_step or 0.0, self.validation_s if self.validation_s is not None
                else (self.validation_guess_s or 0.0), steps, self.planned_epochs,
                f"to end by {datetime.fromtimestamp(self.deadline).strftime('%H:%M:%S')}" if self.deadline else "fixed")

    # ------------------------------------------------------------------ the run
    def start(self, step: int) -> None:
        """Training (re)starts after ``step`` steps."""
        self.step = int(step)
        self._timed_from = self.step + self.settings.warmup_iterations
        self._window, self._last_step, self._carried = None, None, (0.0, 0)
        if self.deadline is not None:
            self.next_check = self._timed_from + 1

    def start_epoch(self, epoch: int) -> None:
        """Time between epochs (validation, bookkeeping) is not training: the window so far is carried
        over up to the last step, and a new one begins."""
        self.epoch = int(epoch)
        window, last = self._window, self._last_step
        if window is not None and last is not None and last[1] > window[1]:
            self._carried = (self._carried[0] + last[0] - window[0], self._carried[1] + last[1] - window[1])
        self._window = (self.clock(), self.step) if self.step >= self._timed_from else None

    def after_step(self, sync: Sync = lambda values: values) -> bool:
        """Count one step, plan again when due; True when the planned steps are done."""
        self.step += 1
        if self.deadline is not None:
            now = self.clock()
            self._last_step = (now, self.step)
            if self.step == self._timed_from:
                self._window = (now, self.step)
            if self.next_check is not None and self.step >= self.next_check:
                self._check(now, sync)
        return self.step >= self.total_steps

    def _check(self, now: float, sync: Sync) -> None:
        planned, next_check = -1, self.step + 1  # -1: no plan yet (the first window is still being timed)
        window = self._window
        if window is not None and self.step > window[1]:
            first = self.seconds_per_step is None
            seconds, timed = self._carried[0] + now - window[0], self._carried[1] + self.step - window[1]
            if not first or timed >= self.settings.first_measure_iterations or seconds >= self.settings.check_seconds:
                self.seconds_per_step = self._mean(self.seconds_per_step, seconds / timed)
                if self.validation_s is None and self.validation_guess_s is None:
                    self.validation_guess_s = float(self.validation_estimate())  # takes time: not training
                    now = self.clock()
                self._window, self._carried = (now, self.step), (0.0, 0)
                planned = self.plan(now)
                next_check = self.step + max(1, int(self.settings.check_seconds / max(self.seconds_per_step, 1e-6)))
        planned, next_check = (int(v) for v in sync([planned, next_check]))
        if planned >= 0:
            self._set_plan(planned)
        self.next_check = next_check

    def record_validation(self, seconds: float) -> None:
        # The slower of the running mean and the last one: the last validation is one block of time
        # at the very end, where a misjudged one cannot be made up for.
        self.validation_s = max(self._mean(self.validation_s, seconds), float(seconds))

    def record_overhead(self, seconds: float) -> None:
        self.overhead_s = self._mean(self.overhead_s, seconds)

    def _mean(self, old: float | None, new: float) -> float:
        a = self.settings.smoothing
        return float(new) if old is None else (1.0 - a) * old + a * float(new)

    # ------------------------------------------------------------------ records
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numbers)."""
        return {"planned": self.planned, "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress,
                "seconds_per_step": self.seconds_per_step, "validation_s": self.validation_s,
                "overhead_s": self.overhead_s, "replans": self.replans, "budget_s": self.budget_s}

    def restore(self, state: dict[str, Any]) -> None:
        self.planned = None if state.get("planned") is None else int(state["planned"])
        self.anchor_step, self.anchor_progress = int(state["anchor_step"]), float(state["anchor_progress"])
        self.seconds_per_step, self.validation_s = state.get("seconds_per_step"), state.get("validation_s")
        self.overhead_s, self.replans = state.get("overhead_s"), int(state.get("replans", 0))
        if self.budget_s is None:
            self.budget_s = state.get("budget_s")

    def report(self) -> dict[str, Any]:
        """The ``time_budget`` section of ``config.json``."""
        now = self.clock()
        return {
            "budget_s": self.budget_s,
            "deadline": None if self.deadline is None else datetime.fromtimestamp(self.deadline).isoformat(timespec="seconds"),
            "seconds_left_at_report": None if self.deadline is None else round(self.deadline - now, 1),
            "achieved_iterations": self.step,
            "planned_iterations": self.total_steps,
            "configured_iterations": self.max_steps,
            "iterations_per_epoch": self.iterations_per_epoch,
            "epochs": self.planned_epochs,
            "seconds_per_iteration": self.seconds_per_step,
            "validation_seconds": self.validation_s,
            "epoch_overhead_seconds": self.overhead_s,
            "margin_s": self.margin_s,
            "replans": self.replans,
            "settings": asdict(self.settings),
        }
