"""What the 3D (volume) adapters share: the per-patient carve, volume checks, and TSV reading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from unimed.data.adapters.base import ReadContext, windows_hint
from unimed.data.adapters.tables import check_utf8, read_lines
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.data.volumes import read_volume

POOL = "all"
CARVE = {POOL: {"train": 0.7, "valid": 0.1, "test": 0.2}}
"""The 3D layouts have no official split: every record is carved per patient, 70 / 10 / 20."""


def check_volume_path(ctx: ReadContext, path: Path, source: Path, line: int | None) -> Path:
    """`path` if the volume exists (and reads as RAS / HU, with check_images); else a DataError
    naming the volume and the table line that lists it."""
    if not path.exists():
        raise DataError(f"volume not found: {path}{windows_hint(path)}", source, line, reason=MISSING_IMAGE)
    if ctx.check_images:
        try:
            read_volume(path)
        except DataError as err:
            raise DataError(f"{err} (listed here)", source, line, reason=err.reason) from None
    return path


def read_tsv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a tab-separated file whose header holds `required`; DataError names the line."""
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        raise DataError(f"empty file; expected columns {list(required)}", path, 1)
    columns = [c.strip() for c in first[1].split("\t")]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {columns}", path, 1, missing[0])
    for line, text in lines:
        if not text.strip():
            continue
        check_utf8(text, path, line)
        values = text.split("\t")
        if len(values) != len(columns):
            raise DataError(f"expected {len(columns)} tab-separated fields, found {len(values)}", path, line)
        yield line, dict(zip(columns, values))
