"""Layout writers: exact file names, headers and cell formats of docs/LAYOUTS.md, on hand-made studies."""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from unimed.data.labels import CHEXPERT_LABELS
from unimed.data.rle import rle_decode
from unimed.phantom.config import PhantomConfig
from unimed.phantom.labels import padchest_labels, pdc_labels
from unimed.phantom.study import Box, Finding, Study
from unimed.phantom.writers import WRITERS, LayoutWriter, StudyResult
from unimed.phantom.writers.base import to_uint8, to_uint16

CFG = PhantomConfig(seed=3, image_size=32)
SIZE = 32


def make_study(index: int, *, view: str = "PA", site: str = "boston", findings: tuple[str, ...] = (),
               mask: bool = False, boxes: tuple[Box, ...] = (), covid_class: str = "normal") -> Study:
    """A small, fully specified study; ids numeric like the generator's, patient shared by pairs."""
    rng = np.random.default_rng(index)
    image = rng.random((SIZE, SIZE), dtype=np.float32)
    pneumothorax = None
    if mask:
        pneumothorax = np.zeros((SIZE, SIZE), dtype=bool)
        pneumothorax[2:6, 3:5] = True
        pneumothorax[20:30, 25:28] = True
    study_findings = [Finding(name, {}) for name in findings]
    chexpert = {name: math.nan for name in CHEXPERT_LABELS}
    chexpert.update({"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumothorax": 0.0})
    return Study(
        index=index, patient_id=f"{index // 2:06d}", study_id=f"{index:06d}", image_id=f"{index:06d}",
        site=site, language="en" if site == "boston" else "es", view=view, sex="F", age=61,
        findings=study_findings, image=image, pneumothorax_mask=pneumothorax,
        boxes=list(boxes), reports={"en": f"FINDINGS: study {index}.\nIMPRESSION: none.", "es": "cardiomegali.",
                                    "es_plain": "cardiomegalia."},
        chexpert=chexpert, pdc=pdc_labels(study_findings),
        covid_class=covid_class, padchest_labels=padchest_labels(study_findings),
    )


def write(name: str, studies: list[Study], dest: Path) -> tuple[LayoutWriter, list[StudyResult]]:
    writer = WRITERS.get(name)(CFG, dest)
    results = [writer.write_study(s, writer.split(s)) for s in studies]
    writer.write_tables([row for r in results for row in r.rows])
    return writer, results


def read_csv(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_registry_has_every_documented_folder():
    assert WRITERS.names() == sorted(
        ["mimic-cxr-jpg", "padchest", "chexpert", "cxp500", "rsna", "siim", "covidx", "object-cxr", "pdc"]
    )


def test_mimic_layout(tmp_path):
    studies = [make_study(0), make_study(1, view="LATERAL"), make_study(2, view="AP")]
    write("mimic-cxr-jpg", studies, tmp_path)
    meta = read_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert meta[0] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                       "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                       "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
                       "InstitutionName"]
    assert [r[4] for r in meta[1:]] == ["PA", "LATERAL", "AP"]
    assert [r[-1] for r in meta[1:]] == [s.site for s in studies]
    split = read_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz")
    assert split[0] == ["dicom_id", "study_id", "subject_id", "split"]
    assert {r[3] for r in split[1:]} <= {"train", "validate", "test"}
    labels = read_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert labels[0][:4] == ["subject_id", "study_id", "Atelectasis", "Cardiomegaly"]
    assert labels[0][2:] == sorted(CHEXPERT_LABELS)
    row = dict(zip(labels[0], labels[1]))
    assert (row["Cardiomegaly"], row["Edema"], row["Pneumothorax"], row["Fracture"]) == ("1.0", "-1.0", "0.0", "")
    # Studies 0 and 1 share a patient, so they share a subject and (same patient) a split.
    assert meta[1][1] == meta[2][1] != meta[3][1] and split[1][3] == split[2][3]
    for dicom_id, subject, study, *_ in meta[1:]:
        assert len(subject) == 8 and subject[0] == "1" and len(study) == 8 and study[0] == "5"
        folder = tmp_path / "files" / f"p{subject[:2]}" / f"p{subject}"
        with Image.open(folder / f"s{study}" / f"{dicom_id}.jpg") as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
        assert (folder / f"s{study}.txt").read_text().startswith("FINDINGS:")


def test_gzip_csvs_have_zero_mtime(tmp_path):
    write("mimic-cxr-jpg", [make_study(0)], tmp_path)
    for path in tmp_path.glob("*.csv.gz"):
        assert path.read_bytes()[4:8] == b"\0\0\0\0", path.name


