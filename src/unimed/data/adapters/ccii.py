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


@ADAPTERS.register("cc-ccii")
def read_ccii(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per scan folder (`image_path` is the folder), class in `target`; carved per patient,
    stratified by class."""
    table = CsvTable(find_file(root, ["unzip_filenames.csv"], "CC-CCII unzip_filenames.csv"), COLUMNS)

    def parse(line: int, row: dict[str, str]) -> Record:
        label = row["label"].strip()
        if label not in CCII_CLASSES:
            raise table.error(f"label {label!r} is not one of {list(CCII_CLASSES)}", line, "label")
        folder = check_volume_path(ctx, root / label / row["patient_id"] / row["scan_id"], table.path, line)
        slices = sum(1 for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES)
        if str(slices) != row["n_slice"].strip():
            raise DataError(f"{folder} holds {slices} slice image(s), n_slice says {row['n_slice']}",
                            table.path, line, "n_slice", reason=MISSING_IMAGE)
        return Record(
            dataset=ctx.dataset, image_path=folder, patient_id=row["patient_id"], study_id=row["scan_id"],
            split=POOL, labels={c: float(c == label) for c in CCII_CLASSES}, target=label, ndim=3,
        )

    return AdapterResult(ctx.rows(table, parse), CARVE, stratify=True)
