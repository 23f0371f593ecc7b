"""Generic image-report tables: one CSV or JSONL row per image, for data in no official layout.

A dataset whose name is not an official layout is read from ``<data.root>/<name>/records.csv``
(or ``records.csv.gz``, ``records.jsonl``, ``records.jsonl.gz``); docs/LAYOUTS.md documents the
columns. In short: ``image`` (path relative to the table's folder, or absolute; any format
:func:`unimed.data.images.load_image` reads) or ``volume`` (a CT volume, any format
:func:`unimed.data.volumes.read_volume` reads: NIfTI, MetaImage, a folder of one DICOM series or of
slice images; the record is 3D), ``report``, ``language``, ``patient_id``, and the
optional ``study_id``, ``site``, ``view`` and ``split`` (train / valid / test; rows where it is
blank or absent follow their patient's stated rows, or are split per patient 80/10/10). Every
other column is a label: 1, 0, -1
(uncertain) or blank (not stated); true / false (a boolean column as pandas or a spreadsheet writes
it, in any case) are 1 / 0.

A table without an ``image`` or ``volume`` column is a text-only corpus: `unimed vocab` and `unimed
mlm` read it (its records have no image); the image stages refuse it with a message saying so.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from unimed.data.adapters.base import AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, check_utf8, find_file, open_text
from unimed.data.adapters.volume_common import check_volume_path
from unimed.data.errors import DataError
from unimed.data.records import Record, language_code
from unimed.data.reports import clean_report
from unimed.data.splits import SPLITS

TABLE_NAMES = ("records.csv", "records.jsonl")
IMAGE, VOLUME, REPORT, LANGUAGE, PATIENT = "image", "volume", "report", "language", "patient_id"
KNOWN_COLUMNS = frozenset({IMAGE, VOLUME, REPORT, LANGUAGE, PATIENT, "study_id", "site", "view", "split"})
SPLIT_RATIOS = {"train": 0.8, "valid": 0.1, "test": 0.1}
CARVED = "all"
LABEL_VALUES = frozenset({1.0, 0.0, -1.0})
# A boolean column as pandas (True / False) and spreadsheets (TRUE / FALSE) write it: 1 / 0, as a
# JSONL table's true / false are read.
BOOLEAN_LABELS = {"true": 1.0, "false": 0.0}
# What a missing value becomes once a column is turned into text (pandas' `astype(str)`: "nan",
# "None") or in a database export ("NULL"): read as the blank cell it was. Kept as text, a blank
# patient_id became one patient "nan" holding every such row, a blank site a site "nan".
MISSING_VALUES = frozenset({"nan", "none", "null"})

Row = tuple[int, "dict[str, str] | DataError"]


def find_table(folder: Path) -> Path:
    """The records table of a generic dataset folder; DataError listing the accepted names."""
    return find_file(folder, TABLE_NAMES, "records table of a generic dataset (docs/LAYOUTS.md)")


def is_generic(folder: Path) -> bool:
    """Whether `folder` holds a records table."""
    return any((folder / f"{n}{gz}").is_file() for n in TABLE_NAMES for gz in ("", ".gz"))


def is_text_only(columns: list[str]) -> bool:
    """Whether a table of these columns is a text-only corpus (no image and no volume column)."""
    return IMAGE not in columns and VOLUME not in columns


def _cell(value: object) -> str:
    """A JSON value as the text a CSV cell would hold (null -> blank, true -> 1)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


class _RepeatedKey(ValueError):
    """A JSON object holding a key twice (compared after stripping spaces, as column names are)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key.strip() in out:
            raise _RepeatedKey(key.strip())
        out[key.strip()] = value
    return out


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """(line, {key: text}) per non-blank line; a line that is not a JSON object yields its error."""
    try:
        with open_text(path) as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    check_utf8(text, path, line)
                    value = json.loads(text, object_pairs_hook=_unique_keys)
                    if not isinstance(value, dict):
                        raise DataError(f"expected a JSON object, got {type(value).__name__}", path, line)
                    nested = next((k for k, v in value.items() if isinstance(v, (list, dict))), None)
                    if nested is not None:  # str() of it would be read as text: "['Heart size', ...]"
                        raise DataError(f"a JSON {type(value[nested]).__name__}; a value is text, a number, "
                                        "true / false or null", path, line, nested)
                except json.JSONDecodeError as err:
                    yield line, DataError(f"not a JSON object ({err.msg})", path, line)
                    continue
                except _RepeatedKey as err:
                    yield line, DataError(f"key {err.args[0]!r} appears twice in the object (one of the "
                                          "values would be read and the other lost)", path, line, err.args[0])
                    continue
                except DataError as err:
                    yield line, err
                    continue
                yield line, {k: _cell(v) for k, v in value.items()}
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read file ({err})", path) from None


def _csv_rows(table: CsvTable) -> Iterator[Row]:
    for line, values in table:
        try:
            yield line, table.row(line, values)
        except DataError as err:
            yield line, err


def read_rows(path: Path) -> tuple[list[str], Iterator[Row]]:
    """The columns of a records table (of a JSONL table: every key any object has) and its rows."""
    if ".jsonl" in path.suffixes:
        keys = dict.fromkeys(k for _, row in _jsonl_rows(path) if isinstance(row, dict) for k in row)
        if not keys:
            raise DataError("no JSON object in the table", path)
        return list(keys), _jsonl_rows(path)
    table = CsvTable(path, (PATIENT,))
    return table.columns, _csv_rows(table)


def _text(row: dict[str, str], column: str) -> str:
    """The row's cell of `column`, stripped; blank where it holds a missing-value marker
    (`MISSING_VALUES`, in any case)."""
    text = row.get(column, "").strip()
    return "" if text.lower() in MISSING_VALUES else text


def _labels(path: Path, line: int, row: dict[str, str], columns: list[str]) -> dict[str, float]:
    """The row's label columns as 1 / 0 / -1 / NaN (blank). Columns without a name (the trailing
    commas of a spreadsheet's export) are not labels, and must stay blank."""
    labels = {}
    for column in columns:
        text = _text(row, column)
        if not column:
            if text:
                raise DataError(f"{text!r} in a column without a name (name every column in the header "
                                "line; pandas writes its index so unless to_csv(index=False))", path, line)
            continue
        value = BOOLEAN_LABELS.get(text.lower())
        if value is None:
            try:
                value = float(text) if text else math.nan
            except ValueError:
                pass
        if value is None or not (math.isnan(value) or value in LABEL_VALUES):
            raise DataError(
                f"label {text!r} is not 1, 0, -1, true / false or blank (every column other than "
                f"{', '.join(sorted(KNOWN_COLUMNS))} is a label)", path, line, column,
            )
        labels[column] = value
    return labels


