"""Errors a user can act on.

Every problem caused by the user's input (config, files, columns, values) raises a subclass of
:class:`AgcError`. The CLI prints its message on one line and exits with status 2; anything else is a
bug and keeps its traceback. Messages name the file, the column and the first offending rows, so the
user can find the problem without a debugger.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: how many offending rows / values an error message shows
MAX_SHOWN = 5


class AgcError(Exception):
    """Base class of user-facing errors (exit status 2 in the CLI)."""

    exit_code = 2


class ConfigError(AgcError):
    """The configuration is invalid: unknown key, bad value, unknown method, impossible n_clusters."""


class InputError(AgcError):
    """An input file or table is missing, malformed or inconsistent.

    ``file``, ``column`` and ``rows`` (0-based row numbers of the offending records, in file order)
    are kept as attributes for tests and for programmatic callers.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: Any = None,
        column: str | None = None,
        rows: Sequence[int] | None = None,
        values: Sequence[Any] | None = None,
        count: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = None if file is None else str(file)
        self.column = column
        self.rows = [int(r) for r in rows[:MAX_SHOWN]] if rows is not None else None
        self.values = list(values[:MAX_SHOWN]) if values is not None else None
        self.count = count
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.column:
            where.append(f"column '{self.column}'")
        msg = (": ".join(where) + ": " if where else "") + self.problem
        if self.rows is not None:
            total = f" ({self.count} in all)" if self.count is not None else ""
            msg += f"; first offending rows{total}: {self.rows}"
            if self.values is not None:
                msg += f" with values {[_short(v) for v in self.values]}"
        elif self.values is not None:
            msg += f"; offending values: {[_short(v) for v in self.values]}"
        if self.hint:
            msg += f". {self.hint}"
        return msg


class StageError(AgcError):
    """A pipeline stage could not run on otherwise valid input (for example k larger than n)."""


def _short(v: Any, limit: int = 40) -> Any:
    if isinstance(v, str) and len(v) > limit:
        return v[: limit - 3] + "..."
    return v


def first_rows(mask) -> tuple[list[int], int]:
    """Row numbers (first few) and count of the True entries of a boolean numpy mask."""
    import numpy as np

    idx = np.flatnonzero(np.asarray(mask))
    return idx[:MAX_SHOWN].tolist(), int(idx.size)
