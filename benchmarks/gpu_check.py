#!/usr/bin/env python
"""One prepared GPU check (issue #16): training and inference speed and memory on one GPU, beside nnU-Net.

    python benchmarks/gpu_check.py --out DIR [--quick] [--dry-run] [--budget S] [--sections a,b,c,d]

One process, one GPU, about 7.5 minutes (``--budget``, default 450 s; ``--quick`` 300 s). It
synthesises its own autoPET-sized phantoms (PET 400x400 at 2.04x2.04x3 mm plus CT on its own
finer grid; ``autopetseg.data.synthetic``, preset ``wholebody``) in a scratch folder (``--work``,
default a temporary folder, removed afterwards), plans them for the GPU with the package's
default budget (``--gpu-memory``, 8 GB like ``plan_and_preprocess``), preprocesses them, and
writes ``DIR/gpu_check.json`` (after every row, so a killed run leaves what it had) and a table.

Sections (in the JSON under their letters; run in the order data, a, b, d, c):

* **(e) environment**: torch, CUDA, cuDNN and driver versions, GPU name(s) and memory, CPU cores,
  nnunetv2's version, the repository's commit.
* **data**: the phantoms, the plans (patch, batch, planned memory per configuration), the
  inference case (one phantom cut to 326 slices, autoPET's typical length).
* **(a) training throughput**: every method of ``METHODS`` (each stage of a multi-stage method,
  its earlier stages' outputs faked from the labels), each with its trainer's default network
  and, for ``l1dfl``, also SegResNet (``EXTRA_NETWORKS``): the trainer built by
  ``prepare_trainer`` on the GPU plan, AMP bf16, ``torch.compile`` off and then on; after a
  warm-up, at least 30 timed ``train_step`` iterations on batches from the real data loader.
  Iterations/s, compute and data-wait seconds per iteration, peak memory (allocated; and the
  device memory used, i.e. the allocator's peak reservation plus what CUDA, cuDNN and cuBLAS hold
  outside it) against the plan's ``estimated_gpu_memory_gb``. Beside them nnU-Net v2's default
  network (PlainConvUNet from its planner's topology for the same patch and spacing, its loss,
  SGD, fp16 + GradScaler as nnU-Net trains, cudnn.benchmark on as nnU-Net sets it) at the same
  patch and batch, timed by the same loop (on a fixed batch: compare with our compute time), with
  and without compile; and nnU-Net's own trainer when (c)'s nnU-Net model is trained. A method
  whose trainer cannot be built is a skipped row with the reason.
* **(b) data loading**: per method, the loader plus the host-to-device copy with the network
  replaced by a no-op: iterations/s against the best training rate of (a).
* **(c) inference**: fold 0 of ``gdfl`` trained for a few iterations, copied to folds 1-4 (the
  ensemble is timed, its accuracy means nothing); the case predicted with the 5-fold ensemble
  through the ``Predictor``'s pieces (``load``, ``predict_loaded``, ``write_case``): read,
  preprocess, network, back onto the PET grid, write; TTA off, ``--tta``, and TTA off again
  (warm). Then ``nnUNetv2_predict`` on 1 fold with its defaults (nnU-Net's own plan, preprocess
  and a short training first), when it fits the time (not with ``--quick``).
* **(d) DDP**: with 2 or more GPUs, 2 processes under ``torchrun`` against 1 process.

Robustness: every row runs guarded: an exception becomes the row's error (JSON and table) and the
script goes on. Each section has a deadline (a share of the budget); a row that would not fit the
time left is skipped, saying so. A row still running past the budget plus 60 s is interrupted.
Exit code: 0 when every row ran, or was skipped by design (``--quick``, one GPU, nnunetv2 not
installed, the dry run's reduced set); 1 when a row failed; 2 when none failed but some were
skipped for time or could not be built.

``--dry-run``: the same code path on the CPU at tiny sizes (tiny phantoms planned with the GPU
planner for a tiny network, float32 because bf16 autocast is 5-10 times slower on a CPU, 3 timed
iterations, 2 folds, a 20-slice case, compile only for the first method and with the ``eager``
backend, DDP with gloo on the CPU); about a minute on 2 cores; ``tests/test_gpu_check.py`` runs it.

When a GPU is lent: ``pip install -e ".[bench]"``, then this script with ``--quick`` (5 minutes)
or without (7.5); ``--sections c --budget 420`` gives (c) the time for ``nnUNetv2_predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks' helpers

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import CONFIGURATION, nnunet_train_only, sync, timed_loop  # noqa: E402
from predict_vs_nnunet import crop_case_slices, nnunet_trainer_name, run_untimed  # noqa: E402
from preprocess_vs_nnunet import convert_for_nnunet, make_phantoms, measure  # noqa: E402

GB = 1024**3
DATASET = "Dataset987_GPUCheck"
NNUNET_ID = 986
NNUNET_DATASET = f"Dataset{NNUNET_ID:03d}_GPUCheckNN"
INFERENCE_METHOD = "gdfl"
# Networks timed besides a method's default (the L1DFL paper trains both of its networks).
EXTRA_NETWORKS = {"l1dfl": ("segresnet",)}
NOT_INSTALLED = 'nnunetv2 not installed (pip install -e ".[bench]")'
INFERENCE_GOAL_S = 15.0
MEMORY_TOLERANCE = 0.15
GRACE_S = 60.0  # a row still running this long after the budget is interrupted
SECTION_TITLES = {
    "e": "(e) environment",
    "data": "data",
    "a": "(a) training throughput",
    "b": "(b) data loading (network replaced by a no-op)",
    "c": "(c) inference, one autoPET-sized case",
    "d": "(d) DDP",
}
# Cumulative share of the budget by which each section should be done, in the order they run.
SECTION_DEADLINES = {"data": 0.18, "a": 0.64, "b": 0.69, "d": 0.72, "c": 1.0}


@dataclass(frozen=True)
class Profile:
    """Sizes and counts of one kind of run."""

    name: str
    budget_s: float
    preset: str
    n_cases: int  # the last one validates fold 0
    pet_spacing_zyx: tuple[float, float, float] | None
    case_slices: int | None  # the inference case cut to this many PET slices (None: as synthesised)
    warmup: int
    iterations: int
    model_iterations: int  # training iterations of the inference model's fold 0
    folds: int
    compile_estimate_s: float  # first guess of a compiled row's warm-up
    compile_all: bool  # compiled rows for every method (else only the first)
    compile_backend: str | None  # None: torch's default (inductor)
    nnunet_pipeline: bool  # nnU-Net's plan, preprocess, trainer and nnUNetv2_predict in (c)
    nnunet_pipeline_s: float
    nnunet_iterations: int
    s_per_iteration_guess: float
    setup_s_guess: float
    max_processes: int  # for synthesising and preprocessing
    amp: dict = field(default_factory=lambda: {"amp": True, "amp_dtype": "bf16"})  # TrainerConfig fields
    planner: dict = field(default_factory=dict)  # PlannerSettings overrides


GPU = Profile(name="gpu", budget_s=450.0, preset="wholebody", n_cases=4, pet_spacing_zyx=(3.0, 2.04, 2.04),
              case_slices=326, warmup=5, iterations=30, model_iterations=5, folds=5, compile_estimate_s=90.0,
              compile_all=True, compile_backend=None, nnunet_pipeline=True, nnunet_pipeline_s=300.0,
              nnunet_iterations=20, s_per_iteration_guess=0.5, setup_s_guess=10.0, max_processes=16)
QUICK = replace(GPU, name="quick", budget_s=300.0, compile_all=False, nnunet_pipeline=False)
DRY_RUN = replace(GPU, name="dry-run", budget_s=900.0, preset="tiny", n_cases=3, pet_spacing_zyx=None, case_slices=None,
                  warmup=1, iterations=3, model_iterations=2, folds=2, compile_estimate_s=20.0, compile_all=False,
                  compile_backend="eager", nnunet_pipeline=False, s_per_iteration_guess=0.2, setup_s_guess=2.0,
                  max_processes=1,  # a process pool costs more than it saves on tiny phantoms
                  amp={"amp": False},  # bf16 autocast on the CPU is 5-10 times slower than float32
                  # 4 stages with feature maps down to 2 voxels: a total stride of 8 (as deep as the
                  # stages of some methods go) on the small tiny-phantom patch
                  planner={"base_features": 4, "max_features": 16, "max_stages_3d": 4, "min_feature_map_size": 2,
                           "max_patch_voxels_3d": 16**3, "max_batch_size_3d": 2})


# =========================================================================== bookkeeping
class Skip(Exception):
    """A row not run. ``kind``: "n/a" (by design), "time" (would not fit), "unbuildable"."""

    def __init__(self, reason: str, kind: str = "n/a"):
        super().__init__(reason)
        self.kind = kind


class OverBudget(Exception):
    pass


def _on_alarm(_signum, _frame):
    raise OverBudget(f"interrupted: still running {GRACE_S:.0f} s after the time budget")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class Report:
    """The JSON (rewritten after every row) and the clock with the sections' deadlines."""

    def __init__(self, out: Path, profile: Profile, budget_s: float, settings: dict):
        self.path = out / "gpu_check.json"
        self.profile = profile
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.deadlines: dict[str, float] = {}
        self.data: dict[str, Any] = {"format": 1, "profile": profile.name, "budget_s": budget_s, "settings": settings,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": {}}
        signal.signal(signal.SIGALRM, _on_alarm)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def set_deadlines(self, runs: dict[str, bool]) -> None:
        """Absolute deadlines; the share of a section that does not run goes to the next one that does."""
        for key, cumulative in SECTION_DEADLINES.items():
            if runs.get(key, False):
                self.deadlines[key] = self.start + cumulative * self.budget_s
        if self.deadlines:  # the last section that runs may use the whole budget
            self.deadlines[list(self.deadlines)[-1]] = self.start + self.budget_s

    def left(self, section: str) -> float:
        return self.deadlines.get(section, self.start + self.budget_s) - time.perf_counter()

    def section(self, key: str) -> dict:
        return self.data["sections"].setdefault(key, {"title": SECTION_TITLES[key], "rows": [], "notes": []})

    def note(self, key: str, text: str) -> None:
        self.section(key)["notes"].append(text)
        self.save()

    def skip_section(self, key: str, reason: str, kind: str = "n/a") -> None:
        row = {"name": "(whole section)", "status": "skipped", "skip": kind, "reason": reason}
        self.section(key)["rows"].append(row)
        self.save()

    def row(self, key: str, name: str, fn: Callable[[], dict | None], needs_s: float = 0.0,
            skip: str | None = None) -> dict:
        """Run one row guarded: its numbers, or its error, or why it was skipped, go into the JSON."""
        row: dict[str, Any] = {"name": name}
        left = self.left(key)
        started = time.perf_counter()
        if skip:
            row.update(status="skipped", skip="n/a", reason=skip)
        elif left < needs_s:
            row.update(status="skipped", skip="time",
                       reason=f"would not fit the time budget (needs about {needs_s:.0f} s, {max(left, 0):.0f} s left)")
        else:
            print(f"[{key}] {name} ...", flush=True)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, self.start + self.budget_s + GRACE_S - time.perf_counter()))
            try:
                row.update(fn() or {})
                row["status"] = "ok"
            except Skip as exc:
                row.update(status="skipped", skip=exc.kind, reason=str(exc))
            except (Exception, SystemExit, OverBudget) as exc:  # noqa: B902 - every failure becomes the row's error
                text = str(exc).strip().splitlines()
                row.update(status="error", error=f"{type(exc).__name__}: {text[-1] if text else ''}"[:500],
                           traceback=traceback.format_exc()[-4000:])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                release_memory()
            row["seconds"] = time.perf_counter() - started
        self.section(key)["rows"].append(row)
        print(f"[{key}] {name}: {_status_text(row)}", flush=True)
        self.save()
        return row

    def rows(self, key: str) -> list[dict]:
        return self.section(key)["rows"]

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def exit_code(self) -> int:
        rows = [r for s in self.data["sections"].values() for r in s["rows"]]
        if any(r["status"] == "error" for r in rows):
            return 1
        return 2 if any(r["status"] == "skipped" and r.get("skip") != "n/a" for r in rows) else 0


