"""Per study: which PET series, which CT, which segmentation. Never a silent guess.

* PET: the single-frame PET series of the study. Several: attenuation- and decay-corrected first,
  then the most slices (a whole-body series over a reformatted or cropped copy), then the latest.
* CT: a CT series in the PET's frame of reference (a PET/CT scanner gives both one); several: the
  nearest in series time to the PET, then the most slices. A CT in another frame of reference is
  only taken when ``--series`` names it.
* Segmentation (optional): an RTSTRUCT or DICOM SEG drawn on the PET series, else on the CT, else
  anywhere in the PET's frame of reference; several: the most recent.

When a rule chooses among several candidates, every candidate and the choice are logged and kept in
the case's ``.dicom.json``; ``--series UID`` (series or SOP instance UID, repeatable) picks instead.
A study whose PET series is enhanced multi-frame, whose PET or CT UID mixes several kinds of
object, or that has no CT is an ``InputError`` naming its folders.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Sequence, TypeVar

from autopetseg.data.dicom.catalog import Instance, Series, Study
from autopetseg.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
_UNKNOWN_TIME = float("inf")


@dataclass
class StudySelection:
    """What one PET study becomes: a case."""

    case_id: str
    patient: str
    study: Study
    pet: Series
    ct: Series
    segmentation: Instance | None
    notes: list[str] = field(default_factory=list)  # each choice made among several candidates


def _safe(text: str, fallback: str) -> str:
    """A file-name-safe id: letters, digits, '-' and '_' kept, anything else as '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return cleaned or fallback


def patient_and_study_ids(study: Study) -> tuple[str, str]:
    """(patient folder, study folder) names: PatientID and StudyDate (file-name safe)."""
    patient = _safe(study.patient_id, "patient")
    date = _safe(study.study_date, "") or "study"
    return patient, date


