"""write_world end to end on a tiny world: manifest vs files on disk, determinism, safe overwrite."""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import multiprocessing
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from unimed.data.adapters import load_dataset
from unimed.errors import ConfigError
from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.writers import WRITERS
from unimed.phantom.world import MANIFEST, SPLIT_DIR, load_manifest, run_chunks, write_world

TINY = PhantomConfig(
    seed=5, image_size=64, mimic_studies=8, padchest_studies=8, chexpert_studies=8, cxp500_studies=3,
    rsna_studies=4, siim_studies=4, covidx_studies=6, object_cxr_studies=4, pdc_studies=3,
    control_studies=6, lateral_fraction=0.3,
)
IMAGE_SUFFIXES = {".jpg", ".png", ".dcm"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, write_world(TINY, root, progress=False)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def csv_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_counts_match_files_on_disk(world):
    root, manifest = world
    assert load_manifest(root) == manifest
    for folder, entry in manifest.datasets.items():
        images = [p for p in (root / folder).rglob("*") if p.suffix in IMAGE_SUFFIXES]
        spans = WRITERS.get(folder)(TINY, root).index_ranges()
        assert len(images) == entry.images == entry.studies == sum(len(span) for span in spans)
        assert entry.views["frontal"] + entry.views["lateral"] == entry.images
        assert sum(entry.splits.values()) == sum(entry.sites.values()) == entry.views["frontal"]


def test_manifest_splits_views_and_labels_match_the_tables(world):
    root, manifest = world
    mimic = root / "mimic-cxr-jpg"
    meta = csv_rows(mimic / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = {r["dicom_id"]: r["split"] for r in csv_rows(mimic / "mimic-cxr-2.0.0-split.csv.gz")}
    frontal = [r for r in meta if r["ViewPosition"] in ("PA", "AP")]
    entry = manifest.datasets["mimic-cxr-jpg"]
    assert entry.views == {"frontal": len(frontal), "lateral": len(meta) - len(frontal)}
    for name in ("train", "validate", "test"):
        assert entry.splits.get(name, 0) == sum(split[r["dicom_id"]] == name for r in frontal)
    chexpert = csv_rows(root / "chexpert" / "CheXpert-v1.0-small" / "train.csv")
    chexpert += csv_rows(root / "chexpert" / "CheXpert-v1.0-small" / "valid.csv")
    frontal = [r for r in chexpert if r["Frontal/Lateral"] == "Frontal"]
    for label, positives in manifest.datasets["chexpert"].positives.items():
        assert positives == sum(r[label] == "1.0" for r in frontal)
    covidx = [ln.split() for s in ("train", "test") for ln in (root / "covidx" / f"{s}.txt").read_text().splitlines()]
    assert manifest.datasets["covidx"].sites == {
        site: sum(ln[3] == site for ln in covidx) for site in ("alicante", "boston")
    }


def test_laterals_only_where_the_real_dataset_has_them(world):
    _, manifest = world
    for folder, entry in manifest.datasets.items():
        if folder not in ("mimic-cxr-jpg", "padchest", "chexpert"):
            assert entry.views["lateral"] == 0, folder
    assert manifest.datasets["padchest"].languages == {"es": manifest.datasets["padchest"].views["frontal"]}


def test_control_community_is_read_back_with_its_site_and_both_languages(world):
    root, manifest = world
    expected = {"mimic-cxr": ("mimic-cxr-jpg", "boston", "en"), "padchest": ("padchest", "alicante", "es")}
    for dataset, (folder, home, language) in expected.items():
        read = load_dataset(dataset, root / folder)
        pairs = Counter((r.site, r.language) for r in read.records)
        assert set(pairs) == {(home, language), ("miami", language)}, dataset
        assert dict(sorted(Counter(r.site for r in read.records).items())) == manifest.datasets[folder].sites
        written = manifest.datasets[folder]
        assert written.studies == getattr(TINY, WRITERS.get(folder).count_field) + TINY.control_studies
    assert "miami" not in manifest.datasets["pdc"].sites


def test_control_site_images_do_not_depend_on_the_report_language():
    english, spanish = (generate_study(TINY, "mimic-cxr", 600_001, site="miami", language=lang)
                        for lang in ("en", "es"))
    assert (english.language, spanish.language) == ("en", "es")
    assert np.array_equal(english.image, spanish.image)
    assert english.view == spanish.view and english.reports == spanish.reports
    with pytest.raises(ValueError, match="name the study's language"):
        generate_study(TINY, "mimic-cxr", 0, site="miami")
    with pytest.raises(ValueError, match="does not report in 'es'"):
        generate_study(TINY, "mimic-cxr", 0, site="boston", language="es")


def test_same_seed_same_bytes_whatever_the_workers(world, tmp_path):
    root, _ = world
    write_world(dataclasses.replace(TINY, workers=2), tmp_path / "two", progress=False)
    assert tree_digest(tmp_path / "two") == tree_digest(root)
    other = dataclasses.replace(TINY, seed=6, mimic_studies=2, padchest_studies=0, chexpert_studies=0)
    write_world(other, tmp_path / "other", progress=False)
    assert tree_digest(tmp_path / "other") != tree_digest(root)
    fewer = dataclasses.replace(TINY, control_studies=2)
    write_world(fewer, tmp_path / "fewer", progress=False)
    assert tree_digest(tmp_path / "fewer" / "rsna") == tree_digest(root / "rsna")
    assert tree_digest(tmp_path / "fewer" / "padchest") != tree_digest(root / "padchest")


def test_rewrite_replaces_phantom_folders_and_refuses_foreign_ones(tmp_path):
    small = dataclasses.replace(TINY, mimic_studies=2, padchest_studies=2, chexpert_studies=2)
    write_world(small, tmp_path, progress=False)
    stale = tmp_path / "siim" / "stale.txt"
    stale.write_text("old")
    keep = tmp_path / "notes" / "mine.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    write_world(small, tmp_path, progress=False)
    assert not stale.exists() and keep.read_text() == "mine"
    foreign = tmp_path / "other-root"
    (foreign / "rsna").mkdir(parents=True)
    (foreign / "rsna" / "real.dcm").write_bytes(b"real data")
    with pytest.raises(ConfigError, match=f"phantom.root={foreign}: {foreign / 'rsna'} is a "
                                          "non-empty folder not written by the phantom"):
        write_world(small, foreign, progress=False)
    assert (foreign / "rsna" / "real.dcm").read_bytes() == b"real data"
    assert sorted(p.name for p in foreign.iterdir()) == ["rsna"]  # checked before anything is written


def test_a_rewritten_world_is_split_afresh_not_by_the_old_worlds_split_files(tmp_path):
    """The read-back writes `<root>/splits/<dataset>.csv`; a world written again with other sizes
    stopped there ("record ... is not in the split file") until the files were deleted by hand.
    Rewriting a folder now deletes its datasets' split files; other split files stay."""
    splits = tmp_path / SPLIT_DIR
    small = dataclasses.replace(TINY, mimic_studies=2, padchest_studies=2, chexpert_studies=2)
    write_world(small, tmp_path, progress=False)
    before = load_dataset("mimic-cxr", tmp_path / "mimic-cxr-jpg", split_dir=splits).records
    mine = splits / "mine.csv"
    mine.write_text("key,patient_id,split\n", encoding="utf-8")
    write_world(dataclasses.replace(small, mimic_studies=6), tmp_path, progress=False)
    assert not (splits / "mimic-cxr.csv").exists() and mine.exists()
    after = load_dataset("mimic-cxr", tmp_path / "mimic-cxr-jpg", split_dir=splits).records
    assert len(after) > len(before) and (splits / "mimic-cxr.csv").exists()

def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="malformed phantom manifest"):
        load_manifest(tmp_path)


def _killed_on_the_fourth_job(parent: int | None, job: tuple[str, int, int]) -> list[tuple[str, int, int]]:
    """[job]; in a process other than `parent` (None: never), the fourth job kills its process."""
    if parent is not None and job[1] == 3 and os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer sends
    return [job]


def test_a_writer_the_system_kills_is_one_config_error_not_a_hang():
    """A writer process killed from outside ends the world's writing with a ConfigError naming
    phantom.workers (a multiprocessing.Pool waited forever for the job it held), its pool stopped;
    the jobs' results come in job order whatever the workers."""
    jobs = [("x", i, i + 1) for i in range(8)]
    work = functools.partial(_killed_on_the_fourth_job, None)
    assert [r for chunk in run_chunks(work, jobs, 2) for r in chunk] == jobs
    before = set(multiprocessing.active_children())
    with pytest.raises(ConfigError, match=r"^a phantom writer process was killed by SIGKILL, as the system "
                                          r"ends a process when memory runs out: write the world in "
                                          r"fewer processes \(phantom.workers=1\)$"):
        list(run_chunks(functools.partial(_killed_on_the_fourth_job, os.getpid()), jobs, 2))
    assert set(multiprocessing.active_children()) == before
