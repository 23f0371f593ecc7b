"""Dataset adapters: one module per official layout, each returning canonical records.

`load_dataset(name, root)` reads a dataset in its official layout (see docs/LAYOUTS.md), applies the
filters, resolves per-patient splits and returns the records with the count of every dropped row.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from unimed.data.adapters import bcv, bimcv, ccii, chexpert, covidx, luna16, mimic, object_cxr, padchest, rsna, siim
from unimed.data.adapters.base import ADAPTERS, AdapterResult, DatasetRead, ReadContext
from unimed.data.config import DataConfig
from unimed.data.errors import DataError, DropCounter
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
) -> DatasetRead:
    """Read dataset `name` from `root` (the folder in its official layout) as canonical records.

    on_error: "raise" stops at the first bad row with a DataError naming file, line and column;
    "skip" skips bad rows and counts them by reason in `DatasetRead.dropped`.
    split_dir: where `<name>.csv` split files are read from (when present) or written to; None
    computes the splits in memory and writes nothing.
    check_images: also verify that every image opens (slower), not only that it exists.
    """
    drops = DropCounter(on_error)
    adapter = ADAPTERS.get(name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder of '{name}' not found", root)
    ctx = ReadContext(name, root, drops, min_report_tokens, check_images, progress)
    result: AdapterResult = adapter(root, ctx)
    rows = [(ctx.key(r), r.patient_id, r.split) for r in result.records]
    splits = resolve_splits(name, rows, result.carve, split_seed, split_dir)
    records = [
        dataclasses.replace(r, split=splits[key]) for r, (key, _, _) in zip(result.records, rows)
    ]
    dropped = drops.as_dict()
    for reason, count in dropped.items():
        logger.info("%s: dropped %d record(s): %s", name, count, reason)
    logger.info("%s: %d record(s) read from %s", name, len(records), root)
    return DatasetRead(records, dropped)


def load_from_config(name: str, cfg: DataConfig) -> DatasetRead:
    """`load_dataset` for `<cfg.root>/<folder of name>` with the settings of `cfg`."""
    ADAPTERS.get(name)
    return load_dataset(
        name,
        Path(cfg.root) / {**DATASET_FOLDERS, **VOLUME_FOLDERS}[name],
        on_error=cfg.on_error,
        min_report_tokens=cfg.min_report_tokens,
        split_seed=cfg.split_seed,
        split_dir=cfg.split_dir,
        check_images=cfg.check_images,
        progress=cfg.progress,
    )


__all__ = [
    "ADAPTERS",
    "DATASET_FOLDERS",
    "DatasetRead",
    "VOLUME_FOLDERS",
    "bcv",
    "bimcv",
    "ccii",
    "chexpert",
    "covidx",
    "load_dataset",
    "load_from_config",
    "luna16",
    "mimic",
    "object_cxr",
    "padchest",
    "rsna",
    "siim",
]
