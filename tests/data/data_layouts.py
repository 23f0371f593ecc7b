"""Tiny datasets in the official layouts (docs/LAYOUTS.md), built in memory, written under tmp_path.

A :class:`Layout` holds tables, text files and images by relative path, so a test can break one
piece (drop a column, blank a report, delete an image) before writing it. `kept` lists the image
paths that the adapter must return with default settings.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from unimed.data.rle import rle_encode
from unimed.data.labels import CHEXPERT_LABELS

SIZE = 16


@dataclasses.dataclass
class Table:
    """A CSV table; `header` is the literal header line when it differs from `columns` (quirks).
    Lone surrogates in cells ("\\udce9") are written as the raw, non-UTF-8 bytes they stand for."""

    columns: list[str]
    rows: list[list[str]]
    header: list[str] | None = None

    def set(self, row: int, column: str, value: str) -> None:
        self.rows[row][self.columns.index(column)] = value

    def add_column(self, column: str, values: list[str]) -> None:
        self.columns.append(column)
        for row, value in zip(self.rows, values, strict=True):
            row.append(value)

    def drop_column(self, column: str) -> None:
        index = self.columns.index(column)
        for values in [self.columns, *self.rows] + ([self.header] if self.header else []):
            del values[index]

    def encode(self) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header or self.columns)
        writer.writerows(self.rows)
        return out.getvalue().encode("utf-8", errors="surrogateescape")


@dataclasses.dataclass
class Layout:
    root: Path
    tables: dict[str, Table] = dataclasses.field(default_factory=dict)
    texts: dict[str, bytes] = dataclasses.field(default_factory=dict)
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    kept: list[str] = dataclasses.field(default_factory=list)
    dicom_patients: dict[str, str] = dataclasses.field(default_factory=dict)

    def write(self) -> Path:
        for rel, table in self.tables.items():
            data = table.encode()
            _put(self.root / rel, gzip.compress(data, mtime=0) if rel.endswith(".gz") else data)
        for rel, data in self.texts.items():
            _put(self.root / rel, data)
        for rel, array in self.images.items():
            write_image(self.root / rel, array, self.dicom_patients.get(rel, ""))
        return self.root


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_image(path: Path, array: np.ndarray, patient_id: str = "") -> None:
    """JPEG (8-bit), PNG (8 or 16-bit by dtype) or DICOM (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".dcm":
        write_dicom(path, array, patient_id=patient_id)
    else:
        Image.fromarray(array).save(path)


def write_dicom(
    path: Path, array: np.ndarray, photometric: str = "MONOCHROME2", patient_id: str = ""
) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.set_pixel_data(array, photometric_interpretation=photometric, bits_stored=8 * array.itemsize)
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, hu: np.ndarray, *, spacing=(0.7, 0.8, 2.5), origin=(-100.0, -120.0, 50.0),
                    slope: float = 1.0, intercept: float = -1024.0) -> Path:
    """One axial CT series of (Z, Y, X) HU `hu` as a scanner writes it: a file per slice (named
    without a suffix, written in reverse slice order), int16 stored values with a rescale slope and
    intercept, rows towards posterior and columns towards the patient's left (the LPS frame),
    slice k at ImagePositionPatient z = origin z + k x slice spacing (superior as k grows)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    for number, k in enumerate(reversed(range(len(hu)))):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, series, "CT", "P1"
        ds.SeriesNumber, ds.InstanceNumber = 1, number + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
        ds.SliceThickness = spacing[2]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.set_pixel_data(np.ascontiguousarray(stored[k]), photometric_interpretation="MONOCHROME2",
                          bits_stored=16)
        ds.save_as(folder / f"IM{number:04d}", enforce_file_format=True)
    return folder


def grey(seed: int, dtype: type = np.uint8) -> np.ndarray:
    high = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, high, (SIZE, SIZE), endpoint=True).astype(dtype)


# ---- MIMIC-CXR ----------------------------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 COMPARISON:  ___.

 FINDINGS:

 There is {finding}.  The cardiomediastinal silhouette is
 normal.  No pneumothorax.

 IMPRESSION:

 {impression}
"""


