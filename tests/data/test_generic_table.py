"""The generic records table (CSV or JSONL): records, labels, sites and splits from the table, text-
only corpora for the text stages, and bad rows named by file, line and column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_layouts import GENERIC_COLUMNS, generic, write_ct_series
from PIL import Image

from unimed.data.adapters import load_dataset, load_from_config, load_texts
from unimed.data.config import DataConfig
from unimed.data.errors import EMPTY_REPORT, MALFORMED_ROW, MISSING_IMAGE, DataError
from unimed.data.images import load_image
from unimed.data.splits import leaking_patients
from unimed.data.volumes import read_volume


def _by_image(read, root: Path) -> dict:
    return {r.image_path.relative_to(root).as_posix(): r for r in read.records}


def _as_jsonl(layout) -> None:
    """Rewrite the layout's CSV table as records.jsonl (numbers as JSON numbers, blanks as null)."""
    table = layout.tables.pop("records.csv")
    lines = []
    for values in table.rows:
        row = dict(zip(table.columns, values))
        for label in ("Effusion", "Nodule"):
            row[label] = int(row[label]) if row[label] else None
        lines.append(json.dumps(row))
    layout.texts["records.jsonl"] = ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_generic_table_reads_every_row_with_its_fields(fmt: str, tmp_path: Path) -> None:
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    if fmt == "jsonl":
        _as_jsonl(layout)
    read = load_dataset("mine", layout.write(), check_images=True)
    records = _by_image(read, layout.root)
    assert sorted(records) == sorted(layout.kept) and read.dropped == {}
    for values in table.rows:
        row = dict(zip(table.columns, values))
        record = records[row["image"]]
        assert (record.patient_id, record.language, record.site) == (
            row["patient_id"], row["language"], row["site"])
        assert record.labels["Effusion"] == float(row["Effusion"])
        nodule = record.labels["Nodule"]
        assert math.isnan(nodule) if not row["Nodule"] else nodule == float(row["Nodule"])
        if row["split"]:
            assert record.split == row["split"]
        load_image(record.image_path)  # PNG, JPEG and DICOM all decode
    english = records["images/pt0/img0.png"]
    assert english.report == "Small left effusion. No pneumothorax."
    assert records["images/pt0/img1.jpg"].report == "Derrame pleural izquierdo. sin neumotorax."
    assert {r.split for r in read.records} == {"train", "valid", "test"}
    rows = [(key, r.patient_id, r.split) for key, r in records.items()]
    assert leaking_patients(rows) == []


def test_generic_dataset_is_found_by_name_under_the_data_root(tmp_path: Path) -> None:
    generic(tmp_path / "mine").write()
    read = load_from_config("mine", DataConfig(root=str(tmp_path), progress=False))
    assert len(read.records) == 12
    with pytest.raises(DataError, match="neither an official layout .* nor a generic dataset"):
        (tmp_path / "other").mkdir()
        load_from_config("other", DataConfig(root=str(tmp_path), progress=False))


def test_a_boolean_label_column_as_pandas_or_a_spreadsheet_writes_it_reads_as_1_and_0(
        tmp_path: Path) -> None:
    """A DataFrame's bool column goes to CSV as True / False (a spreadsheet's as TRUE / FALSE): read
    as 1 / 0, as the same table's JSONL true / false are, not as a bad row each."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    words = ["False", "True", "FALSE", "TRUE", "false", "true"]
    for i in range(len(table.rows)):
        table.set(i, "Effusion", words[i % len(words)])
    read = load_dataset("mine", layout.write())
    assert read.dropped == {}
    for i, (image, record) in enumerate(sorted(_by_image(read, layout.root).items(),
                                               key=lambda item: layout.kept.index(item[0]))):
        assert record.labels["Effusion"] == float(i % 2)


def test_a_missing_value_written_as_text_reads_as_the_blank_it_was(tmp_path: Path) -> None:
    """pandas' astype(str) writes a missing value as "nan" (or "None"), a database export as
    "NULL": kept as text, every row without a patient ID became one patient "nan" (all in one
    split), a site "nan" a community of its own, a label "None" a bad row."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    image = {i: table.rows[i][GENERIC_COLUMNS.index("image")] for i in range(len(table.rows))}
    table.set(2, "site", "nan")
    table.set(3, "Nodule", "None")
    table.set(4, "Effusion", "NULL")
    table.set(5, "patient_id", "nan")
    table.set(6, "report", "NaN")
    table.set(7, "language", "None")
    root = layout.write()
    read = load_dataset("mine", root, on_error="skip")
    records = _by_image(read, root)
    assert records[image[2]].site is None
    assert math.isnan(records[image[3]].labels["Nodule"]) and math.isnan(records[image[4]].labels["Effusion"])
    assert {image[5], image[6], image[7]}.isdisjoint(records)
    assert read.dropped == {MALFORMED_ROW: 2, EMPTY_REPORT: 1}
    assert "nan" not in {r.patient_id for r in read.records}

