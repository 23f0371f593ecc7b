"""CC-CCII: `<class>/<patient_id>/<scan_id>/` folders of slice images, indexed by `unzip_filenames.csv`
(zip_file, label, patient_id, scan_id, n_slice); classes NCP / CP / Normal."""

from __future__ import annotations

from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file
from unimed.data.adapters.volume_common import CARVE, POOL, check_volume_path
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.data.labels import CCII_CLASSES
from unimed.data.records import Record
from unimed.data.volumes import SLICE_SUFFIXES

COLUMNS = ("zip_file", "label", "patient_id", "scan_id", "n_slice")


ARCHIVE_NOT_UNZIPPED = "archive not unzipped"
"""The drop reason of a scan whose zip archive (`zip_file`) has no scan folder here."""


def _scan_folder(root: Path, row: dict[str, str]) -> Path:
    return root / row["label"].strip() / row["patient_id"] / row["scan_id"]


def unzipped_archives(root: Path, table: CsvTable) -> set[str]:
    """The `zip_file` names of which at least one scan folder is here: CC-CCII comes as many zip
    archives, and `unzip_filenames.csv` lists the scans of all of them."""
    present = set()
    for line, values in table:
        try:
            row = table.row(line, values)
        except DataError:
            continue  # the row's own read names it
        if _scan_folder(root, row).is_dir():
            present.add(row["zip_file"].strip())
    return present


@ADAPTERS.register("cc-ccii")
def read_ccii(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per scan folder (`image_path` is the folder), class in `target`; carved per patient,
    stratified by class. The scans of an archive with no folder here (not unzipped) are left out and
    counted; a missing scan of an archive that is here is a bad row."""
    table = CsvTable(find_file(root, ["unzip_filenames.csv"], "CC-CCII unzip_filenames.csv"), COLUMNS)
    present = unzipped_archives(root, table)

    def parse(line: int, row: dict[str, str]) -> Record | None:
        label = row["label"].strip()
        if label not in CCII_CLASSES:
            raise table.error(f"label {label!r} is not one of {list(CCII_CLASSES)}", line, "label")
        if row["zip_file"].strip() not in present:
            ctx.leave_out(ARCHIVE_NOT_UNZIPPED, row["zip_file"].strip())
            return None
        folder = check_volume_path(ctx, _scan_folder(root, row), table.path, line)
        slices = sum(1 for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES)
        if str(slices) != row["n_slice"].strip():
            raise DataError(f"{folder} holds {slices} slice image(s), n_slice says {row['n_slice']}",
                            table.path, line, "n_slice", reason=MISSING_IMAGE)
        return Record(
            dataset=ctx.dataset, image_path=folder, patient_id=row["patient_id"], study_id=row["scan_id"],
            split=POOL, labels={c: float(c == label) for c in CCII_CLASSES}, target=label, ndim=3,
        )

    return AdapterResult(ctx.rows(table, parse), CARVE, stratify=True)
