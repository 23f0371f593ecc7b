"""Per-patient seeded splits: no leakage, determinism, ratios, split files written and read back."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from data_layouts import BUILDERS, GENERIC_COLUMNS, generic

from unimed.data.adapters import load_dataset
from unimed.data.errors import DataError
from unimed.data.splits import assign_patient_splits, leaking_patients, resolve_splits

RATIOS = {"train": 0.7, "valid": 0.15, "test": 0.15}
PATIENTS = [f"p{i:03d}" for i in range(40)]


def test_assignment_is_seeded_order_free_and_follows_ratios() -> None:
    first = assign_patient_splits(PATIENTS, RATIOS, seed=3)
    assert first == assign_patient_splits(list(reversed(PATIENTS)) * 2, RATIOS, seed=3)
    assert first != assign_patient_splits(PATIENTS, RATIOS, seed=4)
    assert Counter(first.values()) == {"train": 28, "valid": 6, "test": 6}


def test_tiny_pools_still_fill_every_split() -> None:
    assert set(assign_patient_splits(["a", "b", "c"], RATIOS, seed=0).values()) == {
        "train",
        "valid",
        "test",
    }


def test_bad_ratios_are_rejected() -> None:
    with pytest.raises(ValueError, match="ratios"):
        assign_patient_splits(PATIENTS, {"train": 0.0, "test": 0.0}, seed=0)


def test_images_of_one_patient_share_a_split() -> None:
    rows = [(f"img{i}", PATIENTS[i // 3], "all") for i in range(60)]
    splits = resolve_splits("x", rows, {"all": RATIOS}, seed=0)
    assert leaking_patients([(k, p, splits[k]) for k, p, _ in rows]) == []
    assert len(set(splits.values())) == 3


def test_official_pools_are_kept_and_only_named_pools_carved() -> None:
    rows = [(f"a{i}", f"p{i}", "train") for i in range(10)] + [
        (f"b{i}", f"q{i}", "test") for i in range(4)
    ]
    splits = resolve_splits("x", rows, {"train": {"train": 0.8, "valid": 0.2}}, seed=0)
    assert [splits[f"b{i}"] for i in range(4)] == ["test"] * 4
    assert Counter(splits[f"a{i}"] for i in range(10)) == {"train": 8, "valid": 2}


@pytest.mark.parametrize("name", ["padchest", "siim", "covidx", "chexpert"])
def test_no_patient_leaks_between_splits(name: str, tmp_path: Path) -> None:
    read = load_dataset(name, BUILDERS[name](tmp_path / name).write())
    assert (
        leaking_patients([(str(r.image_path), r.patient_id, r.split) for r in read.records]) == []
    )


def test_split_file_is_written_then_read_instead_of_recomputed(tmp_path: Path) -> None:
    root = BUILDERS["rsna"](tmp_path / "rsna").write()
    split_dir = tmp_path / "splits"
    first = load_dataset("rsna", root, split_dir=split_dir)
    path = split_dir / "rsna.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["key", "patient_id", "split"]]
    assert {r["key"]: r["split"] for r in rows} == {
        r.image_path.relative_to(root).as_posix(): r.split for r in first.records
    }
    # Edit the file: the next read must follow it, whatever the seed says.
    for row in rows:
        row["split"] = "test"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["key", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    again = load_dataset("rsna", root, split_dir=split_dir, split_seed=99)
    assert {r.split for r in again.records} == {"test"}


def test_record_missing_from_split_file_is_named(tmp_path: Path) -> None:
    root = BUILDERS["rsna"](tmp_path / "rsna").write()
    split_dir = tmp_path / "splits"
    load_dataset("rsna", root, split_dir=split_dir)
    path = split_dir / "rsna.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if "pid2.dcm" not in line) + "\n")
    with pytest.raises(DataError, match="pid2.dcm"):
        load_dataset("rsna", root, split_dir=split_dir)


def test_a_split_file_the_data_no_longer_matches_is_named_not_followed(tmp_path: Path) -> None:
    """A table that gained a stated split, or had a patient ID corrected, since its split file was
    written: the file's old split was used without a word (the user's own test rows in train, or a
    patient in two splits). Now the record is named, with what the data and the file say."""
    layout = generic(tmp_path / "mine")
    table = layout.tables["records.csv"]
    split_dir = tmp_path / "splits"
    root = layout.write()
    written = {r.image_path.relative_to(root).as_posix(): r.split
               for r in load_dataset("mine", root, split_dir=split_dir).records}
    row = next(i for i, values in enumerate(table.rows) if not values[GENERIC_COLUMNS.index("split")])
    key = table.rows[row][GENERIC_COLUMNS.index("image")]
    stated = next(split for split in ("test", "train") if split != written[key])
    table.set(row, "split", stated)
    layout.write()
    with pytest.raises(DataError, match=rf"mine.csv: record '{key}' is in split '{stated}' in the data and "
                                        rf"'{written[key]}' in the split file \(the data changed since"):
        load_dataset("mine", root, split_dir=split_dir)
    table.set(row, "split", written[key])  # the split the file gives: nothing to say
    layout.write()
    assert load_dataset("mine", root, split_dir=split_dir).records
    table.set(row, "patient_id", "pt-corrected")
    layout.write()
    with pytest.raises(DataError, match=rf"record '{key}' is patient 'pt-corrected' in the data and 'pt"):
        load_dataset("mine", root, split_dir=split_dir)

def test_a_split_file_edited_to_split_a_patient_or_to_list_a_record_twice_is_named(tmp_path: Path) -> None:
    """Both were read without a word: a patient the data leaves to the carving in train and test
    (its records trained on and tested on), and a record listed twice (the last row won)."""
    root = generic(tmp_path / "mine").write()
    split_dir = tmp_path / "splits"
    records = load_dataset("mine", root, split_dir=split_dir).records
    path = split_dir / "mine.csv"
    good = path.read_text()
    rows = list(csv.DictReader(good.splitlines()))
    patient = "pt1"  # pt0's images carry the data's own split; pt1's two are carved
    mine = [r for r in rows if r["patient_id"] == patient]
    mine[0]["split"] = next(s for s in ("train", "test") if s != mine[1]["split"])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["key", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=rf"mine\.csv: 1 patient\(s\) in more than one split, e.g. "
                                        rf"\['{patient}'\], where the data leaves their splits to the"):
        load_dataset("mine", root, split_dir=split_dir)
    lines = good.splitlines()
    path.write_text("\n".join([*lines, lines[3]]) + "\n")
    with pytest.raises(DataError, match=rf"mine\.csv, line {len(lines) + 1}, column 'key': record "
                                        rf"'{lines[3].split(',')[0]}' again \(first on line 4\)"):
        load_dataset("mine", root, split_dir=split_dir)
    path.write_text(good)
    again = load_dataset("mine", root, split_dir=split_dir).records
    assert [r.split for r in again] == [r.split for r in records]


def test_bad_split_value_in_split_file(tmp_path: Path) -> None:
    root = BUILDERS["rsna"](tmp_path / "rsna").write()
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "rsna.csv").write_text(
        "key,patient_id,split\nstage_2_train_images/pid0.dcm,pid0,dev\n"
    )
    with pytest.raises(DataError, match=r"rsna\.csv, line 2, column 'split'"):
        load_dataset("rsna", root, split_dir=tmp_path / "splits")


def test_without_split_dir_nothing_is_written_and_result_is_deterministic(tmp_path: Path) -> None:
    root = BUILDERS["padchest"](tmp_path / "padchest").write()
    before = sorted(p for p in tmp_path.rglob("*"))
    first = load_dataset("padchest", root, split_seed=5)
    second = load_dataset("padchest", root, split_seed=5)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert [r.split for r in first.records] == [r.split for r in second.records]


def _table(split: dict[str, str], strata: dict[str, str]) -> Counter:
    return Counter((strata[patient], name) for patient, name in split.items())


def test_each_stratum_takes_its_share_of_every_split() -> None:
    ratios = {"train": 0.7, "valid": 0.1, "test": 0.2}  # the 3D layouts' carve, LUNA16-sized
    patients = [f"s{i:03d}" for i in range(60)]
    strata = {p: "nodule" if i % 2 else "normal" for i, p in enumerate(patients)}
    shares = {(c, name): n for c in ("nodule", "normal") for name, n in (("train", 21), ("valid", 3), ("test", 6))}
    for seed in range(10):
        split = assign_patient_splits(patients, ratios, seed, strata)
        assert _table(split, strata) == shares


def test_uneven_strata_are_rounded_to_a_neighbour_of_their_share_with_the_unstratified_sizes() -> None:
    strata = {p: ("a", "b", "c")[(i % 40 > 22) + (i % 40 > 33)] for i, p in enumerate(PATIENTS)}  # 23 / 11 / 6
    sizes = Counter(strata.values())
    for seed in range(10):
        split = assign_patient_splits(PATIENTS, RATIOS, seed, strata)
        assert Counter(split.values()) == {"train": 28, "valid": 6, "test": 6}
        table, counts = _table(split, strata), Counter(split.values())
        for stratum, size in sizes.items():
            for name, n in counts.items():
                assert abs(table[stratum, name] - size * n / len(PATIENTS)) < 1, (stratum, name)
    first = assign_patient_splits(PATIENTS, RATIOS, 3, strata)
    assert first == assign_patient_splits(list(reversed(PATIENTS)), RATIOS, 3, strata)
    assert first != assign_patient_splits(PATIENTS, RATIOS, 4, strata)


def test_a_patient_without_a_stratum_is_an_error() -> None:
    with pytest.raises(ValueError, match="without a stratum"):
        assign_patient_splits(PATIENTS, RATIOS, 0, {p: "a" for p in PATIENTS[1:]})
