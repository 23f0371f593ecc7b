"""Each adapter on a tiny dataset in its official layout: the right records, fields and filters."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_layouts import BUILDERS, PADCHEST_CSV, SIZE, Layout, mimic, siim_components

from unimed.data.adapters import DATASET_FOLDERS, load_dataset, load_from_config
from unimed.data.adapters.object_cxr import parse_annotation
from unimed.data.config import DataConfig
from unimed.data.errors import DataError
from unimed.data.records import BoxAnn, Record
from unimed.data.rle import rle_decode
from unimed.data.labels import CHEXPERT_LABELS, PDC_LABELS


def _read(name: str, tmp_path: Path, **kwargs) -> tuple[Layout, dict[str, Record], dict[str, int]]:
    layout = BUILDERS[name](tmp_path / name)
    read = load_dataset(name, layout.write(), **kwargs)
    by_key = {r.image_path.relative_to(layout.root).as_posix(): r for r in read.records}
    return layout, by_key, read.dropped


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_adapter_returns_exactly_the_kept_images(name: str, tmp_path: Path) -> None:
    layout, records, _ = _read(name, tmp_path)
    assert sorted(records) == sorted(layout.kept)
    for record in records.values():
        assert record.dataset == name and record.split in ("train", "valid", "test")
        assert record.image_path.is_file() and record.patient_id


@pytest.mark.parametrize("gz", [True, False])
def test_mimic_joins_csvs_and_extracts_report(gz: bool, tmp_path: Path) -> None:
    layout = mimic(tmp_path / "mimic", gz=gz)
    read = load_dataset("mimic-cxr", layout.write())
    assert read.dropped == {"lateral view": 2, "report under 3 tokens": 1}
    record = next(r for r in read.records if r.study_id == "50000001")
    assert record.report == (
        "There is a small left effusion. The cardiomediastinal silhouette is normal. "
        "No pneumothorax. Effusion."
    )
    assert (record.language, record.site, record.view, record.patient_id) == (
        "en",
        "boston",
        "PA",
        "10000001",
    )
    assert {r.study_id: r.split for r in read.records}["50000003"] == "valid"
    assert set(record.labels) == set(CHEXPERT_LABELS)
    assert record.labels[sorted(CHEXPERT_LABELS)[1]] == 1.0
    assert math.isnan(record.labels[sorted(CHEXPERT_LABELS)[0]])


def test_rows_of_image_folders_not_downloaded_are_left_out_and_counted(tmp_path: Path, caplog) -> None:
    """PadChest comes as numbered zip folders and MIMIC-CXR-JPG's images as files/p10 .. p19, each
    listed whole by the tables: rows of a folder that holds no images here (MIMIC's reports, a
    separate download, fill the same tree) are left out, counted and said once; a missing image
    in a folder that is here stays a bad row; a table none of whose folders is here is an error."""
    layout = BUILDERS["padchest"](tmp_path / "padchest")
    root = layout.write()
    for rel in [r for r in layout.images if r.startswith("1/")]:
        (root / rel).unlink()
    (root / "1").rmdir()
    with caplog.at_level(logging.WARNING):
        read = load_dataset("padchest", root, split_dir=tmp_path / "splits")
    assert sorted(r.image_path.relative_to(root).as_posix() for r in read.records) == sorted(
        r for r in layout.kept if not r.startswith("1/"))
    left_out = sum(k.startswith("1/") for k in layout.kept)
    assert read.dropped["folder not downloaded"] == left_out > 0
    assert [r.getMessage() for r in caplog.records if "partial download" in r.getMessage()] == [
        f"padchest: {left_out} row(s) left out, folder not downloaded (1, e.g. 1): a partial download?"]
    (root / sorted(k for k in layout.kept if k.startswith("0/"))[0]).unlink()
    with pytest.raises(DataError, match="image file not found"):
        load_dataset("padchest", root, split_dir=tmp_path / "splits")
    assert load_dataset("padchest", root, require_images=False).dropped.get("folder not downloaded") is None

    layout = mimic(tmp_path / "mimic", gz=False)
    layout.tables["mimic-cxr-2.0.0-metadata.csv"].rows.append(
        ["d9", "11000009", "50000009", "CHEST (PA AND LAT)", "PA", str(SIZE), str(SIZE), "21800101"])
    layout.tables["mimic-cxr-2.0.0-split.csv"].rows.append(["d9", "50000009", "11000009", "train"])
    layout.texts["files/p11/p11000009/s50000009.txt"] = b"FINDINGS: Clear lungs. No effusion seen."
    root = layout.write()
    read = load_dataset("mimic-cxr", root)
    assert sorted(r.image_path.relative_to(root).as_posix() for r in read.records) == sorted(layout.kept)
    assert read.dropped["folder not downloaded"] == 1
    assert len(load_dataset("mimic-cxr", root, require_images=False).records) == len(layout.kept) + 1
    for study in {(root / rel).parent for rel in layout.images}:  # the reports stay
        shutil.rmtree(study)
    with pytest.raises(DataError, match=r"mimic: none of the \d+ row\(s\) its tables list is here "
                                        r"\(folder not downloaded: 2, e\.g\. files/p1[01]\)"):
        load_dataset("mimic-cxr", root)


@pytest.mark.parametrize("name", ["chexpert", "CheXpert-v1.0-small"])
def test_chexpert_reads_from_its_folder_under_any_name(tmp_path: Path, name: str) -> None:
    """The CSVs' paths start with the archive's folder (CheXpert-v1.0-small/train/...): a dataset
    folder that is that folder renamed (train.csv in it) reads the same images."""
    layout = BUILDERS["chexpert"](tmp_path / "download")
    archive = layout.write() / "CheXpert-v1.0-small"
    root = tmp_path / "data" / name
    root.parent.mkdir()
    archive.rename(root)
    read = load_dataset("chexpert", root)
    assert sorted(r.image_path.relative_to(root).as_posix() for r in read.records) == sorted(
        k.removeprefix("CheXpert-v1.0-small/") for k in layout.kept)


def test_padchest_labels_language_site_and_views(tmp_path: Path) -> None:
    _, records, dropped = _read("padchest", tmp_path)
    assert dropped == {"lateral view": 1, "other view": 1, "report under 3 tokens": 1}
    first = records["0/img0.png"]
    assert first.labels == {"pleural effusion": 1.0, "cardiomegaly": 1.0}
    assert (first.language, first.site, first.report) == (
        "es",
        "alicante",
        "derram pleural izquierd. cardiomegali.",
    )
    assert {r.view for r in records.values()} == {"PA", "AP", "AP_horizontal"}
    assert records["1/img4.png"].labels == {"atelectasis": 1.0, "pneumonia": 1.0}


def _mimic_image(row: dict[str, str]) -> str:
    subject = row["subject_id"]
    return f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/{row['dicom_id']}.jpg"


@pytest.mark.parametrize(
    ("name", "table", "column", "default", "image_of"),
    [
        ("mimic-cxr", "mimic-cxr-2.0.0-metadata.csv.gz", "InstitutionName", "boston", _mimic_image),
        ("padchest", PADCHEST_CSV, "InstitutionName_DICOM", "alicante",
         lambda row: f"{row['ImageDir']}/{row['ImageID']}"),
    ],
)
def test_site_comes_from_the_institution_column_else_the_dataset_default(
    name: str, table: str, column: str, default: str, image_of, tmp_path: Path
) -> None:
    layout = BUILDERS[name](tmp_path / name)
    written = layout.tables[table]
    written.add_column(column, ["miami" if i % 2 else " " for i in range(len(written.rows))])
    read = load_dataset(name, layout.write())
    expected = {}
    for values in written.rows:
        row = dict(zip(written.columns, values))
        expected[image_of(row)] = row[column].strip() or default
    got = {r.image_path.relative_to(layout.root).as_posix(): r.site for r in read.records}
    assert got == {image: expected[image] for image in layout.kept}
    assert set(got.values()) == {"miami", default}


# Layouts whose official tables have no institution column: [(table, image key of a row), ...].
SITE_TABLES: dict[str, list[tuple[str, Callable[[dict[str, str]], str]]]] = {
    "chexpert": [(f"CheXpert-v1.0-small/{n}.csv", lambda row: row["Path"]) for n in ("train", "valid")],
    "cxp500": [("test_labels.csv", lambda row: row["Path"])],
    "rsna": [("stage_2_train_labels.csv",
              lambda row: f"stage_2_train_images/{row['patientId']}.dcm")],
    "object-cxr": [(f"{n}.csv", lambda row, n=n: f"{n}/{row['image_name']}") for n in ("train", "dev")],
}


@pytest.mark.parametrize("name", sorted(SITE_TABLES))
def test_site_comes_from_the_optional_site_column_else_unknown(name: str, tmp_path: Path) -> None:
    layout = BUILDERS[name](tmp_path / name)
    unknown = {r.site for r in load_dataset(name, layout.write()).records}
    assert unknown == {None}
    expected = {}
    for table, image_of in SITE_TABLES[name]:
        written = layout.tables[table]
        sites = [f"site{i % 2}" for i in range(len(written.rows))]
        written.add_column("Site", sites)
        for values in written.rows:
            row = dict(zip(written.columns, values))
            expected.setdefault(image_of(row), row["Site"])
    read = load_dataset(name, layout.write())
    got = {r.image_path.relative_to(layout.root).as_posix(): r.site for r in read.records}
    assert got == {image: expected[image] for image in layout.kept}
    assert set(got.values()) == {"site0", "site1"}


def test_pdc_is_physician_only_test_split_with_complete_labels(tmp_path: Path) -> None:
    _, records, dropped = _read("pdc", tmp_path)
    assert dropped["not physician-labelled"] == 1
    assert {r.split for r in records.values()} == {"test"}
    first = records["0/img0.png"]
    assert set(PDC_LABELS) <= set(first.labels)
    assert first.labels["pleural effusion"] == 1.0 and first.labels["edema"] == 0.0
    assert (
        "report under 3 tokens" not in dropped and records["0/img6.png"].report == "consolidacion"
    )


def test_pdc_keeps_images_with_empty_reports(tmp_path: Path) -> None:
    layout = BUILDERS["pdc"](tmp_path / "pdc")
    layout.tables[PADCHEST_CSV].set(0, "Report", " ")
    read = load_dataset("pdc", layout.write())
    assert len(read.records) == len(layout.kept)
    assert next(r for r in read.records if r.image_path.name == "img0.png").report is None


def test_chexpert_official_valid_is_test_and_labels_keep_uncertainty(tmp_path: Path) -> None:
    _, records, dropped = _read("chexpert", tmp_path)
    assert dropped == {"lateral view": 1}
    for key, record in records.items():
        assert (record.split == "test") == ("/valid/" in key)
    record = records["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"]
    assert record.patient_id == "patient00002" and record.view == "AP"
    # The fixture cycles 1 / 0 / -1 / blank through the 14 columns, starting at the patient number.
    cycle = [1.0, 0.0, -1.0, math.nan]
    expected = [cycle[(2 + i) % 4] for i in range(14)]
    values = [record.labels[name] for name in CHEXPERT_LABELS]
    assert np.array_equal(values, expected, equal_nan=True)


def test_cxp500_binary_labels(tmp_path: Path) -> None:
    _, records, _ = _read("cxp500", tmp_path)
    record = records["test/patient64541/study1/view1_frontal.jpg"]
    assert [record.labels[n] for n in CHEXPERT_LABELS[:3]] == [1.0, 0.0, 1.0]


def test_rsna_groups_box_rows_per_patient(tmp_path: Path) -> None:
    _, records, _ = _read("rsna", tmp_path)
    pid0 = records["stage_2_train_images/pid0.dcm"]
    assert pid0.boxes == (BoxAnn(1, 2, 4, 6, "pneumonia"), BoxAnn(8, 8, 13, 14, "pneumonia"))
    assert pid0.labels == {"Pneumonia": 1.0}
    assert records["stage_2_train_images/pid3.dcm"].boxes == ()
    assert records["stage_2_train_images/pid3.dcm"].labels == {"Pneumonia": 0.0}


def test_siim_merges_rle_rows_and_reads_dicom_headers(tmp_path: Path) -> None:
    _, records, _ = _read("siim", tmp_path)
    img0 = next(r for r in records.values() if r.study_id == "img0")
    union = np.logical_or(*siim_components())
    assert img0.image_size == (SIZE, SIZE)
    assert np.array_equal(rle_decode(img0.mask_rle, img0.image_size), union)
    assert img0.labels == {"Pneumothorax": 1.0}
    img5 = next(r for r in records.values() if r.study_id == "img5")
    assert img5.mask_rle == "-1" and img5.labels == {"Pneumothorax": 0.0}
    # img4 and img5 belong to one patient (DICOM PatientID), so they share a split.
    assert img5.patient_id == "patient4"
    assert next(r for r in records.values() if r.study_id == "img4").split == img5.split


def test_covidx_target_source_and_carved_valid(tmp_path: Path) -> None:
    _, records, _ = _read("covidx", tmp_path)
    train1 = records["train/train-1.png"]
    assert (train1.target, train1.site) == ("pneumonia", "cohen")
    assert train1.labels == {"normal": 0.0, "pneumonia": 1.0, "COVID-19": 0.0}
    for key, record in records.items():
        assert (record.split == "test") == key.startswith("test/")
    assert any(r.split == "valid" for r in records.values())


def test_object_cxr_boxes_from_shape_extents(tmp_path: Path) -> None:
    _, records, _ = _read("object-cxr", tmp_path)
    assert records["train/train00000.jpg"].boxes == (BoxAnn(1, 2, 5, 6, "foreign object"),)
    assert records["train/train00001.jpg"].boxes == (
        BoxAnn(3, 3, 9, 7, "foreign object"),
        BoxAnn(1, 1, 6, 9, "foreign object"),
    )
    assert records["train/train00002.jpg"].labels == {"Foreign Object": 0.0}
    # A polygon along one pixel row becomes a 1-pixel-high box, not a zero-area one.
    assert records["train/train00004.jpg"].boxes == (BoxAnn(0, 0, 4, 1, "foreign object"),)
    assert {r.split for k, r in records.items() if k.startswith("dev/")} == {"test"}


def test_min_report_tokens_is_a_counted_filter(tmp_path: Path) -> None:
    layout, records, dropped = _read("padchest", tmp_path, min_report_tokens=5)
    assert all(len(r.report.split()) >= 5 for r in records.values())
    assert dropped["report under 5 tokens"] == len(layout.kept) + 1 - len(records)


def test_summary_counts(tmp_path: Path) -> None:
    layout = BUILDERS["rsna"](tmp_path / "rsna")
    summary = load_dataset("rsna", layout.write()).summary()
    assert summary["records"] == 6 and sum(summary["split"].values()) == 6
    assert summary["labels"]["Pneumonia"] == {"positive": 2, "stated": 6, "prevalence": 2 / 6}
    assert summary["site"] == {"unset": 6}  # the RSNA tables do not say where the images come from


def test_load_from_config_uses_layout_folder(tmp_path: Path) -> None:
    BUILDERS["covidx"](tmp_path / DATASET_FOLDERS["covidx"]).write()
    read = load_from_config("covidx", DataConfig(root=str(tmp_path), progress=False))
    assert len(read.records) == 11


@pytest.mark.parametrize(
    "annotation", ["3 1 2 3 4", "0 1 2 3", "1 1 2 3 4 5 6", "2 1 1 2 2", "0 a 2 3 4", "0 -1 2 3 4"]
)
def test_object_cxr_rejects_malformed_annotations(annotation: str) -> None:
    with pytest.raises(ValueError):
        parse_annotation(annotation)
