"""Run one function over many cases in a process pool, collecting bad-input errors per case.

Every per-case stage (fingerprint, preprocessing, prediction, folder checks) has the same
shape: call ``fn(record)`` for each case, keep the results of the good cases, report the cases
whose input was bad (``InputError``) and finish the others, but stop on a genuine bug.
``run_per_case`` is that loop, once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")


class CaseFailed(RuntimeError):
    """A case failed with an error that is not bad input (a bug, out of memory...): the run stops.

    ``case`` names the case; the original exception is ``__cause__``.
    """

    def __init__(self, case: str, cause: BaseException):
        self.case = case
        super().__init__(f"case {case!r} failed: {type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class PoolSettings:
    """How workers are started. ``spawn`` is safe with torch/CUDA and threads in the parent;
    each worker gets ``threads_per_worker`` SimpleITK/torch threads so that N workers do not
    each start one thread per core."""

    start_method: str = "spawn"
    threads_per_worker: int | None = None  # None: cores // workers, at least 1


def _init_worker(threads: int) -> None:
    """Bound the threads each worker uses (called once per worker process)."""
    import sys

    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _run_one(fn: Callable[[CaseRecord], T], record: CaseRecord) -> tuple[str, T | None, InputError | None]:
    """Worker side: ``InputError`` comes back as a value so it never stops the pool."""
    try:
        return record.case_id, fn(record), None
    except InputError as exc:
        return record.case_id, None, exc.with_case(record.case_id)


def run_per_case(
    fn: Callable[[CaseRecord], T],
    records: Sequence[CaseRecord],
    num_processes: int = 1,
    desc: str = "cases",
    settings: PoolSettings = PoolSettings(),
) -> tuple[dict[str, T], list[InputError]]:
    """Call ``fn(record)`` for every record; return (case id → result for good cases, bad-input errors).

    * ``fn`` must be picklable when ``num_processes > 1``: a module-level function, or a
      ``functools.partial`` of one with picklable arguments (the pool uses ``spawn``).
    * ``InputError`` from a case is collected (naming the case) and the other cases go on.
    * Any other exception stops the run: pending cases are cancelled and ``CaseFailed`` naming
      the case is raised from the original exception.
    * ``num_processes <= 1`` runs in this process (no pool; easier to debug, no start-up cost).

    Results and failures are in the order of ``records``, whatever order the workers finish in.
    """
    order = {r.case_id: i for i, r in enumerate(records)}
    if len(order) != len(records):
        raise ValueError("run_per_case needs unique case ids")
    results: dict[str, T] = {}
    failures: list[InputError] = []

    def collect(case_id: str, result, error: InputError | None) -> None:
        if error is not None:
            log.warning("%s", error)
            failures.append(error)
        else:
            results[case_id] = result

    workers = max(1, min(int(num_processes), len(records)))
    if workers == 1:
        for record in tqdm(records, desc=desc, unit="case", disable=None):
            try:
                collect(*_run_one(fn, record))
            except Exception as exc:
                raise CaseFailed(record.case_id, exc) from exc
    else:
        threads = settings.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context(settings.start_method)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            futures: dict[Future, str] = {pool.submit(_run_one, fn, r): r.case_id for r in records}
            with tqdm(total=len(futures), desc=desc, unit="case", disable=None) as bar:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        case_id = futures[future]
                        exc = future.exception()
                        if exc is not None:
                            for other in pending:
                                other.cancel()
                            if isinstance(exc, BrokenProcessPool):
                                exc = RuntimeError(
                                    "a worker process died while this or another case ran (out of memory?); "
                                    "try fewer processes"
                                )
                            raise CaseFailed(case_id, exc) from exc
                        collect(*future.result())
                        bar.update(1)

    ordered = {case_id: results[case_id] for case_id in sorted(results, key=order.__getitem__)}
    failures.sort(key=lambda e: order.get(e.case, len(order)))
    return ordered, failures
