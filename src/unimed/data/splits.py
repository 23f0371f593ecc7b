"""Per-patient, seeded train / valid / test splits, persisted in split files.

A split file `<split_dir>/<dataset>.csv` has the columns key, patient_id, split. When it exists it
is the truth and is read back instead of recomputed, so results stay comparable across runs, as long
as the data still matches it (the same records, patients and stated splits; else a DataError).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from unimed.data.errors import DataError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_FILE_COLUMNS: tuple[str, ...] = ("key", "patient_id", "split")


def _split_counts(n: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder counts that sum to `n`; every split with a positive ratio gets at least one
    patient when there are enough patients, so a tiny dataset never gets an empty test split."""
    names = list(ratios)
    weights = np.array([ratios[k] for k in names], dtype=float)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"split ratios must be non-negative and not all zero, got {dict(ratios)}")
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    positive = weights > 0
    if n >= positive.sum():
        for i in np.flatnonzero(positive & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return {name: int(c) for name, c in zip(names, counts)}


def _stratum_counts(sizes: Sequence[int], counts: Mapping[str, int]) -> list[dict[str, int]]:
    """Per stratum, its number of patients in each split: every entry is its proportional share
    (stratum size x split size / patients) rounded down or up, each stratum's entries sum to its
    size and each split's to `counts`. Such a rounding always exists (controlled rounding of a
    table with integer margins); it is found as a maximum flow from the strata to the splits whose
    edges carry the rounded-up units."""
    names = list(counts)
    total = sum(sizes)
    share = np.outer(sizes, [counts[k] for k in names]) / max(total, 1)
    base = np.floor(share + 1e-9).astype(int)
    up = (share - base) > 1e-9
    rows, cols = len(sizes), len(names)
    source, sink = rows + cols, rows + cols + 1
    capacity = np.zeros((rows + cols + 2, rows + cols + 2), np.int32)
    capacity[source, :rows] = np.asarray(sizes) - base.sum(axis=1)
    capacity[:rows, rows:rows + cols] = up
    capacity[rows:rows + cols, sink] = np.array([counts[k] for k in names]) - base.sum(axis=0)
    flow = maximum_flow(csr_matrix(capacity), source, sink).flow.toarray()
    table = base + flow[:rows, rows:rows + cols]
    return [dict(zip(names, (int(v) for v in row))) for row in table]


def assign_patient_splits(
    patient_ids: Sequence[str], ratios: Mapping[str, float], seed: int,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map each distinct patient to a split with the given ratios; deterministic given the seed.

    Patients are sorted before a seeded permutation, so the input order does not matter. With
    `strata` (patient -> stratum, e.g. the class of a single-label dataset), each stratum's share of
    every split is its proportional share rounded down or up (`_stratum_counts`), with the split
    sizes of the unstratified carve, and its patients are dealt in the seeded order: a small
    validation split then holds every class that is large enough to have a place in it.
    """
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = _split_counts(len(patients), ratios)
    if strata is not None:
        missing = [p for p in patients if p not in strata]
        if missing:
            raise ValueError(f"patients without a stratum, e.g. {missing[:3]}")
        groups: dict[str, list[str]] = {}
        for index in order:
            groups.setdefault(strata[patients[index]], []).append(patients[index])
        names = sorted(groups)
        assignment = {}
        for name, per_split in zip(names, _stratum_counts([len(groups[n]) for n in names], counts)):
            dealt = iter(groups[name])
            for split, count in per_split.items():
                assignment.update((next(dealt), split) for _ in range(count))
        return assignment
    assignment: dict[str, str] = {}
    start = 0
    for name, count in counts.items():
        for index in order[start : start + count]:
            assignment[patients[index]] = name
        start += count
    return assignment


def split_file_path(split_dir: str | Path, dataset: str) -> Path:
    """Where the split file of `dataset` lives."""
    return Path(split_dir) / f"{dataset}.csv"


def read_split_file(path: Path) -> dict[str, tuple[str, str]]:
    """Read a split file into {key: (patient_id, split)}; DataError names line and column."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in SPLIT_FILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"missing column(s) {missing}; expected columns {list(SPLIT_FILE_COLUMNS)}",
                    path,
                    column=missing[0],
                )
            table: dict[str, tuple[str, str]] = {}
            lines: dict[str, int] = {}
            for row in reader:
                first = lines.setdefault(row["key"], reader.line_num)
                if first != reader.line_num:  # the last one won: an edit's copy moved the record
                    raise DataError(f"record {row['key']!r} again (first on line {first}): one row per "
                                    "record", path, reader.line_num, "key")
                if row["split"] not in SPLITS:
                    raise DataError(
                        f"split {row['split']!r} is not one of {list(SPLITS)}",
                        path,
                        reader.line_num,
                        "split",
                    )
                table[row["key"]] = (row["patient_id"], row["split"])
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason})", path) from None
    return table


