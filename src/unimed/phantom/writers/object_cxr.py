"""Object-CXR: `train.csv` / `dev.csv` (image_name, annotation) with rectangle / ellipse / polygon objects."""

from __future__ import annotations

from typing import Sequence

from unimed.phantom.study import Box, Study
from unimed.phantom.writers.base import LayoutWriter, ManifestEntry, Row, StudyResult, save_jpeg, write_csv

COLUMNS = ("image_name", "annotation")
LABEL = "foreign_object"


def annotation(box: Box, study_index: int) -> str:
    """`TYPE x y x y ...`: 0 rectangle and 1 ellipse give bounding corners, 2 polygon its vertices."""
    if box.shape in (0, 1):
        points: Sequence[tuple[float, float]] = ((box.x0, box.y0), (box.x1, box.y1))
    elif box.shape == 2:
        if len(box.polygon) < 3:
            raise ValueError(f"study {study_index}: polygon object with {len(box.polygon)} vertices")
        points = box.polygon
    else:
        raise ValueError(f"study {study_index}: object shape {box.shape} is not 0, 1 or 2")
    return " ".join([str(box.shape), *(f"{round(x)} {round(y)}" for x, y in points)])


class ObjectCxrWriter(LayoutWriter):
    """Object-CXR: frontal images from the English-speaking site, enriched for foreign objects."""

    folder = "object-cxr"
    dataset = "object-cxr"
    count_field = "object_cxr_studies"
    enrich = {"foreign_object": 0.5}
    splits = (("train", 0.8), ("dev", 0.2))

    def write_study(self, study: Study, split: str) -> StudyResult:
        name = f"{study.index + 1:05d}.jpg"
        save_jpeg(self.dest / split / name, study.image)
        objects = [b for b in study.boxes if b.label == LABEL]
        row = (name, ";".join(annotation(b, study.index) for b in objects))
        labels = {LABEL: float(bool(objects))}
        entry = ManifestEntry(split, True, study.site, study.language, labels, boxes=len(objects))
        return StudyResult(((split, row),), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        for split, _ in self.splits:
            write_csv(self.dest / f"{split}.csv", COLUMNS, self.table_rows(rows, split))
