"""PadChest (Spanish stemmed reports, 16-bit PNGs) and PDC, its physician-labelled zero-shot subset."""

from __future__ import annotations

from typing import Sequence

from unimed.data.labels import PDC_LABELS
from unimed.phantom.catalogue import PADCHEST_NAME, PDC_OF
from unimed.phantom.study import Study
from unimed.phantom.writers.base import (
    LayoutWriter,
    ManifestEntry,
    Row,
    StudyResult,
    save_png16,
    stable_date,
    stable_hex,
    stable_int,
    stable_uniform,
    write_csv,
)

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
    "InstitutionName_DICOM",  # not in the real file (one hospital); the phantom names each study's site
)
IMAGE_DIRS = 54
VIEW_DICOM = {"PA": "POSTEROANTERIOR", "AP": "ANTEROPOSTERIOR", "LATERAL": "LATERAL"}
AP_HORIZONTAL_FRACTION = 0.3
PHYSICIAN_FRACTION = 0.27


def physician_labels(study: Study) -> list[str]:
    """PDC labels: the ten classes from the ground truth, then PadChest names of the other findings."""
    covered = {finding for names in PDC_OF.values() for finding in names}
    labels = [name for name in PDC_LABELS if study.pdc[name]]
    labels += [PADCHEST_NAME[f.name] for f in study.findings if f.name not in covered]
    return labels or ["normal"]


def labels_cell(labels: list[str], spaced: bool) -> str:
    """The Python-list string of the `Labels` column; real files put a space before later items."""
    items = [labels[0], *(f" {label}" if spaced else label for label in labels[1:])]
    return str(items)


class PadchestWriter(LayoutWriter):
    """PadChest from the Spanish-speaking site, then the control community's Spanish studies:
    PA/AP/AP_horizontal/L projections, no official split."""

    folder = "padchest"
    dataset = "padchest"
    count_field = "padchest_studies"
    frontal_only = False
    language = "es"
    control = True
    physician_fraction = PHYSICIAN_FRACTION

    def site(self, index: int) -> str:
        """PadChest comes from the Spanish-speaking site."""
        return "alicante"

    def labels(self, study: Study) -> list[str]:
        """The `Labels` items: what the report mentions, as the real RNN/physician labelling does."""
        return list(study.padchest_labels) or ["normal"]

    def _draw(self, what: str, study: Study) -> float:
        return stable_uniform(what, self.cfg.seed, self.dataset, study.image_id)

    def projection(self, study: Study) -> str:
        """PadChest's Projection: PA, AP, AP_horizontal (a share of AP) or L (lateral)."""
        if study.view == "LATERAL":
            return "L"
        if study.view == "AP" and self._draw("ap-horizontal", study) < AP_HORIZONTAL_FRACTION:
            return "AP_horizontal"
        return study.view

    def write_study(self, study: Study, split: str) -> StudyResult:
        seed, name = self.cfg.seed, self.dataset
        number = stable_int("image", seed, name, study.image_id) % 10**20
        image_id = f"{number:020d}_{stable_hex(2, 'suffix', seed, name, study.image_id)}.png"
        image_dir = str(stable_int("dir", seed, name, study.image_id) % IMAGE_DIRS)
        save_png16(self.dest / image_dir / image_id, study.image)
        date = stable_date(2009, 9, seed, name, study.study_id)
        labels = self.labels(study)
        height, width = study.image.shape
        physician = self._draw("method", study) < self.physician_fraction
        row = (
            image_id,
            image_dir,
            date,
            stable_hex(16, "study", seed, name, study.study_id),
            stable_hex(16, "patient", seed, name, study.patient_id),
            f"{int(date[:4]) - study.age}.0",
            study.sex,
            VIEW_DICOM[study.view],
            self.projection(study),
            "Manual review of DICOM fields",
            "No",
            "CR",
            "PhilipsMedicalSystems",
            "MONOCHROME2",
            str(height),
            str(width),
            study.reports["es"],
            "Physician" if physician else "RNN_model",
            labels_cell(labels, spaced=self._draw("spacing", study) < 0.5),
            "[]",
            str([[label] for label in labels]),
            "[]",
            "[]",
            study.site,
        )
        entry = ManifestEntry(
            split, study.view != "LATERAL", study.site, study.language, {label: 1.0 for label in labels}
        )
        return StudyResult(((CSV_NAME, row),), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / CSV_NAME, COLUMNS, self.table_rows(rows, CSV_NAME))


class PdcWriter(PadchestWriter):
    """PDC: the PadChest schema, frontal only, every row labelled by a physician, a test set."""

    folder = "pdc"
    dataset = "pdc"
    count_field = "pdc_studies"
    frontal_only = True
    control = False
    physician_fraction = 1.0
    # Enough of every class's findings that each of the ten zero-shot classes has positives.
    enrich = {
        name: 0.15
        for name in ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion",
                     "hilar_enlargement", "pneumothorax", "pneumonia", "vascular_redistribution",
                     "heart_insufficiency")
    }

    def split(self, study: Study) -> str:
        """Every PDC study is a zero-shot test study."""
        return "test"

    def labels(self, study: Study) -> list[str]:
        """Physician labels from the image's ground truth, whatever the report says."""
        return physician_labels(study)