def release_memory() -> None:
    """Between rows: compiled graphs, the last row's tensors and the allocator's cache let go."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Context:
    """What the sections share."""

    args: argparse.Namespace
    profile: Profile
    report: Report
    device: torch.device
    work: Path
    raw_dir: Path | None = None
    dataset_dir: Path | None = None
    case_dir: Path | None = None
    inference_model: Path | None = None
    nnunet_installed: str | None = None  # version

    @property
    def dry(self) -> bool:
        return self.profile.name == "dry-run"

    @property
    def preprocessed_root(self) -> Path:
        return self.work / "preprocessed"

    def cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def need(self, *names: str):
        """The first of these attributes, or a ``Skip`` naming those an earlier row failed to make."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise Skip(f"no {', '.join(missing)} (an earlier row did not make it)", "unbuildable")
        return getattr(self, names[0])

    def processes(self) -> int:
        """Processes for data preparation: one per case, at most one per core."""
        return max(1, min(self.profile.n_cases, self.cores(), self.profile.max_processes))


def _status_text(row: dict) -> str:
    if row["status"] == "error":
        return f"ERROR {row['error']}"
    if row["status"] == "skipped":
        return f"skipped ({row['skip']}): {row['reason']}"
    return f"ok ({row.get('seconds', 0):.1f} s)"


