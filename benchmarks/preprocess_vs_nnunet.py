#!/usr/bin/env python
"""Benchmark: ``autopetseg plan_and_preprocess`` against ``nnUNetv2_plan_and_preprocess -c 3d_fullres``.

What it does (issue #2, item 11):

1. Writes ``--n-cases`` synthetic phantoms (``autopetseg.data.synthetic``) in the nnU-Net raw
   layout, the CT on its own finer grid as scanners deliver it. Not timed; reused on a re-run
   when the same settings made it.
2. nnU-Net needs every channel on one grid, so a user must first resample the CT onto the PET
   grid (SimpleITK, linear, fill -1024 HU) into a second raw folder; PET and labels are hard
   links. This conversion is timed and reported on its own line (same number of processes).
3. Runs both tools on the same cases with the same number of processes, each in its own
   subprocess, from a fresh output folder:
   * ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N -npfp N``: nnU-Net's default
     fingerprint + plan + 3d_fullres preprocessing. ``-npfp`` (fingerprint processes, default 8)
     is set to N as well so both tools use N workers throughout. ``--verify_dataset_integrity``
     is off (nnU-Net's default) unless ``--nnunet-verify``; autopetseg always checks its input.
   * ``autopetseg plan_and_preprocess -d RAW -c 3d_fullres --gpu-memory 8 -np N`` on the original
     folder (it regrids the CT itself).
4. Measures each subprocess: wall time; peak memory of the whole process tree, sampled every
   ``--poll`` s from ``/proc`` (sum of RSS, and sum of PSS which does not count shared pages
   twice); and the largest single process (``ru_maxrss`` from ``wait4``).

Caveat: the phantoms were just written, so both tools read them from the page cache.

Example (the run reported in the issue)::

    OMP_NUM_THREADS=1 python benchmarks/preprocess_vs_nnunet.py --n-cases 30 --preset wholebody \
        --spacing 4 4 3 -np 2 --work /tmp/bench_preprocess

``--spacing`` is the PET voxel size in mm in **x y z** order (``4 4 3``: 4 mm in-plane, 3 mm
slices); internally arrays and spacings are (z, y, x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_BenchPhantoms"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
GB = 1024**3


# --------------------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    """ppid -> child pids for every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces/parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    children = _children_map()
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, ()))
    return pids


