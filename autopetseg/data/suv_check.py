"""Is this PET in SUV (body weight)? Plausibility from several statistics of the body's voxels.

A PET in the wrong units passes every other check and gives wrong clinical numbers (TMTV, TLG,
SUVmax) with exit code 0: kBq/ml (×5 for a typical body), an integer volume whose rescale slope
was lost (×60, ×100), Bq/ml (×5000), a negated image. ``check_suv`` measures the body (the voxels
whose CT is tissue, ``loading.BODY_HU``; all voxels when the CT shows no tissue) and compares:

================== ======== ================================================================
statistic          limit    where the limit comes from
================== ======== ================================================================
share of negative  <= 0.10  OSEM reconstructions are non-negative; FBP and unconstrained
body voxels                 reconstructions dip below 0 in cold, noisy regions, but tissue
                            has activity: a body with > 10 % of its voxels below 0 is a
                            negated (or CT-like) image. Real FDG here (mirp_sts, 3 cases and
                            the whole 267-slice series): 0 %.
body median SUV    >= 0.05  the lowest-uptake tissues that fill the body are fat and muscle,
                            SUV ~0.2-0.4 in FDG, ~0.1-0.5 in PSMA PET; 0.05 is a quarter of
                            the lowest, and catches SUV/1000 (weight in kg for g, kBq/ml for Bq/ml).
body median SUV    <= 2.0   most of the body is fat and muscle: FDG fat SUV 0.2-0.4, muscle
                            0.5-1.0 (up to ~1.2 where SUVbw overestimates, in obese patients);
                            the liver, the largest organ with high uptake, has a mean SUV of
                            2-3 (the PERCIST reference range), and the median body voxel lies
                            below it; 2.0 leaves a margin of ~2 over muscle. Measured: 0.60 on
                            the whole MIRP FDG series, 0.38-0.50 on its crops, 0.46-0.51 on the
                            two ACRIN FLT slices, 0.56-0.85 on the synthetic phantoms. A PET ×5
                            (kBq/ml-like) has a body median of 2.8-4.2 (phantoms), 3.0 (the
                            whole MIRP series); of the MIRP tumour crops 1.9-2.5.
99th percentile    <= 40    the top 1 % of the body is brain (FDG SUV 6-12, ~2 % of the body),
of the body                 heart, kidneys, bladder, liver (PSMA SUV 4-8); a very large tumour
                            burden (lesions SUV 10-30) stays below 40. Measured: 3.5 (MIRP),
                            2.5-3.2 (FLT), 6-12 (phantoms).
SUVmax             <= 150   FDG/PSMA lesions rarely exceed SUV 100; physiological bladder and
                            kidneys reach 50-100. Measured: 66.5 (the MIRP series: bladder),
                            25.4 (its crops), 57 (phantoms). ×5 of a bladder at 40 is 200.
================== ======== ================================================================

No single statistic catches every scale error: SUVbw varies about two-fold between patients
(body habitus), so a PET ×2 cannot be told from intensities alone. Together they catch ×5 and
more for whole-body FDG (×4 already with a body median of 0.6) and for typical PSMA scans (by their
SUVmax); ``SuvCheck.limits`` can be moved for an unusual tracer.

Out of range is an ``InputError`` naming the case, the PET file and every statistic out of
range. The override: ``--suv-check warn|off`` on ``plan_and_preprocess`` and ``predict``, or the
environment variable ``AUTOPETSEG_SUV_CHECK`` (also read by worker processes), or
``with suv_check_mode("off"):`` around a call in Python. An all-zero or constant PET, or a volume
one voxel thick along an axis, is logged as a warning (nothing to segment; a 3D network sees no
context), never an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from autopetseg.errors import InputError

log = logging.getLogger(__name__)

SUV_CHECK_ENV = "AUTOPETSEG_SUV_CHECK"
SUV_CHECK_MODES = ("error", "warn", "off")
OVERRIDE_HINT = f"if the tracer is unusual, pass --suv-check warn or off (or set {SUV_CHECK_ENV})"


@dataclass(frozen=True)
class SuvLimits:
    """Plausible range of each body statistic of a PET in SUV (sources: module docstring)."""

    max_negative_share: float = 0.10
    min_body_median: float = 0.05
    max_body_median: float = 2.0
    max_body_p99: float = 40.0
    max_suvmax: float = 150.0
    bq_per_ml_median: float = 100.0  # a body median above this is Bq/ml (SUV × ~5000 for 70 kg, 350 MBq)


@dataclass(frozen=True)
class SuvCheck:
    """What ``check_suv`` does with a statistic out of range: ``error`` (default), ``warn`` or ``off``."""

    mode: str = "error"
    limits: SuvLimits = field(default_factory=SuvLimits)

    def __post_init__(self):
        if self.mode not in SUV_CHECK_MODES:
            raise InputError(f"unknown SUV check mode {self.mode!r}; choose one of {', '.join(SUV_CHECK_MODES)}")

    @classmethod
    def from_environment(cls) -> "SuvCheck":
        """The mode set by ``AUTOPETSEG_SUV_CHECK`` (``error`` when unset)."""
        return cls(mode=os.environ.get(SUV_CHECK_ENV, "").strip().lower() or "error")


@contextlib.contextmanager
def suv_check_mode(mode: str | None) -> Iterator[None]:
    """Run the block with ``mode`` as the SUV check of this process and of the worker processes it
    starts (they inherit the environment). ``None`` leaves the current setting."""
    if mode is None:
        yield
        return
    SuvCheck(mode=mode)  # refuse an unknown mode before anything runs
    before = os.environ.get(SUV_CHECK_ENV)
    os.environ[SUV_CHECK_ENV] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SUV_CHECK_ENV, None)
        else:
            os.environ[SUV_CHECK_ENV] = before


@dataclass(frozen=True)
class BodyStatistics:
    """SUV statistics of one PET's body voxels (and its maximum over the whole image)."""

    n_voxels: int
    negative_share: float
    median: float
    p99: float
    suv_max: float

    @classmethod
    def of(cls, body_values: np.ndarray, pet: np.ndarray, suv_max: float | None = None) -> "BodyStatistics":
        """``body_values``: the PET's body voxels (all of ``pet`` when empty); ``suv_max``: ``pet.max()``
        when the caller has it."""
        values = np.asarray(body_values, dtype=np.float32).reshape(-1)
        if values.size == 0:
            values = np.asarray(pet, dtype=np.float32).reshape(-1)
        median, p99 = np.quantile(values, [0.5, 0.99]) if values.size else (0.0, 0.0)
        if suv_max is None:
            suv_max = float(pet.max()) if pet.size else 0.0
        return cls(
            n_voxels=int(values.size),
            negative_share=float(np.count_nonzero(values < 0)) / max(values.size, 1),
            median=float(median),
            p99=float(p99),
            suv_max=float(suv_max),
        )