# =========================================================================== (e) environment
def environment(ctx: Context) -> dict:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_cores": ctx.cores(),
        "device": str(ctx.device),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "nnunetv2": ctx.nnunet_installed or "not installed",
        "profile": ctx.profile.name,
    }
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
        info["working_tree_changed"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                                           capture_output=True, text=True, timeout=10).stdout.strip())
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu_name=props.name, gpu_memory_gb=props.total_memory / GB,
                    compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["driver"] = None
    else:
        info.update(gpu_name="none (CPU)", driver=None)
    return info


# =========================================================================== data
def _planner_settings(profile: Profile):
    from autopetseg.planning.planner import PlannerSettings

    return PlannerSettings(**profile.planner) if profile.planner else None


def _configurations() -> tuple[str, ...]:
    """The configurations the methods' stages use that this planner can plan (3d_fullres first)."""
    from autopetseg.models.methods import METHODS
    from autopetseg.planning.planner import KNOWN_CONFIGURATIONS

    used = {s.configuration for m in METHODS.values() for s in m.stages}
    return tuple(c for c in KNOWN_CONFIGURATIONS if c in used or c == CONFIGURATION)


def synthesize(ctx: Context) -> dict:
    ctx.raw_dir = ctx.work / "raw" / DATASET
    p = ctx.profile
    spacing = p.pet_spacing_zyx or _preset_spacing(p.preset)
    make_phantoms(ctx.raw_dir, p.n_cases, p.preset, spacing, ctx.args.seed, ctx.processes())
    return {"cases": p.n_cases, "preset": p.preset, "pet_spacing_zyx": list(spacing)}


def _preset_spacing(preset: str) -> tuple:
    from autopetseg.data.synthetic import PRESETS

    return tuple(PRESETS[preset].pet_spacing_zyx)


def plan_and_preprocess_row(ctx: Context) -> dict:
    from autopetseg.io_utils import read_json, write_json
    from autopetseg.pipeline import plan_and_preprocess
    from autopetseg.planning.plans import ComputeBudget

    ctx.need("raw_dir")
    budget = ComputeBudget("cuda", gpu_memory_gb=ctx.args.gpu_memory)
    result = plan_and_preprocess(ctx.raw_dir, _configurations(), budget, num_processes=ctx.processes(),
                                 preprocessed_root=ctx.preprocessed_root, planner_settings=_planner_settings(ctx.profile))
    if result.failures:
        raise RuntimeError(f"preprocessing failed: {[str(f) for f in result.failures]}")
    ctx.dataset_dir = result.output_dir
    # Our own splits: fold 0 validates on the last case (the library's 5-fold splits need 5 patients).
    cases = [c["case_id"] for c in read_json(ctx.dataset_dir / "dataset.json")["cases"]]
    write_json(ctx.dataset_dir / "splits.json", [{"train": cases[:-1], "val": cases[-1:]}])
    plans = {}
    for name, conf in result.plans.configurations.items():
        plans[name] = {"spacing_zyx": conf.spacing_zyx, "patch_size": conf.patch_size, "batch_size": conf.batch_size,
                       "features": conf.network.features_per_stage,
                       "planned_gb": conf.notes.get("estimated_gpu_memory_gb")}
    return {"budget_gpu_memory_gb": ctx.args.gpu_memory, "plans": plans}


def inference_case(ctx: Context) -> dict:
    """One phantom in its own folder (nnU-Net layout), cut to ``case_slices`` PET slices if asked."""
    import SimpleITK as sitk

    ctx.need("raw_dir")
    meta = json.loads((ctx.raw_dir / "dataset.json").read_text())
    label = sorted((ctx.raw_dir / "labelsTr").glob("*.nii.gz"))[0]
    case = label.name[: -len(".nii.gz")]
    single = ctx.work / "raw" / "inference_case_full"
    shutil.rmtree(single, ignore_errors=True)
    (single / "imagesTr").mkdir(parents=True)
    (single / "labelsTr").mkdir()
    (single / "labelsTr" / label.name).symlink_to(label)
    for image in (ctx.raw_dir / "imagesTr").glob(f"{case}_*.nii.gz"):
        (single / "imagesTr" / image.name).symlink_to(image)
    (single / "dataset.json").write_text(json.dumps({**meta, "numTraining": 1, "name": single.name}))
    if ctx.profile.case_slices:
        ctx.case_dir = ctx.work / "raw" / f"inference_case_{ctx.profile.case_slices}"
        crop_case_slices(single, ctx.case_dir, ctx.profile.case_slices)
    else:
        ctx.case_dir = single
    pet_key = [k for k, v in meta["channel_names"].items() if str(v).lower() != "ct"][0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ctx.case_dir / "imagesTr" / f"{case}_{int(pet_key):04d}.nii.gz"))
    reader.ReadImageInformation()
    return {"case": case, "pet_size_xyz": list(reader.GetSize()),
            "pet_spacing_xyz": [round(s, 3) for s in reader.GetSpacing()]}


# =========================================================================== (a) training
@dataclass(frozen=True)
class Variant:
    method: str
    stage: str
    network: str
    default_network: bool
    multi_stage: bool

    @property
    def label(self) -> str:
        return self.method + (f"/{self.stage}" if self.multi_stage else "") + f" ({self.network})"