@pytest.mark.parametrize(
    ("column", "value", "reason", "message"),
    [
        ("Effusion", "yes", MALFORMED_ROW, "label 'yes' is not 1, 0, -1, true / false or blank"),
        ("report", "  ", EMPTY_REPORT, "empty report"),
        # De-identification blanked it (Open-i's XXXX, MIMIC's ___): the line said only "empty report".
        ("report", "XXXX ___", EMPTY_REPORT, "empty report (nothing but de-identification gaps, such as"),
        ("image", "images/none.png", MISSING_IMAGE, "image file not found"),
        ("image", "images\\a0.png", MISSING_IMAGE,
         "image file not found: {root}/images\\a0.png (the path holds '\\': write paths with '/')"),
        ("split", "holdout", MALFORMED_ROW, "split 'holdout' is not one of"),
        ("patient_id", "", MALFORMED_ROW, "empty patient_id"),
        ("language", "", MALFORMED_ROW, "empty language"),
        # Read as communities of their own beside "en" and "es", without a word:
        ("language", "english", MALFORMED_ROW, "language 'english' is not a two-letter ISO 639-1 code"),
        ("language", "Español", MALFORMED_ROW, "language 'Español' is not a two-letter ISO 639-1 code"),
        ("language", "123", MALFORMED_ROW, "language '123' is not a two-letter"),
        ("language", "-", MALFORMED_ROW, "language '-' is not a two-letter"),  # read as empty
    ],
)
def test_generic_bad_row_is_named_or_skipped_and_counted(
    column: str, value: str, reason: str, message: str, tmp_path: Path
) -> None:
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    table.set(3, column, value)
    root = layout.write()
    with pytest.raises(DataError) as err:
        load_dataset("mine", root)
    text = str(err.value)
    line = 2 + sum(1 + "".join(row).count("\n") for row in table.rows[:3])  # reports span lines
    assert text.startswith(f"{root / 'records.csv'}, line {line}") and message.format(root=root) in text
    if column != "image":
        assert f"column '{column}'" in text
    read = load_dataset("mine", root, on_error="skip")
    assert len(read.records) == 11 and read.dropped == {reason: 1}


def test_generic_jsonl_bad_line_is_named_and_later_lines_still_read(tmp_path: Path) -> None:
    layout = generic(tmp_path / "mine")
    _as_jsonl(layout)
    lines = layout.texts["records.jsonl"].decode().splitlines()
    lines[2] = lines[2][:-5]  # a truncated object
    layout.texts["records.jsonl"] = ("\n".join(lines) + "\n").encode()
    root = layout.write()
    with pytest.raises(DataError, match=r"records.jsonl, line 3: not a JSON object"):
        load_dataset("mine", root)
    assert len(load_dataset("mine", root, on_error="skip").records) == 11


