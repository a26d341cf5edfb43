"""What a case is, independent of the folder layout it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autopetseg.errors import InputError


@dataclass
class CaseRecord:
    """One PET/CT study as found on disk.

    ``pet`` or ``ct`` may be ``None`` when discovery found the case but not that channel;
    loading such a case raises an ``InputError`` naming the missing channel, so a folder run
    reports it beside the other bad cases. ``label`` is ``None`` for unlabelled cases.
    """

    case_id: str
    pet: Path | None
    ct: Path | None
    label: Path | None = None
    patient_id: str | None = None
    cohort: str | None = None
    clinical: dict[str, str] = field(default_factory=dict)
    # A problem discovery found with this case's files (two files for one channel). Reading the
    # case raises it, so a folder run reports this case beside the other bad ones and goes on.
    problem: InputError | None = None

    def raise_problem(self) -> None:
        if self.problem is not None:
            raise self.problem

    @property
    def patient(self) -> str:
        """Patient id for keeping a patient's studies in one fold; the case id when unknown."""
        return self.patient_id or self.case_id


@dataclass
class Dataset:
    """A discovered folder: its layout name and its cases sorted by id."""

    root: Path
    layout: str  # "nnunet", "autopet" or "flat"
    cases: list[CaseRecord]

    def by_id(self) -> dict[str, CaseRecord]:
        return {c.case_id: c for c in self.cases}
