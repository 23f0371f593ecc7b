"""Finished evaluation jobs kept on disk, so that an evaluation stopped part-way (Ctrl-C, a
preempted cluster job, a task that failed) goes on where it stopped when it is run again.

An evaluation of several methods and baselines on every task is many jobs (:mod:`unimed.eval.runner`)
and, at full scale, hours; without this, a stop in its last job lost all of them. As each job ends,
its metrics, timings, bootstrap replicates, the figures it drew and the splits it read are written
to ``<store>/<key>/`` (to a temporary name first, then renamed, so a stop mid-write leaves no half
job). The key is a SHA-256 of everything a job's result depends on: the encoder (its weights,
tokenizer, text length, device type, name and label), the job's tasks, the evaluation and data
config, the zero-shot prompt files and unimed's code (a stopped evaluation run again after an
upgrade runs every job again). A kept job is taken only where the records of every dataset it read
are still those it read (their fingerprints: every field of every record, each file's size and
modification time; a relabelled or regenerated dataset runs again). Jobs start from the evaluation seed
(:func:`unimed.eval.runner._run_job`), so a kept result is the one the job would give again. The
store goes when the evaluation is written; a failed one leaves it for the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimed.eval.data import EvalData
from unimed.eval.encoders import Encoder

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
REPLICATES_FILE = "replicates.npz"
FIGURES_DIR = "figures"


def encoder_identity(encoder: Encoder) -> str:
    """A SHA-256 of what an encoder's results depend on: every tensor of its model (name, type,
    shape, values), its tokenizer's vocabulary, text length, temperature, device type, name and
    label."""
    digest = hashlib.sha256()
    vocabulary = sorted(encoder.tokenizer.get_vocab().items())
    digest.update(json.dumps([encoder.name, encoder.label, encoder.max_length, encoder.temperature,
                              encoder.device.type, vocabulary]).encode())
    for name, tensor in encoder.model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def context_identity(*parts: object, files: Iterable[Path] = ()) -> str:
    """A SHA-256 of JSON-serialisable `parts` (the evaluation and data config) and of the names and
    contents of `files` (the prompt files, the code)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class JobStore:
    """The finished jobs of one run's evaluation under `folder`, for the config whose
    :func:`context_identity` is `context`."""

    def __init__(self, folder: Path, context: str) -> None:
        self.folder = folder
        self.context = context

    def key(self, encoder: str, tasks: tuple[str, ...]) -> str:
        """The key of the job of the encoder of identity `encoder` on `tasks`."""
        return hashlib.sha256(json.dumps([self.context, encoder, list(tasks)]).encode()).hexdigest()[:32]

    def load(self, key: str, data: EvalData, figures: Path
             ) -> tuple[tuple[dict, dict, dict], list[tuple[str, str | None]]] | None:
        """((metrics, seconds, replicates), splits read) of the kept job `key`, its figures copied
        back under `figures`; None where there is none or the records it read have changed."""
        folder = self.folder / key
        if not folder.is_dir():
            return None
        try:
            saved = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
            with np.load(folder / REPLICATES_FILE) as stored:
                replicates = {name: stored[name] for name in stored.files}
            metrics, seconds, datasets = saved["metrics"], saved["seconds"], saved["datasets"]
            splits = [(dataset, split) for dataset, split in saved["splits"]]
            changed = [d for d, fingerprint in datasets.items() if data.fingerprint(d) != fingerprint]
            if not changed:
                for name in _figures(metrics):
                    (figures / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / FIGURES_DIR / name, figures / name)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("the evaluation job kept in %s cannot be read (%s): it runs again", folder, exc)
            return None
        if changed:
            log.info("the records of %s changed since the job kept in %s ran: it runs again",
                     ", ".join(changed), folder)
            return None
        return (metrics, seconds, replicates), splits

    def save(self, key: str, result: tuple[dict, dict, Mapping[str, np.ndarray]],
             splits: Iterable[tuple[str, str | None]], datasets: Mapping[str, str], figures: Path) -> None:
        """Keep a finished job: `result` (metrics, seconds, replicates), the `splits` it read, the
        fingerprints of the `datasets` it read, the figures its metrics name (under `figures`). A
        store that cannot be written is said once a job; the evaluation goes on."""
        metrics, seconds, replicates = result
        final, temporary = self.folder / key, self.folder / f".{key}.{os.getpid()}"
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            (temporary / FIGURES_DIR).mkdir(parents=True)
            for name in _figures(metrics):
                (temporary / FIGURES_DIR / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(figures / name, temporary / FIGURES_DIR / name)
            np.savez(temporary / REPLICATES_FILE, **replicates)
            (temporary / RESULT_FILE).write_text(json.dumps(
                {"metrics": metrics, "seconds": seconds, "splits": [list(s) for s in splits],
                 "datasets": dict(datasets)}), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            temporary.rename(final)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            log.warning("cannot keep the finished evaluation job in %s (%s): a stopped evaluation "
                        "will run it again", final, exc.strerror or exc)

    def clear(self) -> None:
        """Remove the store (the evaluation it served is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _figures(metrics: Mapping[str, Any]) -> list[str]:
    """The figure files (names relative to the figures folder) a job's {task: metrics} list, under
    each task's "figures" as :mod:`unimed.eval.tasks` has tasks list them."""
    return [name for task in metrics.values() for name in (task.get("figures") or {}).values()]
