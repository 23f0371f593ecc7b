"""Object-CXR: foreign-object annotations (rectangles, ellipses, polygons) in train/dev.csv."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext, site_of
from unimed.data.adapters.tables import CsvTable, find_file
from unimed.data.records import BoxAnn, Record

COLUMNS = ("image_name", "annotation")
BOX_LABEL = "foreign object"
SHAPES = {0: "rectangle", 1: "ellipse", 2: "polygon"}
TRAIN_CARVE = {"train": 0.8, "valid": 0.2}


def parse_annotation(text: str) -> tuple[BoxAnn, ...]:
    """Boxes from `TYPE x y x y ...;TYPE ...` (0 rectangle / 1 ellipse by two corners, 2 polygon by
    its vertices), each the extent of its shape; raises ValueError when malformed."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        fields = part.split()
        try:
            kind, coords = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"shape {part[:40]!r} holds a non-number") from None
        if kind not in SHAPES:
            raise ValueError(f"shape type {kind} is not one of {SHAPES}")
        # Rectangles and ellipses are two corners; a polygon needs at least three vertices.
        valid = len(coords) == 4 if kind in (0, 1) else len(coords) >= 6 and len(coords) % 2 == 0
        if not valid:
            raise ValueError(f"{SHAPES[kind]} has {len(coords)} coordinates")
        if min(coords) < 0:
            raise ValueError(f"{SHAPES[kind]} {part[:40]!r} has a negative coordinate")
        xs, ys = coords[0::2], coords[1::2]
        # A shape drawn along one pixel row or column (a thin wire) is a real object one pixel
        # thick, so its extent is widened to 1 px rather than left with zero area, which detectors
        # reject.
        x0, y0 = min(xs), min(ys)
        boxes.append(BoxAnn(x0, y0, max(max(xs), x0 + 1), max(max(ys), y0 + 1), BOX_LABEL))
    return tuple(boxes)


def _read_csv(root: Path, name: str, pool: str, ctx: ReadContext) -> list[Record]:
    table = CsvTable(find_file(root, [f"{name}.csv"], f"Object-CXR {name}.csv"), COLUMNS)

    def parse(line: int, row: dict[str, str]) -> Record:
        image_name = row["image_name"].strip()
        try:
            boxes = parse_annotation(row["annotation"])
        except ValueError as err:
            raise table.error(str(err), line, "annotation") from None
        image = ctx.image(root / name / image_name, table.path, line)
        image_id = PurePosixPath(image_name).stem
        return Record(
            dataset=ctx.dataset,
            image_path=image,
            patient_id=image_id,
            study_id=image_id,
            split=pool,
            site=site_of(row),
            labels={"Foreign Object": float(bool(boxes))},
            boxes=boxes,
        )

    return ctx.rows(table, parse)


@ADAPTERS.register("object-cxr")
def read_object_cxr(root: Path, ctx: ReadContext) -> AdapterResult:
    """Object-CXR images with foreign-object boxes; dev -> "test", "valid" carved from train per
    image (the dataset has no patient ids, so each image is its own patient), 80/20; the site is the
    optional `Site` column."""
    records = _read_csv(root, "train", "train", ctx) + _read_csv(root, "dev", "test", ctx)
    return AdapterResult(records, {"train": TRAIN_CARVE})
