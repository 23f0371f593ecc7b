"""What every adapter shares: the registry, the read context (filters, errors), the result types."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from unimed.data.adapters.tables import CsvTable
from unimed.data.errors import EMPTY_REPORT, MISSING_IMAGE, DataError, DropCounter
from unimed.data.images import check_image, not_an_image_file
from unimed.data.records import Record
from unimed.data.reports import count_tokens
from unimed.registry import Registry

logger = logging.getLogger(__name__)

LATERAL_VIEW = "lateral view"
PART_NOT_DOWNLOADED = "folder not downloaded"
"""The drop reason of a row whose image folder, one part of a download that comes in parts, is not here."""
OTHER_VIEW = "other view"
SITE_COLUMN = "Site"
"""The optional column naming each image's acquisition site in layouts whose official tables have
no institution column (CheXpert, CXP500, RSNA, Object-CXR): the site then comes from the data, and
a table without it leaves the site unknown (None)."""


def site_of(row: dict[str, str], column: str = SITE_COLUMN) -> str | None:
    """The row's site: its stripped `column` cell, None when the column is absent or blank."""
    return row.get(column, "").strip() or None


@dataclasses.dataclass
class AdapterResult:
    """Records as read, with `split` holding a pool: an official split, or a key of `carve`
    whose records are split per patient with the ratios `carve[pool]`; with `stratify`, each class
    (`Record.target`) is spread over the carved splits in proportion (a small single-label dataset
    whose validation split would otherwise hold one class by chance)."""

    records: list[Record]
    carve: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    stratify: bool = False


def windows_hint(path: Path) -> str:
    """What to add to "not found" for a path a table lists: a table written on Windows separates
    its folders with '\\', which names no folder here."""
    return " (the path holds '\\': write paths with '/')" if "\\" in str(path) else ""


@dataclasses.dataclass
class ReadContext:
    """Per-read settings and the drop counter that adapters report filters and bad rows to."""

    dataset: str
    root: Path
    drops: DropCounter
    min_report_tokens: int = 3
    check_images: bool = False
    progress: bool = False
    require_images: bool = True
    # Drop reason -> {part of the download not here: rows left out} (:meth:`leave_out`).
    not_here: dict[str, collections.Counter[str]] = dataclasses.field(default_factory=dict)
    _parts: dict[Path, bool] = dataclasses.field(default_factory=dict)

    def rows(
        self, table: CsvTable, parse: Callable[[int, dict[str, str]], Record | None]
    ) -> list[Record]:
        """Parse every row of `table`; None means filtered, a DataError is raised or skipped."""
        records = []
        bar = tqdm(
            table,
            desc=f"{self.dataset}: {table.path.name}",
            disable=not self.progress,
            unit=" rows",
        )
        for line, values in bar:
            try:
                record = parse(line, table.row(line, values))
            except DataError as err:
                self.drops.bad(err)
                continue
            if record is not None:
                records.append(record)
        return records

    def image(self, path: Path, source: Path, line: int | None) -> Path:
        """`path` if the image exists (and opens, with check_images); else a DataError naming both
        the image and the table line that lists it. Without `require_images` (the text stages)
        images are not looked at."""
        if not self.require_images:
            return path
        if not path.is_file():
            raise DataError(f"{not_an_image_file(path)}: {path}{windows_hint(path)}", source, line,
                            reason=MISSING_IMAGE)
        if self.check_images:
            try:
                check_image(path)
            except DataError as err:
                raise DataError(f"{err} (listed here)", source, line, reason=err.reason) from None
        return path

    def leave_out(self, reason: str, part: str) -> None:
        """Count a row left out because `part` of a download that comes in parts (a LUNA16 subset,
        a CC-CCII zip archive, a PadChest image folder) is not here; :func:`say_not_here` says it."""
        self.not_here.setdefault(reason, collections.Counter())[part] += 1
        self.drops.drop(reason)

    def part_missing(self, folder: Path, holds_images: Callable[[Path], bool] = Path.is_dir) -> bool:
        """Whether `folder`, one part of a download that comes in parts (PadChest's numbered image
        folders, MIMIC-CXR-JPG's files/pNN), holds no images here (`holds_images`, asked once per
        folder): a partial download, whose rows are then left out and counted
        (:meth:`leave_out`, PART_NOT_DOWNLOADED) rather than each a missing image. Never without
        `require_images`."""
        if not self.require_images:
            return False
        if folder not in self._parts:
            self._parts[folder] = holds_images(folder)
        if self._parts[folder]:
            return False
        self.leave_out(PART_NOT_DOWNLOADED, folder.relative_to(self.root).as_posix())
        return True

    def accept_report(
        self, text: str, source: Path, line: int | None, column: str | None = None, raw: str | None = None
    ) -> bool:
        """False (counted) for a report under `min_report_tokens`; DataError for an empty one, which
        says so where `raw`, the text as the file has it, held nothing but de-identification gaps."""
        if not text.strip():
            gaps = " (nothing but de-identification gaps, such as XXXX or ___)" if raw and raw.strip() else ""
            raise DataError(f"empty report{gaps}", source, line, column, reason=EMPTY_REPORT)
        if count_tokens(text) < self.min_report_tokens:
            self.drops.drop(f"report under {self.min_report_tokens} tokens")
            return False
        return True

    def key(self, record: Record) -> str:
        """The record's split-file key: its image path relative to the dataset root (the study id
        of a text-only row), followed by its crop's tag when it stands for a crop of its volume."""
        return record.study_id if record.image_path is None else record.image_key(self.root)


def say_not_here(ctx: ReadContext, records: Sequence[Record]) -> None:
    """One warning per reason of the rows left out for parts of the download not here
    (:meth:`ReadContext.leave_out`); a DataError when such rows were all there was."""
    for reason, parts in ctx.not_here.items():
        rows, example = sum(parts.values()), next(iter(parts))
        if not records:
            raise DataError(f"none of the {rows} row(s) its tables list is here ({reason}: {len(parts)}, "
                            f"e.g. {example}): is this the dataset's folder?", ctx.root)
        logger.warning("%s: %d row(s) left out, %s (%d, e.g. %s): a partial download?", ctx.dataset, rows,
                       reason, len(parts), example)


Adapter = Callable[[Path, ReadContext], AdapterResult]
ADAPTERS: Registry[Adapter] = Registry("dataset")


@dataclasses.dataclass
class DatasetRead:
    """The records of one dataset, how many rows were dropped by reason, and the first messages of
    each reason of bad input that was skipped (`examples`; filters have none)."""

    records: list[Record]
    dropped: dict[str, int]
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Counts per split / language / site / view ("unset" where a record has none), and
        per-label positives and prevalence (positives over records where the label is stated)."""
        out: dict = {"records": len(self.records), "dropped": dict(self.dropped)}
        for field in ("split", "language", "site", "view", "target"):
            counts = collections.Counter("unset" if getattr(r, field) is None else str(getattr(r, field))
                                         for r in self.records)
            out[field] = dict(sorted(counts.items()))
        out["labels"] = _label_prevalence(self.records)
        return out


def _label_prevalence(records: Iterable[Record]) -> dict[str, dict[str, float]]:
    positive: collections.Counter[str] = collections.Counter()
    stated: collections.Counter[str] = collections.Counter()
    for record in records:
        for name, value in record.labels.items():
            if not math.isnan(value):
                stated[name] += 1
                positive[name] += value == 1.0
    return {
        name: {
            "positive": positive[name],
            "stated": stated[name],
            "prevalence": positive[name] / stated[name],
        }
        for name in sorted(stated)
    }
