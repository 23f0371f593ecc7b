"""What every layout writer shares: the writer interface, stable ids and splits, image and table I/O.

A writer turns one generated :class:`Study` into files on disk (images) plus table rows; the rows of
all studies are collected in index order and written once at the end, so the output is the same
whatever the number of worker processes.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import gzip
import hashlib
import io
import math
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from unimed.phantom.config import PhantomConfig
from unimed.phantom.study import Study

JPEG_QUALITY = 95
CONTROL_START = 600_000
"""Study index of a layout's first control-community study: a multiple of the patient block size
(latent.patient_of) above any layout's own count, so control patients share no id with the others."""

Row = tuple[str, tuple[str, ...]]
"""(table name, cell values) — one line of one of the layout's index files."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """What one written study contributes to the manifest, as an adapter will read it back."""

    split: str
    frontal: bool
    site: str
    language: str
    labels: Mapping[str, float]
    images: int = 1
    boxes: int = 0


@dataclasses.dataclass(frozen=True)
class StudyResult:
    """The rows and manifest entry of one written study."""

    rows: tuple[Row, ...]
    entry: ManifestEntry


class LayoutWriter(abc.ABC):
    """Writes studies of one dataset in its official layout under `dest` (the dataset's folder).

    Subclasses set the class attributes that decide how the world generates the dataset and
    implement :meth:`write_study` (image files + rows) and :meth:`write_tables` (index files).
    """

    folder: ClassVar[str]
    dataset: ClassVar[str]
    count_field: ClassVar[str]
    frontal_only: ClassVar[bool] = True
    enrich: ClassVar[Mapping[str, float] | None] = None
    splits: ClassVar[tuple[tuple[str, float], ...]] = ()
    """Official splits as (name, fraction of patients); empty when the real dataset has none."""
    language: ClassVar[str | None] = None
    """The language of the layout's reports; None: each study's site has only one."""
    control: ClassVar[bool] = False
    """Whether the control community's studies in `language` are written through this layout too."""

    def __init__(self, cfg: PhantomConfig, dest: Path) -> None:
        self.cfg = cfg
        self.dest = Path(dest)

    def count(self) -> int:
        """How many studies the world asks for."""
        return int(getattr(self.cfg, self.count_field))

    def control_count(self) -> int:
        """How many control-community studies the layout holds beside its own."""
        return int(self.cfg.control_studies) if self.control else 0

    def index_ranges(self) -> tuple[range, ...]:
        """The study indices of the layout: its own studies, then the control community's."""
        own, control = self.count(), self.control_count()
        if own > CONTROL_START:
            raise ValueError(f"phantom.{self.count_field} = {own} exceeds {CONTROL_START}")
        return range(own), range(CONTROL_START, CONTROL_START + control)

    def site(self, index: int) -> str:
        """The acquisition site of the layout's own study `index`."""
        return "boston"

    def study_site(self, index: int) -> str:
        """The acquisition site of study `index`: the control site's for the control indices."""
        return self.cfg.control_site if index >= CONTROL_START else self.site(index)

    def split(self, study: Study) -> str:
        """The official split of a study, per patient and seeded; "none" when there is no official split."""
        if not self.splits:
            return "none"
        return patient_split(self.cfg.seed, self.dataset, study.patient_id, self.splits)

    @abc.abstractmethod
    def write_study(self, study: Study, split: str) -> StudyResult:
        """Write the study's image file(s); return its table rows and manifest entry."""

    @abc.abstractmethod
    def write_tables(self, rows: Sequence[Row]) -> None:
        """Write the layout's index files from all rows, in study order."""

    def table_rows(self, rows: Sequence[Row], table: str) -> list[tuple[str, ...]]:
        """The cells of `rows` that belong to `table`, in order."""
        return [cells for name, cells in rows if name == table]


def numeric_id(text: str, what: str) -> int:
    """The integer behind a generator id such as "000123"; a clear error for anything else."""
    if not text.isdigit():
        raise ValueError(f"layout writers need numeric {what} ids, got {text!r}")
    return int(text)


def stable_int(*parts: object) -> int:
    """A 64-bit integer that depends only on `parts` (never on Python's salted `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def stable_hex(nbytes: int, *parts: object) -> str:
    """A lower-case hex string of `nbytes` bytes that depends only on `parts`."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=nbytes).hexdigest()


def stable_uniform(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`."""
    return stable_int(*parts) / 2.0**64


def stable_date(first_year: int, years: int, *parts: object) -> str:
    """A YYYYMMDD date in [first_year, first_year + years) that depends only on `parts`."""
    n = stable_int("date", *parts)
    return f"{first_year + n % years:04d}{1 + n // years % 12:02d}{1 + n // (12 * years) % 28:02d}"


def stable_time(*parts: object) -> str:
    """An HHMMSS time of day that depends only on `parts`."""
    n = stable_int("time", *parts)
    return f"{n % 24:02d}{n // 24 % 60:02d}{n // 1440 % 60:02d}"


def patient_split(seed: int, dataset: str, patient_id: str, splits: Sequence[tuple[str, float]]) -> str:
    """Assign a patient to a split by a seeded hash, so all of a patient's studies share one split."""
    u = stable_uniform("split", seed, dataset, patient_id)
    edge = 0.0
    for name, fraction in splits:
        edge += fraction
        if u < edge:
            return name
    return splits[-1][0]


def format_label(value: float) -> str:
    """CheXpert-style cell: "1.0" / "0.0" / "-1.0", blank for NaN (not mentioned)."""
    return "" if math.isnan(value) else f"{float(value):.1f}"


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (H, W)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint16 (H, W) over the full 16-bit range."""
    return np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    """Save a float image in [0, 1] as an 8-bit greyscale JPEG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image), mode="L").save(path, format="JPEG", quality=JPEG_QUALITY)


def save_png16(path: Path, image: np.ndarray) -> None:
    """Save a float image in [0, 1] as a 16-bit greyscale PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # compress_level 1: the images are noisy, so stronger zlib levels cost time and save little.
    Image.fromarray(to_uint16(image)).save(path, format="PNG", compress_level=1)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Write a comma-separated file; a `.gz` suffix gzips it with mtime 0 so the bytes are reproducible."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)
