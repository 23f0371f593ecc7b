"""Dataset adapters: one module per official layout, each returning canonical records, and the
generic records table (:mod:`.generic`) for data in no official layout.

`load_dataset(name, root)` reads a dataset in its official layout, or a generic table when `name` is
not an official layout (see docs/LAYOUTS.md), applies the filters, resolves per-patient splits and
returns the records with the count of every dropped row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unimed.data.adapters import bcv, bimcv, ccii, chexpert, covidx, luna16, mimic, object_cxr, padchest, rsna, siim
from unimed.data.adapters.base import ADAPTERS, AdapterResult, DatasetRead, ReadContext, say_not_here
from unimed.data.adapters.generic import is_generic, read_generic
from unimed.data.config import DataConfig
from unimed.data.errors import DataError, DropCounter
from unimed.data.records import Record
from unimed.data.splits import resolve_splits

logger = logging.getLogger(__name__)

# Folder of each dataset under a phantom (or user-assembled) root, as in docs/LAYOUTS.md.
DATASET_FOLDERS: dict[str, str] = {
    "mimic-cxr": "mimic-cxr-jpg",
    "padchest": "padchest",
    "chexpert": "chexpert",
    "cxp500": "cxp500",
    "rsna": "rsna",
    "siim": "siim",
    "covidx": "covidx",
    "object-cxr": "object-cxr",
    "pdc": "pdc",
}
# Folder of each 3D (volume) dataset, written by the phantom's CT world (phantom.ct.enabled).
VOLUME_FOLDERS: dict[str, str] = {
    "bimcv-covid19": "bimcv-covid19",
    "cc-ccii": "cc-ccii",
    "luna16": "luna16",
    "bcv": "bcv",
}
# Datasets read from another dataset's folder: LUNA16's nodule candidates (one record per row of
# its candidates.csv) from the LUNA16 layout.
SHARED_FOLDERS: dict[str, str] = {"luna16-candidates": "luna16"}
OFFICIAL_FOLDERS: dict[str, str] = {**DATASET_FOLDERS, **VOLUME_FOLDERS, **SHARED_FOLDERS}
"""The folder of every official layout's dataset: 2D, then 3D, then those read from another's."""


def load_dataset(
    name: str,
    root: str | Path,
    *,
    on_error: str = "raise",
    min_report_tokens: int = 3,
    split_seed: int = 0,
    split_dir: str | Path | None = None,
    check_images: bool = False,
    progress: bool = False,
    require_images: bool = True,
    candidate_negatives: int | None = None,
) -> DatasetRead:
    """Read dataset `name` from `root` (the folder in its official layout) as canonical records.

    on_error: "raise" stops at the first bad row with a DataError naming file, line and column;
    "skip" skips bad rows and counts them by reason in `DatasetRead.dropped`.
    split_dir: where `<name>.csv` split files are read from (when present) or written to; None
    computes the splits in memory and writes nothing.
    check_images: also verify that every image opens (slower), not only that it exists.
    require_images: False for the text stages, which read reports only: images are not looked at
    and a generic text-only table (no image column) is accepted.
    candidate_negatives: per volume, at most this many candidates without a positive label are
    kept (:func:`sample_candidates`, after the splits are carved); None keeps every record.
    """
    drops = DropCounter(on_error)
    root = Path(root)
    if not root.is_dir():
        dangling = (f" (a symbolic link to {os.readlink(root)}, which is not there)" if root.is_symlink()
                    else "")
        raise DataError(f"dataset folder of '{name}' not found{dangling}", root)
    if name in ADAPTERS:
        adapter = ADAPTERS.get(name)
    elif is_generic(root):
        adapter = read_generic
    else:
        raise DataError(
            f"'{name}' is neither an official layout ({', '.join(ADAPTERS.names())}) nor a generic "
            "dataset: no records.csv / records.jsonl in this folder (see docs/LAYOUTS.md)", root,
        )
    ctx = ReadContext(name, root, drops, min_report_tokens, check_images, progress, require_images)
    result: AdapterResult = adapter(root, ctx)
    say_not_here(ctx, result.records)
    rows = [(ctx.key(r), r.patient_id, r.split) for r in result.records]
    splits = resolve_splits(name, rows, result.carve, split_seed, split_dir,
                            patient_strata(result.records) if result.stratify else None)
    records = [
        dataclasses.replace(r, split=splits[key]) for r, (key, _, _) in zip(result.records, rows)
    ]
    if candidate_negatives is not None:
        kept = sample_candidates(records, candidate_negatives, split_seed, root)
        logger.info("%s: %d of %d record(s) kept, every positive candidate and at most %d other(s) "
                    "per volume (data.candidate_negatives)", name, len(kept), len(records),
                    candidate_negatives)
        records = kept
    dropped = drops.as_dict()
    for reason, count in dropped.items():
        logger.info("%s: dropped %d record(s): %s", name, count, reason)
    logger.info("%s: %d record(s) read from %s", name, len(records), root)
    return DatasetRead(records, dropped, dict(drops.examples))


def sample_candidates(records: Sequence[Record], negatives: int, seed: int, root: Path) -> list[Record]:
    """`records` in order, less the candidates without a positive label beyond `negatives` per
    volume. A candidate is a record with a `crop` (a cube around a point of its volume); records
    without one are all kept. Which of a volume's negatives stay is a sample seeded by `seed` and
    the volume's path relative to `root`, so it depends neither on the other volumes nor on the
    order of the table; a volume's records share its patient's split, so the splits keep theirs."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if record.crop is not None and not any(v > 0 for v in record.labels.values()):
            volume = record.image_key(root).removesuffix(record.crop.tag())
            groups.setdefault(volume, []).append(i)
    dropped: set[int] = set()
    for volume, indices in groups.items():
        if len(indices) > negatives:
            name = volume.encode("utf-8")
            rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name).digest()[:8], "little")])
            ordered = sorted(indices, key=lambda i: records[i].crop.tag())  # not the table's order
            keep = rng.choice(len(ordered), size=negatives, replace=False)
            dropped.update(set(ordered) - {ordered[j] for j in keep})
    return [record for i, record in enumerate(records) if i not in dropped]


