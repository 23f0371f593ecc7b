"""LUNA16: `subset*/<seriesuid>.mhd` + `.raw` volumes, nodules in `annotations.csv` (seriesuid,
coordX, coordY, coordZ, diameter_mm; world millimetres in ITK's LPS frame), nodule candidates in
a candidates table (seriesuid, coordX, coordY, coordZ, class: LUNA16's false-positive reduction
track; CANDIDATE_TABLES).

Two datasets read the folder: ``luna16``, one record per series labelled nodule / normal (a series
with no annotation is a normal volume; the UniMedI paper's wording of its task), and
``luna16-candidates``, one record per candidate, the cube of CANDIDATE_CUBE_MM around it labelled
nodule (class 1) or not (class 0): nodule classification as LUNA16's own track and the 3D
self-supervised literature pose it (Models Genesis' NCC, an AUC on candidate cubes). UniMedI's
Table 3 names its column "LUNA2016-v2" and reports an AUC; LUNA16's candidates table is in its
second version (candidates_V2)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file, parse_number
from unimed.data.adapters.volume_common import CARVE, POOL, check_volume_path
from unimed.data.errors import DataError
from unimed.data.records import Crop, PointAnn, Record
from unimed.data.volumes import mhd_geometry

COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
CANDIDATE_TABLES = ("candidates_V2/candidates_V2.csv", "candidates_V2.csv", "candidates.csv")
"""Where the candidates are read from, the first found: LUNA16 ships the extended table of its
false-positive reduction track as `candidates_V2/candidates_V2.csv` and keeps the first
`candidates.csv` "for completeness" (it says not to use it); the phantom writes `candidates.csv`."""
CANDIDATE_CUBE_MM = 48.0
"""Side of the cube a candidate is read as: 2-15 times the diameter of LUNA16's nodules (3-30 mm),
about the field of view of Models Genesis' 64 x 64 x 32-voxel NCC cubes."""

SERIES_NOT_HERE = "series not here"
"""The drop reason of a table row naming a series whose subset is not in the folder."""
Check = Callable[[CsvTable, int, dict[str, str], float], None]
log = logging.getLogger(__name__)


def _positive_diameter(table: CsvTable, line: int, row: dict[str, str], value: float) -> None:
    if value != value or value <= 0:
        raise table.error(f"diameter {row['diameter_mm']!r} must be a positive number", line, "diameter_mm")


def _class_label(table: CsvTable, line: int, row: dict[str, str], value: float) -> None:
    if value not in (0.0, 1.0):
        raise table.error(f"class {row['class']!r} must be 0 or 1", line, "class")


Geometry = dict[str, tuple[tuple[int, int, int], np.ndarray]]
"""Series uid -> (size, world-to-voxel matrix: the inverse of the affine) of the headers read so
far (:func:`mhd_geometry`), each read and inverted once however many rows name the series."""