def _timestamp(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else float("-inf")


def _pick(candidates: Sequence[T], chosen: set[str], uids: Callable[[T], set[str]], rank: Callable[[T], tuple],
          what: str, rule: str, describe: Callable[[T], str], case: str, folders: str) -> tuple[T, str | None]:
    """The candidate ``--series`` names, the only one, or the best by ``rank`` (logged)."""
    named = [c for c in candidates if uids(c) & chosen]
    if len(named) > 1:
        raise InputError(f"--series names {len(named)} {what} candidates of one study: "
                         + "; ".join(describe(c) for c in named), case, folders)
    if named:
        return named[0], (f"{what}: {describe(named[0])} (named by --series)" if len(candidates) > 1 else None)
    if len(candidates) == 1:
        return candidates[0], None
    ordered = sorted(candidates, key=rank)
    note = (f"{what}: {len(candidates)} candidates, took {describe(ordered[0])} ({rule}); others: "
            + "; ".join(describe(c) for c in ordered[1:]) + ". Pass --series UID to take another.")
    log.warning("%s: %s", case, note)
    return ordered[0], note


def _check_not_mixed(study: Study, case: str) -> None:
    for series in study.series.values():
        if series.kind == "mixed" and series.kinds & {"pet", "pet_enhanced", "ct", "ct_enhanced"}:
            counts = ", ".join(f"{sum(i.kind == k for i in series.instances)} {k}" for k in sorted(series.kinds))
            raise InputError(f"mixed series: SeriesInstanceUID {series.uid} holds {counts} objects; "
                             "export each series on its own", case, series.folder_text)


def _choose_pet(study: Study, chosen: set[str], case: str) -> tuple[Series, str | None]:
    pets = study.of_kind("pet")
    if not pets:
        enhanced = study.of_kind("pet_enhanced")
        raise InputError("enhanced multi-frame PET is not supported; export the PET as single-frame images "
                         f"(one file per slice): {'; '.join(s.summary() for s in enhanced)}",
                         case, "; ".join(s.folder_text for s in enhanced))

    def rank(s: Series) -> tuple:
        corrected = {"ATTN", "DECY"} <= set(s.first.corrected_image)
        return (not corrected, -len(s.instances), -_timestamp(s.time))

    return _pick(pets, chosen, lambda s: {s.uid}, rank, "PET", "attenuation- and decay-corrected first, then "
                 "the most slices, then the latest", Series.summary, case, study.folder_text)


def _choose_ct(study: Study, pet: Series, chosen: set[str], case: str) -> tuple[Series, str | None]:
    cts = study.of_kind("ct")
    if not cts:
        enhanced = study.of_kind("ct_enhanced")
        extra = f" (enhanced multi-frame CT is not supported: {enhanced[0].folder_text})" if enhanced else ""
        raise InputError(f"PET study without a CT series{extra}; the model needs both", case, pet.folder_text)
    same_frame = [s for s in cts if s.frame_of_reference_uid == pet.frame_of_reference_uid]
    named_elsewhere = [s for s in cts if s.uid in chosen and s not in same_frame]
    if not same_frame and not named_elsewhere:
        raise InputError(
            f"no CT in the PET's frame of reference {pet.frame_of_reference_uid}; CT series of the study: "
            + "; ".join(s.summary() for s in cts) + ". Pass --series CT_UID to pair one anyway",
            case, pet.folder_text)
    pet_time = _timestamp(pet.time)

    def rank(s: Series) -> tuple:
        gap = abs(_timestamp(s.time) - pet_time) if s.time is not None and pet.time is not None else _UNKNOWN_TIME
        return (gap, -len(s.instances))

    return _pick(same_frame + named_elsewhere, chosen, lambda s: {s.uid}, rank, "CT",
                 "same frame of reference, nearest in time to the PET, then the most slices", Series.summary,
                 case, study.folder_text)


def _describe_segmentation(instance: Instance) -> str:
    made = instance.content_time.isoformat(sep=" ") if instance.content_time else "date unknown"
    return f"{instance.kind.upper()} {instance.sop_instance_uid} (series {instance.series_uid}, {made}) {instance.path}"


def _choose_segmentation(study: Study, pet: Series, ct: Series, chosen: set[str],
                         case: str) -> tuple[Instance | None, str | None]:
    def link(instance: Instance) -> int | None:
        if pet.uid in instance.referenced_series:
            return 0
        if ct.uid in instance.referenced_series:
            return 1
        return 2 if instance.frame_of_reference_uid == pet.frame_of_reference_uid else None

    candidates = [i for s in study.of_kind("rtstruct", "seg") for i in s.instances if link(i) is not None]
    if not candidates:
        return None, None
    return _pick(candidates, chosen, lambda i: {i.series_uid, i.sop_instance_uid},
                 lambda i: (link(i), -_timestamp(i.content_time)), "segmentation",
                 "drawn on the PET, else on the CT, else in the same frame of reference; then the most recent",
                 _describe_segmentation, case, study.folder_text)


def select_study(study: Study, chosen: Sequence[str] = (), case_id: str | None = None) -> StudySelection | None:
    """The case a study makes; ``None`` for a study without PET; ``InputError`` for a PET study that cannot be used."""
    patient, date = patient_and_study_ids(study)
    case = case_id or f"{patient}_{date}"
    if not study.of_kind("pet", "pet_enhanced") and not any(
            s.kind == "mixed" and s.kinds & {"pet", "pet_enhanced"} for s in study.series.values()):
        return None
    chosen_set = set(chosen)
    _check_not_mixed(study, case)
    pet, pet_note = _choose_pet(study, chosen_set, case)
    ct, ct_note = _choose_ct(study, pet, chosen_set, case)
    segmentation, seg_note = _choose_segmentation(study, pet, ct, chosen_set, case)
    notes = [n for n in (pet_note, ct_note, seg_note) if n]
    return StudySelection(case, patient, study, pet, ct, segmentation, notes)