def variants() -> list[Variant]:
    """Every stage of every method in ``METHODS`` with its default network, plus ``EXTRA_NETWORKS``."""
    from autopetseg.models.methods import METHODS
    from autopetseg.training.variants import get_trainer_class

    found = []
    for name, spec in METHODS.items():
        for stage in spec.stages:
            try:
                default = get_trainer_class(stage.trainer).default_config().network
            except Exception as exc:  # listed anyway: its rows say why they cannot run
                default = f"? ({type(exc).__name__})"
            found.append(Variant(name, stage.name, default, True, len(spec.stages) > 1))
            if len(spec.stages) == 1:
                extra = [n for n in EXTRA_NETWORKS.get(name, ()) if n != default]
                found += [Variant(name, stage.name, n, False, False) for n in extra]
    return found


def make_trainer(ctx: Context, variant: Variant, iterations: int, **overrides):
    """The trainer of ``variant`` on fold 0 of the GPU plan (a ``Skip`` if it cannot be built)."""
    from autopetseg.models.methods import METHODS
    from autopetseg.training.run import prepare_trainer

    ctx.need("dataset_dir")
    spec = METHODS[variant.method]
    try:
        trainer = prepare_trainer(
            ctx.dataset_dir, 0, spec, None, ctx.preprocessed_root, ctx.work / "results", str(ctx.device),
            stage=variant.stage, epochs=1, iterations_per_epoch=iterations,
            network=None if variant.default_network else variant.network, **ctx.profile.amp, **overrides)
    except Exception as exc:
        raise Skip(f"cannot be built: {type(exc).__name__}: {exc}", "unbuildable") from exc
    if trainer.stage.inputs:
        fake_stage_inputs(trainer)
    return trainer


def fake_stage_inputs(trainer) -> None:
    """Stand-ins for the earlier stages' outputs a later stage reads: its labels as float16 probabilities."""
    from autopetseg.training.data_loader import load_cached_case

    trainer.inputs_dir.mkdir(parents=True, exist_ok=True)
    for case_id in trainer.train_case_ids + trainer.val_case_ids:
        seg = np.asarray(load_cached_case(trainer.data_dir, case_id).seg)
        for source in trainer.stage.inputs:
            np.save(trainer.inputs_dir / f"{case_id}_{source}.npy", (seg == 1).astype(np.float16))


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """``torch.compile`` with ``backend`` for the code inside (the dry run: "eager", no code generation)."""
    if backend is None:
        yield
        return
    real = torch.compile

    def compile_with_backend(model=None, **kwargs):
        return real(model, **{**kwargs, "backend": backend})

    torch.compile = compile_with_backend
    try:
        yield
    finally:
        torch.compile = real


