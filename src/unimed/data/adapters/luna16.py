"""LUNA16: `subset*/<seriesuid>.mhd` + `.raw` volumes, nodules in `annotations.csv` (seriesuid,
coordX, coordY, coordZ, diameter_mm; world millimetres in ITK's LPS frame). `candidates.csv` is
not needed for volume labels; a series with no annotation is a normal (nodule-free) volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file, parse_number
from unimed.data.adapters.volume_common import CARVE, POOL, check_volume_path
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.data.records import PointAnn, Record
from unimed.data.volumes import mhd_geometry

COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def _annotations(root: Path, ctx: ReadContext) -> tuple[CsvTable, list[tuple[int, str, PointAnn]]]:
    table = CsvTable(find_file(root, ["annotations.csv"], "LUNA16 annotations.csv"), COLUMNS)
    out = []
    for line, values in table:
        try:
            row = table.row(line, values)
            x, y, z, d = (parse_number(table, line, row, c) for c in COLUMNS[1:])
            if d != d or d <= 0:
                raise table.error(f"diameter {row['diameter_mm']!r} must be a positive number", line, "diameter_mm")
        except DataError as err:
            ctx.drops.bad(err)
            continue
        out.append((line, row["seriesuid"].strip(), PointAnn(-x, -y, z, d, "nodule")))  # LPS -> RAS
    return table, out


@ADAPTERS.register("luna16")
def read_luna16(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per series with its nodules (`points`, RAS mm) and label nodule 1 / 0; an
    annotation outside its volume or of a series with no volume is a DataError on its line. Carved
    per patient, stratified by label."""
    headers = {p.stem: p for p in sorted(root.glob("subset*/*.mhd"))}
    table, annotations = _annotations(root, ctx)
    geometry, points = {}, {uid: [] for uid in headers}
    for line, uid, point in annotations:
        try:
            if uid not in headers:
                raise table.error(f"series {uid} has no subset*/{uid}.mhd", line, "seriesuid", MISSING_IMAGE)
            if uid not in geometry:
                geometry[uid] = mhd_geometry(headers[uid])
            size, affine = geometry[uid]
            voxel = (np.linalg.inv(affine) @ np.array([point.x, point.y, point.z, 1.0]))[:3]
            if np.any(voxel < -0.5) or np.any(voxel > np.array(size) - 0.5):
                raise table.error(f"nodule at ({-point.x}, {-point.y}, {point.z}) mm is outside the volume "
                                  f"(voxel {voxel.round(1).tolist()}, size {list(size)})", line)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        points[uid].append(point)
    records = []
    for uid, header in headers.items():
        try:
            check_volume_path(ctx, header, header, None)
            if uid not in geometry:
                mhd_geometry(header)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        nodules = tuple(points[uid])
        records.append(Record(
            dataset=ctx.dataset, image_path=header, patient_id=uid, study_id=uid, split=POOL,
            labels={"nodule": float(bool(nodules))}, target="nodule" if nodules else "normal",
            points=nodules, ndim=3,
        ))
    return AdapterResult(records, CARVE, stratify=True)
