"""Errors a user can act on."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input data: names the case, the file and what is wrong.

    The CLI prints ``str(error)`` as one line and exits non-zero; folder runs collect these per
    case and finish the good cases first.
    """

    def __init__(self, reason: str, case: str | None = None, file: str | Path | None = None):
        self.reason = reason
        self.case = case
        self.file = str(file) if file is not None else None
        where = []
        if case is not None:
            where.append(f"case {case!r}")
        if file is not None:
            where.append(f"file {self.file}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)

    def with_case(self, case: str) -> "InputError":
        """The same error, naming the case if it did not already."""
        return self if self.case is not None else InputError(self.reason, case, self.file)
