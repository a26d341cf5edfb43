"""``plan_and_preprocess``: discovery → fingerprint → plan → preprocess, each stage writing what
the next reads (``dataset.json``, ``fingerprint.json``, ``plans.json``, the cache).

A re-run continues where the last one stopped and keeps what the user changed:

* ``fingerprint.json`` is reused. Cases it does not hold (bad last time, or new) are measured
  again; if one of them is good now the fingerprint is measured anew (its statistics pool the
  cases' samples, which are not stored), otherwise their current errors are reported. A case
  whose files changed since it was measured (size, modification time or content hash,
  ``data.provenance``) also has the fingerprint measured anew.
* ``plans.json`` is reused, hand edits included, when it was made for the same budget; a
  configuration it lacks is planned and added beside the others. A different budget plans again
  (with a warning: hand edits of the old file are replaced). When the fingerprint was measured
  anew and would now give other plans, a warning names the differences (the file is kept;
  ``--overwrite`` plans again).
* preprocessing skips cases whose cache files exist and were made with the same plans from the
  same source files; a case whose files changed is preprocessed again.
* the fingerprint pass saves every good case cut to its body box in ``cropped/`` (the cropped
  stage, ``preprocessing.cropping``); preprocessing reads those instead of the raw files, and a
  fingerprint measured again reuses the entries whose source files did not change.

``overwrite`` redoes all three.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from autopetseg.data.discovery import discover
from autopetseg.data.parallel import run_per_case
from autopetseg.data.provenance import changed_sources
from autopetseg.data.records import Dataset
from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, remove_stale_temporaries, write_json
from autopetseg.paths import dataset_name, preprocessed_dir, resolve_raw_dataset
from autopetseg.planning.fingerprint import Fingerprint, extract_fingerprint, fingerprint_case
from autopetseg.models.costs import machine_memory_bytes, planner_cost
from autopetseg.planning.named_plans import AUTO, check_plans_name, paper_plans, plans_file
from autopetseg.planning.planner import KNOWN_CONFIGURATIONS, NETWORK_FAMILIES, PlannerSettings, plan_experiment
from autopetseg.planning.plans import ComputeBudget, Plans
from autopetseg.preprocessing import preprocess_dataset
from autopetseg.data.cropping import CROPPED_FOLDER

log = logging.getLogger(__name__)

SHOWN_CHANGES = 10  # changed cases named one by one in the log; the rest are counted


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
    plans_name: str = AUTO,
) -> PlanAndPreprocessResult:
    """Run the three planning stages on a raw dataset folder (or name/id under ``AUTOPETSEG_RAW``).

    Bad cases are reported in ``failures`` and left out; the good ones are planned for and
    preprocessed. Raises ``InputError`` for an unknown configuration or budget, a folder that
    is not a dataset, or a dataset without a single usable case. ``planner_settings`` (e.g.
    ``PlannerSettings.gdfl()``) is used when plans are made, not when an existing file is kept.
    ``plans_name``: ``auto`` (``plans.json``) or a paper's plans (``planning.named_plans``), written
    as ``plans_<name>.json`` beside the default and sharing its cache where spacing and
    normalization agree.
    """
    check_plans_name(plans_name)
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
    remove_stale_temporaries(out_dir, recursive=True)  # of killed runs: cropped cases, cache arrays

    found = discover(raw_dir)
    log.info("%s: %d cases in the %s layout", name, len(found.cases), found.layout)

    cropped_dir = out_dir / CROPPED_FOLDER
    fingerprint_path = out_dir / "fingerprint.json"
    before = fingerprint_path.stat().st_mtime_ns if fingerprint_path.is_file() else None
    fingerprint, failures = _reuse_or_fingerprint(fingerprint_path, found, num_processes, overwrite, cropped_dir)
    bad = {f.case for f in failures}
    good = Dataset(found.root, found.layout, [c for c in found.cases if c.case_id not in bad])

    if plans_name == AUTO:
        plans = _reuse_or_plan(out_dir / "plans.json", fingerprint, budget, configurations, name, overwrite,
                               planner_settings)
        if before is not None and not overwrite and fingerprint_path.stat().st_mtime_ns != before:
            _warn_if_the_plans_would_change(out_dir / "plans.json", plans, fingerprint, name, planner_settings)
    else:
        plans = _reuse_or_plan_paper(plans_file(out_dir, plans_name), plans_name, fingerprint, budget,
                                     configurations, name, overwrite)

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
            known = {c.case_id: c for c in fingerprint.cases}
            others = [c for c in found.cases if c.case_id not in known]
            changed = {c.case_id: changes for c in found.cases if c.case_id in known
                       and (changes := changed_sources(c, known[c.case_id].sources))}
            for case_id, changes in list(changed.items())[:SHOWN_CHANGES]:
                log.warning("case %r: %s since the fingerprint measured it", case_id, ", ".join(changes))
            if changed:
                log.warning("%d case(s) changed since %s was made; measuring the dataset again", len(changed), path.name)
                others = []
            if not others and not changed:
                log.info("reusing %s", path)
                return fingerprint, []
            if others:
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


def _plan(fingerprint: Fingerprint, budget: ComputeBudget, configurations: tuple[str, ...], name: str,
          settings: PlannerSettings | None, target_spacing_zyx: list[float] | None = None) -> Plans:
    """The ``auto`` plans: ``3d_fullres`` sized for every network the planner knows, each with its own
    fitted cost model (``models.costs``), so that ``train -tr METHOD`` finds its own network's size."""
    return plan_experiment(fingerprint, budget, configurations=configurations, dataset_name=name, settings=settings,
                           target_spacing_zyx=target_spacing_zyx, networks=tuple(NETWORK_FAMILIES), cost=planner_cost)