def test_generic_jsonl_list_or_object_value_is_a_bad_row_not_its_python_text(tmp_path: Path) -> None:
    """A report written as a list of sentences was read as the text "['Heart size normal', ...]"."""
    layout = generic(tmp_path / "mine")
    _as_jsonl(layout)
    lines = layout.texts["records.jsonl"].decode().splitlines()
    row = json.loads(lines[2])
    row["report"] = ["Heart size normal.", "No effusion."]
    lines[2] = json.dumps(row)
    layout.texts["records.jsonl"] = ("\n".join(lines) + "\n").encode()
    root = layout.write()
    with pytest.raises(DataError, match=r"records.jsonl, line 3, column 'report': a JSON list; a value is "
                                        r"text, a number, true / false or null$"):
        load_dataset("mine", root)
    read = load_dataset("mine", root, on_error="skip")
    assert len(read.records) == 11 and read.dropped == {MALFORMED_ROW: 1}

    lines[2] = lines[2].replace('"Effusion":', '"Effusion": 0, "Effusion ":')  # one key twice: one was lost
    layout.texts["records.jsonl"] = ("\n".join(lines) + "\n").encode()
    with pytest.raises(DataError, match=r"records.jsonl, line 3, column 'Effusion': key 'Effusion' appears "
                                        r"twice in the object \(one of the values would be read"):
        load_dataset("mine", layout.write())


def test_a_column_named_twice_is_named_and_unnamed_blank_columns_are_no_labels(tmp_path: Path) -> None:
    """Two 'Effusion' columns (one of them 'Effusion ' before its spaces are stripped): one was read
    and the other lost without a word. Columns without a name, as a spreadsheet's trailing commas
    write them, were a label called ''."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    table.add_column("Effusion ", ["0"] * len(table.rows))
    with pytest.raises(DataError, match=r"records.csv, line 1, column 'Effusion': column 'Effusion' "
                                        r"appears 2 times \(columns \[7, 9\]\); one of them would be read"):
        load_dataset("mine", layout.write())

    table.drop_column("Effusion ")
    want = [r.labels for r in load_dataset("mine", layout.write()).records]
    table.add_column("", [""] * len(table.rows))
    table.add_column("", [""] * len(table.rows))
    assert [r.labels for r in load_dataset("mine", layout.write()).records] == want
    table.set(3, "", "x")
    line = 2 + sum(1 + "".join(row).count("\n") for row in table.rows[:3])  # reports span lines
    with pytest.raises(DataError, match=rf"records.csv, line {line}: 'x' in a column without a name"):
        load_dataset("mine", layout.write())


def test_a_quote_left_open_fails_the_table_instead_of_skipping_one_row_for_the_rest(tmp_path: Path) -> None:
    """An opening quote never closed swallows every later line into one field: skipped as one bad
    row, the rest of the table was lost while the count said one row."""
    table = tmp_path / "notes" / "records.csv"
    table.parent.mkdir()
    rows = [f"Small effusion number {i} seen.,en,P{i}" for i in range(40)]
    rows[5] = '"' + rows[5]
    table.write_text("report,language,patient_id\n" + "\n".join(rows) + "\n", encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"records.csv, line 7: a quoted field opened here runs to "
                                            r"line 41 \(a quote left open\?\): its 35 lines read as one "):
            load_dataset("notes", table.parent, on_error=on_error, require_images=False)
    rows[5] = '"Small ""effusion"" number 5,\n seen.",en,P5'  # quotes written as CSV writes them
    table.write_text("report,language,patient_id\n" + "\n".join(rows) + "\n", encoding="utf-8")
    read = load_dataset("notes", table.parent, require_images=False)
    assert len(read.records) == 40 and read.records[5].report == 'Small "effusion" number 5, seen.'


def test_a_patient_with_a_stated_split_has_its_unstated_rows_there_too(tmp_path: Path) -> None:
    """Rows whose split is blank were carved per patient regardless of the patient's stated rows:
    a patient with one row in test had the others in train (18 of 20 patients here)."""
    table = tmp_path / "notes" / "records.csv"
    table.parent.mkdir()
    rows = [f"Small effusion number {i} seen.,en,P{i // 2},{'test' if i % 2 == 0 and i < 20 else ''}"
            for i in range(60)]
    table.write_text("report,language,patient_id,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    read = load_dataset("notes", table.parent, require_images=False, split_dir=tmp_path / "splits")
    by_patient: dict[str, set[str]] = {}
    for record in read.records:
        by_patient.setdefault(record.patient_id, set()).add(record.split)
    assert all(by_patient[f"P{p}"] == {"test"} for p in range(10))
    assert leaking_patients([(r.study_id, r.patient_id, r.split) for r in read.records]) == []
    assert {s for p in range(10, 30) for s in by_patient[f"P{p}"]} == {"train", "valid", "test"}  # carved


def test_an_image_listed_twice_is_a_bad_row_naming_its_first_line(tmp_path: Path) -> None:
    """A table written twice into one held every image twice: double weight in training, each
    test image counted twice in every metric. An image with reports in two languages (a
    translation) is two records."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    table.rows.append(list(table.rows[4]))
    root = layout.write()
    line = 2 + sum(1 + "".join(row).count("\n") for row in table.rows[:-1])  # reports span lines
    first = 2 + sum(1 + "".join(row).count("\n") for row in table.rows[:4])
    with pytest.raises(DataError, match=rf"records.csv, line {line}, column 'image': the image of line "
                                        rf"{first} again, with a report in the same language \(en\) \(one "):
        load_dataset("mine", root)
    read = load_dataset("mine", root, on_error="skip")
    assert len(read.records) == 12 and read.dropped == {MALFORMED_ROW: 1}
    table.set(len(table.rows) - 1, "language", "es")  # the same image with a translated report: kept
    assert len(load_dataset("mine", layout.write()).records) == 13