def close_trainer(trainer) -> None:
    """Stop the loader's worker processes now (the library has no close(); the iterator's is private)."""
    shutdown = getattr(getattr(trainer, "train_loader", None), "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def memory_numbers(ctx: Context, planned_gb: float | None, timing: dict) -> dict:
    """Peak memory against the plan. CUDA "used": the allocator's peak reservation plus what is held
    outside it now (CUDA context, cuDNN/cuBLAS workspaces), which is what the planner's model covers."""
    out: dict[str, Any] = {"planned_gb": planned_gb, "peak_gb": timing["peak_memory_mb"] / 1024}
    if ctx.device.type != "cuda":
        out["memory_note"] = "CPU: peak RSS, not comparable with the planned GPU memory"
        return out
    free, total = torch.cuda.mem_get_info(ctx.device)
    outside = (total - free) - torch.cuda.memory_reserved(ctx.device)
    used = torch.cuda.max_memory_reserved(ctx.device) + outside
    out.update(peak_reserved_gb=torch.cuda.max_memory_reserved(ctx.device) / GB, outside_allocator_gb=outside / GB,
               used_gb=used / GB)
    if planned_gb:
        out["planned_over_used"] = planned_gb / (used / GB)
        out["planned_within_15_percent"] = abs(out["planned_over_used"] - 1) <= MEMORY_TOLERANCE
    return out


class Estimates:
    """Running guesses of how long rows take, from the rows so far."""

    def __init__(self, profile: Profile):
        self.s_per_iteration = profile.s_per_iteration_guess
        self.compile_s = profile.compile_estimate_s
        self.setup_s = profile.setup_s_guess
        self.iterations = profile.warmup + profile.iterations
        self.measured: dict[bool, list[float]] = {False: [], True: []}

    def training(self, compiled: bool) -> float:
        return self.setup_s + self.iterations * self.s_per_iteration + (self.compile_s if compiled else 0.0)

    def learn(self, row: dict) -> None:
        """The slowest eager iteration and the longest compiled warm-up seen replace the first guesses."""
        if row.get("status") != "ok" or "s_per_iteration" not in row:
            return
        compiled = bool(row.get("compile"))
        self.measured[compiled].append(row["warmup_s"] if compiled else row["s_per_iteration"])
        if compiled:
            self.compile_s = max(self.measured[True])
        else:
            self.s_per_iteration = max(self.measured[False])


def train_row(ctx: Context, variant: Variant, compiled: bool) -> dict:
    from autopetseg.models.networks import count_parameters

    p = ctx.profile
    trainer = make_trainer(ctx, variant, p.warmup + p.iterations, compile=compiled)
    try:
        with compile_backend(p.compile_backend if compiled else None):
            trainer.setup()
        trainer.train_network.train()
        timing = timed_loop(trainer.train_step, ctx.device, p.iterations, p.warmup,
                            fetch=lambda: next(trainer.train_loader))
        return {
            "method": variant.method, "stage": variant.stage, "network": trainer.config.network, "compile": compiled,
            "compile_backend": (p.compile_backend or "inductor") if compiled else None,
            "amp_dtype": str(trainer.amp_dtype).removeprefix("torch."), "configuration": trainer.configuration.name,
            "patch_size": list(trainer.patch_size), "batch_size": trainer.batch_size, "workers": trainer.num_workers,
            "parameters": count_parameters(trainer.network), **timing,
            **memory_numbers(ctx, trainer.configuration.notes.get("estimated_gpu_memory_gb"), timing),
        }
    finally:
        close_trainer(trainer)


def nnunet_row(ctx: Context, compiled: bool) -> dict:
    """nnU-Net's default network at the GPU plan's 3d_fullres patch and batch, by the same loop."""
    from train_throughput import nnunet_train_step

    from autopetseg.planning.plans import Plans

    if not ctx.nnunet_installed:
        raise Skip(NOT_INSTALLED)
    ctx.need("dataset_dir")
    conf = Plans.load(ctx.dataset_dir / "plans.json").configuration(CONFIGURATION)
    p = ctx.profile
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer sets it
    try:
        with compile_backend(p.compile_backend if compiled else None):
            step, info = nnunet_train_step(conf.patch_size, conf.batch_size, conf.spacing_zyx, ctx.device, compiled)
            timing = timed_loop(lambda _: step(), ctx.device, p.iterations, p.warmup)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return {"method": "nnU-Net", "network": "PlainConvUNet", "compile": compiled,
            "compile_backend": (p.compile_backend or "inductor") if compiled else None, "workers": None,
            "data_note": "fixed batch on the device: compare with our compute s/it", **info, **timing,
            **memory_numbers(ctx, None, timing)}  # the plan's memory model is of our network, not this one


def training_section(ctx: Context) -> None:
    r, p = ctx.report, ctx.profile
    est = Estimates(p)
    found = variants()
    amp = f"AMP {p.amp.get('amp_dtype')}" if p.amp.get("amp") else "float32 (no AMP)"
    benchmark = "on" if ctx.args.cudnn_benchmark else "off (the library default)"
    r.note("a", f"{amp} (nnU-Net: fp16 + GradScaler on CUDA, its default); {p.warmup} warm-up + {p.iterations} timed "
                f"iterations per row; cudnn.benchmark {benchmark} for our rows")
    if ctx.device.type != "cuda":
        r.note("a", "CPU dry run: the numbers only show that the code path works")

    def ours(variant: Variant, compiled: bool) -> None:
        label = f"{variant.label}, {'compiled' if compiled else 'eager'}"
        row = r.row("a", label, lambda: train_row(ctx, variant, compiled), est.training(compiled))
        est.learn(row)

    def theirs(compiled: bool) -> None:
        label = f"nnU-Net PlainConvUNet, {'compiled' if compiled else 'eager'}"
        row = r.row("a", label, lambda: nnunet_row(ctx, compiled), est.training(compiled))
        est.learn(row)

    # The comparison the goals judge first (the default method, nnU-Net; eager and compiled), then the
    # other stages and networks, those with a network not timed yet before those that differ by the loss only.
    first = next((v for v in found if v.method == INFERENCE_METHOD and v.default_network), found[0])
    seen = {first.network}
    rest = []
    for new_network in (True, False):
        for v in found:
            if v != first and v not in rest and (v.network not in seen) == new_network:
                rest.append(v)
                seen.add(v.network)
    ours(first, False)
    theirs(False)
    ours(first, True)
    theirs(True)
    for variant in rest:
        ours(variant, False)
    for variant in rest:
        if p.compile_all:
            ours(variant, True)
        else:
            r.row("a", f"{variant.label}, compiled", lambda: None,
                  skip=f"{p.name}: compiled only for {first.label} (and nnU-Net)")


# =========================================================================== (b) data loading
def loading_row(ctx: Context, variant: Variant) -> dict:
    p = ctx.profile
    trainer = make_trainer(ctx, variant, p.warmup + p.iterations)
    try:
        trainer.setup()

        def no_network(batch) -> torch.Tensor:
            return trainer.prepare_batch(batch)["input"].reshape(-1)[0]

        timing = timed_loop(no_network, ctx.device, p.iterations, p.warmup, fetch=lambda: next(trainer.train_loader))
    finally:
        close_trainer(trainer)
    trained = [row["iterations_per_s"] for row in ctx.report.rows("a")
               if row["status"] == "ok" and row.get("method") == variant.method and row.get("stage") == variant.stage]
    best = max(trained) if trained else None
    return {"method": variant.method, "stage": variant.stage, "workers": trainer.num_workers, "cpu_cores": ctx.cores(),
            "patch_size": list(trainer.patch_size), "batch_size": trainer.batch_size,
            "iterations_per_s": timing["iterations_per_s"], "s_per_iteration": timing["s_per_iteration"],
            "best_training_iterations_per_s": best,
            "loader_over_training": timing["iterations_per_s"] / best if best else None,
            "keeps_up": timing["iterations_per_s"] >= best if best else None}


def loading_section(ctx: Context) -> None:
    seen = set()
    for variant in variants():
        if (variant.method, variant.stage) in seen:  # the loader does not depend on the network
            continue
        seen.add((variant.method, variant.stage))
        ctx.report.row("b", f"{variant.method}" + (f"/{variant.stage}" if variant.multi_stage else ""),
                       lambda v=variant: loading_row(ctx, v), ctx.profile.setup_s_guess + 5)


# =========================================================================== (c) inference
def train_inference_model(ctx: Context) -> dict:
    from autopetseg.models.methods import METHODS
    from autopetseg.training.run import model_dir, run_training

    ctx.need("dataset_dir", "case_dir")
    results = ctx.work / "results_inference"
    run_training(ctx.dataset_dir, 0, INFERENCE_METHOD, None, ctx.preprocessed_root, results, str(ctx.device),
                 epochs=1, iterations_per_epoch=ctx.profile.model_iterations, **ctx.profile.amp)
    folder = model_dir(results, ctx.dataset_dir.name, METHODS[INFERENCE_METHOD])
    for k in range(1, ctx.profile.folds):  # copies of fold 0 make the ensemble as wide as a real one
        shutil.rmtree(folder / f"fold_{k}", ignore_errors=True)
        shutil.copytree(folder / "fold_0", folder / f"fold_{k}")
    ctx.inference_model = folder
    return {"method": INFERENCE_METHOD, "iterations": ctx.profile.model_iterations, "folds": ctx.profile.folds,
            "note": f"folds 1..{ctx.profile.folds - 1} are copies of fold 0 (the ensemble is timed, "
                    f"its accuracy means nothing)"}


class _Stopwatch:
    """Seconds spent inside wrapped callables, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed


def predict_row(ctx: Context, tta: bool, tag: str) -> dict:
    """The case through the Predictor's pieces, each timed: NIfTI in to NIfTI out."""
    import autopetseg.inference.predictor as predictor_module
    from autopetseg.data.discovery import discover
    from autopetseg.inference.predictor import Predictor, PredictorSettings

    model = ctx.need("inference_model")
    folds = list(range(ctx.profile.folds))
    t0 = time.perf_counter()
    predictor = Predictor(model, PredictorSettings(folds=folds, device=str(ctx.device), tta=tta))
    load_model_s = time.perf_counter() - t0
    record = discover(ctx.case_dir).cases[0]
    watch = _Stopwatch()
    out = ctx.work / f"predictions_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with mock.patch.object(predictor_module, "load_case", watch.wrap("read", predictor_module.load_case)):
        case, prepared = predictor.load(record)
    t1 = time.perf_counter()
    predictor.predict_stage = watch.wrap("network", predictor.predict_stage)
    prediction = predictor.predict_loaded(case, prepared)
    sync(ctx.device)
    t2 = time.perf_counter()
    predictor.write_case(prediction, out, record)
    t3 = time.perf_counter()
    wall = t3 - t0
    windows = prediction.windows
    result = {
        "folds": len(folds), "tta": tta, "wall_s": wall, "load_model_s": load_model_s,
        "read_s": watch.seconds["read"], "preprocess_s": (t1 - t0) - watch.seconds["read"],
        "network_s": watch.seconds["network"], "to_pet_grid_s": (t2 - t1) - watch.seconds["network"],
        "write_s": t3 - t2, "export_s": (t2 - t1) - watch.seconds["network"] + (t3 - t2),
        "windows": windows.n_windows, "windows_run": windows.n_windows - windows.n_skipped,
        "lesion_voxels": int(prediction.mask.sum()),
    }
    result["total_s"] = wall + load_model_s  # what `autopetseg predict` adds besides starting Python and CUDA
    if not tta:
        result["goal_s"] = INFERENCE_GOAL_S
        result["goal_met"] = result["total_s"] <= INFERENCE_GOAL_S if ctx.device.type == "cuda" else None
    return result


def nnunet_predict_row(ctx: Context) -> dict:
    """nnU-Net's own plan, preprocessing and a short training (not timed), then ``nnUNetv2_predict`` (timed)."""
    ctx.need("raw_dir", "case_dir")
    work = ctx.work / "nnunet"
    nn_raw, nn_pre, nn_res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    logs = work / "logs"
    for folder in (nn_raw, nn_pre, nn_res, logs):
        folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=str(nn_raw), nnUNet_preprocessed=str(nn_pre), nnUNet_results=str(nn_res))
    processes = str(max(1, min(8, ctx.cores())))
    started = time.perf_counter()
    convert_for_nnunet(ctx.raw_dir, nn_raw / NNUNET_DATASET, int(processes))
    run_untimed("nnUNetv2_plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", str(NNUNET_ID), "-c",
                                                 CONFIGURATION, "-np", processes, "-npfp", processes], env,
                logs / "plan.log")
    # Its 5-fold split needs 5 cases: fold 0 validates on the last case, as ours does.
    cases = sorted(f.name[: -len(".nii.gz")] for f in (nn_raw / NNUNET_DATASET / "labelsTr").glob("*.nii.gz"))
    (nn_pre / NNUNET_DATASET / "splits_final.json").write_text(json.dumps([{"train": cases[:-1], "val": cases[-1:]}]))
    trainer = nnunet_trainer_name(1)
    iterations = ctx.profile.nnunet_iterations
    run_untimed(f"nnU-Net {trainer}, {iterations} iterations",
                [sys.executable, str(Path(__file__).resolve()), "--nnunet-train-only", str(NNUNET_ID), trainer,
                 str(iterations), str(ctx.device.type)], env, logs / "train.log")
    own_trainer(ctx, logs / "train.log", iterations)
    case = work / "case"
    convert_for_nnunet(ctx.case_dir, case, 1)
    preparation_s = time.perf_counter() - started
    pred = work / "predictions"
    m = measure("nnUNetv2_predict", ["nnUNetv2_predict", "-i", str(case / "imagesTr"), "-o", str(pred), "-d",
                                     str(NNUNET_ID), "-c", CONFIGURATION, "-f", "0", "-tr", trainer, "-device",
                                     ctx.device.type], env, logs / "predict.log", 0.5)
    if m.returncode != 0:
        raise RuntimeError(f"nnUNetv2_predict exited {m.returncode}; see {m.log_file}")
    return {"folds": 1, "tta": True, "wall_s": m.wall_s, "peak_tree_rss_gb": m.peak_tree_rss_gb,
            "preparation_s": preparation_s,
            "note": "nnU-Net defaults (mirroring TTA on); wall of the whole command incl. its start, "
                    "CT->PET regridding not included (done before, as a user must)"}