def _rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS from smaps_rollup (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            rss = int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0, 0
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, pss


class TreeMemoryMonitor(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, root_pid: int, interval: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = _tree(self.root_pid)
            sizes = [_rss_pss(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
            self.peak_processes = max(self.peak_processes, sum(1 for s in sizes if s[0] > 0))
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Measurement:
    name: str
    command: str
    returncode: int
    wall_s: float
    peak_tree_rss_gb: float
    peak_tree_pss_gb: float
    max_single_process_rss_gb: float
    peak_processes: int
    samples: int
    log_file: str


def measure(name: str, command: list[str], env: dict, log_file: Path, poll: float) -> Measurement:
    """Run ``command`` to completion, timing it and sampling its process tree's memory."""
    print(f"\n[{name}] {' '.join(command)}", flush=True)
    with open(log_file, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = TreeMemoryMonitor(proc.pid, poll)
        monitor.start()
        # wait4 gives the rusage of this child and its waited-for descendants (ru_maxrss: the
        # largest single process, in KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        monitor.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = Measurement(
        name=name,
        command=" ".join(command),
        returncode=proc.returncode,
        wall_s=wall,
        peak_tree_rss_gb=monitor.peak_rss / GB,
        peak_tree_pss_gb=monitor.peak_pss / GB,
        max_single_process_rss_gb=usage.ru_maxrss * 1024 / GB,
        peak_processes=monitor.peak_processes,
        samples=monitor.samples,
        log_file=str(log_file),
    )
    state = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}), see {log_file}"
    print(f"[{name}] {state}: {wall:.1f} s, peak tree RSS {result.peak_tree_rss_gb:.2f} GB "
          f"(PSS {result.peak_tree_pss_gb:.2f} GB), {monitor.samples} samples", flush=True)
    return result


# --------------------------------------------------------------------------- data


def make_phantoms(raw_dir: Path, n_cases: int, preset: str, spacing_zyx: tuple, seed: int, num_processes: int) -> None:
    """Synthesize the dataset unless a finished one with the same settings is there (not timed)."""
    from autopetseg.data.synthetic import synthesize_dataset

    settings = {"n_cases": n_cases, "preset": preset, "pet_spacing_zyx": list(spacing_zyx), "seed": seed}
    marker = raw_dir / "benchmark_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"reusing phantoms in {raw_dir}")
        return
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    print(f"writing {n_cases} {preset} phantoms (PET spacing z,y,x = {spacing_zyx} mm) to {raw_dir} (not timed) ...",
          flush=True)
    t0 = time.perf_counter()
    synthesize_dataset(raw_dir, n_cases=n_cases, layout="nnunet", seed=seed, preset=preset,
                       pet_spacing_zyx=spacing_zyx, num_processes=num_processes)
    marker.write_text(json.dumps(settings))
    print(f"  done in {time.perf_counter() - t0:.0f} s")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _ct_channel(dataset_json: dict) -> tuple[str, str]:
    """(CT channel key, PET channel key) from dataset.json's channel_names."""
    names = {k: str(v).lower() for k, v in dataset_json["channel_names"].items()}
    ct = [k for k, v in names.items() if v == "ct"]
    pet = [k for k, v in names.items() if v != "ct"]
    if len(ct) != 1 or len(pet) != 1:
        raise SystemExit(f"expected one CT and one PET channel, got {dataset_json['channel_names']}")
    return ct[0], pet[0]


def _regrid_one(job: tuple[str, str, str]) -> None:
    """Resample one CT onto its PET's grid (linear, -1024 HU outside), keeping the CT's pixel type."""
    import SimpleITK as sitk

    ct_path, pet_path, out_path = job
    ct = sitk.ReadImage(ct_path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(pet_path)
    reader.ReadImageInformation()  # only the PET geometry is needed
    out = sitk.Resample(ct, reader.GetSize(), sitk.Transform(), sitk.sitkLinear, reader.GetOrigin(),
                        reader.GetSpacing(), reader.GetDirection(), -1024.0, ct.GetPixelID())
    tmp = out_path + ".tmp.nii.gz"
    sitk.WriteImage(out, tmp, True)
    os.replace(tmp, out_path)


def convert_for_nnunet(src: Path, dst: Path, num_processes: int) -> None:
    """nnU-Net raw copy of ``src`` with every channel on the PET grid (the step a user must do)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the pool provides the parallelism
    meta = json.loads((src / "dataset.json").read_text())
    ct_key, pet_key = _ct_channel(meta)
    ending = meta.get("file_ending", ".nii.gz")
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    jobs = []
    for label in sorted((src / "labelsTr").glob(f"*{ending}")):
        case = label.name[: -len(ending)]
        ct = src / "imagesTr" / f"{case}_{int(ct_key):04d}{ending}"
        pet = src / "imagesTr" / f"{case}_{int(pet_key):04d}{ending}"
        _link_or_copy(pet, dst / "imagesTr" / pet.name)
        _link_or_copy(label, dst / "labelsTr" / label.name)
        jobs.append((str(ct), str(pet), str(dst / "imagesTr" / ct.name)))
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            list(pool.map(_regrid_one, jobs))
    else:
        for job in jobs:
            _regrid_one(job)
    meta["name"] = dst.name
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------- outputs


def _nnunet_summary(preprocessed: Path) -> dict:
    folder = preprocessed / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    data_dir = folder / conf["data_identifier"]
    files = [p for p in data_dir.iterdir() if p.is_file()]
    back = plans["transpose_backward"]  # nnU-Net plans list axes transposed (coarsest first)
    return {
        "spacing_zyx": [conf["spacing"][i] for i in back],
        "patch_size": [conf["patch_size"][i] for i in back],
        "batch_size": conf["batch_size"],
        "cases": len([p for p in files if p.name.endswith(".pkl")]),
        "cache_gb": sum(p.stat().st_size for p in files) / GB,
    }


def _autopetseg_summary(preprocessed: Path) -> dict:
    folder = preprocessed / DATASET_NAME
    plans = json.loads((folder / "plans.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    data_dir = folder / conf.get("data_identifier", "3d_fullres")
    files = [p for p in data_dir.iterdir() if p.is_file()]
    return {
        "spacing_zyx": conf.get("spacing_zyx"),
        "patch_size": conf.get("patch_size"),
        "batch_size": conf.get("batch_size"),
        "cases": len([p for p in files if p.suffix == ".json"]),
        "cache_gb": sum(p.stat().st_size for p in files) / GB,
    }


def _nnunet_command(args) -> list[str]:
    exe = shutil.which("nnUNetv2_plan_and_preprocess")
    if exe:
        command = [exe]
    else:  # the console script is not on PATH: call its entry point with this interpreter
        command = [sys.executable, "-c",
                   "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                   "plan_and_preprocess_entry as m; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; m()"]
    command += ["-d", str(DATASET_ID), "-c", "3d_fullres", "-np", str(args.num_processes),
                "-npfp", str(args.num_processes)]
    if args.nnunet_verify:
        command.append("--verify_dataset_integrity")
    return command


def _table(rows: list[tuple[str, Measurement | None, float, float, float, float]]) -> str:
    lines = [f"{'':34s} {'wall s':>8s} {'peak RSS GB':>12s} {'peak PSS GB':>12s} {'max 1 proc GB':>14s}"]
    for label, _, wall, rss, pss, single in rows:
        lines.append(f"{label:34s} {wall:8.1f} {rss:12.2f} {pss:12.2f} {single:14.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cases", type=int, default=30)
    parser.add_argument("--spacing", type=float, nargs=3, default=(4.0, 4.0, 3.0), metavar=("X", "Y", "Z"),
                        help="PET voxel size in mm, in x y z order (default 4 4 3: 4 mm in-plane, 3 mm slices)")
    parser.add_argument("--preset", choices=("tiny", "wholebody"), default="wholebody")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for both tools")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autopetseg_bench_preprocess"),
                        help="folder for the raw data, both caches, logs and results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-nnunet", action="store_true", help="run only autopetseg")
    parser.add_argument("--nnunet-verify", action="store_true",
                        help="pass --verify_dataset_integrity to nnU-Net (off by default, as in nnU-Net)")
    parser.add_argument("--poll", type=float, default=0.2, help="memory sampling interval, s")
    parser.add_argument("--convert-only", nargs=2, type=Path, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.convert_only:  # the timed CT regridding runs as its own measured subprocess
        convert_for_nnunet(*args.convert_only, args.num_processes)
        return 0

    spacing_zyx = tuple(float(v) for v in args.spacing[::-1])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw" / DATASET_NAME
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    make_phantoms(raw, args.n_cases, args.preset, spacing_zyx, args.seed, args.num_processes)

    env = dict(os.environ)
    print(f"\n{args.n_cases} cases, preset {args.preset}, PET spacing x,y,z = {tuple(args.spacing)} mm, "
          f"-np {args.num_processes}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, "
          f"nnU-Net integrity check {'on' if args.nnunet_verify else 'off (default)'}")
    results: dict[str, dict] = {"settings": {
        "n_cases": args.n_cases, "preset": args.preset, "pet_spacing_xyz_mm": list(args.spacing),
        "num_processes": args.num_processes, "cpus": os.cpu_count(), "nnunet_verify": args.nnunet_verify}}

    measurements: dict[str, Measurement] = {}
    if not args.skip_nnunet:
        nn_raw, nn_pre, nn_res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
        for folder in (nn_pre, nn_res):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        nn_raw.mkdir(exist_ok=True)
        measurements["convert"] = measure(
            "CT->PET grid conversion",
            [sys.executable, str(Path(__file__).resolve()), "--convert-only", str(raw), str(nn_raw / DATASET_NAME),
             "-np", str(args.num_processes)],
            env, logs / "convert.log", args.poll)
        nn_env = dict(env, nnUNet_raw=str(nn_raw), nnUNet_preprocessed=str(nn_pre), nnUNet_results=str(nn_res))
        measurements["nnunet"] = measure("nnU-Net v2", _nnunet_command(args), nn_env, logs / "nnunet.log", args.poll)
        if measurements["nnunet"].returncode == 0:
            results["nnunet_output"] = _nnunet_summary(nn_pre)

    ap_pre = work / "autopetseg_preprocessed"
    shutil.rmtree(ap_pre, ignore_errors=True)
    ap_pre.mkdir(parents=True)
    measurements["autopetseg"] = measure(
        "autopetseg",
        [sys.executable, "-m", "autopetseg", "plan_and_preprocess", "-d", str(raw), "-c", "3d_fullres",
         "--gpu-memory", "8", "-np", str(args.num_processes), "--preprocessed", str(ap_pre)],
        env, logs / "autopetseg.log", args.poll)
    if measurements["autopetseg"].returncode == 0:
        results["autopetseg_output"] = _autopetseg_summary(ap_pre)
    results["measurements"] = {k: asdict(v) for k, v in measurements.items()}

    # ------------------------------------------------------------------ table
    def row(label, m):
        return (label, m, m.wall_s, m.peak_tree_rss_gb, m.peak_tree_pss_gb, m.max_single_process_rss_gb)

    rows = []
    ap = measurements["autopetseg"]
    if "nnunet" in measurements:
        conv, nn = measurements["convert"], measurements["nnunet"]
        rows.append(row("CT->PET conversion (user step)", conv))
        rows.append(row("nnU-Net v2 plan_and_preprocess", nn))
        # Conversion and nnU-Net run one after the other: times add, memory is the larger peak.
        rows.append(("nnU-Net incl. conversion", None, conv.wall_s + nn.wall_s,
                     max(conv.peak_tree_rss_gb, nn.peak_tree_rss_gb), max(conv.peak_tree_pss_gb, nn.peak_tree_pss_gb),
                     max(conv.max_single_process_rss_gb, nn.max_single_process_rss_gb)))
    rows.append(row("autopetseg plan_and_preprocess", ap))
    print("\n" + _table(rows))

    if "nnunet" in measurements:
        ratios = {}
        for label, (_, _, wall, rss, pss, single) in (("vs nnU-Net alone", rows[1]), ("vs nnU-Net + conversion", rows[2])):
            ratios[label] = {"wall": ap.wall_s / wall, "rss": ap.peak_tree_rss_gb / rss, "pss": ap.peak_tree_pss_gb / pss,
                             "single": ap.max_single_process_rss_gb / single}
            r = ratios[label]
            print(f"autopetseg / {label[3:]:24s} wall {r['wall']:.2f}   peak RSS {r['rss']:.2f}   "
                  f"peak PSS {r['pss']:.2f}   max 1 proc {r['single']:.2f}")
        results["ratios_autopetseg_over"] = ratios
        r = ratios["vs nnU-Net alone"]
        print(f"target (vs nnU-Net alone): wall <= 1/3 -> {'met' if r['wall'] <= 1 / 3 else 'MISSED'}; "
              f"memory <= 1 (tree PSS) -> {'met' if r['pss'] <= 1 else 'MISSED'}")
    for key in ("nnunet_output", "autopetseg_output"):
        if key in results:
            out = results[key]
            print(f"{key.split('_')[0]:10s} output: {out['cases']} cases, spacing z,y,x {out['spacing_zyx']}, "
                  f"patch {out['patch_size']}, batch {out['batch_size']}, cache {out['cache_gb']:.2f} GB")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults and logs in {work}")
    failed = [m.name for m in measurements.values() if m.returncode != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
