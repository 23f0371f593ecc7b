"""COVIDx CXR: space-separated `patient_id filename label source` lines in train.txt / test.txt."""

from __future__ import annotations

from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import check_utf8, find_file, read_lines
from unimed.data.errors import DataError
from unimed.data.records import Record
from unimed.data.labels import COVIDX_CLASSES

TRAIN_CARVE = {"train": 0.8, "valid": 0.2}
BINARY_LABELS = frozenset({"positive", "negative"})
"""The classes of COVIDx CXR-2 and later (COVID-19 or not), which the three-class probe cannot read."""


def parse_line(path: Path, line: int, text: str) -> tuple[str, str, str, str]:
    """(patient_id, filename, label, source); filenames may contain spaces, so the patient is the
    first field and label / source the last two."""
    fields = text.split()
    if len(fields) < 4:
        raise DataError(
            f"expected 'patient_id filename label source', got {text[:80]!r}", path, line
        )
    patient, label, source = fields[0], fields[-2], fields[-1]
    if label in BINARY_LABELS:
        raise DataError(f"label {label!r} is one of COVIDx CXR-2's and later releases' two classes "
                        "(positive / negative); the benchmark reads the three-class COVIDx (v5-v8: "
                        f"{' / '.join(COVIDX_CLASSES)})", path, line, "label")
    if label not in COVIDX_CLASSES:
        raise DataError(
            f"label {label!r} is not one of {list(COVIDX_CLASSES)}", path, line, "label"
        )
    return patient, " ".join(fields[1:-2]), label, source


def _read_list(root: Path, name: str, pool: str, ctx: ReadContext) -> list[Record]:
    path = find_file(root, [f"{name}.txt"], f"COVIDx {name}.txt")
    records = []
    for line, text in read_lines(path):
        if not text.strip():
            continue
        try:
            check_utf8(text, path, line)
            patient, filename, label, source = parse_line(path, line, text)
            image = ctx.image(root / name / filename, path, line)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        records.append(
            Record(
                dataset=ctx.dataset,
                image_path=image,
                patient_id=patient,
                study_id=filename,
                split=pool,
                site=source,
                labels={c: float(c == label) for c in COVIDX_CLASSES},
                target=label,
            )
        )
    return records


@ADAPTERS.register("covidx")
def read_covidx(root: Path, ctx: ReadContext) -> AdapterResult:
    """COVIDx images with their class (`target`, and one-hot `labels`), site = `source` column;
    test.txt -> "test", validation carved per patient from train.txt (20%)."""
    records = _read_list(root, "train", "train", ctx) + _read_list(root, "test", "test", ctx)
    return AdapterResult(records, {"train": TRAIN_CARVE})