# (subject, study, split, [(dicom, view)], finding, impression)
MIMIC_STUDIES = [
    (
        "10000001",
        "50000001",
        "train",
        [("d1", "PA"), ("d2", "LATERAL")],
        "a small left effusion",
        "Effusion.",
    ),
    (
        "10000002",
        "50000002",
        "train",
        [("d3", "AP")],
        "no focal consolidation",
        "No acute process.",
    ),
    (
        "10000003",
        "50000003",
        "validate",
        [("d4", "PA"), ("d5", "LL")],
        "mild cardiomegaly",
        "Cardiomegaly.",
    ),
    (
        "10000004",
        "50000004",
        "test",
        [("d6", "AP")],
        "a right lower lobe opacity",
        "Pneumonia.",
    ),
    ("10000004", "50000005", "test", [("d7", "PA")], None, None),
]


def mimic(root: Path, gz: bool = True) -> Layout:
    """4 patients, 5 studies, 8 images: 2 lateral, 1 study with a 2-token report (filtered)."""
    layout = Layout(root)
    meta, split, labels = [], [], []
    for subject, study, official, images, finding, impression in MIMIC_STUDIES:
        folder = f"files/p{subject[:2]}/p{subject}"
        report = (
            MIMIC_REPORT.format(finding=finding, impression=impression)
            if finding
            else "FINDINGS: Clear lungs."
        )
        layout.texts[f"{folder}/s{study}.txt"] = report.encode()
        labels.append([subject, study] + ["1.0" if i == int(study[-1]) else "" for i in range(14)])
        for dicom, view in images:
            rel = f"{folder}/s{study}/{dicom}.jpg"
            layout.images[rel] = grey(len(layout.images))
            meta.append(
                [
                    dicom,
                    subject,
                    study,
                    "CHEST (PA AND LAT)",
                    view,
                    str(SIZE),
                    str(SIZE),
                    "21800101",
                ]
            )
            split.append([dicom, study, subject, official])
            if view in ("PA", "AP") and finding:
                layout.kept.append(rel)
    suffix = ".gz" if gz else ""
    layout.tables[f"mimic-cxr-2.0.0-metadata.csv{suffix}"] = Table(
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
        ],
        meta,
    )
    layout.tables[f"mimic-cxr-2.0.0-split.csv{suffix}"] = Table(
        ["dicom_id", "study_id", "subject_id", "split"], split
    )
    layout.tables[f"mimic-cxr-2.0.0-chexpert.csv{suffix}"] = Table(
        ["subject_id", "study_id", *sorted(CHEXPERT_LABELS)], labels
    )
    return layout


# ---- PadChest / PDC -----------------------------------------------------------------------------

PADCHEST_COLUMNS = [
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
]
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


# (patient, projection, method, labels cell, report)
PADCHEST_ROWS = [
    (
        "p1",
        "PA",
        "Physician",
        "['pleural effusion', ' cardiomegaly']",
        "derram pleural izquierd. cardiomegali.",
    ),
    ("p1", "L", "Physician", "['pleural effusion']", "derram pleural izquierd."),
    ("p2", "AP", "Physician", "['normal']", "sin hallazg patologic relev."),
    (
        "p3",
        "AP_horizontal",
        "Physician",
        "['pneumothorax']",
        "neumotorax derech de pequeñ tamañ.",
    ),
    (
        "p4",
        "PA",
        "RNN_model",
        "['atelectasis', ' pneumonia']",
        "atelectasi laminar. neumoni basal.",
    ),
    ("p5", "COSTAL", "Physician", "['normal']", "sin fractur costal visibl."),
    ("p6", "PA", "Physician", "['consolidation']", "consolidacion"),
    ("p7", "PA", "Physician", "['hilar enlargement', ' edema']", "aument hili. edem pulmonar."),
    ("p8", "AP", "Physician", "['normal']", "sin hallazg patologic relev."),
    (
        "p8",
        "PA",
        "Physician",
        "['heart insufficiency', ' pleural effusion']",
        "insuficienci cardiac. derram.",
    ),
]