def patient_strata(records: Sequence[Record]) -> dict[str, str]:
    """Each patient's stratum for a stratified carve: the classes (`Record.target`) of the
    patient's records, sorted and joined by '+' (one class for nearly every patient)."""
    classes: dict[str, set[str]] = {}
    for record in records:
        classes.setdefault(record.patient_id, set()).add(str(record.target))
    return {patient: "+".join(sorted(names)) for patient, names in classes.items()}


def dataset_folder(name: str, root: str | Path) -> Path:
    """Where dataset `name` lives under `root`: its official layout's folder, else `<root>/<name>`
    (a generic records table)."""
    return Path(root) / DATASET_FOLDERS.get(name, SHARED_FOLDERS.get(name, name))


def find_datasets(root: str | Path) -> list[str]:
    """The datasets present under `root`: official layouts (2D, then 3D, then those read from
    another one's folder, LUNA16's candidates) whose folder exists, then every other sub-folder
    holding a generic records table (named by the folder)."""
    root = Path(root)
    official = [name for name, folder in OFFICIAL_FOLDERS.items() if (root / folder).is_dir()]
    taken = set(OFFICIAL_FOLDERS.values())
    generic = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in taken
                     and is_generic(p)) if root.is_dir() else []
    return official + generic


def load_from_config(name: str, cfg: DataConfig, *, require_images: bool = True) -> DatasetRead:
    """`load_dataset` for `<cfg.root>/<folder of name>` with the settings of `cfg`."""
    return load_dataset(
        name,
        dataset_folder(name, cfg.root),
        on_error=cfg.on_error,
        min_report_tokens=cfg.min_report_tokens,
        split_seed=cfg.split_seed,
        split_dir=cfg.split_dir,
        check_images=cfg.check_images and require_images,
        progress=cfg.progress,
        require_images=require_images,
        candidate_negatives=cfg.candidate_negatives,
    )


def with_reports(name: str, read: DatasetRead) -> list[Record]:
    """The records of dataset `name` (as `read`) that have a report; a dataset with none is said
    to add nothing to the text stages and pre-training, instead of passing unseen."""
    paired = [r for r in read.records if r.report]
    if not paired:
        logger.warning("%s: none of its %d records has a report, so it adds no reports and no pre-training "
                       "pairs (a labelled set is read by the evaluation: eval.<task>.datasets)", name,
                       len(read.records))
    return paired


def load_texts(cfg: DataConfig) -> list[Record]:
    """The records with a report in `cfg.text_splits` of the text-stage datasets (`text_datasets`,
    else `pretrain_datasets`), for `unimed vocab` and `unimed mlm`: images are not read, so a
    report table without images (or a generic text-only table) is enough."""
    names = cfg.text_datasets or cfg.pretrain_datasets
    records = []
    for name in names:
        read = load_from_config(name, cfg, require_images=False)
        records += [r for r in with_reports(name, read) if r.split in cfg.text_splits]
    if not records:
        raise DataError(
            f"no reports in split(s) {', '.join(cfg.text_splits)} of the text datasets "
            f"({', '.join(names)}); see data.text_datasets and data.text_splits", cfg.root,
        )
    return records


__all__ = [
    "ADAPTERS",
    "DATASET_FOLDERS",
    "DatasetRead",
    "OFFICIAL_FOLDERS",
    "SHARED_FOLDERS",
    "VOLUME_FOLDERS",
    "bcv",
    "bimcv",
    "ccii",
    "chexpert",
    "dataset_folder",
    "find_datasets",
    "covidx",
    "load_dataset",
    "load_from_config",
    "load_texts",
    "luna16",
    "mimic",
    "object_cxr",
    "padchest",
    "rsna",
    "sample_candidates",
    "siim",
    "with_reports",
]
