"""Downstream data for evaluation: records per dataset and split, their images decoded once.

Images are cached as (N, 1, S, S) float32 tensors in [0, 1] (grey), per split and per sample a task
draws (:meth:`EvalData.sample_images`), so every encoder and every task reuses one decode; `rgb`
expands them to the 3 channels the encoders take. Two geometries:

* ``"crop"``: resize to ``resize_size`` then centre-crop ``image_size`` (the paper's zero-shot and
  classification transform, as in pre-training);
* ``"full"``: the whole image resized to ``image_size`` x ``image_size``, so boxes and masks map by
  a plain scale (segmentation, detection).

CT volumes (3D datasets) are cached as stacks of axial slices for the slice-wise adapter
(:meth:`EvalData.slice_stacks`).

A split (or sample) whose images or slice stacks take more than half the memory available is not
held: given a ``spill_dir`` (the evaluate command gives one in the run's evaluation folder, removed
when it ends), they are decoded once into a file there and read back as a memory-mapped array whose
pages the kernel loads on use and drops under pressure, so a task over a whole corpus (CheXpert's
223k training images for the linear probe, a LUNA16 candidates table) runs in bounded memory and
every encoder and worker process reuses one decode. Without one, the volume embeddings stream piece
by piece (:meth:`EvalData.stack_pieces`) and anything else is held, or one error where it exceeds
the memory available.

Files are decoded on as many threads as torch computes on (``torch.get_num_threads()``, at most
`MAX_DECODE_THREADS`): PIL's and zlib's decoders release the GIL, so on 2 cores the demo's splits
decode about 1.5x faster than in one thread (the 1,000 PNGs of the two zero-shot test sets: 1.4 s
against 2.2 s; 61 CC-CCII and 40 BIMCV volumes: 2.0 s against 3.1 s; three or four threads are
slower again), the order and the values unchanged.

Every dataset split whose images a task reads is published after the run (:meth:`EvalData.publish`)
as a split file listing its image ids, with the file's SHA-256, so a set can be reproduced exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from unimed.data.adapters import load_from_config
from unimed.data.config import DataConfig
from unimed.data.errors import UNREADABLE_IMAGE, DataError
from unimed.data.images import load_image
from unimed.data.records import Record
from unimed.data.transforms import eval_transform
from unimed.data.volumes import axial_depth, axial_slices, crop_cube, read_volume
from unimed.eval.errors import EvalError
from unimed.machine import available_memory

log = logging.getLogger(__name__)

GEOMETRIES = ("crop", "full")
SPLITS_DIR = "splits"
MAX_DECODE_THREADS = 8
STREAM_PIECE_BYTES = 2**30
"""The largest piece of slice stacks :meth:`EvalData.stack_pieces` reads at once when a split streams."""

_ALLOCATIONS = itertools.count()  # numbers the files EvalData.allocator makes in this process

R = TypeVar("R")
T = TypeVar("T")


def check_fits(shape: tuple[int, ...], what: str, dtype: torch.dtype = torch.float32) -> None:
    """An EvalError before a tensor of `shape` is allocated that the memory available now cannot
    hold (a split's decoded images, slice stacks or feature maps, where there is no spill folder):
    one line naming `what` and the sizes, where the process would otherwise be killed for memory
    after decoding or encoding for hours."""
    need = math.prod(shape) * dtype.itemsize
    available = available_memory()
    if available is not None and need > available:
        raise EvalError(f"{what} take {need / 2**30:.1f} GB in memory, more than the "
                        f"{available / 2**30:.1f} GB available; evaluate on a subset of the records "
                        "(data.candidate_negatives for a candidates table, else a subsample of the "
                        "dataset's table) or at a smaller size")


def check_disk(folder: Path, need: int, what: str) -> None:
    """An EvalError before `need` bytes are written under `folder` that the disk there cannot hold
    (free space of its nearest existing ancestor): one line naming `what`, the sizes and `folder`,
    where the write would otherwise fail after the volumes were decoded."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise EvalError(f"{what} take {need / 2**30:.1f} GB, more than half the memory available and "
                        f"more than the {free / 2**30:.1f} GB free on the disk of {folder}; evaluate on "
                        "a subset of the records (data.candidate_negatives for a candidates table, else "
                        "a subsample of the dataset's table) or at a smaller size")


