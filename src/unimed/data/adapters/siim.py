"""SIIM-ACR Pneumothorax: relative-RLE masks (several rows per image), DICOMs in nested folders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.tables import CsvTable, find_file, raw_cell
from unimed.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError
from unimed.data.images import dicom_header
from unimed.data.records import Record
from unimed.data.rle import EMPTY, rle_decode, rle_encode

logger = logging.getLogger(__name__)

RLE_FILE = "train-rle.csv"
# The real header is "ImageId, EncodedPixels"; CsvTable strips names, so both spellings work.
COLUMNS = ("ImageId", "EncodedPixels")
IMAGE_DIR = "dicom-images-train"
SPLIT_RATIOS = {"train": 0.7, "valid": 0.15, "test": 0.15}


def index_dicoms(folder: Path) -> dict[str, Path]:
    """ImageId (file stem) -> path of every `.dcm` under `folder`, at any depth."""
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        if path.stem in index:
            raise DataError(f"ImageId {path.stem!r} is also at {index[path.stem]}", path)
        index[path.stem] = path
    return index


def _group(table: CsvTable, ctx: ReadContext) -> dict[str, list[tuple[int, str]]]:
    """ImageId -> [(line, RLE), ...] in file order; an image with any bad row is left out, so it
    never loses a mask component silently (the bad row is counted)."""
    rows: dict[str, list[tuple[int, str]]] = {}
    bad: set[str] = set()
    id_index = table.columns.index("ImageId")
    for line, values in table:
        try:
            row = table.row(line, values)
        except DataError as err:
            ctx.drops.bad(err)
            bad.add(raw_cell(values, id_index))
            continue
        rows.setdefault(row["ImageId"].strip(), []).append((line, row["EncodedPixels"].strip()))
    return {image_id: rles for image_id, rles in rows.items() if image_id not in bad}


def _merged_mask(table: CsvTable, rles: list[tuple[int, str]], shape: tuple[int, int]) -> str:
    """One RLE for the union of an image's component rows; "-1" when all are empty."""
    mask = np.zeros(shape, dtype=bool)  # (H, W)
    for line, rle in rles:
        try:
            mask |= rle_decode(rle, shape)
        except ValueError as err:
            raise table.error(
                f"bad RLE for a {shape[0]}x{shape[1]} image: {err}", line, "EncodedPixels"
            ) from None
    return rle_encode(mask) if mask.any() else EMPTY


def _record(
    table: CsvTable, ctx: ReadContext, image_id: str, rles: list[tuple[int, str]], path: Path | None
) -> Record:
    first_line = rles[0][0]
    if path is None:
        raise DataError(
            f"no DICOM named {image_id}.dcm under {ctx.root}",
            table.path,
            first_line,
            reason=MISSING_IMAGE,
        )
    ctx.image(path, table.path, first_line)
    try:
        header = dicom_header(path)
        shape = (int(header.Rows), int(header.Columns))
    except (DataError, AttributeError) as err:
        raise table.error(
            f"cannot read the DICOM header of {path} ({err})", first_line, reason=UNREADABLE_IMAGE
        ) from None
    mask_rle = _merged_mask(table, rles, shape)
    patient_id = str(getattr(header, "PatientID", "") or image_id)
    return Record(
        dataset=ctx.dataset,
        image_path=path,
        patient_id=patient_id,
        study_id=image_id,
        split="all",
        site=str(getattr(header, "InstitutionName", "") or "").strip() or None,
        labels={"Pneumothorax": 0.0 if mask_rle == EMPTY else 1.0},
        mask_rle=mask_rle,
        image_size=shape,
    )


@ADAPTERS.register("siim")
def read_siim(root: Path, ctx: ReadContext) -> AdapterResult:
    """One record per ImageId with the union of its RLE rows and the image size from the DICOM
    header; patient from the DICOM PatientID, site from its InstitutionName (None when absent);
    per-patient 70/15/15 split."""
    table = CsvTable(find_file(root, [RLE_FILE], "SIIM train-rle.csv"), COLUMNS)
    folder = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
    dicoms = index_dicoms(folder)
    records = []
    grouped = _group(table, ctx)
    for image_id, rles in tqdm(grouped.items(), desc="siim: images", disable=not ctx.progress):
        try:
            records.append(_record(table, ctx, image_id, rles, dicoms.get(image_id)))
        except DataError as err:
            ctx.drops.bad(err)
    return AdapterResult(records, {"all": SPLIT_RATIOS})
