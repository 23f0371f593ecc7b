"""Write the whole phantom world: every dataset layout under one root, plus `manifest.json`.

Studies are generated and written in chunks of consecutive indices, optionally by several worker
processes; the table rows come back in index order, so the bytes on disk do not depend on the
number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from tqdm import tqdm

from unimed.data.adapters import OFFICIAL_FOLDERS
from unimed.data.splits import split_file_path
from unimed.errors import ConfigError, why_unwritable
from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.writers import LAYOUTS, WRITERS, ManifestEntry, StudyResult
from unimed.phantom.writers.base import write_csv
from unimed.phantom.writers.mimic import PARALLEL_COLUMNS, PARALLEL_CSV
from unimed.train.stop import forked_pool, leave_interrupts_to_parent

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MARKER = ".unimed-phantom"
"""Empty file in every folder the world writes; only such folders are ever deleted on a rewrite."""
SPLIT_DIR = "splits"
"""Where the read-back writes the split files (`<root>/splits/<dataset>.csv`)."""
CHUNK = 16
Job = tuple[str, int, int]
"""(layout folder, first study index, stop index): one chunk of studies for one worker."""

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DatasetManifest:
    """What one dataset folder holds. `views` counts every image; all other counts are over frontal
    images (what an adapter keeping PA/AP returns). Split names are the official ones on disk
    ("validate", "dev", ...), "none" where the real dataset has no official split."""

    folder: str
    dataset: str
    studies: int
    images: int
    views: dict[str, int]
    splits: dict[str, int]
    sites: dict[str, int]
    languages: dict[str, int]
    positives: dict[str, int]
    prevalence: dict[str, float]
    boxes: int


@dataclasses.dataclass(frozen=True)
class WorldManifest:
    """The manifest of a written world: generation settings and one :class:`DatasetManifest` per folder."""

    seed: int
    image_size: int
    difficulty: float
    datasets: dict[str, DatasetManifest]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldManifest:
        """Inverse of :meth:`to_dict`."""
        datasets = {k: DatasetManifest(**v) for k, v in data["datasets"].items()}
        return cls(data["seed"], data["image_size"], data["difficulty"], datasets)


def load_manifest(root: str | Path) -> WorldManifest:
    """Read `<root>/manifest.json`; a clear error when it is missing or malformed."""
    return read_manifest(Path(root) / MANIFEST, WorldManifest, "phantom", "the world")


def read_manifest(path: Path, cls: type[T], kind: str, world: str) -> T:
    """`cls.from_dict` of the JSON manifest at `path`; FileNotFoundError / ValueError naming the
    file when it is missing or malformed (`kind` and `world` word the message)."""
    try:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {kind} manifest (write {world} first)") from None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: malformed {kind} manifest ({exc})") from None


def summarize(folder: str, dataset: str, entries: Sequence[ManifestEntry]) -> DatasetManifest:
    """Count what a dataset's studies put on disk (its writer's `folder` and `dataset`: a 2D or a
    CT layout writer)."""
    frontal = [e for e in entries if e.frontal]
    positives: Counter[str] = Counter()
    for entry in frontal:
        positives.update(name for name, value in entry.labels.items() if value == 1.0)
    names = sorted({name for e in entries for name in e.labels})
    return DatasetManifest(
        folder=folder,
        dataset=dataset,
        studies=len(entries),
        images=sum(e.images for e in entries),
        views={"frontal": len(frontal), "lateral": len(entries) - len(frontal)},
        splits=dict(sorted(Counter(e.split for e in frontal).items())),
        sites=dict(sorted(Counter(e.site for e in frontal).items())),
        languages=dict(sorted(Counter(e.language for e in frontal).items())),
        positives={name: positives[name] for name in names},
        prevalence={name: round(positives[name] / max(len(frontal), 1), 6) for name in names},
        boxes=sum(e.boxes for e in frontal),
    )


def make_root(root: Path) -> None:
    """Create the world's root folder; one that cannot be is a ConfigError naming phantom.root."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"phantom.root={root}: cannot create the folder "
                          f"({why_unwritable(root, exc)}); choose another root") from None


def _check_writable(folder: Path) -> None:
    """Refuse a dataset folder that holds something the phantom did not write (a real download,
    say): a ConfigError naming phantom.root, before anything is written."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"phantom.root={folder.parent}: {folder} exists and is not a folder; "
                          "refusing to overwrite it: choose another root")
    if any(folder.iterdir()) and not (folder / MARKER).exists():
        raise ConfigError(
            f"phantom.root={folder.parent}: {folder} is a non-empty folder not written by the "
            f"phantom (no {MARKER}); refusing to overwrite it: choose another root"
        )


def _reset(folder: Path) -> None:
    """Replace a dataset folder by an empty one carrying the phantom marker, and delete the split
    files of the datasets read from it: written for the world it held, they would split the new
    world's records as the old ones' (or stop its read-back on a record they lack)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).touch()
    for name in (name for name, where in OFFICIAL_FOLDERS.items() if where == folder.name):
        split_file_path(folder.parent / SPLIT_DIR, name).unlink(missing_ok=True)


