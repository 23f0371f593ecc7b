"""RSNA Pneumonia Detection (stage 2): one row per box in the labels CSV, DICOM images."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext, site_of
from unimed.data.adapters.tables import CsvTable, find_file, parse_number, raw_cell
from unimed.data.errors import DataError
from unimed.data.records import BoxAnn, Record

LABELS_FILE = "stage_2_train_labels.csv"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
IMAGE_DIR = "stage_2_train_images"
SPLIT_RATIOS = {"train": 0.6, "valid": 0.2, "test": 0.2}
BOX_LABEL = "pneumonia"


@dataclasses.dataclass
class _Patient:
    line: int
    target: float
    boxes: list[BoxAnn]
    site: str | None


def _parse_row(table: CsvTable, line: int, row: dict[str, str]) -> tuple[float, BoxAnn | None]:
    """(Target, box or None) of one row; coordinates all given for Target 1, all blank for 0."""
    target = parse_number(table, line, row, "Target")
    if target not in (0.0, 1.0):
        raise table.error(f"Target {row['Target']!r} is not 0 or 1", line, "Target")
    x, y, w, h = (parse_number(table, line, row, c) for c in ("x", "y", "width", "height"))
    given = [not math.isnan(v) for v in (x, y, w, h)]
    if target == 0.0:
        if any(given):
            raise table.error("a Target 0 row must have empty x / y / width / height", line, "x")
        return target, None
    if not all(given):
        missing = [c for c, g in zip(("x", "y", "width", "height"), given) if not g][0]
        raise table.error("a Target 1 row needs x, y, width and height", line, missing)
    if w <= 0 or h <= 0:
        raise table.error(f"box width {w} / height {h} must be positive", line, "width")
    return target, BoxAnn(x, y, x + w, y + h, BOX_LABEL)


def _group(table: CsvTable, ctx: ReadContext) -> dict[str, _Patient]:
    """Rows grouped by patientId; a patient with any bad row is left out (the row is counted)."""
    patients: dict[str, _Patient] = {}
    bad: set[str] = set()
    id_index = table.columns.index("patientId")
    for line, values in table:
        try:
            row = table.row(line, values)
            patient_id = row["patientId"].strip()
            target, box = _parse_row(table, line, row)
            known = patients.setdefault(patient_id, _Patient(line, target, [], site_of(row)))
            if known.target != target:
                raise table.error(
                    f"patient {patient_id!r} has Target {known.target:g} at line {known.line} "
                    f"and {target:g} here",
                    line,
                    "Target",
                )
        except DataError as err:
            ctx.drops.bad(err)
            bad.add(raw_cell(values, id_index))
            continue
        if box is not None:
            known.boxes.append(box)
    return {pid: p for pid, p in patients.items() if pid not in bad}


@ADAPTERS.register("rsna")
def read_rsna(root: Path, ctx: ReadContext) -> AdapterResult:
    """One record per image with its pneumonia boxes (pixel coords); per-patient 60/20/20 split;
    the site is the optional `Site` column (of the patient's first row)."""
    table = CsvTable(find_file(root, [LABELS_FILE], "RSNA labels CSV"), COLUMNS)
    records = []
    for patient_id, patient in _group(table, ctx).items():
        try:
            image = ctx.image(root / IMAGE_DIR / f"{patient_id}.dcm", table.path, patient.line)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        records.append(
            Record(
                dataset=ctx.dataset,
                image_path=image,
                patient_id=patient_id,
                study_id=patient_id,
                split="all",
                site=patient.site,
                labels={"Pneumonia": patient.target},
                boxes=tuple(patient.boxes),
            )
        )
    return AdapterResult(records, {"all": SPLIT_RATIOS})