def _reuse_or_plan_paper(path: Path, plans_name: str, fingerprint: Fingerprint, budget: ComputeBudget,
                         configurations: tuple[str, ...], name: str, overwrite: bool) -> Plans:
    """A paper's plans (``planning.named_plans``): kept when made for the same budget, else made and
    checked against the budget (an ``InputError`` naming the nearest plan that fits)."""
    if set(configurations) != {"3d_fullres"}:
        raise InputError(f"plans {plans_name!r} hold the paper's 3d_fullres configuration only, not {list(configurations)}")
    if path.exists() and not overwrite:
        existing = Plans.load(path)
        if existing.budget == budget:
            log.info("reusing %s (use --overwrite to plan again)", path)
            return existing
    auto_path = path.parent / "plans.json"
    auto = Plans.load(auto_path) if auto_path.exists() else None
    plans = paper_plans(plans_name, fingerprint, budget, planner_cost, dataset_name=name, auto=auto,
                        cpu_memory_bytes=machine_memory_bytes())
    plans.save(path)
    log.info("plans %s written to %s", plans_name, path)
    return plans


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
            added = _plan(fingerprint, budget, missing, name, settings, target_spacing_zyx=spacing)
            merged = replace(existing, configurations={**existing.configurations, **added.configurations})
            merged.save(path)
            log.info("added configuration(s) %s to %s", list(missing), path)
            return merged
        log.warning("%s was planned for %s, not %s: planning again (edits to the old file are replaced)",
                    path, existing.budget, budget)
    plans = _plan(fingerprint, budget, configurations, name, settings)
    plans.save(path)
    log.info("plans written to %s", path)
    return plans


def _warn_if_the_plans_would_change(path: Path, plans: Plans, fingerprint: Fingerprint, name: str,
                                    settings: PlannerSettings | None) -> None:
    """After the fingerprint was measured anew (the data changed), plan again in memory and say what
    the kept ``plans.json`` would change to: kept because it may hold hand edits and trained models
    refer to it."""
    fresh = _plan(fingerprint, plans.budget, tuple(c for c in plans.configurations if c in KNOWN_CONFIGURATIONS),
                  name, settings)
    differences = plan_differences(asdict(plans), asdict(fresh))
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        log.warning("the data changed and would now be planned differently (%s); %s is kept as it is: run with "
                    "--overwrite to plan again", shown, path)


def plan_differences(old, new, where: str = "") -> list[str]:
    """``"key.path old -> new"`` for each leaf that differs between two plans as dicts (notes left out)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key == "notes":
                continue
            out += plan_differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and list(old) == list(new):
        return []
    return [] if old == new else [f"{where} {old} -> {new}"]
