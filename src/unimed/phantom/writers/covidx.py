"""COVIDx CXR: `train.txt` / `test.txt` lines `patient_id filename label source`, images in train/ and test/."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unimed.data.labels import COVIDX_CLASSES
from unimed.phantom.study import Study
from unimed.phantom.writers.base import LayoutWriter, ManifestEntry, Row, StudyResult, save_jpeg


class CovidxWriter(LayoutWriter):
    """COVIDx from both sites (the `source` column names the site), balanced over its three classes."""

    folder = "covidx"
    dataset = "covidx"
    count_field = "covidx_studies"
    enrich = {"covid": 1 / 3, "pneumonia": 1 / 3}
    splits = (("train", 0.8), ("test", 0.2))

    def site(self, index: int) -> str:
        """The first half of the studies comes from the English-speaking site, the second half from the Spanish one."""
        return "boston" if index < (self.count() + 1) // 2 else "alicante"

    def write_study(self, study: Study, split: str) -> StudyResult:
        if study.covid_class not in COVIDX_CLASSES:
            raise ValueError(f"study {study.index}: COVIDx class {study.covid_class!r} not in {COVIDX_CLASSES}")
        filename = f"{study.image_id}.jpg"
        save_jpeg(self.dest / split / filename, study.image)
        line = (study.patient_id, filename, study.covid_class, study.site)
        entry = ManifestEntry(split, True, study.site, study.language, {study.covid_class: 1.0})
        return StudyResult(((split, line),), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        for split, _ in self.splits:
            lines = "".join(" ".join(cells) + "\n" for cells in self.table_rows(rows, split))
            path: Path = self.dest / f"{split}.txt"
            path.write_text(lines, encoding="utf-8")