def _problems(stats: BodyStatistics, limits: SuvLimits) -> list[str]:
    """One phrase per statistic out of range, naming it, its value and the limit."""
    found = []
    if stats.negative_share > limits.max_negative_share:
        found.append(f"{100 * stats.negative_share:.0f}% of the body voxels are negative (at most "
                     f"{100 * limits.max_negative_share:.0f}% in a PET in SUV; is the image negated?)")
    if stats.median > limits.bq_per_ml_median:
        found.append(f"PET body median is {stats.median:.0f}, which looks like Bq/ml rather than SUV")
    elif stats.median > limits.max_body_median:
        found.append(f"body median SUV {stats.median:.2f} is above {limits.max_body_median:g} (fat and muscle, most "
                     f"of the body, lie at 0.2-1.0; a scaled image: kBq/ml, a lost rescale slope?)")
    elif stats.median < limits.min_body_median and stats.negative_share <= limits.max_negative_share:
        found.append(f"body median SUV {stats.median:.3g} is below {limits.min_body_median:g} (SUV divided by "
                     f"1000: the weight in kg where grams were expected, or the activity in kBq/ml?)")
    if stats.p99 > limits.max_body_p99:
        found.append(f"99th percentile of the body {stats.p99:.1f} is above {limits.max_body_p99:g}")
    if stats.suv_max > limits.max_suvmax:
        found.append(f"SUVmax {stats.suv_max:.1f} is above {limits.max_suvmax:g}")
    return found


def shape_warnings(shape: tuple[int, ...], low: float, high: float) -> list[str]:
    """Things that are allowed but that the user should know: a one-slice volume, a constant PET
    (``low``, ``high``: its minimum and maximum)."""
    notes = []
    thin = [axis for axis, n in zip("zyx", shape) if n == 1]
    if thin:
        notes.append(f"the PET is one voxel thick along {', '.join(thin)} (shape {tuple(shape)}): "
                     "3D networks see no context across it")
    if low == high:
        notes.append(f"the PET is constant ({high:g} everywhere): there is nothing to segment")
    return notes


def check_suv(pet: np.ndarray, body_values: np.ndarray, case: str | None, file: str | Path | None,
              check: SuvCheck | None = None) -> BodyStatistics | None:
    """Check that ``pet`` is in SUV from its body voxels ``body_values`` (module docstring).

    Raises ``InputError`` naming the case, the file and each statistic out of range (mode
    ``error``), logs it (``warn``) or does nothing (``off``). Returns the statistics measured
    (``None`` when off). A constant PET or a one-voxel-thick volume is a warning only.
    """
    check = check or SuvCheck.from_environment()
    low, high = (float(pet.min()), float(pet.max())) if pet.size else (0.0, 0.0)
    for note in shape_warnings(pet.shape, low, high):
        log.warning("%s", InputError(note, case, file))
    if check.mode == "off":
        return None
    stats = BodyStatistics.of(body_values, pet, high)
    if low == high:
        return stats  # constant (all zero): warned above; no unit can be told
    problems = _problems(stats, check.limits)
    if not problems:
        return stats
    reason = "PET does not look like SUV (body weight): " + "; ".join(problems) + f"; {OVERRIDE_HINT}"
    if check.mode == "error":
        raise InputError(reason, case, file)
    log.warning("%s", InputError(reason, case, file))
    return stats