def padchest(root: Path) -> Layout:
    """8 patients, 10 rows: 1 lateral, 1 COSTAL, 1 RNN-labelled, 1 one-token report."""
    layout = Layout(root)
    table = []
    for i, (patient, projection, method, labels, report) in enumerate(PADCHEST_ROWS):
        image_id, image_dir = f"img{i}.png", str(i % 3)
        layout.images[f"{image_dir}/{image_id}"] = grey(i, np.uint16)
        values = dict.fromkeys(PADCHEST_COLUMNS, "")
        values.update(
            ImageID=image_id,
            ImageDir=image_dir,
            StudyID=f"s{i}",
            PatientID=patient,
            Projection=projection,
            MethodLabel=method,
            Labels=labels,
            Report=report,
        )
        table.append([values[c] for c in PADCHEST_COLUMNS])
        if projection in ("PA", "AP", "AP_horizontal") and report != "consolidacion":
            layout.kept.append(f"{image_dir}/{image_id}")
    layout.tables[PADCHEST_CSV] = Table(list(PADCHEST_COLUMNS), table)
    return layout


def pdc(root: Path) -> Layout:
    """The PadChest fixture under the PDC adapter: RNN-labelled rows are filtered, but the
    one-token report is not (reports never filter this test set)."""
    layout = padchest(root)
    method = layout.tables[PADCHEST_CSV].columns.index("MethodLabel")
    rows = layout.tables[PADCHEST_CSV].rows
    rnn = {f"{r[1]}/{r[0]}" for r in rows if r[method] == "RNN_model"}
    layout.kept = [k for k in layout.kept if k not in rnn] + ["0/img6.png"]
    return layout


# ---- CheXpert / CXP500 --------------------------------------------------------------------------


def _chexpert_row(path: str, seed: int) -> list[str]:
    values = ["1.0", "0.0", "-1.0", ""]
    return [path] + [values[(seed + i) % 4] for i in range(14)]


def chexpert(root: Path) -> Layout:
    """train.csv: 6 patients (1 lateral image); valid.csv: 2 patients."""
    layout = Layout(root)
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for name, first, count in (("train", 1, 6), ("valid", 64541, 2)):
        rows = []
        for p in range(first, first + count):
            views = [("view1_frontal", "Frontal", "AP")] + (
                [("view2_lateral", "Lateral", "")] if p == 1 else []
            )
            for view, fl, appa in views:
                rel = f"CheXpert-v1.0-small/{name}/patient{p:05d}/study1/{view}.jpg"
                layout.images[rel] = grey(p)
                labels = _chexpert_row(rel, p)
                rows.append([rel, "Female", "60", fl, appa] + labels[1:])
                if fl == "Frontal":
                    layout.kept.append(rel)
        layout.tables[f"CheXpert-v1.0-small/{name}.csv"] = Table(list(columns), rows)
    return layout


def cxp500(root: Path) -> Layout:
    """4 expert-labelled studies (0 / 1 labels)."""
    layout = Layout(root)
    rows = []
    for p in range(64541, 64545):
        rel = f"test/patient{p}/study1/view1_frontal.jpg"
        layout.images[rel] = grey(p)
        rows.append([rel] + [str((p + i) % 2) for i in range(14)])
        layout.kept.append(rel)
    layout.tables["test_labels.csv"] = Table(["Path", *CHEXPERT_LABELS], rows)
    return layout


# ---- RSNA / SIIM --------------------------------------------------------------------------------


def rsna(root: Path) -> Layout:
    """6 patients: one with two boxes, one with one box, four negatives."""
    layout = Layout(root)
    boxes = {"pid0": [(1, 2, 3, 4), (8, 8, 5, 6)], "pid1": [(2, 2, 10, 12)]}
    rows = []
    for i in range(6):
        pid = f"pid{i}"
        for box in boxes.get(pid, [None]):
            rows.append(
                [
                    pid,
                    *(["", "", "", ""] if box is None else [str(v) for v in box]),
                    str(int(box is not None)),
                ]
            )
        layout.images[f"stage_2_train_images/{pid}.dcm"] = grey(i)
        layout.kept.append(f"stage_2_train_images/{pid}.dcm")
    layout.tables["stage_2_train_labels.csv"] = Table(
        ["patientId", "x", "y", "width", "height", "Target"], rows
    )
    return layout


def siim_components() -> list[np.ndarray]:
    """Two disjoint components of the first image's pneumothorax mask."""
    a, b = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    a[2:5, 3:6] = True
    b[10:12, 9:14] = True
    return [a, b]


