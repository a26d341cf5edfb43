#!/usr/bin/env python
"""Benchmark: ``autopetseg predict`` time of ``cascade_l2s`` against one-stage 3D models (issue #12).

Times ``predict_folder`` (no pictures, no prefetch) of a folder of cases with the models of an
``l2s_ablation.py`` work folder, fold ``--fold``:

* ``segmenter``: the cascade's own 3D segmenter alone, predicted as a one-stage model (same
  network, same windows, no 2D pass): the fair reference for "the cost of the 2D pass";
* ``cascade``: the cascade with its default combine rule (the localizer runs after the segmenter,
  on the coronal slices where its cue can change the mask);
* ``cascade_every_slice``: the same, the localizer on every coronal slice, 2 slices per forward
  pass (as before the localizer was restricted; same masks);
* ``gdfl``: the ``gdfl`` model of the work folder (another one-stage 3D model).

The models take turns ``--repeats`` times (so that a change in the machine's load hits each alike);
the median wall and CPU seconds of each are printed, then the ratios to ``segmenter`` and ``gdfl``.
``--threads`` sets torch's intra-op threads (on a shared machine one thread gives stable times).

Example (the README's numbers)::

    nice -n 10 python benchmarks/l2s_predict_time.py --work /tmp/h12/l2s_bench2 --repeats 5 --threads 1
    nice -n 10 python benchmarks/l2s_predict_time.py --work /tmp/h12/l2s_bench2 --cases /tmp/l2s_wb/cases \\
        --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2s_ablation import predictor_variant  # noqa: E402  (a script beside this one)

MODELS = ("segmenter", "cascade", "cascade_every_slice", "gdfl")


def make_predictor(name: str, work: Path, fold: int):
    from autopetseg.demo import DATASET

    cascade = work / "results" / DATASET / "cascade_l2s__3d_fullres"
    if name == "gdfl":
        return predictor_variant(work / "gdfl" / "results" / DATASET / "gdfl__3d_fullres", fold)
    if name == "segmenter":
        return predictor_variant(cascade, fold, stages="segmenter")
    predictor = predictor_variant(cascade, fold)
    if name == "cascade_every_slice":
        predictor.settings.slice_batch_pixels = 1  # the batch size (2) wins
        predictor.every_slice = True
    return predictor


def main(argv: list[str] | None = None) -> int:
    import torch

    import autopetseg.inference.combine as combine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the work folder of benchmarks/l2s_ablation.py")
    p.add_argument("--cases", type=Path, help="cases to predict (default: WORK/data/held_out)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases or args.work / "data" / "held_out"
    rule = combine.READ_REGIONS["l2s_adaptive"]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.models}
    runs: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for name in args.models:
                predictor = make_predictor(name, args.work, args.fold)
                predictor.settings.prefetch = False
                every_slice = getattr(predictor, "every_slice", False)
                combine.READ_REGIONS["l2s_adaptive"] = (lambda *a: None) if every_slice else rule
                wall, cpu = time.perf_counter(), time.process_time()
                report = predictor.predict_folder(cases, Path(out) / name)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                runs[name] = report.n_windows - report.n_windows_skipped
        combine.READ_REGIONS["l2s_adaptive"] = rule
    medians = {name: [statistics.median(t[i] for t in v) for i in (0, 1)] for name, v in times.items()}
    print(f"{cases}: median of {args.repeats} (threads {torch.get_num_threads()})")
    for name, (wall, cpu) in medians.items():
        print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {runs[name]} windows + slices run; "
              f"walls {[round(t[0], 2) for t in times[name]]}")
    for reference in ("segmenter", "gdfl"):
        if reference in medians:
            for name in medians:
                if name != reference:
                    ratios = [medians[name][i] / medians[reference][i] for i in (0, 1)]
                    print(f"  {name} / {reference}: {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU")
    print(json.dumps({"medians_wall_cpu_s": medians, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