def test_padchest_layout(tmp_path):
    studies = [make_study(i, site="alicante", view=v, findings=("cardiomegaly", "edema"))
               for i, v in enumerate(["PA", "LATERAL", "AP", "PA"])]
    write("padchest", studies, tmp_path)
    rows = read_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    header = rows[0]
    assert header == [
        "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
        "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
        "Manufacturer_DICOM", "PhotometricInterpretation_DICOM", "Rows_DICOM", "Columns_DICOM", "Report",
        "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
        "LocalizationsCUIS", "InstitutionName_DICOM",
    ]
    records = [dict(zip(header, r)) for r in rows[1:]]
    assert [r["Projection"] for r in records][:2] == ["PA", "L"]
    assert [r["InstitutionName_DICOM"] for r in records] == ["alicante"] * len(studies)
    assert records[2]["Projection"] in ("AP", "AP_horizontal")
    assert {r["MethodLabel"] for r in records} <= {"Physician", "RNN_model"}
    for record, study in zip(records, studies):
        labels = ast.literal_eval(record["Labels"])
        assert [x.strip() for x in labels] == ["cardiomegaly", "pulmonary edema"]
        assert record["Report"] == "cardiomegali."
        with Image.open(tmp_path / record["ImageDir"] / record["ImageID"]) as im:
            assert im.mode == "I;16"
            np.testing.assert_array_equal(np.asarray(im), to_uint16(study.image))
    # Studies 0 and 1 share a patient.
    assert records[0]["PatientID"] == records[1]["PatientID"] != records[2]["PatientID"]


def test_padchest_labels_have_the_real_leading_space_items(tmp_path):
    studies = [make_study(i, site="alicante", findings=("cardiomegaly", "edema")) for i in range(24)]
    studies.append(make_study(24, site="alicante"))
    write("padchest", studies, tmp_path)
    rows = read_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    cells = [dict(zip(rows[0], r))["Labels"] for r in rows[1:]]
    assert "['cardiomegaly', ' pulmonary edema']" in cells and "['cardiomegaly', 'pulmonary edema']" in cells
    assert cells[-1] == "['normal']"


def test_pdc_is_physician_labelled_test_set(tmp_path):
    studies = [make_study(i, site="alicante", findings=("pneumonia", "edema", "nodule")) for i in range(6)]
    for study in studies[:3]:
        study.findings = [dataclasses.replace(f, mentioned=False) for f in study.findings]
    writer, results = write("pdc", studies, tmp_path)
    rows = read_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    records = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert {r["MethodLabel"] for r in records} == {"Physician"}
    # Physician labels use the PDC class names and ignore what the report leaves out.
    expected = ["consolidation", "edema", "pneumonia", "nodule"]
    for record in records:
        assert [x.strip() for x in ast.literal_eval(record["Labels"])] == expected
    assert writer.frontal_only and {r.entry.split for r in results} == {"test"}


def test_chexpert_layout(tmp_path):
    studies = [make_study(i, view="LATERAL" if i == 1 else "PA") for i in range(16)]
    _, results = write("chexpert", studies, tmp_path)
    expected_header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    seen = 0
    for split in ("train", "valid"):
        rows = read_csv(tmp_path / "CheXpert-v1.0-small" / f"{split}.csv")
        assert rows[0] == expected_header
        for row in rows[1:]:
            record = dict(zip(rows[0], row))
            assert record["Path"].startswith(f"CheXpert-v1.0-small/{split}/patient")
            assert (tmp_path / record["Path"]).is_file()
            lateral = record["Frontal/Lateral"] == "Lateral"
            assert record["Path"].endswith("view1_lateral.jpg" if lateral else "view1_frontal.jpg")
            assert record["AP/PA"] == ("" if lateral else "PA") and record["Sex"] == "Female"
            values = {record[n] for n in CHEXPERT_LABELS}
            assert values <= ({"0.0", "1.0"} if split == "valid" else {"0.0", "1.0", "-1.0", ""})
            seen += 1
    assert seen == len(studies) and {r.entry.split for r in results} == {"train", "valid"}


def test_cxp500_layout(tmp_path):
    studies = [make_study(i, findings=("pleural_effusion",) if i else ()) for i in range(3)]
    write("cxp500", studies, tmp_path)
    rows = read_csv(tmp_path / "test_labels.csv")
    assert rows[0] == ["Path", *CHEXPERT_LABELS]
    for row, study in zip(rows[1:], studies):
        record = dict(zip(rows[0], row))
        assert record["Path"].startswith("test/patient") and (tmp_path / record["Path"]).is_file()
        assert {record[n] for n in CHEXPERT_LABELS} <= {"0", "1"}
        effusion = "pleural_effusion" in {f.name for f in study.findings}
        assert record["Pleural Effusion"] == str(int(effusion))
        assert record["No Finding"] == str(int(not effusion))