def siim(root: Path) -> Layout:
    """6 images (5 patients) in nested folders; img0 has two RLE rows, img1 one, the rest "-1"."""
    layout = Layout(root)
    parts = siim_components()
    rows = [["img0", " " + rle_encode(parts[0])], ["img0", " " + rle_encode(parts[1])]]
    rows.append(["img1", " " + rle_encode(parts[1])])
    rows += [[f"img{i}", " -1"] for i in range(2, 6)]
    for i in range(6):
        rel = f"dicom-images-train/1.2.{i}/1.3.{i}/img{i}.dcm"
        layout.images[rel] = grey(i)
        layout.dicom_patients[rel] = f"patient{min(i, 4)}"
        layout.kept.append(rel)
    layout.tables["train-rle.csv"] = Table(
        ["ImageId", "EncodedPixels"], rows, header=["ImageId", " EncodedPixels"]
    )
    return layout


# ---- COVIDx / Object-CXR ------------------------------------------------------------------------


def covidx(root: Path) -> Layout:
    """train.txt: 8 images of 6 patients; test.txt: 3 images."""
    layout = Layout(root)
    classes = ["normal", "pneumonia", "COVID-19"]
    for name, count in (("train", 8), ("test", 3)):
        lines = []
        for i in range(count):
            filename = f"{name}-{i}.png"
            patient = f"{name}{min(i, 5)}"
            lines.append(f"{patient} {filename} {classes[i % 3]} {'cohen' if i % 2 else 'rsna'}")
            layout.images[f"{name}/{filename}"] = grey(i)
            layout.kept.append(f"{name}/{filename}")
        layout.texts[f"{name}.txt"] = ("\n".join(lines) + "\n").encode()
    return layout


OBJECT_ANNOTATIONS = [
    "0 1 2 5 6",
    "1 3 3 9 7;2 1 1 6 2 4 9",
    "",
    "",
    "2 0 0 4 0 2 0",
    "",
    "0 2 2 4 4",
    "",
]


def object_cxr(root: Path) -> Layout:
    """train.csv: 6 images (rectangle, ellipse + polygon, polygon, empty); dev.csv: 2 images."""
    layout = Layout(root)
    for name, texts in (("train", OBJECT_ANNOTATIONS[:6]), ("dev", OBJECT_ANNOTATIONS[6:])):
        rows = []
        for i, annotation in enumerate(texts):
            image = f"{name}{i:05d}.jpg"
            layout.images[f"{name}/{image}"] = grey(i)
            layout.kept.append(f"{name}/{image}")
            rows.append([image, annotation])
        layout.tables[f"{name}.csv"] = Table(["image_name", "annotation"], rows)
    return layout


BUILDERS: dict[str, Callable[[Path], Layout]] = {
    "mimic-cxr": mimic,
    "padchest": padchest,
    "pdc": pdc,
    "chexpert": chexpert,
    "cxp500": cxp500,
    "rsna": rsna,
    "siim": siim,
    "covidx": covidx,
    "object-cxr": object_cxr,
}


# ---- Generic records table ----------------------------------------------------------------------

GENERIC_COLUMNS = ["image", "report", "language", "patient_id", "site", "split", "Effusion",
                   "Nodule"]


def generic(root: Path) -> Layout:
    """12 images of 6 patients in PNG, JPEG and DICOM; English and Spanish reports, two label
    columns, sites from the table, two rows with an official split and the rest carved."""
    layout = Layout(root)
    rows = []
    for i in range(12):
        patient = f"pt{i // 2}"
        image = f"images/{patient}/img{i}.{('png', 'jpg', 'dcm')[i % 3]}"
        layout.images[image] = grey(i)
        layout.kept.append(image)
        spanish = i % 2 == 1
        report = ("Derrame pleural izquierdo. XXXX sin neumotorax." if spanish
                  else "Small left effusion.\n No ___ pneumothorax.")
        split = {0: "test", 1: "test"}.get(i, "")
        rows.append([image, report, "es" if spanish else "en", patient, f"site{i % 3}", split,
                     str(i % 2), "" if i % 4 == 0 else str((i // 2) % 2)])
    layout.tables["records.csv"] = Table(list(GENERIC_COLUMNS), rows)
    return layout