def own_trainer(ctx: Context, log: Path, iterations: int) -> None:
    """nnU-Net's own trainer row of (a), from its training log (epoch 0 includes its compile and loader start)."""
    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log.read_text(errors="replace"))]

    def numbers() -> dict:
        if not times:
            raise RuntimeError(f"no 'Epoch time' in {log}")
        return {"method": "nnU-Net", "network": "PlainConvUNet (nnUNetTrainer)", "epoch_s": times[0],
                "iterations_per_s": iterations / times[0], "timed_iterations": iterations,
                "note": "its own loop and loader; one epoch including compilation and worker start"}

    ctx.report.row("a", "nnU-Net's own trainer (one short epoch)", numbers)


def inference_section(ctx: Context) -> None:
    r, p = ctx.report, ctx.profile
    r.row("c", f"train {INFERENCE_METHOD} fold 0 ({p.model_iterations} iterations), copy to {p.folds} folds",
          lambda: train_inference_model(ctx), p.setup_s_guess * 3)
    first = r.row("c", f"autopetseg, {p.folds} folds, TTA off", lambda: predict_row(ctx, False, "default"),
                  p.setup_s_guess * 2)
    network_s = first.get("network_s", p.setup_s_guess)
    r.row("c", f"autopetseg, {p.folds} folds, --tta", lambda: predict_row(ctx, True, "tta"),
          first.get("wall_s", 0) + 7 * network_s)
    r.row("c", f"autopetseg, {p.folds} folds, TTA off, again (warm)", lambda: predict_row(ctx, False, "warm"),
          first.get("wall_s", p.setup_s_guess))
    skip = None
    if not ctx.nnunet_installed:
        skip = NOT_INSTALLED
    elif not p.nnunet_pipeline:
        skip = f"{p.name}: nnU-Net's plan, preprocessing, training and nnUNetv2_predict are left out"
    r.row("c", "nnUNetv2_predict, 1 fold, its defaults", lambda: nnunet_predict_row(ctx), p.nnunet_pipeline_s, skip=skip)
    if skip:
        r.row("a", "nnU-Net's own trainer (one short epoch)", lambda: None, skip=f"trained with (c)'s nnUNetv2_predict "
                                                                                  f"model, which is skipped: {skip}")


