"""``plan_and_preprocess``: discovery → fingerprint → plan → preprocess, each stage writing what
the next reads (``dataset.json``, ``fingerprint.json``, ``plans.json``, the cache).

A re-run continues where the last one stopped and keeps what the user changed:

* ``fingerprint.json`` is reused. Cases it does not hold (bad last time, or new) are measured
  again; if one of them is good now the fingerprint is measured anew (its statistics pool the
  cases' samples, which are not stored), otherwise their current errors are reported.
* ``plans.json`` is reused, hand edits included, when it was made for the same budget; a
  configuration it lacks is planned and added beside the others. A different budget plans again
  (with a warning: hand edits of the old file are replaced).
* preprocessing skips cases whose cache files exist and were made with the same plans.
* the fingerprint pass saves every good case cut to its body box in ``cropped/`` (the cropped
  stage, ``preprocessing.cropping``); preprocessing reads those instead of the raw files, and a
  fingerprint measured again reuses the entries whose source files did not change.

``overwrite`` redoes all three.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from autopetseg.data.discovery import discover
from autopetseg.data.parallel import run_per_case
from autopetseg.data.records import Dataset
from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, write_json
from autopetseg.paths import dataset_name, preprocessed_dir, resolve_raw_dataset
from autopetseg.planning.fingerprint import Fingerprint, extract_fingerprint, fingerprint_case
from autopetseg.planning.planner import KNOWN_CONFIGURATIONS, PlannerSettings, plan_experiment
from autopetseg.planning.plans import ComputeBudget, Plans
from autopetseg.preprocessing import preprocess_dataset
from autopetseg.data.cropping import CROPPED_FOLDER

log = logging.getLogger(__name__)


@dataclass
class PlanAndPreprocessResult:
    output_dir: Path
    plans: Plans
    failures: list[InputError] = field(default_factory=list)


def dataset_manifest(dataset: Dataset, excluded: set[str] = frozenset()) -> dict:
    """What training needs to know about the cases without the raw folder: ids, patients, cohorts."""
    return {
        "layout": dataset.layout,
        "root": str(dataset.root),
        "cases": [
            {"case_id": c.case_id, "patient": c.patient, "cohort": c.cohort, "clinical": c.clinical}
            for c in dataset.cases
            if c.case_id not in excluded
        ],
    }


def plan_and_preprocess(
    dataset: str | Path,
    configurations: tuple[str, ...] = ("3d_fullres",),
    budget: ComputeBudget | None = None,
    num_processes: int = 2,
    overwrite: bool = False,
    raw_root: str | Path | None = None,
    preprocessed_root: str | Path | None = None,
    planner_settings: PlannerSettings | None = None,
) -> PlanAndPreprocessResult:
    """Run the three planning stages on a raw dataset folder (or name/id under ``AUTOPETSEG_RAW``).

    Bad cases are reported in ``failures`` and left out; the good ones are planned for and
    preprocessed. Raises ``InputError`` for an unknown configuration or budget, a folder that
    is not a dataset, or a dataset without a single usable case. ``planner_settings`` (e.g.
    ``PlannerSettings.gdfl()``) is used when plans are made, not when an existing file is kept.
    """
    budget = budget or ComputeBudget()
    configurations = tuple(configurations)
    unknown = [c for c in configurations if c not in KNOWN_CONFIGURATIONS]
    if unknown or not configurations:
        raise InputError(f"unknown configuration(s) {unknown or list(configurations)}; known: {list(KNOWN_CONFIGURATIONS)}")
    try:
        budget.validate()
    except ValueError as exc:
        raise InputError(f"invalid compute budget: {exc}") from None

    raw_dir = resolve_raw_dataset(dataset, raw_root)
    name = dataset_name(raw_dir)
    out_dir = preprocessed_dir(name, preprocessed_root)
    out_dir.mkdir(parents=True, exist_ok=True)

    found = discover(raw_dir)
    log.info("%s: %d cases in the %s layout", name, len(found.cases), found.layout)

    cropped_dir = out_dir / CROPPED_FOLDER
    fingerprint, failures = _reuse_or_fingerprint(out_dir / "fingerprint.json", found, num_processes, overwrite,
                                                  cropped_dir)
    bad = {f.case for f in failures}
    good = Dataset(found.root, found.layout, [c for c in found.cases if c.case_id not in bad])

    plans = _reuse_or_plan(out_dir / "plans.json", fingerprint, budget, configurations, name, overwrite,
                           planner_settings)

    failures += preprocess_dataset(good, plans, out_dir, configurations=configurations,
                                   num_processes=num_processes, overwrite=overwrite, cropped_dir=cropped_dir)
    # Written last and without any failed case, so that training only sees cases in the cache.
    manifest = dataset_manifest(good, {f.case for f in failures})
    manifest_path = out_dir / "dataset.json"
    if overwrite or _read_or_none(manifest_path) != manifest:
        write_json(manifest_path, manifest)
    return PlanAndPreprocessResult(out_dir, plans, failures)


def _read_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _reuse_or_fingerprint(path: Path, found: Dataset, num_processes: int, overwrite: bool,
                          cropped_dir: Path) -> tuple[Fingerprint, list[InputError]]:
    """The fingerprint of the discovered cases and the cases that failed (module docstring)."""
    if path.exists() and not overwrite:
        try:
            fingerprint = Fingerprint.load(path)
        except InputError as exc:
            log.warning("%s; measuring the dataset again", exc)
        else:
            known = set(fingerprint.case_ids())
            others = [c for c in found.cases if c.case_id not in known]
            if not others:
                log.info("reusing %s", path)
                return fingerprint, []
            # Cheap: only the cases the fingerprint lacks are loaded again.
            measure = functools.partial(fingerprint_case, cropped_dir=str(cropped_dir))
            recovered, failures = run_per_case(measure, others, num_processes, "check cases")
            if not recovered:
                log.info("reusing %s (%d case(s) still failing)", path, len(failures))
                return fingerprint, failures
            log.info("%d case(s) not in %s can be measured now; measuring the dataset again",
                     len(recovered), path.name)
    fingerprint, failures = extract_fingerprint(found, num_processes=num_processes, cropped_dir=cropped_dir,
                                                overwrite=overwrite)
    fingerprint.save(path)
    return fingerprint, failures


def _reuse_or_plan(path: Path, fingerprint: Fingerprint, budget: ComputeBudget, configurations: tuple[str, ...],
                   name: str, overwrite: bool, settings: PlannerSettings | None) -> Plans:
    """Keep an existing (possibly hand-edited) plans.json made for the same budget, adding the
    configurations it lacks; otherwise plan afresh. A hand-edited file that does not validate
    raises ``InputError`` (it is never silently replaced)."""
    if path.exists() and not overwrite:
        existing = Plans.load(path)
        if existing.budget == budget:
            missing = tuple(c for c in configurations if c not in existing.configurations)
            if not missing:
                log.info("reusing %s (use --overwrite to plan again)", path)
                return existing
            # The new configuration shares the cache of the existing ones: keep their (maybe edited) spacing.
            spacing = (existing.configurations["3d_fullres"].spacing_zyx if "3d_fullres" in existing.configurations
                       else existing.target_spacing_zyx)
            added = plan_experiment(fingerprint, budget, configurations=missing, dataset_name=name, settings=settings,
                                    target_spacing_zyx=spacing)
            merged = replace(existing, configurations={**existing.configurations, **added.configurations})
            merged.save(path)
            log.info("added configuration(s) %s to %s", list(missing), path)
            return merged
        log.warning("%s was planned for %s, not %s: planning again (edits to the old file are replaced)",
                    path, existing.budget, budget)
    plans = plan_experiment(fingerprint, budget, configurations=configurations, dataset_name=name, settings=settings)
    plans.save(path)
    log.info("plans written to %s", path)
    return plans