def test_an_image_under_two_patients_or_spelt_another_way_is_named(tmp_path: Path) -> None:
    """The same image listed under a second patient took that patient's split (the image's test
    row and its patient's other images in train: a leak, read without a word), and
    ``images/../images/x.png`` was another image to the repeated-row check."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    column = table.columns.index
    lines = [2 + sum(1 + "".join(row).count("\n") for row in table.rows[:k])
             for k in range(len(table.rows) + 1)]
    moved = list(table.rows[4])
    moved[column("patient_id")] = "someone else"
    moved[column("language")] = "es" if moved[column("language")] == "en" else "en"  # not a repeated row
    table.rows.append(moved)
    root = layout.write()
    with pytest.raises(DataError, match=rf"records.csv, line {lines[-1]}, column 'patient_id': the image of "
                                        rf"line {lines[4]} again, there under patient '.+' and here under "
                                        r"'someone else' \(each image belongs to one patient"):
        load_dataset("mine", root)
    table.rows[-1] = list(table.rows[4])
    image = Path(table.rows[-1][column("image")])  # images/pt2/img4.jpg
    table.set(len(table.rows) - 1, "image", f"{image.parent}/../{image.parent.name}/{image.name}")
    with pytest.raises(DataError, match=rf"line {lines[-1]}, column 'image': the image of line {lines[4]} "
                                        "again"):
        load_dataset("mine", layout.write())


def test_language_codes_and_split_names_ignore_case(tmp_path: Path) -> None:
    """'EN' (or 'en-US') beside 'en' made two languages: two communities in batches and in the bias
    audit, and reports the vocabulary did not count as English."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    for row in range(0, len(table.rows), 4):
        table.set(row, "language", table.rows[row][table.columns.index("language")].upper())
    region = {"en": "en-US", "es": "es_ES"}  # a BCP 47 / locale region, as hospital systems write it
    for row in range(1, len(table.rows), 4):
        table.set(row, "language", region[table.rows[row][table.columns.index("language")]])
    languages = {r.language for r in load_dataset("mine", layout.write()).records}
    assert languages == {"en", "es"}
    want = {r.image_path: r.split for r in load_dataset("mine", layout.write()).records}
    table.set(0, "split", "Test")  # a split written with a capital is that split
    assert {r.image_path: r.split for r in load_dataset("mine", layout.write()).records} == want


def test_generic_table_without_patient_column_names_it(tmp_path: Path) -> None:
    layout = generic(tmp_path / "mine")
    layout.tables["records.csv"].drop_column("patient_id")
    with pytest.raises(DataError, match=r"records.csv, line 1, column 'patient_id': missing"):
        load_dataset("mine", layout.write())


