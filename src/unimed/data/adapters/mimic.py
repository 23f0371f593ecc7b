"""MIMIC-CXR-JPG 2.0.0 with the free-text reports: metadata + split + CheXpert-label CSVs joined."""

from __future__ import annotations

import logging
from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, LATERAL_VIEW, OTHER_VIEW, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file, parse_labels, raw_cell
from unimed.data.errors import MISSING_REPORT, NON_UTF8, DataError
from unimed.data.records import Record
from unimed.data.reports import mimic_report_text
from unimed.data.labels import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL"})
OFFICIAL_SPLITS = {"train": "train", "validate": "valid", "test": "test"}
SITE_COLUMN = "InstitutionName"
DEFAULT_SITE = "boston"
"""The site of a row whose metadata CSV has no (or a blank) InstitutionName: the real MIMIC-CXR
comes from one hospital in Boston and has no such column."""


def _read_splits(root: Path) -> dict[str, str | DataError]:
    """dicom_id -> split; a bad row keeps its error so only the images it concerns fail."""
    table = CsvTable(find_file(root, [SPLIT_FILE], "MIMIC-CXR split CSV"), SPLIT_COLUMNS)
    splits: dict[str, str | DataError] = {}
    for line, values in table:
        try:
            row = table.row(line, values)
        except DataError as err:  # a short row: its image fails with this row's error
            splits[raw_cell(values, SPLIT_COLUMNS.index("dicom_id"))] = err
            continue
        value = row["split"].strip()
        splits[row["dicom_id"].strip()] = OFFICIAL_SPLITS.get(value) or table.error(
            f"split {value!r} is not one of {list(OFFICIAL_SPLITS)}", line, "split"
        )
    return splits


def _read_labels(root: Path) -> dict[tuple[str, str], dict[str, float] | DataError]:
    """(subject_id, study_id) -> the 14 CheXpert labels (blank -> NaN), or the row's error."""
    table = CsvTable(
        find_file(root, [CHEXPERT_FILE], "MIMIC-CXR CheXpert label CSV"), CHEXPERT_COLUMNS
    )
    labels: dict[tuple[str, str], dict[str, float] | DataError] = {}
    for line, values in table:
        try:
            row = table.row(line, values)
        except DataError as err:  # a short row: its study fails with this row's error
            subject, study = (raw_cell(values, CHEXPERT_COLUMNS.index(c)) for c in ("subject_id", "study_id"))
            labels[subject, study] = err
            continue
        key = (row["subject_id"].strip(), row["study_id"].strip())
        try:
            labels[key] = parse_labels(table, line, row, CHEXPERT_LABELS)
        except DataError as err:
            labels[key] = err
    return labels


class _Reports:
    """Reads each study's report once (several images share it) and keeps the text or the error."""

    def __init__(self) -> None:
        self._cache: dict[Path, str | DataError] = {}

    def get(self, path: Path) -> str:
        if path not in self._cache:
            self._cache[path] = self._read(path)
        value = self._cache[path]
        if isinstance(value, DataError):
            raise value
        return value

    @staticmethod
    def _read(path: Path) -> str | DataError:
        try:
            return mimic_report_text(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return DataError("report file not found", path, reason=MISSING_REPORT)
        except UnicodeDecodeError as err:
            return DataError(
                f"not UTF-8 text ({err.reason} at byte {err.start})", path, reason=NON_UTF8
            )


def holds_image_studies(part: Path) -> bool:
    """Whether a files/p<NN> folder holds a study folder of images (p<subject>/s<study>/): the
    download comes as ten such parts, and the reports' separate download fills the same tree with
    s<study>.txt files alone."""
    if not part.is_dir():
        return False
    patients = (patient for patient in part.iterdir() if patient.is_dir())
    return any(study.is_dir() for patient in patients for study in patient.iterdir())


@ADAPTERS.register("mimic-cxr")
def read_mimic(root: Path, ctx: ReadContext) -> AdapterResult:
    """Frontal (PA/AP) MIMIC-CXR images with FINDINGS + IMPRESSION text and the official split;
    the site is the metadata's optional InstitutionName column, else DEFAULT_SITE."""
    table = CsvTable(find_file(root, [METADATA_FILE], "MIMIC-CXR metadata CSV"), METADATA_COLUMNS)
    splits, labels, reports = _read_splits(root), _read_labels(root), _Reports()

    def parse(line: int, row: dict[str, str]) -> Record | None:
        view = row["ViewPosition"].strip().upper()
        if view not in FRONTAL_VIEWS:
            ctx.drops.drop(LATERAL_VIEW if view in LATERAL_VIEWS else OTHER_VIEW)
            return None
        dicom, subject, study = (row[c].strip() for c in ("dicom_id", "subject_id", "study_id"))
        for column, value in (("subject_id", subject), ("study_id", study)):
            if not value.isdigit():
                raise table.error(f"{value!r} is not a numeric id", line, column)
        split = splits.get(dicom) or table.error(
            f"dicom_id {dicom!r} is not in {SPLIT_FILE}", line, "dicom_id"
        )
        study_labels = labels.get((subject, study), {})
        for value in (split, study_labels):
            if isinstance(value, DataError):
                raise value
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        if ctx.part_missing(folder.parent, holds_image_studies):
            return None
        report = reports.get(folder / f"s{study}.txt")
        if not ctx.accept_report(report, folder / f"s{study}.txt", None):
            return None
        image = ctx.image(folder / f"s{study}" / f"{dicom}.jpg", table.path, line)
        return Record(
            dataset="mimic-cxr",
            image_path=image,
            patient_id=subject,
            study_id=study,
            split=split,
            report=report,
            language="en",
            site=row.get(SITE_COLUMN, "").strip() or DEFAULT_SITE,
            view=view,
            labels=dict(study_labels),
        )

    records = ctx.rows(table, parse)
    unlabelled = sum(1 for r in records if not r.labels)
    if unlabelled:
        logger.info("mimic-cxr: %d records have no CheXpert label row (labels NaN)", unlabelled)
    return AdapterResult(records)
