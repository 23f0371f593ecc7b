"""PadChest and the physician-labelled PadChest zero-shot set (PDC), which share one CSV schema."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, LATERAL_VIEW, OTHER_VIEW, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file
from unimed.data.records import Record
from unimed.data.reports import clean_report
from unimed.data.labels import PDC_LABELS

CSV_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = (
    "ImageID",
    "ImageDir",
    "StudyID",
    "PatientID",
    "Projection",
    "Report",
    "MethodLabel",
    "Labels",
)
FRONTAL_PROJECTIONS = frozenset({"PA", "AP", "AP_horizontal"})
LATERAL_PROJECTIONS = frozenset({"L"})
SPLIT_RATIOS = {"train": 0.8, "valid": 0.1, "test": 0.1}
NOT_PHYSICIAN = "not physician-labelled"
SITE_COLUMN = "InstitutionName_DICOM"
DEFAULT_SITE = "alicante"
"""The site of a row without (or with a blank) InstitutionName_DICOM: the real PadChest comes from
one hospital in Alicante and has no such column."""


def parse_label_list(table: CsvTable, line: int, text: str) -> list[str]:
    """The `Labels` cell, a Python-list string, read safely; items stripped, empty items dropped."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise table.error(
            f"Labels {text[:60]!r} is not a Python list of strings", line, "Labels"
        ) from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise table.error(f"Labels {text[:60]!r} is not a Python list of strings", line, "Labels")
    return [item.strip() for item in value if item.strip()]


def _image_dir(table: CsvTable, line: int, text: str) -> str:
    """ImageDir is an integer folder name; some exports write it as a float ("12.0")."""
    try:
        number = float(text)
    except ValueError:
        raise table.error(f"{text!r} is not an integer folder number", line, "ImageDir") from None
    if not number.is_integer():
        raise table.error(f"{text!r} is not an integer folder number", line, "ImageDir")
    return str(int(number))


@dataclasses.dataclass(frozen=True)
class _Variant:
    """How PadChest and PDC read the same schema differently."""

    physician_only: bool
    label_names: tuple[str, ...]  # stated 0.0 unless listed
    pool: str
    filter_reports: bool  # PDC is an image-label test set: its reports never remove images


PADCHEST = _Variant(physician_only=False, label_names=(), pool="all", filter_reports=True)
PDC = _Variant(physician_only=True, label_names=PDC_LABELS, pool="test", filter_reports=False)


def _read(root: Path, ctx: ReadContext, variant: _Variant) -> list[Record]:
    table = CsvTable(find_file(root, [CSV_FILE], "PadChest label CSV"), COLUMNS)

    def parse(line: int, row: dict[str, str]) -> Record | None:
        projection = row["Projection"].strip()
        if projection not in FRONTAL_PROJECTIONS:
            ctx.drops.drop(LATERAL_VIEW if projection in LATERAL_PROJECTIONS else OTHER_VIEW)
            return None
        if variant.physician_only and row["MethodLabel"].strip() != "Physician":
            ctx.drops.drop(NOT_PHYSICIAN)
            return None
        present = parse_label_list(table, line, row["Labels"])
        report = clean_report(row["Report"])
        if variant.filter_reports and not ctx.accept_report(report, table.path, line, "Report",
                                                            row["Report"]):
            return None
        image_dir = _image_dir(table, line, row["ImageDir"].strip())
        if ctx.part_missing(root / image_dir):  # one of the download's numbered zip folders
            return None
        image = ctx.image(root / image_dir / row["ImageID"].strip(), table.path, line)
        labels = dict.fromkeys(variant.label_names, 0.0)
        labels.update({name: 1.0 for name in present})
        return Record(
            dataset=ctx.dataset,
            image_path=image,
            patient_id=row["PatientID"].strip(),
            study_id=row["StudyID"].strip(),
            split=variant.pool,
            report=report or None,
            language="es",
            site=row.get(SITE_COLUMN, "").strip() or DEFAULT_SITE,
            view=projection,
            labels=labels,
        )

    return ctx.rows(table, parse)


@ADAPTERS.register("padchest")
def read_padchest(root: Path, ctx: ReadContext) -> AdapterResult:
    """Frontal PadChest images with their stemmed Spanish report; labels present -> 1.0 (others NaN,
    since RNN-labelled rows do not state absences reliably); seeded per-patient 80/10/10 split;
    the site is the optional InstitutionName_DICOM column, else DEFAULT_SITE."""
    return AdapterResult(_read(root, ctx, PADCHEST), {"all": SPLIT_RATIOS})


@ADAPTERS.register("pdc")
def read_pdc(root: Path, ctx: ReadContext) -> AdapterResult:
    """Physician-labelled frontal PadChest images, all in "test"; the ten zero-shot classes are
    1.0 when listed and 0.0 otherwise, since physicians labelled every image completely. Reports are
    kept (None when empty) but never filter images out of this evaluation set."""
    return AdapterResult(_read(root, ctx, PDC))
