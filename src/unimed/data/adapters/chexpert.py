"""CheXpert-v1.0(-small) train/valid CSVs, and the CheXpert-style CXP500 expert-labelled set."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from unimed.data.adapters.base import ADAPTERS, LATERAL_VIEW, AdapterResult, ReadContext, site_of
from unimed.data.adapters.tables import CsvTable, find_file, parse_labels
from unimed.data.errors import DataError
from unimed.data.records import Record
from unimed.data.labels import CHEXPERT_LABELS

CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CHEXPERT_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
CXP500_COLUMNS = ("Path", *CHEXPERT_LABELS)
# The official valid.csv (200 studies) is the test set of the linear-probe protocol (as in MGCA and
# Med-UniC); a validation set is carved from train per patient.
TRAIN_CARVE = {"train": 0.9, "valid": 0.1}


def _patient_study(table: CsvTable, line: int, path: str) -> tuple[str, str]:
    """Patient and study ids from a `.../patientNNNNN/studyN/viewN_frontal.jpg` path."""
    parts = PurePosixPath(path).parts
    patients = [i for i, part in enumerate(parts) if part.startswith("patient")]
    if not patients or patients[-1] + 1 >= len(parts) - 1:
        raise table.error(f"{path!r} does not look like .../patientN/studyN/file", line, "Path")
    i = patients[-1]
    return parts[i], f"{parts[i]}/{parts[i + 1]}"


def _find_chexpert(root: Path) -> Path:
    """The folder holding train.csv: `root/CheXpert-v1.0-small`, `root/CheXpert-v1.0` or `root`."""
    for folder in (*(root / name for name in CHEXPERT_FOLDERS), root):
        if (folder / "train.csv").is_file() or (folder / "valid.csv").is_file():
            return folder
    raise DataError(
        f"no train.csv / valid.csv in {root} or its {' / '.join(CHEXPERT_FOLDERS)} folder", root
    )


def _image_path(folder: Path, relative: str) -> Path:
    """The image a CSV's `Path` names: it starts with the archive's folder name
    (CheXpert-v1.0-small/train/...), read below `folder`, the folder holding the CSV, whatever its
    name (a dataset folder that is the archive's folder renamed)."""
    parts = PurePosixPath(relative).parts
    return folder.joinpath(*parts[1:]) if parts and parts[0] in CHEXPERT_FOLDERS else folder / relative


def _read_chexpert_csv(path: Path, folder: Path, pool: str, ctx: ReadContext) -> list[Record]:
    table = CsvTable(path, CHEXPERT_COLUMNS)

    def parse(line: int, row: dict[str, str]) -> Record | None:
        if row["Frontal/Lateral"].strip() != "Frontal":
            ctx.drops.drop(LATERAL_VIEW)
            return None
        relative = row["Path"].strip()
        patient, study = _patient_study(table, line, relative)
        labels = parse_labels(table, line, row, CHEXPERT_LABELS)
        image = ctx.image(_image_path(folder, relative), table.path, line)
        return Record(
            dataset=ctx.dataset,
            image_path=image,
            patient_id=patient,
            study_id=study,
            split=pool,
            site=site_of(row),
            view=row["AP/PA"].strip() or None,
            labels=labels,
        )

    return ctx.rows(table, parse)


@ADAPTERS.register("chexpert")
def read_chexpert(root: Path, ctx: ReadContext) -> AdapterResult:
    """Frontal CheXpert images with 14 labels (1 / 0 / -1 / NaN); valid.csv -> "test", train.csv
    split per patient into train / valid (90/10); the site is the optional `Site` column."""
    folder = _find_chexpert(root)
    records = []
    for name, pool in (("train.csv", "train"), ("valid.csv", "test")):
        records += _read_chexpert_csv(
            find_file(folder, [name], f"CheXpert {name}"), folder, pool, ctx
        )
    return AdapterResult(records, {"train": TRAIN_CARVE})


@ADAPTERS.register("cxp500")
def read_cxp500(root: Path, ctx: ReadContext) -> AdapterResult:
    """The CXP500 zero-shot test set: 14 expert labels as 0 / 1, all records in "test"."""
    table = CsvTable(find_file(root, ["test_labels.csv"], "CXP500 test_labels.csv"), CXP500_COLUMNS)

    def parse(line: int, row: dict[str, str]) -> Record | None:
        relative = row["Path"].strip()
        if "lateral" in PurePosixPath(relative).name.lower():
            ctx.drops.drop(LATERAL_VIEW)
            return None
        patient, study = _patient_study(table, line, relative)
        labels = parse_labels(table, line, row, CHEXPERT_LABELS, allowed=frozenset({0.0, 1.0}))
        image = ctx.image(root / relative, table.path, line)
        return Record(
            dataset=ctx.dataset,
            image_path=image,
            patient_id=patient,
            study_id=study,
            split="test",
            site=site_of(row),
            view=None,
            labels=labels,
        )

    return AdapterResult(ctx.rows(table, parse))