# =========================================================================== (d) DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_row(ctx: Context) -> dict:
    p = ctx.profile
    ctx.need("dataset_dir")
    spec = {"dataset_dir": str(ctx.dataset_dir), "preprocessed": str(ctx.preprocessed_root),
            "results": str(ctx.work / "results_ddp"), "device": ctx.device.type, "warmup": p.warmup,
            "iterations": p.iterations, "method": INFERENCE_METHOD, "amp": p.amp,
            "out": str(ctx.work / "ddp_result.json")}
    spec_file = ctx.work / "ddp_spec.json"
    spec_file.write_text(json.dumps(spec))
    log = ctx.work / "ddp.log"
    env = dict(os.environ, OMP_NUM_THREADS="1") if ctx.device.type == "cpu" else dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--ddp-worker", str(spec_file)]
    with open(log, "wb") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=max(30.0, ctx.report.left("d") + GRACE_S))
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"torchrun exited {done.returncode}:\n{tail}")
    result = json.loads(Path(spec["out"]).read_text())
    single = [row for row in ctx.report.rows("a") if row["status"] == "ok" and row.get("method") == INFERENCE_METHOD
              and not row.get("compile") and row.get("network") == "resunet"]
    if single:
        one = single[0]["iterations_per_s"] * single[0]["batch_size"]
        result.update(one_process_samples_per_s=one, scaling=result["samples_per_s"] / one)
    return result


def ddp_worker(spec_file: str) -> int:
    """One rank of (d), under torchrun: ``gdfl`` eager on this rank's GPU (CPU: gloo), timed; rank 0 writes."""
    import torch.distributed as dist

    from autopetseg.models.runtime import resolve_device
    from autopetseg.training.run import init_distributed, prepare_trainer

    spec = json.loads(Path(spec_file).read_text())
    device = resolve_device(spec["device"], int(os.environ.get("LOCAL_RANK", "0")))
    rank, started = init_distributed(device)
    try:
        trainer = prepare_trainer(spec["dataset_dir"], 0, spec["method"], None, spec["preprocessed"], spec["results"],
                                  spec["device"], dist_context=rank, epochs=1,
                                  iterations_per_epoch=spec["warmup"] + spec["iterations"], **spec["amp"])
        trainer.setup()
        trainer.train_network.train()
        timing = timed_loop(trainer.train_step, trainer.device, spec["iterations"], spec["warmup"],
                            fetch=lambda: next(trainer.train_loader))
        rates = torch.tensor([timing["iterations_per_s"]], dtype=torch.float64, device=trainer.device)
        dist.all_reduce(rates, op=dist.ReduceOp.MIN)  # the slowest rank sets the pace
        if rank.is_main:
            Path(spec["out"]).write_text(json.dumps({
                "processes": rank.world_size, "backend": dist.get_backend(), "batch_per_process": trainer.batch_size,
                "iterations_per_s": float(rates[0]),
                "samples_per_s": float(rates[0]) * trainer.batch_size * rank.world_size,
                "peak_gb_rank0": timing["peak_memory_mb"] / 1024}))
        close_trainer(trainer)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def ddp_section(ctx: Context, gpus: int) -> None:
    if ctx.dry:
        ctx.report.note("d", "dry run: 2 processes with gloo on the CPU (the code path, not a measurement)")
    skip = None if ctx.dry or gpus >= 2 else f"{gpus} GPU(s): DDP needs 2 or more"
    ctx.report.row("d", "torchrun, 2 processes, gdfl eager", lambda: ddp_row(ctx), ctx.profile.setup_s_guess * 3,
                   skip=skip)


# =========================================================================== table
def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


TABLES = {
    "data": [("seconds", "s", ".1f")],
    "a": [("patch_size", "patch", ""), ("batch_size", "bs", ""), ("workers", "wrk", ""),
          ("iterations_per_s", "it/s", ".2f"),
          ("compute_s_per_iteration", "compute s", ".3f"), ("data_wait_s_per_iteration", "wait s", ".3f"),
          ("peak_gb", "peak GB", ".2f"), ("used_gb", "used GB", ".2f"), ("planned_gb", "plan GB", ".2f"),
          ("planned_over_used", "plan/used", ".2f")],
    "b": [("workers", "wrk", ""), ("cpu_cores", "cores", ""), ("iterations_per_s", "it/s", ".2f"),
          ("best_training_iterations_per_s", "train it/s", ".2f"), ("loader_over_training", "ratio", ".2f"),
          ("keeps_up", "keeps up", "")],
    "c": [("read_s", "read", ".2f"), ("preprocess_s", "prep", ".2f"), ("network_s", "network", ".2f"),
          ("export_s", "export", ".2f"), ("wall_s", "wall s", ".2f"), ("load_model_s", "+model", ".2f"),
          ("total_s", "total s", ".2f"), ("windows_run", "windows", ""), ("goal_met", "<=15 s", "")],
    "d": [("processes", "procs", ""), ("iterations_per_s", "it/s", ".2f"), ("samples_per_s", "samples/s", ".2f"),
          ("one_process_samples_per_s", "1-proc", ".2f"), ("scaling", "scaling", ".2f")],
}


def table(report: Report) -> str:
    lines = []
    sections = report.data["sections"]
    for key in ("e", "data", "a", "b", "c", "d"):
        if key not in sections:
            continue
        section = sections[key]
        lines.append(f"\n== {section['title']}")
        lines += [f"   {n}" for n in section["notes"]]
        if key == "e":
            for row in section["rows"]:
                if row["status"] == "ok":
                    lines += [f"   {k}: {_fmt(v)}" for k, v in row.items() if k not in ("name", "status", "seconds")]
                else:
                    lines.append(f"   {row['name']}: {_status_text(row)}")
            continue
        columns = TABLES[key]
        width = max([len(r["name"]) for r in section["rows"]] + [10])
        cells = [[_fmt(row.get(k), spec) for k, _, spec in columns] for row in section["rows"]]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
        lines.append(f"   {'':{width}s}  " + "  ".join(f"{h:>{w}s}" for (_, h, _), w in zip(columns, widths)))
        for row, cell in zip(section["rows"], cells):
            if row["status"] == "ok":
                extra = "  " + row["note"] if row.get("note") else ""
                values = "  ".join(f"{c:>{w}s}" for c, w in zip(cell, widths))
                lines.append(f"   {row['name']:{width}s}  {values}{extra}")
            else:
                lines.append(f"   {row['name']:{width}s}  {_status_text(row)}")
            if key == "data" and row.get("plans"):
                for name, plan in row["plans"].items():
                    lines.append(f"      {name}: spacing {plan['spacing_zyx']} patch {_fmt(plan['patch_size'])} "
                                 f"batch {plan['batch_size']} features {plan['features']} "
                                 f"planned {_fmt(plan['planned_gb'], '.2f')} GB")
            if key == "data" and row.get("pet_size_xyz"):
                lines.append(f"      PET {_fmt(row['pet_size_xyz'])} voxels (x,y,z) at {row['pet_spacing_xyz']} mm")
    lines.append("")
    lines += summary(report)
    return "\n".join(lines)