def _write_chunk(cfg: PhantomConfig, root: Path, job: Job) -> list[StudyResult]:
    """Generate and write studies [start, stop) of one layout (runs in a worker process)."""
    folder, start, stop = job
    writer = WRITERS.get(folder)(cfg, root / folder)
    results = []
    for index in range(start, stop):
        study = generate_study(
            cfg, writer.dataset, index, site=writer.study_site(index), language=writer.language,
            frontal_only=writer.frontal_only, enrich=writer.enrich,
        )
        results.append(writer.write_study(study, writer.split(study)))
    return results


def _jobs(cfg: PhantomConfig) -> list[Job]:
    jobs = []
    for writer in LAYOUTS:
        for span in writer(cfg, Path()).index_ranges():
            jobs += [(writer.folder, s, min(s + CHUNK, span.stop))
                     for s in range(span.start, span.stop, CHUNK)]
    return jobs


def run_chunks(work: Callable[[Job], list[StudyResult]], jobs: list[Job],
               workers: int) -> Iterator[list[StudyResult]]:
    """`work` on each job, results in job order; in `workers` forked processes when more than one
    (they leave Ctrl-C to this process and end with it: :func:`leave_interrupts_to_parent`), stopped
    when the caller stops reading. A worker the system kills (out of memory) is a ConfigError naming
    `phantom.workers`: a ``multiprocessing.Pool`` waited forever for the job it held."""
    if workers <= 1:
        yield from map(work, jobs)
        return
    with forked_pool(workers, _writer_killed, leave_interrupts_to_parent) as pool:
        yield from pool.map(work, jobs)


def _writer_killed(how: str) -> ConfigError:
    return ConfigError(f"a phantom writer process {how}, as the system ends a process when memory runs "
                       "out: write the world in fewer processes (phantom.workers=1)")


def _write_parallel_reports(root: Path, results: dict[str, list[StudyResult]]) -> None:
    """The parallel (translated) test reports that the layouts' rows carry, as one CSV."""
    rows = [cells for done in results.values() for r in done for table, cells in r.rows
            if table == PARALLEL_CSV]
    write_csv(root / PARALLEL_CSV, PARALLEL_COLUMNS, rows)


def write_layouts(cfg: PhantomConfig, root: Path, layouts: Sequence[type], jobs: list[Job],
                  write_chunk: Callable[[PhantomConfig, Path, Job], list[StudyResult]], *,
                  also: Sequence[Path] = (), desc: str, unit: str, progress: bool
                  ) -> tuple[dict[str, list[StudyResult]], dict[str, DatasetManifest]]:
    """Replace the folders of `layouts` (the 2D world's or the CT world's writer classes) under
    `root`, and the `also` folders, by the studies of `jobs`, each chunk generated and written by
    `write_chunk(cfg, root, job)` in `cfg.workers` processes, then write each layout's tables. Every
    folder is checked to be the phantom's before any is replaced. Returns each folder's study
    results in index order and its manifest entry."""
    make_root(root)
    folders = [root / writer.folder for writer in layouts] + list(also)
    for folder in folders:
        _check_writable(folder)
    for folder in folders:
        _reset(folder)
    results: dict[str, list[StudyResult]] = {writer.folder: [] for writer in layouts}
    try:
        chunks = run_chunks(partial(write_chunk, cfg, root), jobs, cfg.workers)
        with tqdm(total=sum(stop - start for _, start, stop in jobs), desc=desc, unit=unit,
                  disable=not progress) as bar:
            for (folder, _, _), chunk in zip(jobs, chunks):
                results[folder] += chunk
                bar.update(len(chunk))
        datasets = {}
        for writer in layouts:
            done = results[writer.folder]
            writer(cfg, root / writer.folder).write_tables([row for r in done for row in r.rows])
            datasets[writer.folder] = summarize(writer.folder, writer.dataset, [r.entry for r in done])
    except OSError as exc:
        if exc.filename is not None:
            raise
        # A full disk met when a file is closed (write_text's flush) names no file: the world's
        # root is named instead.
        raise OSError(exc.errno, exc.strerror, str(root)) from exc
    return results, datasets


def write_world(cfg: PhantomConfig, root: str | Path | None = None, *, progress: bool = True) -> WorldManifest:
    """Generate the phantom world and write every dataset layout under `root` (default `cfg.root`).

    Only the dataset folders written here are replaced, and only if the phantom wrote them before.
    Returns the manifest, also saved as `<root>/manifest.json`.
    """
    root = Path(cfg.root if root is None else root)
    results, datasets = write_layouts(cfg, root, LAYOUTS, _jobs(cfg), _write_chunk,
                                      also=[(root / PARALLEL_CSV).parent], desc="phantom world",
                                      unit="study", progress=progress)
    _write_parallel_reports(root, results)
    manifest = WorldManifest(cfg.seed, cfg.image_size, cfg.difficulty, datasets)
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    log.info("phantom world: %d studies in %d layouts under %s",
             sum(d.studies for d in datasets.values()), len(datasets), root)
    return manifest
