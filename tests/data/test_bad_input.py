"""Bad input, for every adapter: missing files and columns, missing / unreadable images, malformed
rows, empty reports, non-UTF-8 text; raised with file / line / column, or skipped and counted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from data_layouts import BUILDERS, PADCHEST_CSV, Layout

from unimed.data.adapters import load_dataset
from unimed.data.errors import (
    EMPTY_REPORT,
    MALFORMED_ROW,
    MISSING_IMAGE,
    NON_UTF8,
    UNREADABLE_IMAGE,
    DataError,
)

MIMIC_META = "mimic-cxr-2.0.0-metadata.csv.gz"
MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv.gz"
MIMIC_REPORT = "files/p10/p10000002/s50000002.txt"


@dataclasses.dataclass(frozen=True)
class Breakage:
    """One malformed row: (file, row index, column, bad value); the row holds one kept record."""

    file: str
    row: int
    column: str
    value: str


# One malformed cell per adapter, each of a different kind: bad number, bad label value, bad Labels
# string, bad RLE, bad annotation, bad box, bad split value.
BAD_ROWS: dict[str, Breakage] = {
    "mimic-cxr": Breakage(MIMIC_LABELS, 1, "Edema", "yes"),
    "padchest": Breakage(PADCHEST_CSV, 0, "Labels", "['pleural effusion', "),
    "pdc": Breakage(PADCHEST_CSV, 2, "Labels", "pneumothorax"),
    "chexpert": Breakage("CheXpert-v1.0-small/train.csv", 2, "Cardiomegaly", "2.0"),
    "cxp500": Breakage("test_labels.csv", 0, "Edema", "-1"),
    "rsna": Breakage("stage_2_train_labels.csv", 2, "width", "wide"),
    "siim": Breakage("train-rle.csv", 2, "EncodedPixels", " 3 4 5"),
    "object-cxr": Breakage("train.csv", 0, "annotation", "3 1 2 3 4"),
}
# A required column of each adapter's main table.
COLUMNS: dict[str, tuple[str, str]] = {
    "mimic-cxr": (MIMIC_META, "ViewPosition"),
    "padchest": (PADCHEST_CSV, "Labels"),
    "pdc": (PADCHEST_CSV, "MethodLabel"),
    "chexpert": ("CheXpert-v1.0-small/valid.csv", "Frontal/Lateral"),
    "cxp500": ("test_labels.csv", "Path"),
    "rsna": ("stage_2_train_labels.csv", "Target"),
    "siim": ("train-rle.csv", "EncodedPixels"),
    "object-cxr": ("dev.csv", "annotation"),
}
EMPTY_REPORTS: dict[str, Callable[[Layout], str]] = {
    "mimic-cxr": lambda lay: _set_text(
        lay, MIMIC_REPORT, b"EXAMINATION: CHEST\n\nFINDINGS:\n\n___\n"
    ),
    "padchest": lambda lay: _set_cell(lay, PADCHEST_CSV, 0, "Report", "  "),
}


def _set_text(layout: Layout, rel: str, data: bytes) -> str:
    layout.texts[rel] = data
    return rel


def _set_cell(layout: Layout, rel: str, row: int, column: str, value: str) -> str:
    layout.tables[rel].set(row, column, value)
    return rel


def _non_utf8(name: str, layout: Layout) -> tuple[str, int | None]:
    """Put a Latin-1 byte into one kept record's text; returns (file, line) the error must name."""
    if name == "mimic-cxr":
        return _set_text(
            layout, MIMIC_REPORT, "FINDINGS: derrame pleural pequeño.".encode("latin-1")
        ), None
    if name == "covidx":
        layout.texts["train.txt"] = layout.texts["train.txt"].replace(b"cohen", b"coh\xe9n", 1)
        return "train.txt", 2
    rel = next(iter(layout.tables))
    layout.tables[rel].rows[0][0] += "\udce9"
    return rel, 2


def _layout(name: str, tmp_path: Path) -> Layout:
    return BUILDERS[name](tmp_path / name)


def _count(name: str, tmp_path: Path) -> int:
    return len(_layout(name, tmp_path / "clean").kept)