def write_split_file(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """Write (key, patient_id, split) rows, sorted by key, atomically (temp file then rename; the
    temp file is the process's own, so that evaluation workers creating the same split file at
    once each rename a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".csv.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_FILE_COLUMNS)
        writer.writerows(sorted(rows))
    tmp.replace(path)
    logger.info("wrote split file %s (%d rows)", path, len(rows))


def leaking_patients(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """Patients that appear in more than one split among (key, patient_id, split) rows."""
    first: dict[str, str] = {}
    leaking: set[str] = set()
    for _, patient, split in rows:
        if first.setdefault(patient, split) != split:
            leaking.add(patient)
    return sorted(leaking)


def resolve_splits(
    dataset: str,
    rows: Sequence[tuple[str, str, str]],
    carve: Mapping[str, Mapping[str, float]],
    seed: int,
    split_dir: str | Path | None = None,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Final split of every (key, patient_id, pool) row, as {key: split}.

    A pool is either an official split ("train" / "valid" / "test"), kept as is, or a name in
    `carve` whose rows are split per patient with the ratios `carve[pool]` and `seed`, stratified
    by `strata` (patient -> stratum) when given (see `assign_patient_splits`). A patient with rows
    in one official split has its carved rows in that split too (a table that states the split of
    some rows only would otherwise put the patient in two splits). With
    `split_dir`, an existing `<split_dir>/<dataset>.csv` is read instead (a key missing from it is
    an error), and a missing one is computed and written. Without `split_dir` nothing is written.
    """
    if split_dir is not None and split_file_path(split_dir, dataset).is_file():
        return _splits_from_file(split_file_path(split_dir, dataset), rows, carve)
    by_pool: dict[str, list[str]] = {}
    stated: dict[str, set[str]] = {}
    for _, patient, pool in rows:
        by_pool.setdefault(pool, []).append(patient)
        if pool in SPLITS and pool not in carve:
            stated.setdefault(patient, set()).add(pool)
    assignment: dict[str, dict[str, str]] = {}
    for pool, patients in by_pool.items():
        if pool in carve:
            known = {p: next(iter(stated[p])) for p in patients if len(stated.get(p, ())) == 1}
            if known:
                logger.info("%s: %d patient(s) with rows in one official split keep their other rows "
                            "there", dataset, len(known))
            rest = [p for p in patients if p not in known]
            assignment[pool] = {**assign_patient_splits(rest, carve[pool], seed, strata), **known}
        elif pool not in SPLITS:
            raise ValueError(f"{dataset}: pool {pool!r} is neither a split {SPLITS} nor carved")
    final = [
        (key, patient, assignment[pool][patient] if pool in assignment else pool)
        for key, patient, pool in rows
    ]
    _warn_leakage(dataset, final)
    if split_dir is not None:
        write_split_file(split_file_path(split_dir, dataset), final)
    return {key: split for key, _, split in final}


def _splits_from_file(path: Path, rows: Sequence[tuple[str, str, str]],
                      carve: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """The splits the file gives `rows`, which must still be the records it was written for: the
    same keys, each of the same patient, and a row whose split the data states (a pool that is not
    carved) in that split. A table that gained a split column, or had its patient IDs corrected,
    since the file was written would otherwise be split as before without a word."""
    table = read_split_file(path)
    redo = "delete the file to recompute the splits or point split_dir elsewhere"
    out: dict[str, str] = {}
    for key, patient, pool in rows:
        if key not in table:
            raise DataError(f"record {key!r} is not in the split file; {redo}", path)
        listed_patient, split = table[key]
        if listed_patient != patient:
            raise DataError(f"record {key!r} is patient {patient!r} in the data and {listed_patient!r} "
                            f"in the split file (the data changed since it was written); {redo}", path)
        if pool in SPLITS and pool not in carve and pool != split:
            raise DataError(f"record {key!r} is in split {pool!r} in the data and {split!r} in the split "
                            f"file (the data changed since it was written); {redo}", path)
        out[key] = split
    carved = {patient for _, patient, pool in rows if pool not in SPLITS or pool in carve}
    leaking = [p for p in leaking_patients([(key, patient, out[key]) for key, patient, _ in rows])
               if p in carved]
    if leaking:  # the file puts a patient the data leaves to the carving in two splits: an edit
        raise DataError(f"{len(leaking)} patient(s) in more than one split, e.g. {leaking[:3]}, where the "
                        f"data leaves their splits to the per-patient carving; {redo}", path)
    logger.info("read splits of %d records from %s", len(out), path)
    return out


def _warn_leakage(dataset: str, rows: Sequence[tuple[str, str, str]]) -> None:
    # Carved pools never leak by construction; an official split that puts a patient in two splits
    # is the dataset's own choice, so it is reported rather than silently changed.
    leaking = leaking_patients(rows)
    if leaking:
        logger.warning(
            "%s: %d patient(s) appear in more than one split, e.g. %s",
            dataset,
            len(leaking),
            leaking[:3],
        )
