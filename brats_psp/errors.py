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


class DiscoveryError(ValueError):
    """A folder or datalist holds no usable case, or an ambiguous mix of layouts."""
