"""Errors that name the case and the file they are about."""

from __future__ import annotations

import os


class CaseError(Exception):
    """Something is wrong with one case: says which case, which file and what.

    A run over many cases catches this, records it, and goes on with the others.
    """

    def __init__(self, case_id: str, path: str | os.PathLike | None, message: str) -> None:
        self.case_id = case_id
        self.path = None if path is None else os.fspath(path)
        self.message = message
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"case {case_id}{where}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str | None, str]]:
        """Pickle with the constructor's arguments (a worker process sends it back whole)."""
        return (type(self), (self.case_id, self.path, self.message))


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, unsafe or not a brats_psp checkpoint."""


class RunError(ValueError):
    """An MLflow run cannot serve as asked (no evaluation, nothing in common with another run)."""


class DiscoveryError(ValueError):
    """A folder or datalist holds no usable case, or an ambiguous mix of layouts."""


def check_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is a plain file name; a CaseError if it would leave an output folder."""
    if not case_id or case_id in {".", ".."} or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise CaseError(case_id, None, "case id is not a plain file name; refusing to write outside the output folder")
    return case_id
