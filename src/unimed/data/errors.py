"""Errors for bad dataset input, and the raise-or-skip policy that the adapters share.

A :class:`DataError` always names the file and, where one is involved, the line and the column, so
a user can open the file and fix it. Under ``on_error="skip"`` the same errors are counted by reason
instead of raised, so no row is ever lost silently.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ON_ERROR_OPTIONS: tuple[str, ...] = ("raise", "skip")

MALFORMED_ROW = "malformed row"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
MISSING_REPORT = "missing report file"
EMPTY_REPORT = "empty report"
NON_UTF8 = "non-UTF-8 text"


class DataError(Exception):
    """Bad input data; the message names the file and, when relevant, the line and column.

    `reason` is the short category under which the error is counted when rows are skipped. The
    message is kept on one line (a library's own message may span several: pydicom lists each
    decoder plugin it tried on a line of its own), so it reads as one line wherever it is shown.
    """

    def __init__(
        self,
        message: str,
        path: str | Path,
        line: int | None = None,
        column: str | None = None,
        reason: str = MALFORMED_ROW,
    ) -> None:
        self.message = _one_line(message)
        self.path = Path(path)
        self.line = line
        self.column = column
        self.reason = reason
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {self.message}")

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses from a DataLoader worker to
        the main process intact."""
        return type(self), (self.message, self.path, self.line, self.column, self.reason)


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines).replace(":; ", ": ")


def check_on_error(on_error: str) -> str:
    """Return `on_error` if it is a valid option, else raise ValueError listing the options."""
    if on_error not in ON_ERROR_OPTIONS:
        valid = ", ".join(repr(o) for o in ON_ERROR_OPTIONS)
        raise ValueError(f"on_error must be one of {valid}, got {on_error!r}")
    return on_error


EXAMPLES_PER_REASON = 3


class DropCounter:
    """Counts dropped records by reason and applies the raise-or-skip policy to bad rows; keeps the
    first messages of each reason of bad input (`examples`) so a summary can show them."""

    def __init__(self, on_error: str = "raise") -> None:
        self.on_error = check_on_error(on_error)
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def drop(self, reason: str, count: int = 1) -> None:
        """Count `count` records removed by a filter (not an error)."""
        self.counts[reason] += count

    def bad(self, error: DataError) -> None:
        """Raise `error` under on_error="raise"; otherwise count it under its reason and go on."""
        if self.on_error == "raise":
            raise error
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(str(error))
        if self.counts[error.reason] == 0:
            logger.warning("skipping bad input (%s): %s", error.reason, error)
        else:
            logger.debug("skipping bad input (%s): %s", error.reason, error)
        self.counts[error.reason] += 1

    def as_dict(self) -> dict[str, int]:
        """Reason -> count, only for reasons that dropped something."""
        return {reason: n for reason, n in sorted(self.counts.items()) if n > 0}
