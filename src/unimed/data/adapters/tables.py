"""Reading the CSV / text tables of dataset layouts, with errors that name file, line and column."""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from unimed.data.errors import MALFORMED_ROW, NON_UTF8, DataError


def open_text(path: Path) -> IO[str]:
    """Open a text file, gunzipping `.gz` files.

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that
    :func:`check_utf8` can name the exact line that holds them, and that line alone can be skipped.
    """
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")


def check_utf8(text: str, path: Path, line: int) -> None:
    """Raise DataError naming the line if `text` came from bytes that are not UTF-8, with the
    first such byte and what it reads as in Windows-1252 (Excel's "CSV" on Western Windows; a
    table saved so is one error per line with an accent)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = err.object[err.start].encode("utf-8", "surrogateescape")
        raise DataError(f"not UTF-8 text (byte 0x{raw.hex()}, {raw.decode('cp1252', 'replace')!r} in "
                        "Windows-1252; save the table as UTF-8)", path, line, reason=NON_UTF8) from None


def find_file(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` under `root` that exists (each also tried as `.gz`), else DataError."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    tried = ", ".join(names)
    raise DataError(f"{what} not found; expected one of: {tried} (or .gz)", root)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of a text file; call :func:`check_utf8` on each line."""
    try:
        with open_text(path) as f:
            for line, text in enumerate(f, start=1):
                yield line, text.rstrip("\r\n")
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read file ({err})", path) from None


class CsvTable:
    """A CSV file whose header holds `required` columns (names compared after stripping spaces).

    Iterating yields (line number the row starts on, row dict); a row with the wrong number of
    fields raises a DataError from :meth:`row` so the caller can skip it under on_error="skip".
    """

    def __init__(self, path: Path, required: Sequence[str]) -> None:
        self.path = path
        records = self._records()
        try:
            header = next(records, None)
        finally:
            records.close()
        if header is None:
            raise DataError(f"empty file; expected columns {list(required)}", path, 1)
        check_utf8("".join(header[2]), path, 1)
        self.columns = [name.strip() for name in header[2]]
        twice = next((c for i, c in enumerate(self.columns) if c and c in self.columns[:i]), None)
        if twice is not None:
            places = [i + 1 for i, c in enumerate(self.columns) if c == twice]
            raise DataError(f"column {twice!r} appears {len(places)} times (columns {places}); one of them "
                            "would be read and the others lost", path, 1, twice)
        missing = [c for c in required if c not in self.columns]
        if missing:
            other = [d for d in ";\t|" if len(self.columns) == 1 and d in self.columns[0]]
            raise DataError(
                f"missing column(s) {missing}; expected columns {list(required)}, "
                f"found {self.columns}"
                + (f" (the table is separated by {other[0]!r}; it must be comma-separated)" if other else ""),
                path,
                1,
                missing[0],
            )

    def _records(self) -> Iterator[tuple[int, int, list[str]]]:
        # A quoted cell may span lines: a record is named by the line it starts on.
        line = 0
        try:
            with open_text(self.path) as f:
                reader = csv.reader(f)
                for values in reader:
                    start, line = line + 1, reader.line_num
                    if values:
                        yield start, line, values
        except (OSError, EOFError, csv.Error) as err:
            raise DataError(f"cannot read CSV ({err})", self.path, line + 1) from None

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        """(line, values) per record. A record over several lines with the wrong number of fields
        is an error of the table, not a row to skip: a quote left open swallows every line up to
        the next quote (or the end of the file) into one field, rows that a skip would lose
        while counting one."""
        records = self._records()
        next(records, None)
        for start, end, values in records:
            if end > start and len(values) != len(self.columns):
                raise DataError(f"a quoted field opened here runs to line {end} (a quote left open?): "
                                f"its {end - start + 1} lines read as one record of {len(values)} field(s), "
                                f"not {len(self.columns)}; write a quote inside a field as \"\"",
                                self.path, start)
            yield start, values

    def row(self, line: int, values: list[str]) -> dict[str, str]:
        """The row as {column: value}; raises DataError if its field count or encoding is wrong."""
        check_utf8("".join(values), self.path, line)
        if len(values) != len(self.columns):
            raise DataError(
                f"expected {len(self.columns)} fields, found {len(values)}", self.path, line
            )
        row: dict[str, str] = {}
        for column, value in zip(self.columns, values):
            if column not in row or value.strip():  # columns without a name: a value in any is kept
                row[column] = value
        return row

    def error(
        self, message: str, line: int, column: str | None = None, reason: str = MALFORMED_ROW
    ) -> DataError:
        """A DataError located in this table."""
        return DataError(message, self.path, line, column, reason)


def raw_cell(values: list[str], index: int) -> str:
    """A cell of a row that failed to parse, stripped and without undecodable bytes, so the caller
    can still tell which image or patient the bad row belonged to."""
    if index >= len(values):
        return ""
    return values[index].encode("utf-8", "ignore").decode("utf-8").strip()


def parse_number(table: CsvTable, line: int, row: dict[str, str], column: str) -> float:
    """The float in `row[column]`; blank gives NaN; anything else non-numeric is a DataError."""
    text = row[column].strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise table.error(f"{text!r} is not a number", line, column) from None


def parse_labels(
    table: CsvTable,
    line: int,
    row: dict[str, str],
    columns: Sequence[str],
    allowed: frozenset[float] = frozenset({1.0, 0.0, -1.0}),
) -> dict[str, float]:
    """Label columns as floats (blank -> NaN); a value outside `allowed` is a DataError."""
    labels = {}
    for column in columns:
        value = parse_number(table, line, row, column)
        if not math.isnan(value) and value not in allowed:
            raise table.error(f"label {value} is not one of {sorted(allowed)}", line, column)
        labels[column] = value
    return labels