def _points(root: Path, ctx: ReadContext, names: tuple[str, ...], columns: tuple[str, ...], what: str,
            headers: dict[str, Path], check: Check, geometry: Geometry
            ) -> dict[str, list[tuple[float, float, float, float]]]:
    """Series uid -> [(x, y, z in RAS mm, the row's last column)] of the first table of `names`
    found (LPS mm on disk); a point outside its volume or without coordinates, or a repeated row is
    a DataError on its line, a row naming a series without a volume here is left out and counted
    (a subset not downloaded; a warning when no row names one here). The headers it reads go into
    `geometry`."""
    table = CsvTable(find_file(root, names, f"LUNA16 {what} table"), columns)
    out: dict[str, list[tuple[float, float, float, float]]] = {uid: [] for uid in headers}
    seen: dict[tuple[str, float, float, float], int] = {}
    for line, values in table:
        try:
            row = table.row(line, values)
            x, y, z, value = (parse_number(table, line, row, c) for c in columns[1:])
            check(table, line, row, value)
            if not np.isfinite((x, y, z)).all():
                raise table.error(f"{what} coordinates ({x}, {y}, {z}) must be numbers", line)
            uid = row["seriesuid"].strip()
            if uid not in headers:
                ctx.leave_out(SERIES_NOT_HERE, uid)
                continue
            if uid not in geometry:
                size, affine = mhd_geometry(headers[uid])
                geometry[uid] = (size, np.linalg.inv(affine))
            size, to_voxel = geometry[uid]
            voxel = (to_voxel @ np.array([-x, -y, z, 1.0]))[:3]
            if np.any(voxel < -0.5) or np.any(voxel > np.array(size) - 0.5):
                raise table.error(f"{what} at ({x}, {y}, {z}) mm is outside the volume "
                                  f"(voxel {voxel.round(1).tolist()}, size {list(size)})", line)
            position = (uid, round(x, 2), round(y, 2), round(z, 2))  # a split-file key's precision
            if position in seen:
                raise table.error(f"repeats the {what} of line {seen[position]} (same position to 0.01 mm)", line)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        seen[position] = line
        out[uid].append((-x, -y, z, value))
    absent = sum(ctx.not_here.get(SERIES_NOT_HERE, {}).values())
    if absent and not any(out.values()):  # a few nodule-free series copied, or another dataset's table
        log.warning("%s: none of its %d row(s) names a series here (no subset*/<seriesuid>.mhd of theirs): "
                    "no volume has a %s (are the table and the volumes of one dataset?)", table.path, absent,
                    what)
    return out


def _readable(ctx: ReadContext, header: Path, geometry: Geometry) -> bool:
    """Whether the series' volume is there (a missing or short `.raw` is counted as a bad row);
    its header is read unless `geometry` holds it already."""
    try:
        check_volume_path(ctx, header, header, None)
        if header.stem not in geometry:
            mhd_geometry(header)
    except DataError as err:
        ctx.drops.bad(err)
        return False
    return True


@ADAPTERS.register("luna16")
def read_luna16(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per series with its nodules (`points`, RAS mm) and label nodule 1 / 0; an
    annotation outside its volume, without coordinates or repeating another is a DataError on its
    line (one of a series not here is left out and counted). Carved per patient, stratified by
    label."""
    headers = {p.stem: p for p in sorted(root.glob("subset*/*.mhd"))}
    geometry: Geometry = {}
    nodules = _points(root, ctx, ("annotations.csv",), COLUMNS, "nodule", headers, _positive_diameter, geometry)
    records = []
    for uid, header in headers.items():
        if not _readable(ctx, header, geometry):
            continue
        points = tuple(PointAnn(x, y, z, d, "nodule") for x, y, z, d in nodules[uid])
        records.append(Record(
            dataset=ctx.dataset, image_path=header, patient_id=uid, study_id=uid, split=POOL,
            labels={"nodule": float(bool(points))}, target="nodule" if points else "normal",
            points=points, ndim=3,
        ))
    return AdapterResult(records, CARVE, stratify=True)


@ADAPTERS.register("luna16-candidates")
def read_luna16_candidates(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per row of the candidates table (the first of CANDIDATE_TABLES found): the
    cube of CANDIDATE_CUBE_MM around the candidate (`crop`, RAS mm) of its series' volume, label
    nodule 1 / 0 by its class. A point outside its volume or without coordinates, a class other
    than 0 / 1 or a repeated row is a DataError on its line (a row of a series not here is left out
    and counted).
    Carved per patient (series), stratified by the classes of a series' candidates."""
    headers = {p.stem: p for p in sorted(root.glob("subset*/*.mhd"))}
    geometry: Geometry = {}
    candidates = _points(root, ctx, CANDIDATE_TABLES, CANDIDATE_COLUMNS, "candidate", headers, _class_label,
                         geometry)
    records = []
    for uid, header in headers.items():
        if not candidates[uid] or not _readable(ctx, header, geometry):
            continue
        records += [Record(
            dataset=ctx.dataset, image_path=header, patient_id=uid, study_id=uid, split=POOL,
            labels={"nodule": label}, target="nodule" if label else "non-nodule", ndim=3,
            crop=Crop(x, y, z, CANDIDATE_CUBE_MM),
        ) for x, y, z, label in candidates[uid]]
    return AdapterResult(records, CARVE, stratify=True)
