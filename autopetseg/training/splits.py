"""Cross-validation splits, stratified by cohort, patients kept together (GDFL paper §2.1).

The paper splits each cohort (lymphoma, lung cancer, melanoma, negative controls) into 5 parts
and makes fold f's validation set the union of the cohorts' f-th parts. Here:

- the unit that is assigned is the *patient* (all of a patient's studies go to one part), so no
  patient is ever in the training and validation set of one fold;
- a patient whose studies carry different cohorts belongs to the cohort of its first study
  (cases sorted by id); a missing cohort (``None``) is one cohort of its own;
- within a cohort the patients are shuffled with ``seed``, then placed largest first (by number of
  studies) into the part with the fewest studies of that cohort; ties go to the part with the
  fewest studies over all cohorts so far, then to the lowest index, which keeps the folds
  balanced in size as well as in cohort mix;
- the result does not depend on the order of ``cases``;
- with a ``label_column`` (a patient-level 0/1 label in the cases' ``clinical`` fields, e.g. the
  multitask trainer's ``prognosis``) the strata are (cohort, label) instead of the cohort, so each
  fold also gets its share of each class (patients without a label form a stratum of their own).
  Such splits are kept in their own file (``splits_file_name``), so that the folds of models
  already trained on ``splits.json`` never change.

The file format is nnU-Net's ``splits_final.json``: a list of ``{"train": [...], "val": [...]}``,
so a user may bring one made elsewhere; ``load_or_create_splits`` respects it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autopetseg.errors import InputError
from autopetseg.io_utils import read_json, write_json

logger = logging.getLogger(__name__)

N_FOLDS = 5  # folds of a new splits file (nnU-Net's five-fold cross-validation)

Split = dict[str, list[str]]


def splits_file_name(label_column: str | None = None) -> str:
    """``splits.json``, or ``splits_<label_column>.json`` for folds stratified by that label as well."""
    return "splits.json" if label_column is None else f"splits_{label_column}.json"


def _stratum(case: Mapping[str, Any], label_column: str | None) -> str:
    cohort = case.get("cohort")
    key = "" if cohort is None else str(cohort)
    if label_column is None:
        return key
    label = (case.get("clinical") or {}).get(label_column)
    return f"{key}|{'' if label in (None, '') else label}"


def _patients_by_cohort(cases: Sequence[Mapping[str, Any]],
                        label_column: str | None = None) -> dict[str, dict[str, list[str]]]:
    """stratum -> patient -> sorted case ids; the stratum is the cohort (``""`` for ``None``), with
    ``label_column`` the cohort and the label of the patient's first study."""
    seen: set[str] = set()
    for case in cases:
        case_id = case["case_id"]
        if case_id in seen:
            raise InputError(f"case id {case_id!r} appears twice in the dataset", case=case_id)
        seen.add(case_id)
    patient_cases: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for case in sorted(cases, key=lambda c: c["case_id"]):
        patient_cases[case.get("patient") or case["case_id"]].append(case)
    cohorts: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for patient, studies in patient_cases.items():
        cohorts[_stratum(studies[0], label_column)][patient] = [c["case_id"] for c in studies]
    return cohorts


def make_splits(cases: Sequence[Mapping[str, Any]], n_folds: int = N_FOLDS, seed: int = 12345,
                label_column: str | None = None) -> list[Split]:
    """Split ``cases`` (dicts with ``case_id``, ``patient``, ``cohort``; ``clinical`` with a
    ``label_column``) into ``n_folds`` folds, stratified by cohort (and label).

    Returns one ``{"train": ids, "val": ids}`` per fold, ids sorted. Raises ``InputError`` when a
    fold would get no validation case (fewer patients than folds).
    """
    if n_folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds, got n_folds={n_folds}")
    cohorts = _patients_by_cohort(cases, label_column)
    rng = np.random.default_rng(seed)
    fold_cases: list[list[str]] = [[] for _ in range(n_folds)]
    for cohort in sorted(cohorts):
        patients = sorted(cohorts[cohort])
        patients = [patients[i] for i in rng.permutation(len(patients))]
        # Stable sort keeps the shuffled order among patients with the same number of studies.
        patients.sort(key=lambda p: -len(cohorts[cohort][p]))
        in_cohort = [0] * n_folds
        for patient in patients:
            studies = cohorts[cohort][patient]
            fold = min(range(n_folds), key=lambda f: (in_cohort[f], len(fold_cases[f]), f))
            in_cohort[fold] += len(studies)
            fold_cases[fold].extend(studies)
    n_patients = sum(len(p) for p in cohorts.values())
    empty = [f for f in range(n_folds) if not fold_cases[f]]
    if empty:
        raise InputError(
            f"cannot make {n_folds} cross-validation folds from {len(cases)} cases of {n_patients} patients: "
            f"fold(s) {empty} would have no validation case; at least {n_folds} patients are needed "
            f"(or use fewer folds, or train on all cases with fold 'all')"
        )
    all_ids = sorted(i for ids in fold_cases for i in ids)
    splits = []
    for f in range(n_folds):
        val = set(fold_cases[f])
        splits.append({"train": [i for i in all_ids if i not in val], "val": sorted(val)})
    return splits


