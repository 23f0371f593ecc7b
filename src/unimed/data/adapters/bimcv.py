"""BIMCV-COVID19+: BIDS sessions of CT volumes with Spanish reports and their labels.

`derivatives/labels/labels_covid_posi.tsv` (PatientID, ReportID, Report, Labels) lists one session
per line; the volume is `<PatientID>/<ReportID>/mod-ct/*_ct.nii.gz` (of several runs, the one with
the most slices). `Labels` is a Python-list string of English label names, as in PadChest.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import find_file
from unimed.data.adapters.volume_common import CARVE, POOL, check_volume_path, read_tsv
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.data.records import Record
from unimed.data.reports import clean_report
from unimed.data.volumes import axial_depth

LABELS_TSV = "derivatives/labels/labels_covid_posi.tsv"
COLUMNS = ("PatientID", "ReportID", "Report", "Labels")
log = logging.getLogger(__name__)


def parse_labels(text: str, path: Path, line: int) -> list[str]:
    try:
        labels = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise DataError(f"Labels {text[:60]!r} is not a list of names", path, line, "Labels") from None
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        raise DataError(f"Labels {text[:60]!r} is not a list of names", path, line, "Labels")
    return [name.strip() for name in labels]


def _volumes(root: Path, patient: str, session: str, path: Path, line: int) -> list[Path]:
    """The session's CT volumes (its runs), in name order; a DataError when it has none."""
    folder = root / patient / session / "mod-ct"
    found = sorted(folder.glob("*_ct.nii.gz")) + sorted(folder.glob("*_ct.nii"))
    if not found:
        raise DataError(f"no *_ct.nii.gz in {folder}", path, line, reason=MISSING_IMAGE)
    return found


def _most_slices(runs: list[Path]) -> Path:
    """Of a session's CT runs, the one with the most axial slices (from the headers): the
    diagnostic series rather than a scout or a thick-slice reconstruction; the first by name of
    equals."""
    return max(runs, key=axial_depth) if len(runs) > 1 else runs[0]


@ADAPTERS.register("bimcv-covid19")
def read_bimcv(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per CT session, with its Spanish report and labels; carved per patient."""
    path = find_file(root, [LABELS_TSV], "BIMCV labels table")
    records, several = [], []
    for line, row in read_tsv(path, COLUMNS):
        try:
            labels = parse_labels(row["Labels"], path, line)
            runs = _volumes(root, row["PatientID"], row["ReportID"], path, line)
            volume = check_volume_path(ctx, _most_slices(runs), path, line)
            if len(runs) > 1:
                several.append((volume, len(runs)))
            report = clean_report(row["Report"])
            if not ctx.accept_report(report, path, line, "Report", row["Report"]):
                continue
        except DataError as err:
            ctx.drops.bad(err)
            continue
        records.append(Record(
            dataset=ctx.dataset, image_path=volume, patient_id=row["PatientID"], study_id=row["ReportID"],
            split=POOL, report=report, language="es", labels={name: 1.0 for name in labels}, ndim=3,
        ))
    if several:
        volume, runs = several[0]
        log.warning("%s: %d session(s) hold several CT volumes (runs); each session's report goes with "
                    "its run of the most slices (e.g. %s of %d in %s)", ctx.dataset, len(several),
                    volume.name, runs, volume.parent)
    return AdapterResult(records, CARVE)