def summary(report: Report) -> list[str]:
    """The issue's goals, judged on what ran."""
    sections = report.data["sections"]
    rows = {key: [r for r in s["rows"] if r["status"] == "ok"] for key, s in sections.items()}
    lines = ["== goals" + ("" if report.data.get("device") == "cuda" else " (CPU: not judged, numbers shown)")]
    ours = [r for r in rows.get("a", []) if r.get("method") not in (None, "nnU-Net")]
    nn = [r for r in rows.get("a", []) if r.get("network") == "PlainConvUNet"]
    if ours and nn:
        first = [r for r in ours if r.get("method") == ours[0]["method"] and r.get("network") == ours[0]["network"]]
        best_ours = min(r["compute_s_per_iteration"] for r in first)
        best_nn = min(r["compute_s_per_iteration"] for r in nn)
        lines.append(f"   training: {ours[0]['method']} ({ours[0]['network']}) {1 / best_ours:.2f} it/s of compute vs "
                     f"nnU-Net {1 / best_nn:.2f} it/s at the same patch and batch -> "
                     f"{'met' if best_ours <= best_nn else 'MISSED'} (best of eager/compiled each)")
    loaders = [r for r in rows.get("b", []) if r.get("keeps_up") is not None]
    if loaders:
        verdicts = ", ".join(f"{r['name']} {_fmt(r['keeps_up'])}" for r in loaders)
        lines.append(f"   loader keeps up: {verdicts}")
    memory = [r for r in rows.get("a", []) if r.get("planned_over_used") is not None]
    if memory:
        off = [f"{r['name']} {r['planned_over_used']:.2f}" for r in memory if not r["planned_within_15_percent"]]
        lines.append(f"   planned memory within 15 % of used: {len(memory) - len(off)}/{len(memory)} rows"
                     + (f"; off: {', '.join(off)}" if off else ""))
    default = [r for r in rows.get("c", []) if r.get("tta") is False and "wall_s" in r and r.get("folds", 0) > 1]
    if default:
        lines.append(f"   inference, {default[0]['folds']} folds, TTA off: {default[0]['total_s']:.1f} s with the model "
                     f"load (goal <= {INFERENCE_GOAL_S:.0f} s: {_fmt(default[0].get('goal_met'))})")
    code = report.exit_code()
    lines.append(f"   exit code {code}: " + {0: "every row ran (or was skipped by design)", 1: "some row FAILED",
                                             2: "some rows skipped for time or not buildable"}[code])
    return lines


# =========================================================================== main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--quick", action="store_true",
                        help="5 minutes: compiled rows only for gdfl and nnU-Net, no nnUNetv2_predict")
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 450, --quick 300)")
    parser.add_argument("--sections", default="a,b,c,d", help="which of a,b,c,d to run (default all)")
    parser.add_argument("--gpu-memory", type=float, default=8.0, help="GPU memory the plans are made for, GB (default 8)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark for our rows too")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--nnunet-train-only", nargs=4, metavar=("ID", "TRAINER", "ITERATIONS", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.ddp_worker or args.nnunet_train_only) and args.out is None:
        parser.error("--out is required")
    unknown = {s.strip() for s in args.sections.split(",") if s.strip()} - set("abcd")
    if unknown:
        parser.error(f"--sections takes a comma-separated subset of a,b,c,d; not {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args.ddp_worker)
    if args.nnunet_train_only:
        dataset_id, trainer, iterations, device = args.nnunet_train_only
        nnunet_train_only(dataset_id, trainer, int(iterations), device)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    profile = DRY_RUN if args.dry_run else QUICK if args.quick else GPU
    budget = args.budget or profile.budget_s
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0) if torch.cuda.is_available() else None
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, profile, budget, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                                if k not in ("ddp_worker", "nnunet_train_only")})
    if device is None:
        report.data["device"] = None
        report.row("e", "versions", lambda: environment(Context(args, profile, report, torch.device("cpu"), args.out)))
        for key in ("data", "a", "b", "c", "d"):
            report.skip_section(key, "no CUDA device (use --dry-run for the CPU code path)", "unbuildable")
        print(table(report))
        return report.exit_code()
    report.data["device"] = device.type
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, profile, report, device, work.resolve())
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        import nnunetv2  # noqa: F401
        import dynamic_network_architectures  # noqa: F401

        ctx.nnunet_installed = version("nnunetv2")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ddp_runs = "d" in sections and (ctx.dry or gpus >= 2)
    report.set_deadlines({"data": True, **{key: key in sections for key in "abc"}, "d": ddp_runs})
    try:
        report.row("e", "versions", lambda: environment(ctx))
        report.row("data", f"synthesize {profile.n_cases} {profile.preset} phantoms", lambda: synthesize(ctx))
        report.row("data", "plan (GPU budget) and preprocess", lambda: plan_and_preprocess_row(ctx))
        report.row("data", "inference case", lambda: inference_case(ctx))
        for key, run in (("a", training_section), ("b", loading_section)):
            if key in sections:
                run(ctx)
            else:
                report.skip_section(key, "not in --sections")
        if "d" in sections:
            ddp_section(ctx, gpus)
        else:
            report.skip_section("d", "not in --sections")
        if "c" in sections:
            inference_section(ctx)
        else:
            report.skip_section("c", "not in --sections")
    finally:
        report.data["elapsed_s"] = report.elapsed()
        report.data["exit_code"] = report.exit_code()
        report.save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    print(f"\n{report.elapsed():.0f} s; results in {report.path}")
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