def read_labelled(record: Record, *, size: int, depth: int, window: tuple[float, float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """((depth, size, size) image in [0, 1], (depth, size, size) int64 labels) of a labelled volume;
    a DataError names the label map when it is missing or its shape differs from the volume's."""
    if record.mask_path is None:
        raise DataError("no label map for this volume", record.image_path, reason=UNREADABLE_IMAGE)
    volume = read_volume(record.image_path)
    labels = read_volume(record.mask_path, labels=True)
    if labels.array.shape != volume.array.shape:
        raise DataError(f"label map shape {labels.array.shape} differs from its volume's "
                        f"{volume.array.shape} ({record.image_path})", record.mask_path,
                        reason=UNREADABLE_IMAGE)
    image = axial_slices(volume, size=size, slices=depth, window=window)
    return image, axial_slices(labels, size=size, slices=depth, labels=True).round().long()


def _too_large(nbytes: int) -> bool:
    """Whether `nbytes` exceed half the memory available now (unknown: never)."""
    available = available_memory()
    return available is not None and nbytes > available / 2


def _spilled(path: Path) -> torch.Tensor:
    """The float32 array of the .npy file `path`, memory-mapped copy-on-write (the file is never
    written back)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _write_once(path: Path, write: Callable[[Path], None], nbytes: int, what: str) -> None:
    """`write` the spill file `path` (`nbytes`, `what` for the messages) unless it is there, under
    an exclusive lock on a file beside it: another worker process of the run that needs the same
    file waits, then finds it written, rather than decoding the same split at the same time. A
    disk without room is one EvalError before `write` runs (:func:`check_disk`); so is a folder
    that cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock").open("a")  # closed by the with below
    except OSError as exc:
        raise EvalError(f"{what}: cannot write {path}: {exc.strerror or exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            check_disk(path.parent, nbytes, what)
            log.info("%s (%.1f GB) go to %s", what, nbytes / 2**30, path)
            _write_whole(path, write, what)


def _write_whole(path: Path, write: Callable[[Path], None], what: str) -> None:
    """`write` a file under a temporary name beside `path`, then rename it to `path`, so the file
    appears whole (another process of the run may be writing the same); an EvalError names `what`
    and `path` when it cannot be written (an unwritable folder, a full disk)."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # never created, or its folder cannot be made
            temporary.unlink()
        raise EvalError(f"{what}: cannot write {path}: {exc.strerror or exc}") from None


def _by_volume(records: Sequence[Record]) -> list[list[int]]:
    """The indices of `records` grouped by volume file, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(str(record.image_path), []).append(i)
    return list(groups.values())


class EvalData:
    """Lazily read, cached datasets of one evaluation run."""

    def __init__(self, cfg: DataConfig, *, progress: bool = False, spill_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.spill_dir = spill_dir  # where what is too large to hold goes (see the module docstring)
        self._records: dict[str, list[Record]] = {}
        self._images: dict[tuple[str, str | None, str], torch.Tensor] = {}
        self._samples: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self._slices: dict[tuple, torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]] = {}
        self._depths: dict[tuple[str, str], list[int]] = {}
        self._spill_keys: set[tuple] = set()  # keys of _slices memory-mapped from spill_dir
        self._noted: dict[tuple[str, str | None], None] = {}  # splits other processes read
        self._fingerprints: dict[str, str] = {}
        self._asked: list[set[str]] = []  # of each `asking` block open: the datasets asked for

    def decode(self, read: Callable[[R], T], items: Sequence[R], desc: str, unit: str
               ) -> Iterator[T]:
        """`read` of each item (a record, or the records of one volume), yielded in order, run on
        ``torch.get_num_threads()`` threads (at most `MAX_DECODE_THREADS`); the first error
        raises, and the reads not yet started are cancelled. An evaluation set is fixed when its
        dataset is read, so an image found unreadable here is not skipped under
        ``data.on_error=skip``: the error then says how to leave such images out."""
        pool = ThreadPoolExecutor(min(MAX_DECODE_THREADS, torch.get_num_threads()))
        try:
            yield from tqdm(pool.map(read, items), total=len(items), desc=desc, unit=unit,
                            disable=not self.progress)
        except DataError as err:
            if self.cfg.on_error != "skip" or self.cfg.check_images:
                raise
            raise DataError(f"{err.message} (data.on_error=skip leaves out the images found "
                            "unreadable when a dataset is read; with data.check_images=true every "
                            "image is read then)", err.path, err.line, err.column, err.reason) from None
        finally:
            pool.shutdown(cancel_futures=True)

    @property
    def image_size(self) -> int:
        """Side of the square images every task sees."""
        return self.cfg.image_size

    def records(self, dataset: str, split: str | None = None) -> list[Record]:
        """The dataset's records (one split, or all when `split` is None), in adapter order."""
        for asked in self._asked:
            asked.add(dataset)
        if dataset not in self._records:
            self._records[dataset] = load_from_config(dataset, self.cfg).records
        records = self._records[dataset]
        return records if split is None else [r for r in records if r.split == split]

    @contextlib.contextmanager
    def asking(self) -> Iterator[set[str]]:
        """The set of the datasets whose records are asked for inside the block (what an
        evaluation job read: :mod:`unimed.eval.jobs`)."""
        asked: set[str] = set()
        self._asked.append(asked)
        try:
            yield asked
        finally:
            self._asked.remove(asked)

    def fingerprint(self, dataset: str) -> str:
        """A SHA-256 of every field of every record of `dataset` and of the size and modification
        time of each file they name: a relabelled, regenerated or rewritten dataset has another."""
        if dataset not in self._fingerprints:
            digest = hashlib.sha256()
            for record in self.records(dataset):
                digest.update(repr(record).encode())
                for path in (record.image_path, record.mask_path):
                    with contextlib.suppress(OSError, TypeError):
                        stat = os.stat(path)
                        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            self._fingerprints[dataset] = digest.hexdigest()
        return self._fingerprints[dataset]

    def require(self, dataset: str, split: str | None = None) -> list[Record]:
        """`records`, but an empty result is an error naming the dataset, split and root."""
        records = self.records(dataset, split)
        if not records:
            where = f"split '{split}' of " if split else ""
            raise EvalError(f"no records in {where}dataset '{dataset}' under {self.cfg.root}")
        return records

    def images(self, dataset: str, split: str | None = None, geometry: str = "crop",
               size: int | None = None) -> torch.Tensor:
        """(N, 1, S, S) grey images of `records(dataset, split)` in the given geometry, S = `size`
        (a "full" geometry of its own, as the dense tasks' ``image_size`` asks) or `image_size`,
        decoded once and cached: in memory, or, where they take more than half the memory available
        and there is a ``spill_dir``, in a file there, memory-mapped back (as slice stacks)."""
        if geometry not in GEOMETRIES:
            raise EvalError(f"unknown geometry {geometry!r}; valid: {', '.join(GEOMETRIES)}")
        key = (dataset, split, geometry, size)
        if key not in self._images:
            self._images[key] = self._decoded(key, self.records(dataset, split), geometry,
                                              f"{dataset}/{split}", size)
        return self._images[key]

    def _decoded(self, name: tuple, records: Sequence[Record], geometry: str, desc: str,
                 size: int | None = None) -> torch.Tensor:
        """:meth:`load` of `records`, held; or, where they take more than half the memory available
        and there is a ``spill_dir``, decoded into a file there (named after `name`; one another
        worker of the run wrote is read as it is, one it is writing waited for) and memory-mapped
        back."""
        volumes = [r.image_path for r in records if r.ndim == 3]
        if volumes:
            raise EvalError(f"{desc}: {volumes[0]} is a volume; the 2D tasks need images (a CT "
                            "dataset goes in the 3D tasks' eval.volume.* lists)")
        side = size or self.image_size
        shape = (len(records), 1, side, side)
        nbytes = math.prod(shape) * torch.float32.itemsize
        if self.spill_dir is None or not _too_large(nbytes):
            return self.load(records, geometry, desc, size=size)
        path, what = self._spill_path(*name), f"{desc}: {len(records)} images of {side} px"

        def write(temporary: Path) -> None:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
            self.load(records, geometry, desc, size=size, out=torch.from_numpy(out))
            out.flush()

        _write_once(path, write, nbytes, what)
        return _spilled(path)

    def sample_images(self, records: Sequence[Record], geometry: str = "crop",
                      desc: str = "images") -> torch.Tensor:
        """(N, 1, S, S) images of `records`, a sample a task draws (not a whole split), decoded
        once per run: every encoder reads the same decode (cached by the records' image paths)."""
        if geometry not in GEOMETRIES:
            raise EvalError(f"unknown geometry {geometry!r}; valid: {', '.join(GEOMETRIES)}")
        key = (geometry, tuple(str(r.image_path) for r in records))
        if key not in self._samples:
            self._samples[key] = self._decoded(("sample", desc, *key), records, geometry, desc)
        return self._samples[key]

    def slice_stacks(self, dataset: str, split: str, slices: int, window: tuple[float, float],
                     side: int | None = None) -> torch.Tensor:
        """(N, slices, 1, S, S) axial slices of the volumes of `records(dataset, split)`
        (:func:`unimed.data.volumes.axial_slices`; of its cube, for a record with a `crop`), S =
        `side` (default ``image_size``; a native 3D model's own, :meth:`Encoder.volume_grid`), read
        on the decoding threads and cached. Records of one volume (the candidates of a series) are
        read from one reading of it. Stacks taking more than half the memory available are
        memory-mapped from ``spill_dir`` (:meth:`_spill_stacks`) where there is one; else an
        EvalError before any reading when they exceed the memory available."""
        side = side or self.image_size
        key = (dataset, split, slices, tuple(window), side)
        if key not in self._slices:
            records = self._volume_records(dataset, split)
            shape = (len(records), slices, 1, side, side)
            if self.spill_dir is not None and _too_large(math.prod(shape) * torch.float32.itemsize):
                self._slices[key] = self._spill_stacks(dataset, split, slices, window, shape)
            else:
                check_fits(shape, f"{dataset}/{split}: {len(records)} volumes x {slices} slices of "
                                  f"{side} px")
                [(_, self._slices[key])] = self._read_stacks(dataset, split, slices, window, side,
                                                             [list(range(len(records)))])
        return self._slices[key]

    def stack_pieces(self, dataset: str, split: str, slices: int, window: tuple[float, float],
                     side: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """The slice stacks of :meth:`slice_stacks` as (record indices, (n, slices, 1, S, S))
        pieces, for a task that needs one piece at a time (a volume embedding): the whole split as
        one piece, read and cached by :meth:`slice_stacks`, when it is held or takes at most half
        the memory available now; else pieces of at most `STREAM_PIECE_BYTES` (whole volumes: a
        series' candidates stay in one piece), copied one after another from the split's stacks
        in ``spill_dir`` (written there once), or, without one, read one after another and dropped
        after use, so memory holds a piece or two however large the split."""
        side = side or self.image_size
        key = (dataset, split, slices, tuple(window), side)
        records = self._volume_records(dataset, split)
        per_record = slices * side**2 * torch.float32.itemsize
        if key not in self._spill_keys and (key in self._slices or not _too_large(len(records) * per_record)):
            yield list(range(len(records))), self.slice_stacks(dataset, split, slices, window, side)
            return
        pieces = self._pieces(records, per_record)
        log.info("%s/%s: %d volumes x %d slices in %d piece(s) (%.1f GB in all, %s)", dataset, split,
                 len(records), slices, len(pieces), len(records) * per_record / 2**30,
                 "streamed" if self.spill_dir is None else f"on disk in {self.spill_dir}")
        if self.spill_dir is None:
            yield from self._read_stacks(dataset, split, slices, window, side, pieces)
            return
        stacks = self.slice_stacks(dataset, split, slices, window, side)
        for piece in pieces:
            yield piece, stacks[piece]

    @staticmethod
    def _pieces(records: Sequence[Record], per_record: int) -> list[list[int]]:
        """Ascending indices into `records`, grouped into pieces of at most `STREAM_PIECE_BYTES`
        of whole volumes (`per_record` bytes each; a volume larger than that is a piece of its own)."""
        pieces: list[list[int]] = [[]]
        for group in _by_volume(records):
            if pieces[-1] and (len(pieces[-1]) + len(group)) * per_record > STREAM_PIECE_BYTES:
                pieces.append([])
            pieces[-1].extend(group)
        return [sorted(p) for p in pieces]

    def allocator(self, *name: object, what: str) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
        """A function (shape, dtype) -> an uninitialised tensor for a task's per-split output (an
        encoder's feature maps of a split, `what`): in memory, or, where it would take more than
        half the memory available and there is a ``spill_dir``, a memory-mapped file there, named
        after `name`, this process and a count, so no two allocations share one. Without a spill
        folder, a tensor larger than the memory available is one EvalError naming `what` and the
        shape."""

        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nbytes = math.prod(shape) * dtype.itemsize
            described = f"{what} {tuple(shape)}"
            if self.spill_dir is None or not _too_large(nbytes):
                check_fits(shape, described, dtype)
                return torch.empty(shape, dtype=dtype)
            path = self._spill_path(*name)
            path = path.with_name(f"{path.stem}.{os.getpid()}.{next(_ALLOCATIONS)}{path.suffix}")
            check_disk(path.parent, nbytes, described)
            log.info("%s (%.1f GB) go to %s", described, nbytes / 2**30, path)
            numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                array = np.lib.format.open_memmap(path, mode="w+", dtype=numpy_dtype, shape=shape)
            except OSError as exc:
                raise EvalError(f"{described}: cannot write {path}: {exc.strerror or exc}") from None
            return torch.from_numpy(array)

        return allocate

    def _spill_path(self, *key: object) -> Path:
        """The file in ``spill_dir`` of one cached array, named after its dataset and split and a
        digest of its whole key (what was read, how)."""
        digest = hashlib.sha256(repr((key, self.image_size)).encode()).hexdigest()[:16]
        name = re.sub(r"[^\w.-]", "_", f"{key[0]}-{key[1]}")  # a dataset name is no path
        return self.spill_dir / f"{name}-{digest}.npy"

    def _spill_stacks(self, dataset: str, split: str, slices: int, window: tuple[float, float],
                      shape: tuple[int, ...]) -> torch.Tensor:
        """The stacks of :meth:`slice_stacks` written piece by piece (:meth:`_pieces`) to an .npy
        file in ``spill_dir`` and memory-mapped back, with the volumes' depths beside it; a file
        another worker of the run wrote is read as it is, one it is writing waited for
        (:func:`_write_once`). An EvalError names the file when it cannot be written."""
        side = shape[-1]
        path = self._spill_path(dataset, split, slices, tuple(window), side)
        depths_path = path.with_suffix(".depths.json")
        records = self._volume_records(dataset, split)
        nbytes = math.prod(shape) * torch.float32.itemsize
        what = f"{dataset}/{split}: {len(records)} volumes x {slices} slices of {side} px"

        def write(temporary: Path) -> None:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
            pieces = self._pieces(records, math.prod(shape[1:]) * torch.float32.itemsize)
            for piece, stacks in self._read_stacks(dataset, split, slices, window, side, pieces):
                out[piece] = stacks.numpy()
            out.flush()
            _write_whole(depths_path, lambda json_file: json_file.write_text(
                json.dumps(self._depths[(dataset, split)]), encoding="utf-8"), what)

        _write_once(path, write, nbytes, what)
        if (dataset, split) not in self._depths:  # written by another process: its depths are on disk
            self._depths[(dataset, split)] = json.loads(depths_path.read_text(encoding="utf-8"))
        self._spill_keys.add((dataset, split, slices, tuple(window), side))
        return _spilled(path)

    def _read_stacks(self, dataset: str, split: str, slices: int, window: tuple[float, float],
                     side: int, pieces: Sequence[list[int]]
                     ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, (n, slices, 1, S, S) stacks in their order, S = `side`) per piece of
        `pieces`, ascending indices into `records(dataset, split)`; each volume is read once, on
        the decoding threads, for all its records in the piece. The volumes' own depths are noted
        for :meth:`native_depths` once every piece is read."""
        records = self._volume_records(dataset, split)
        depths = [0] * len(records)

        def read(group: list[int]) -> list[tuple[torch.Tensor, int]]:
            volume = read_volume(records[group[0]].image_path)
            out = []
            for i in group:
                crop = records[i].crop
                view = crop_cube(volume, (crop.x, crop.y, crop.z), crop.size_mm) if crop else volume
                out.append((axial_slices(view, size=side, slices=slices, window=window),
                            view.array.shape[2]))
            return out

        for piece in pieces:
            row = {index: k for k, index in enumerate(piece)}
            groups = [[piece[k] for k in group] for group in _by_volume([records[i] for i in piece])]
            stacks = torch.empty(len(piece), slices, 1, side, side)
            for group, read_back in zip(groups, self.decode(read, groups, f"{dataset}/{split}", "volume")):
                for i, (stack, depth) in zip(group, read_back):
                    stacks[row[i], :, 0] = stack
                    depths[i] = depth
            yield piece, stacks
        self._depths[(dataset, split)] = depths

    def native_depths(self, dataset: str, split: str) -> list[int]:
        """Per volume of `records(dataset, split)`, its own number of axial slices (RAS z), which
        slice ground truth counts in (a candidate's, its cube's); noted while :meth:`slice_stacks`
        reads the volumes, else read from their headers (:func:`~unimed.data.volumes.axial_depth`)."""
        key = (dataset, split)
        if key not in self._depths:
            self._depths[key] = [axial_depth(r.image_path, r.crop.size_mm if r.crop else None)
                                 for r in self._volume_records(dataset, split)]
        return self._depths[key]

    def native_slices(self, dataset: str, split: str, window: tuple[float, float]) -> list[torch.Tensor]:
        """Per volume of `records(dataset, split)`, all its axial slices ((Z, 1, S, S), inferior to
        superior, Z the volume's own depth), cached: what slice localisation scores. With a
        ``spill_dir``, volumes are held while they take at most half the memory available, the
        others written there, one file each, and memory-mapped back."""
        key = (dataset, split, None, tuple(window))
        if key not in self._slices:
            available = available_memory()
            budget = None if self.spill_dir is None or available is None else available / 2
            held, lock = 0, threading.Lock()

            def read(item: tuple[int, Record]) -> torch.Tensor:
                nonlocal held
                index, record = item
                path = None if budget is None else self._spill_path(dataset, split, "native",
                                                                     tuple(window), index)
                if path is not None and path.is_file():
                    return _spilled(path)
                volume = read_volume(record.image_path)
                stack = axial_slices(volume, size=self.image_size, slices=volume.array.shape[2],
                                     window=window)[:, None]
                if path is None:
                    return stack
                with lock:
                    keep = held + stack.nbytes <= budget
                    held += stack.nbytes if keep else 0
                if keep:
                    return stack
                _write_whole(path, lambda temporary: np.save(temporary, stack.numpy()),
                             f"{dataset}/{split}: the slices of {record.image_path}")
                return _spilled(path)

            items = list(enumerate(self._volume_records(dataset, split)))
            self._slices[key] = list(self.decode(read, items, f"{dataset}/{split}", "volume"))
        return self._slices[key]

    def labelled_volumes(self, dataset: str, split: str, depth: int, window: tuple[float, float]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, depth, S, S) windowed volumes, (N, depth, S, S) int64 label maps) of the labelled
        volumes of `records(dataset, split)` (BCV), read on the decoding threads and cached, in
        memory or, each taking more than half the memory available, in ``spill_dir``
        (:meth:`allocator`)."""
        key = (dataset, split, depth, tuple(window), "labelled")
        if key not in self._slices:
            def read(record: Record) -> tuple[torch.Tensor, torch.Tensor]:
                return read_labelled(record, size=self.image_size, depth=depth, window=window)

            records = self._volume_records(dataset, split)
            shape = (len(records), depth, self.image_size, self.image_size)
            allocate = self.allocator(*key, what=f"{dataset}/{split}: {len(records)} labelled volumes")
            volumes, labels = allocate(shape, torch.float32), allocate(shape, torch.int64)
            for i, (volume, label) in enumerate(self.decode(read, records, f"{dataset}/{split}", "volume")):
                volumes[i], labels[i] = volume, label
            self._slices[key] = (volumes, labels)
        return self._slices[key]

    def _volume_records(self, dataset: str, split: str) -> list[Record]:
        """`records(dataset, split)`, which must all be volumes (an EvalError names the first
        that is not)."""
        records = self.records(dataset, split)
        flat = [r.image_path for r in records if r.ndim != 3]
        if flat:
            raise EvalError(f"{dataset}: {flat[0]} is not a volume; the 3D tasks need a 3D dataset")
        return records

    def image_id(self, record: Record) -> str:
        """The record's id in split files relative to the data root (:meth:`Record.image_key`)."""
        return record.image_key(self.cfg.root)

    def splits_read(self) -> list[tuple[str, str | None]]:
        """(dataset, split) of every split whose images or volumes were read so far, here or (noted
        by :meth:`note_read`) in a worker process of the same run, first read first."""
        read = [(d, s) for d, s, *_ in self._images] + [(d, s) for d, s, *_ in self._slices]
        return list(dict.fromkeys([*self._noted, *read]))

    def note_read(self, splits: Sequence[tuple[str, str | None]]) -> None:
        """Count `splits` ((dataset, split) pairs a worker process of this run read) as read."""
        self._noted.update(dict.fromkeys(splits))

    def publish(self, out_dir: Path) -> dict[str, dict[str, object]]:
        """Write one split file per dataset split read so far (:meth:`splits_read`;
        `<out_dir>/splits/<dataset>_<split>.txt`, one image id per line in adapter order) and return
        {"<dataset>/<split>": {"file" (relative to `out_dir`), "sha256", "images"}}."""
        published = {}
        for dataset, split in self.splits_read():
            name = f"{dataset}/{split or 'all'}"
            text = "".join(self.image_id(r) + "\n" for r in self.records(dataset, split))
            relative = Path(SPLITS_DIR) / f"{dataset}_{split or 'all'}.txt"
            (out_dir / SPLITS_DIR).mkdir(parents=True, exist_ok=True)
            (out_dir / relative).write_text(text, encoding="utf-8")
            published[name] = {"file": relative.as_posix(),
                               "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                               "images": text.count("\n")}
        return published

    def load(self, records: Sequence[Record], geometry: str, desc: str = "images",
             size: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode and resize the images of `records` (uncached) to `size` (default `image_size`)
        into `out` ((N, 1, S, S), e.g. a memory-mapped file) or a new tensor; `size` is for the
        "full" geometry only. A JPEG decodes at the smallest DCT scale that keeps both sides at
        least the size it is resized to (as pre-training reads it)."""
        if size is not None and geometry != "full":
            raise EvalError(f"an image size of its own is for the 'full' geometry, not {geometry!r}")
        size = size or self.cfg.image_size
        resize = self.cfg.resize_size if geometry == "crop" else size
        transform = eval_transform(size, resize)
        if out is None:
            check_fits((len(records), 1, size, size), f"{desc}: {len(records)} images of {size} px")
            out = torch.empty(len(records), 1, size, size)

        def read(record: Record) -> torch.Tensor:
            return transform(load_image(record.image_path, min_side=resize))[:1]

        for i, image in enumerate(self.decode(read, records, desc, "img")):
            out[i] = image
        return out


def rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) -> (N, 3, S, S) view, the input the image encoders take."""
    return images.expand(-1, 3, -1, -1)


def fraction_indices(n: int, fraction: float, min_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `n` training items: `fraction` of them, at least
    `min_images` (or all `n`). Subsets of one seed are nested: 1% is inside 10% is inside 100%."""
    count = min(n, max(int(round(fraction * n)), min_images))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:count])