@pytest.mark.parametrize(
    "name,rel",
    [
        (n, rel)
        for n in BUILDERS
        for rel in [*BUILDERS[n](Path("unused")).tables, *BUILDERS[n](Path("unused")).texts]
        if not rel.startswith("files/")
    ],
)
def test_missing_table_names_the_file(name: str, rel: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    layout.tables.pop(rel, None)
    layout.texts.pop(rel, None)
    with pytest.raises(DataError, match=Path(rel).name.removesuffix(".gz")):
        load_dataset(name, layout.write(), on_error="skip")


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_missing_column_names_column_file_and_expected(name: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    rel, column = COLUMNS[name]
    layout.tables[rel].drop_column(column)
    with pytest.raises(DataError) as info:
        load_dataset(name, layout.write(), on_error="skip")
    message = str(info.value)
    assert (
        info.value.column == column and Path(rel).name in message and "expected columns" in message
    )


def test_covidx_short_line_names_file_and_line(tmp_path: Path) -> None:
    layout = _layout("covidx", tmp_path)
    lines = layout.texts["test.txt"].decode().splitlines()
    layout.texts["test.txt"] = ("\n".join(lines[:2] + ["test9 test-2.png normal"]) + "\n").encode()
    with pytest.raises(DataError, match=r"test\.txt, line 3"):
        load_dataset("covidx", layout.write())


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_image(name: str, on_error: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    missing = layout.kept[0]
    del layout.images[missing]
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError, match=Path(missing).name) as info:
            load_dataset(name, root)
        assert info.value.reason == MISSING_IMAGE
        return
    read = load_dataset(name, root, on_error="skip")
    assert len(read.records) == len(layout.kept) - 1
    assert read.dropped[MISSING_IMAGE] == 1
    assert all(r.image_path.is_file() for r in read.records)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_unreadable_image_with_check_images(name: str, on_error: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    root = layout.write()
    broken = root / layout.kept[-1]
    broken.write_bytes(b"not an image at all")
    if on_error == "raise":
        with pytest.raises(DataError, match=broken.name) as info:
            load_dataset(name, root, check_images=True)
        assert info.value.reason == UNREADABLE_IMAGE
        return
    read = load_dataset(name, root, on_error="skip", check_images=True)
    assert len(read.records) == len(layout.kept) - 1
    assert read.dropped[UNREADABLE_IMAGE] == 1
    assert broken not in {r.image_path for r in read.records}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_malformed_row(name: str, on_error: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    bad = BAD_ROWS[name]
    layout.tables[bad.file].set(bad.row, bad.column, bad.value)
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError) as info:
            load_dataset(name, root)
        assert info.value.column == bad.column
        assert f"{Path(bad.file).name}, line {bad.row + 2}" in str(info.value)
        return
    read = load_dataset(name, root, on_error="skip")
    assert len(read.records) == len(layout.kept) - 1
    assert read.dropped[MALFORMED_ROW] == 1


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_covidx_malformed_line(on_error: str, tmp_path: Path) -> None:
    layout = _layout("covidx", tmp_path)
    layout.texts["train.txt"] = layout.texts["train.txt"].replace(b" pneumonia ", b" flu ", 1)
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError, match=r"train\.txt, line 2, column 'label'"):
            load_dataset("covidx", root)
        return
    read = load_dataset("covidx", root, on_error="skip")
    assert len(read.records) == len(layout.kept) - 1 and read.dropped == {MALFORMED_ROW: 1}


def test_covidx_of_the_binary_releases_is_named_as_such(tmp_path: Path) -> None:
    """COVIDx CXR-2 and later label positive / negative; the benchmark's COVIDx is three-class."""
    layout = _layout("covidx", tmp_path)
    text = layout.texts["train.txt"].decode()
    for label, binary in (("COVID-19", "positive"), ("pneumonia", "negative"), ("normal", "negative")):
        text = text.replace(f" {label} ", f" {binary} ")
    layout.texts["train.txt"] = text.encode()
    with pytest.raises(DataError, match=r"train\.txt, line 1, column 'label': label '(positive|negative)' is "
                                        r"one of COVIDx CXR-2's and later releases' two classes .*three-class"):
        load_dataset("covidx", layout.write())


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(EMPTY_REPORTS))
def test_empty_report(name: str, on_error: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    rel = EMPTY_REPORTS[name](layout)
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError, match="empty report") as info:
            load_dataset(name, root)
        assert info.value.path.name == Path(rel).name
        return
    read = load_dataset(name, root, on_error="skip")
    assert len(read.records) == len(layout.kept) - 1
    assert read.dropped[EMPTY_REPORT] == 1


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_non_utf8_text(name: str, on_error: str, tmp_path: Path) -> None:
    layout = _layout(name, tmp_path)
    rel, line = _non_utf8(name, layout)
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError, match="not UTF-8") as info:
            load_dataset(name, root)
        assert info.value.path == root / rel and info.value.line == line
        return
    read = load_dataset(name, root, on_error="skip")
    assert len(read.records) == len(layout.kept) - 1
    assert read.dropped[NON_UTF8] == 1


def test_invalid_on_error_lists_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'raise', 'skip'"):
        load_dataset("rsna", tmp_path, on_error="ignore")


def test_unknown_dataset_lists_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'mimic' is neither an official layout \(.*mimic-cxr.*\) nor a "
                       "generic dataset: no records.csv"):
        load_dataset("mimic", tmp_path)


def test_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset("siim", tmp_path / "nowhere")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("table", [MIMIC_LABELS, "mimic-cxr-2.0.0-split.csv.gz"])
def test_mimic_short_row_fails_its_study_with_its_own_line(table: str, on_error: str,
                                                           tmp_path: Path) -> None:
    """A label or split row one field short is that row's error (raised, or counted under skip),
    not a silently unlabelled study nor an image 'not in the split CSV'."""
    layout = _layout("mimic-cxr", tmp_path)
    kept = Path(layout.kept[0])
    dicom, study = kept.stem, kept.parent.name[1:]
    rows = layout.tables[table].rows
    split = "split" in table
    index = next(i for i, row in enumerate(rows) if (row[0] == dicom if split else row[1] == study))
    rows[index] = rows[index][:-1]
    root = layout.write()
    if on_error == "raise":
        with pytest.raises(DataError, match=rf"{table}, line {index + 2}: expected \d+ fields, found"):
            load_dataset("mimic-cxr", root)
        return
    read = load_dataset("mimic-cxr", root, on_error="skip")
    lost = [k for k in layout.kept
            if (Path(k).stem == dicom if split else Path(k).parent == kept.parent)]
    assert len(read.records) == len(layout.kept) - len(lost)
    assert read.dropped[MALFORMED_ROW] == len(lost)