def validate_splits(raw: Any, known_case_ids: Sequence[str], path: str | Path | None = None) -> list[Split]:
    """Check a splits list (e.g. a user's file): structure, known ids, no case in train and val of a fold."""
    if not isinstance(raw, list) or not raw:
        raise InputError("splits must be a non-empty list of {'train': [...], 'val': [...]}", file=path)
    known = set(known_case_ids)
    splits: list[Split] = []
    for f, entry in enumerate(raw):
        if not isinstance(entry, dict) or not {"train", "val"} <= set(entry):
            raise InputError(f"fold {f} must be an object with 'train' and 'val' lists", file=path)
        train, val = entry["train"], entry["val"]
        if not all(isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in (train, val)):
            raise InputError(f"fold {f}: 'train' and 'val' must be lists of case ids", file=path)
        unknown = sorted((set(train) | set(val)) - known)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise InputError(f"fold {f} names {len(unknown)} case(s) not in the dataset: {shown}", file=path)
        leaked = sorted(set(train) & set(val))
        if leaked:
            raise InputError(f"fold {f} has case(s) in both train and val: {', '.join(leaked[:5])}", file=path)
        splits.append({"train": list(train), "val": list(val)})
    unused = known - {i for s in splits for i in s["train"] + s["val"]}
    if unused:
        logger.warning("%d dataset case(s) are in no fold of the splits file %s and will not be used", len(unused), path)
    return splits


def load_or_create_splits(
    path: str | Path, cases: Sequence[Mapping[str, Any]], n_folds: int = N_FOLDS, seed: int = 12345,
    label_column: str | None = None,
) -> list[Split]:
    """Read ``path`` if it exists (a user's file is respected after validation), else make and write it."""
    path = Path(path)
    known = [c["case_id"] for c in cases]
    if path.exists():
        try:
            raw = read_json(path)
        except ValueError as exc:
            raise InputError(f"splits file is not valid JSON: {exc}", file=path) from None
        splits = validate_splits(raw, known, path)
        if len(splits) != n_folds:
            logger.info("using %d folds from existing %s (asked for %d)", len(splits), path, n_folds)
        return splits
    if label_column is not None and not any((c.get("clinical") or {}).get(label_column) not in (None, "")
                                            for c in cases):
        columns = sorted({k for c in cases for k in (c.get("clinical") or {})})
        raise InputError(f"no case has a value in column {label_column!r} of clinical.csv (columns found: "
                         f"{', '.join(columns) or 'none'})", file=path.parent / "dataset.json")
    splits = make_splits(cases, n_folds=n_folds, seed=seed, label_column=label_column)
    write_json(path, splits)
    logger.info("wrote %d-fold splits to %s", n_folds, path)
    return splits


def fold_cases(splits: Sequence[Split], fold: int | str) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold``; ``"all"`` trains on every case of the splits and validates on none."""
    if isinstance(fold, str) and fold != "all":
        if not fold.isdigit():
            raise InputError(f"fold must be an integer or 'all', got {fold!r}")
        fold = int(fold)
    if fold == "all":
        return sorted({i for s in splits for i in s["train"] + s["val"]}), []
    if not 0 <= fold < len(splits):
        raise InputError(f"fold {fold} does not exist; the splits have folds 0..{len(splits) - 1} and 'all'")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
