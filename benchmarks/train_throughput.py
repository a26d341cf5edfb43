"""Training throughput of the planned configuration on this machine, beside nnU-Net's default network.

Prints iterations per second, seconds per iteration (all of it, and the forward/backward/step
part alone) and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak
resident set size, reset before each measurement) of one training process of ``-tr`` (default
gdfl) at the plans' patch and batch. The batches come from the real data loader (patch
sampling, augmentation, ``--num-workers`` processes), so "data wait" shows whether loading keeps
up with the device.

When ``nnunetv2`` is importable it also times nnU-Net v2's trainer step at the same patch and
batch: the ``PlainConvUNet`` its default planner builds for this patch and spacing (features
32..320, two convolutions per stage, instance norm, LeakyReLU, deep supervision), the
``DC_and_CE_loss`` with deep-supervision weights, SGD (lr 1e-2, momentum 0.99, nesterov), gradient
clipping at 12, and on CUDA fp16 autocast with a GradScaler and ``torch.compile`` (nnU-Net 2.8's
defaults; ``--nnunet-compile off`` disables it). Its batches are prepared on the device beforehand,
so compare its time with our "compute" time.

Usage:
    python benchmarks/train_throughput.py                        # synthetic dataset planned for this device
    python benchmarks/train_throughput.py --iterations 5         # quick CPU check (about a minute)
    python benchmarks/train_throughput.py -d Dataset001_Phantoms [--preprocessed ROOT] [-c 3d_fullres]

Without ``-d`` it synthesises ``--n-cases`` phantoms with the package's generator (preset
``tiny`` on the CPU, ``wholebody`` on CUDA), plans them for this device (CPU: ``--threads``
cores; CUDA: ``--gpu-memory`` GB, default 8 like ``plan_and_preprocess``) and preprocesses them
into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script

from _common import timed_loop  # noqa: E402
from autopetseg.io_utils import read_json  # noqa: E402
from autopetseg.planning.plans import ComputeBudget, Plans  # noqa: E402


# --------------------------------------------------------------------------- dataset
def synthetic_dataset(work: Path, device: torch.device, args) -> Path:
    """Synthesise, plan for this device and preprocess a small phantom dataset; returns its folder."""
    from autopetseg.data.synthetic import synthesize_dataset
    from autopetseg.pipeline import plan_and_preprocess

    preset = args.preset or ("tiny" if device.type == "cpu" else "wholebody")
    budget = (
        ComputeBudget("cpu", cpu_cores=max(1, args.threads or torch.get_num_threads()))
        if device.type == "cpu"
        else ComputeBudget("cuda", gpu_memory_gb=args.gpu_memory)
    )
    processes = max(1, min(args.n_cases, os.cpu_count() or 1, 8))
    started = time.perf_counter()
    raw = synthesize_dataset(work / "raw" / "Dataset990_Throughput", n_cases=args.n_cases, preset=preset, seed=0,
                             negative_fraction=0.0, num_processes=processes)
    result = plan_and_preprocess(raw, (args.configuration,), budget, num_processes=processes,
                                 preprocessed_root=work / "preprocessed")
    if result.failures:
        raise SystemExit(f"preprocessing failed: {result.failures}")
    print(f"synthetic dataset: {args.n_cases} '{preset}' phantoms planned for {budget.device} "
          f"and preprocessed in {time.perf_counter() - started:.1f} s")
    return result.output_dir


def dataset_cases(dataset_dir: Path, data_dir: Path) -> list[str]:
    cases = [c["case_id"] for c in read_json(dataset_dir / "dataset.json")["cases"]]
    return [c for c in cases if (data_dir / f"{c}.json").is_file()]


# --------------------------------------------------------------------------- ours
def time_ours(dataset_dir: Path, device: torch.device, work: Path, args) -> dict:
    from autopetseg.training.config import TrainerConfig
    from autopetseg.models.networks import count_parameters
    from autopetseg.training.variants import get_trainer_class

    plans = Plans.load(dataset_dir / "plans.json")
    conf = plans.configuration(args.configuration)
    data_dir = dataset_dir / conf.data_identifier
    cases = dataset_cases(dataset_dir, data_dir)
    if not cases:
        raise SystemExit(f"no preprocessed cases in {data_dir}")
    cls = get_trainer_class(args.trainer)
    overrides = {
        "epochs": 1,
        "iterations_per_epoch": args.warmup + args.iterations,
        "channels_last_3d": args.channels_last,
        "compile": args.compile,
        "amp_dtype": args.amp_dtype,
    }
    if args.amp is not None:
        overrides["amp"] = args.amp == "on"
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.patch:
        overrides["patch_size"] = list(args.patch)
    config: TrainerConfig = cls.default_config().replace(**overrides)
    trainer = cls(plans, args.configuration, data_dir, work / "ours", cases, [], config=config, device=device)
    trainer.setup()
    print(f"ours: trainer {args.trainer}, network {config.network} ({count_parameters(trainer.network) / 1e6:.2f} M "
          f"parameters), patch {trainer.patch_size}, batch {trainer.batch_size}, spacing {conf.spacing_zyx} mm, "
          f"AMP {trainer.amp_dtype}, channels_last_3d {config.channels_last_3d}, compile {config.compile}, "
          f"{trainer.num_workers} loader workers, {len(cases)} cases")

    trainer.train_network.train()
    timing = timed_loop(trainer.train_step, device, args.iterations, args.warmup, fetch=lambda: next(trainer.train_loader))
    return {
        "patch_size": list(trainer.patch_size),
        "batch_size": trainer.batch_size,
        "spacing_zyx": list(conf.spacing_zyx),
        "parameters": count_parameters(trainer.network),
        **timing,
    }


# --------------------------------------------------------------------------- nnU-Net
def nnunet_default_network(patch_size, spacing_zyx, in_channels: int = 2, num_classes: int = 2):
    """nnU-Net v2's default 3d_fullres PlainConvUNet for this patch and spacing, and its patch.

    ``get_pool_and_conv_props`` may round the patch up to a multiple of the network's total stride.
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(spacing_zyx), list(patch_size), 4, 999999)
    n_stages = len(strides)
    network = PlainConvUNet(
        in_channels, n_stages, [min(320, 32 * 2**i) for i in range(n_stages)], torch.nn.Conv3d, kernels, strides,
        [2] * n_stages, num_classes, [2] * (n_stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    return network, [int(p) for p in patch], strides


def nnunet_train_step(patch_size, batch_size: int, spacing_zyx, device: torch.device, compile_on: bool):
    """(step, description): one ``nnUNetTrainer.train_step`` of nnU-Net's default network at this patch
    and batch on a fixed batch already on the device (fp16 autocast and GradScaler on CUDA, as
    nnU-Net trains; float32 on the CPU), and what was built."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    network, patch, strides = nnunet_default_network(patch_size, spacing_zyx)
    network = network.to(device)
    scales = [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]
    weights = np.array([1 / 2**i for i in range(len(scales))])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_on:
        loss.dc = torch.compile(loss.dc)
        network = torch.compile(network)
    loss = DeepSupervisionWrapper(loss, weights)
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    g = torch.Generator().manual_seed(0)
    data = torch.randn((batch_size, 2, *patch), generator=g).to(device)
    target = (torch.rand((batch_size, 1, *patch), generator=g) < 0.05).float().to(device)
    targets = [
        target if all(s == 1 for s in scale)
        else torch.nn.functional.interpolate(target, size=[int(round(p * s)) for p, s in zip(patch, scale)], mode="nearest")
        for scale in scales
    ]

    def step() -> torch.Tensor:  # nnUNetTrainer.train_step without the host->device copy
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext():
            output = network(data)
            value = loss(output, targets)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        return value.detach()

    network.train()
    n_params = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return step, {
        "patch_size": patch,
        "batch_size": batch_size,
        "parameters": n_params,
        "strides": [list(s) for s in strides],
        "amp": "fp16 + GradScaler" if device.type == "cuda" else "off",
        "compile": compile_on,
    }


def time_nnunet(patch_size, batch_size: int, spacing_zyx, device: torch.device, args) -> dict:
    compile_on = args.nnunet_compile == "on" or (args.nnunet_compile == "auto" and device.type == "cuda")
    step, info = nnunet_train_step(patch_size, batch_size, spacing_zyx, device, compile_on)
    print(f"nnU-Net: PlainConvUNet {len(info['strides'])} stages ({info['parameters'] / 1e6:.2f} M parameters), "
          f"patch {info['patch_size']}, batch {batch_size}, strides {info['strides']}, AMP {info['amp']}, "
          f"compile {compile_on}")
    timing = timed_loop(lambda _: step(), device, args.iterations, args.warmup)
    return {**info, **timing}


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", help="preprocessed dataset (folder with plans.json, name or id); default: synthetic")
    p.add_argument("--preprocessed", help="preprocessed root (default $AUTOPETSEG_PREPROCESSED)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-tr", "--trainer", default="gdfl")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--iterations", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation, allocator, workers)")
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's choice)")
    p.add_argument("--num-workers", type=int, help="data loader processes (default: the trainer's)")
    p.add_argument("--batch-size", type=int, help="override the plans' batch size")
    p.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the plans' patch size")
    p.add_argument("--amp", choices=("on", "off"), help="default: on for CUDA, off on the CPU")
    p.add_argument("--amp-dtype", default="auto", choices=("auto", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile our training forward")
    p.add_argument("--nnunet", default="auto", choices=("auto", "off"), help="time nnU-Net when nnunetv2 is importable")
    p.add_argument("--nnunet-compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile nnU-Net's network (auto: on CUDA, as nnU-Net 2.8 does)")
    p.add_argument("--n-cases", type=int, default=3, help="synthetic cases (without -d)")
    p.add_argument("--preset", choices=("tiny", "wholebody"), help="synthetic preset (default: tiny on CPU, wholebody on CUDA)")
    p.add_argument("--gpu-memory", type=float, default=8.0, help="GPU memory to plan for, GB (synthetic, CUDA)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA device is available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="autopetseg_bench_") as tmp:
        work = Path(tmp)
        if args.dataset:
            from autopetseg.training.run import resolve_preprocessed_dataset

            dataset_dir = resolve_preprocessed_dataset(args.dataset, args.preprocessed)
        else:
            dataset_dir = synthetic_dataset(work, device, args)
        results = {"device": name, "torch": torch.__version__, "ours": time_ours(dataset_dir, device, work, args)}
        ours = results["ours"]
        print(f"ours:    {ours['iterations_per_s']:.3f} it/s, {ours['s_per_iteration']:.3f} s/it "
              f"(median compute {ours['compute_s_per_iteration']:.3f} s, mean data wait {ours['data_wait_s_per_iteration']:.3f} s), "
              f"peak memory {ours['peak_memory_mb']:.0f} MB [{ours['peak_memory_kind']}]")

        have_nnunet = False
        if args.nnunet != "off":
            try:
                import nnunetv2  # noqa: F401
                import dynamic_network_architectures  # noqa: F401

                have_nnunet = True
            except ImportError:
                print("nnU-Net: nnunetv2 is not installed (pip install nnunetv2); comparison skipped")
        if have_nnunet:
            theirs = time_nnunet(ours["patch_size"], ours["batch_size"], ours["spacing_zyx"], device, args)
            results["nnunet"] = theirs
            ratio = theirs["compute_s_per_iteration"] / ours["compute_s_per_iteration"]
            results["nnunet_over_ours_compute"] = ratio
            print(f"nnU-Net: {theirs['iterations_per_s']:.3f} it/s, {theirs['s_per_iteration']:.3f} s/it "
                  f"(median compute {theirs['compute_s_per_iteration']:.3f} s), peak memory {theirs['peak_memory_mb']:.0f} MB")
            print(f"ratio nnU-Net / ours, median compute time per iteration: {ratio:.2f}x "
                  f"({'ours faster' if ratio > 1 else 'nnU-Net faster'}); "
                  f"peak memory {theirs['peak_memory_mb'] / ours['peak_memory_mb']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
