"""Write the 3D phantom world: the four CT layouts under the phantom root, plus `manifest-ct.json`.

Studies are generated in chunks of consecutive indices, optionally by several worker processes
(`phantom.workers`); rows come back in index order, so the bytes do not depend on the worker count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import CTStudy, generate_ct_study
from unimed.phantom.ct.writers import CT_LAYOUTS
from unimed.phantom.world import CHUNK, DatasetManifest, Job, read_manifest, write_layouts
from unimed.phantom.writers import StudyResult

log = logging.getLogger(__name__)

CT_MANIFEST = "manifest-ct.json"
WRITERS_BY_FOLDER = {writer.folder: writer for writer in CT_LAYOUTS}


@dataclasses.dataclass(frozen=True)
class CTWorldManifest:
    """What the 3D world holds: generation settings and one :class:`DatasetManifest` per folder."""

    seed: int
    shape: tuple[int, int, int]
    difficulty: float
    datasets: dict[str, DatasetManifest]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CTWorldManifest:
        datasets = {k: DatasetManifest(**v) for k, v in data["datasets"].items()}
        return cls(data["seed"], tuple(data["shape"]), data["difficulty"], datasets)


def load_ct_manifest(root: str | Path) -> CTWorldManifest:
    """Read `<root>/manifest-ct.json`; a clear error when it is missing or malformed."""
    return read_manifest(Path(root) / CT_MANIFEST, CTWorldManifest, "CT phantom", "the 3D world")


def regenerate_ct_study(root: str | Path, folder: str, key: str) -> CTStudy | None:
    """The study the phantom wrote under `<root>/<folder>/<key>` (a ``phantom_findings.csv`` key),
    generated again from the seed, shape, difficulty and study count of `manifest-ct.json`; None when
    `folder` is not one of its CT layouts or no study of it has that key. A missing or malformed
    manifest is a FileNotFoundError / ValueError naming it.

    The manifest does not record the sites file or the language packs (the packaged ones are used),
    so a world written with others regenerates differently: compare the result with the file on
    disk before trusting it.
    """
    manifest = load_ct_manifest(root)
    layout = WRITERS_BY_FOLDER.get(folder)
    if layout is None or folder not in manifest.datasets:
        return None
    ct = CTConfig(enabled=True, shape=manifest.shape, difficulty=manifest.difficulty,
                  **{layout.count_field: manifest.datasets[folder].studies})
    writer = layout(PhantomConfig(root=str(root), seed=manifest.seed, ct=ct), Path(root) / folder)
    for index in writer.candidates(key):
        if 0 <= index < writer.count():
            study = generate_ct_study(ct, manifest.seed, writer.dataset, index, site=writer.site(index),
                                      enrich=writer.enrich)
            if writer.key(study) == key:
                return study
    return None


def _write_chunk(cfg: PhantomConfig, root: Path, job: Job) -> list[StudyResult]:
    folder, start, stop = job
    writer = WRITERS_BY_FOLDER[folder](cfg, root / folder)
    return [
        writer.write_study(generate_ct_study(cfg.ct, cfg.seed, writer.dataset, index,
                                             site=writer.site(index), enrich=writer.enrich))
        for index in range(start, stop)
    ]


def ct_jobs(cfg: PhantomConfig) -> list[Job]:
    """(folder, start, stop) chunks of every CT layout."""
    jobs = []
    for writer in CT_LAYOUTS:
        count = writer(cfg, Path()).count()
        jobs += [(writer.folder, s, min(s + CHUNK, count)) for s in range(0, count, CHUNK)]
    return jobs


def write_ct_world(cfg: PhantomConfig, root: str | Path | None = None, *, progress: bool = True) -> CTWorldManifest:
    """Generate the CT studies and write the four 3D layouts under `root` (default `cfg.root`).

    Only folders the phantom wrote before are replaced. Returns the manifest, also saved as
    `<root>/manifest-ct.json`.
    """
    root = Path(cfg.root if root is None else root)
    _, datasets = write_layouts(cfg, root, CT_LAYOUTS, ct_jobs(cfg), _write_chunk,
                                desc="phantom CT world", unit="volume", progress=progress)
    manifest = CTWorldManifest(cfg.seed, tuple(cfg.ct.shape), cfg.ct.difficulty, datasets)
    (root / CT_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    log.info("phantom CT world: %d volumes in %d layouts under %s",
             sum(d.studies for d in datasets.values()), len(datasets), root)
    return manifest