def _parse(ctx: ReadContext, path: Path, line: int, row: dict[str, str], columns: list[str]
           ) -> Record | None:
    patient = _text(row, PATIENT)
    if not patient:
        raise DataError("empty patient_id", path, line, PATIENT)
    report = language = None
    if REPORT in columns:
        report = clean_report(_text(row, REPORT))
        if not ctx.accept_report(report, path, line, REPORT, _text(row, REPORT)):
            return None
        given = _text(row, LANGUAGE)
        language = language_code(given)  # "EN", "en-US" and "en_GB" rows are "en" rows
        if not given:
            raise DataError("empty language (a code such as en or es)", path, line, LANGUAGE)
        if not re.fullmatch("[a-z]{2}", language):  # "english" was a community of its own beside "en"
            raise DataError(f"language {given!r} is not a two-letter ISO 639-1 code (such as en or es, "
                            "as the prompt files are named)", path, line, LANGUAGE)
    split = _text(row, "split").lower() or CARVED  # "Train", "TEST": the splits
    if split not in (*SPLITS, CARVED):
        raise DataError(f"split {split!r} is not one of {list(SPLITS)} or blank", path, line, "split")
    labels = _labels(path, line, row, [c for c in columns if c not in KNOWN_COLUMNS])
    image, ndim, relative = None, 2, f"{path.name}:{line}"  # a text-only row is named by its line
    given = {column: _text(row, column) for column in (IMAGE, VOLUME) if column in columns}
    if given:
        filled = [column for column, value in given.items() if value]
        if not filled:
            raise DataError(f"empty {' and '.join(given)} path", path, line, next(iter(given)))
        if len(filled) > 1:
            raise DataError("an image and a volume: a row is one or the other", path, line, VOLUME)
        relative = given[filled[0]]
        if filled[0] == IMAGE:
            image = ctx.image(path.parent / relative, path, line)
        else:
            image, ndim = path.parent / relative, 3
            if ctx.require_images:
                check_volume_path(ctx, image, path, line)
    study = _text(row, "study_id") or relative
    return Record(
        dataset=ctx.dataset,
        image_path=image,
        patient_id=patient,
        study_id=study,
        split=split,
        report=report,
        language=language,
        site=_text(row, "site") or None,
        view=_text(row, "view") or None,
        labels=labels,
        ndim=ndim,
    )


def read_generic(root: Path, ctx: ReadContext) -> AdapterResult:
    """The records of a generic table; rows without a `split` are split per patient 80/10/10."""
    path = find_table(root)
    columns, rows = read_rows(path)
    missing = [c for c in (PATIENT, *((LANGUAGE,) if REPORT in columns else ())) if c not in columns]
    if missing:
        raise DataError(f"missing column {missing[0]!r}; found {columns}", path, 1, missing[0])
    if is_text_only(columns) and ctx.require_images:
        raise DataError(
            "no 'image' or 'volume' column: a text-only corpus, read by `unimed vocab` and `unimed mlm` "
            "only", path, 1,
        )
    records: list[Record] = []
    first: dict[tuple[Path, str | None], int] = {}  # (image / volume, language) -> its first line
    owner: dict[Path, tuple[str, int]] = {}  # image / volume -> (its patient, its first line)
    for line, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            record = _parse(ctx, path, line, row, columns)
            if record is not None and record.image_path is not None:
                _check_repeated(record, first, owner, path, line)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        if record is not None:
            records.append(record)
    return AdapterResult(records, {CARVED: SPLIT_RATIOS})


def _check_repeated(record: Record, first: dict[tuple[Path, str | None], int],
                    owner: dict[Path, tuple[str, int]], path: Path, line: int) -> None:
    """DataError when `record`'s image (or volume) came before with a report in the same language
    (or without reports), as in a table written twice into one, or under another patient, whose
    rows the per-patient split can put in two splits; `first` keeps each image and language's line,
    `owner` each image's patient and line. Paths are compared as written out (``a/../b`` is ``b``).
    An image with reports in two languages (a translation) is two records."""
    image = Path(os.path.normpath(record.image_path))
    kind = VOLUME if record.ndim == 3 else IMAGE
    patient, at = owner.setdefault(image, (record.patient_id, line))
    if patient != record.patient_id:
        raise DataError(f"the {kind} of line {at} again, there under patient {patient!r} and here under "
                        f"{record.patient_id!r} (each {kind} belongs to one patient; the per-patient split "
                        "could put its rows in two splits)", path, line, PATIENT)
    key = (image, record.language)
    if first.setdefault(key, line) != line:
        same = f", with a report in the same language ({record.language})" if record.language else ""
        raise DataError(f"the {kind} of line {first[key]} again{same} (one row per {kind} and language: a "
                        "table written twice into one?)", path, line, kind)