def test_rsna_layout_and_dicom(tmp_path):
    box = Box(4.0, 5.0, 14.5, 20.0, "pneumonia")
    studies = [make_study(0, boxes=(box, Box(1, 1, 3, 3, "pneumonia"))), make_study(1)]
    write("rsna", studies, tmp_path)
    rows = read_csv(tmp_path / "stage_2_train_labels.csv")
    assert rows[0] == ["patientId", "x", "y", "width", "height", "Target"]
    assert rows[1][1:] == ["4.0", "5.0", "10.5", "15.0", "1"] and rows[2][0] == rows[1][0]
    assert rows[3][1:] == ["", "", "", "", "0"]
    classes = read_csv(tmp_path / "stage_2_detailed_class_info.csv")
    assert classes[0] == ["patientId", "class"] and [r[1] for r in classes[1:3]] == ["Lung Opacity"] * 2
    assert len(classes) == len(rows)
    for patient, study in ((rows[1][0], studies[0]), (rows[3][0], studies[1])):
        ds = pydicom.dcmread(tmp_path / "stage_2_train_images" / f"{patient}.dcm")
        assert ds.PatientID == patient and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        np.testing.assert_array_equal(ds.pixel_array, to_uint8(study.image))
        assert ds.StudyInstanceUID.is_valid and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID


def test_siim_header_quirk_rle_round_trip_and_nested_dicoms(tmp_path):
    studies = [make_study(0, mask=True), make_study(1)]
    write("siim", studies, tmp_path)
    text = (tmp_path / "train-rle.csv").read_text()
    assert text.splitlines()[0] == "ImageId, EncodedPixels"
    rows = read_csv(tmp_path / "train-rle.csv")[1:]
    positive = [r for r in rows if r[0] == rows[0][0]]
    assert len(positive) == 2  # one row per connected component
    union = np.logical_or.reduce([rle_decode(r[1], (SIZE, SIZE)) for r in positive])
    np.testing.assert_array_equal(union, studies[0].pneumothorax_mask)
    assert [r[1] for r in rows if r[0] != rows[0][0]] == ["-1"]
    for image_id in {r[0] for r in rows}:
        (path,) = (tmp_path / "dicom-images-train").rglob(f"{image_id}.dcm")
        ds = pydicom.dcmread(path)
        assert path.parent.name == ds.SeriesInstanceUID and path.parent.parent.name == ds.StudyInstanceUID
        assert ds.SOPInstanceUID == image_id and ds.pixel_array.dtype == np.uint8


def test_covidx_layout(tmp_path):
    classes = ["normal", "pneumonia", "COVID-19", "normal"]
    studies = [make_study(i, covid_class=c) for i, c in enumerate(classes)]
    write("covidx", studies, tmp_path)
    lines = [
        (split, line.split(" "))
        for split in ("train", "test")
        for line in (tmp_path / f"{split}.txt").read_text().splitlines()
    ]
    assert sorted(cells[2] for _, cells in lines) == sorted(classes)
    for split, (patient, filename, label, source) in lines:
        assert (tmp_path / split / filename).is_file() and source == "boston" and patient.isdigit()


def test_covidx_rejects_unknown_class(tmp_path):
    with pytest.raises(ValueError, match="study 0: COVIDx class 'flu'"):
        write("covidx", [make_study(0, covid_class="flu")], tmp_path)


def test_object_cxr_annotations(tmp_path):
    objects = (
        Box(1.2, 2.0, 5.0, 6.0, "foreign_object", shape=0),
        Box(10, 10, 14, 16, "foreign_object", shape=1),
        Box(3, 20, 9, 27, "foreign_object", shape=2, polygon=((3, 20), (9, 22), (5, 27))),
    )
    write("object-cxr", [make_study(0, boxes=objects), make_study(1)], tmp_path)
    rows = [r for split in ("train", "dev") for r in read_csv(tmp_path / f"{split}.csv")[1:]]
    assert read_csv(tmp_path / "train.csv")[0] == ["image_name", "annotation"]
    annotations = dict(rows)
    assert annotations["00001.jpg"] == "0 1 2 5 6;1 10 10 14 16;2 3 20 9 22 5 27"
    assert annotations["00002.jpg"] == ""


def test_same_studies_give_identical_bytes(tmp_path):
    studies = [make_study(i, mask=i % 2 == 0, site="alicante" if i % 3 else "boston") for i in range(4)]
    digests = set()
    for attempt in ("a", "b"):
        for name in WRITERS.names():
            write(name, studies, tmp_path / attempt / name)
        digests.add(tree_digest(tmp_path / attempt))
    assert len(digests) == 1


def test_different_seed_changes_ids(tmp_path):
    writer = WRITERS.get("rsna")
    other = PhantomConfig(seed=CFG.seed + 1, image_size=SIZE)
    names = []
    for cfg, dest in ((CFG, tmp_path / "a"), (other, tmp_path / "b")):
        writer(cfg, dest).write_study(make_study(0), "none")
        names.append(sorted(p.name for p in (dest / "stage_2_train_images").iterdir()))
    assert names[0] != names[1]