def _text_only(root: Path) -> Path:
    """A Spanish report table without images: 10 rows of 10 patients, two of them in test."""
    lines = ["report,language,patient_id,split"]
    lines += [f"derrame pleural numero {i} sin neumotorax,es,p{i},{'test' if i < 2 else ''}"
              for i in range(10)]
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "records.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_text_only_table_feeds_the_text_stages_not_the_image_stages(tmp_path: Path) -> None:
    root = _text_only(tmp_path)
    cfg = DataConfig(root=str(root), text_datasets=("notes",), progress=False)
    with pytest.raises(DataError, match="no 'image' or 'volume' column: a text-only corpus"):
        load_from_config("notes", cfg)
    train = load_texts(cfg)
    assert train and {r.split for r in train} == {"train"} and {r.language for r in train} == {"es"}
    assert all(r.image_path is None for r in train)
    every = load_texts(DataConfig(root=str(root), text_datasets=("notes",), progress=False,
                                  text_splits=("train", "valid", "test")))
    assert len(every) == 10


def test_text_stages_read_reports_whose_images_are_missing(tmp_path: Path) -> None:
    layout = generic(tmp_path / "mine")
    layout.images.clear()
    layout.write()
    cfg = DataConfig(root=str(tmp_path), pretrain_datasets=("mine",), progress=False,
                     text_splits=("train", "valid", "test"))
    assert len(load_texts(cfg)) == 12
    with pytest.raises(DataError, match="image file not found"):
        load_from_config("mine", cfg)


def test_empty_text_corpus_is_one_data_error(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "records.csv").write_text(
        "report,language,patient_id,split\nderrame pleural izquierdo,es,p1,test\n", encoding="utf-8")
    cfg = DataConfig(root=str(tmp_path), text_datasets=("notes",), progress=False)
    with pytest.raises(DataError, match=r"no reports in split\(s\) train of the text datasets"):
        load_texts(cfg)


def _ct_table(folder: Path, rows: str) -> Path:
    """A table of CT rows: a NIfTI volume, a DICOM series folder and an X-ray beside them."""
    hu = np.full((4, 8, 8), -1000.0, dtype=np.float32)
    hu[:, 2:6, 2:6] = 40.0
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), np.diag([1.0, 1.0, 3.0, 1.0])),
             str(folder / "ct1.nii.gz"))
    write_ct_series(folder / "ct2", hu)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(folder / "cxr.png")
    (folder / "records.csv").write_text("image,volume,report,language,patient_id,Covid\n" + rows,
                                        encoding="utf-8")
    return folder


def test_a_volume_column_makes_3d_records_of_nifti_files_and_dicom_series(tmp_path: Path) -> None:
    folder = _ct_table(tmp_path / "ct", ",ct1.nii.gz,Vidrio deslustrado bilateral.,es,P1,1\n"
                                        ",ct2,No hay hallazgos.,es,P2,0\n"
                                        "cxr.png,,Lungs are clear.,en,P3,\n")
    read = load_dataset("ct", folder, check_images=True)
    got = {r.image_path.name: (r.ndim, r.patient_id, r.labels["Covid"] == 1.0) for r in read.records}
    assert got == {"ct1.nii.gz": (3, "P1", True), "ct2": (3, "P2", False), "cxr.png": (2, "P3", False)}
    for record in read.records:
        if record.ndim == 3:
            assert read_volume(record.image_path).array.min() == -1000.0


@pytest.mark.parametrize("row, message", [
    ("cxr.png,ct1.nii.gz,Small left pleural effusion.,en,P1,1\n",
     "column 'volume': an image and a volume: a row is one or the other"),
    (",,Small left pleural effusion.,en,P1,1\n", "column 'image': empty image and volume path"),
    (",absent.nii.gz,Small left pleural effusion.,en,P1,1\n", "volume not found"),
    (",scans\\ct1.nii.gz,Small left pleural effusion.,en,P1,1\n",
     r"volume not found: .*scans\\ct1\.nii\.gz \(the path holds '\\': write paths with '/'\)"),
])
def test_a_volume_row_that_cannot_be_read_is_named(row: str, message: str, tmp_path: Path) -> None:
    folder = _ct_table(tmp_path / "ct", row)
    with pytest.raises(DataError, match=f"{folder / 'records.csv'}, line 2.*{message}"):
        load_dataset("ct", folder, check_images=True)


def test_generic_columns_are_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "LAYOUTS.md").read_text(encoding="utf-8")
    for column in GENERIC_COLUMNS[:6] + ["study_id", "view", "volume"]:
        assert f"`{column}`" in docs
