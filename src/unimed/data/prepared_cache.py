"""A persistent on-disk cache of prepared inputs, for the pre-training loaders.

Reading a CT volume means decompressing a NIfTI file of a few hundred slices, orienting it and
resizing it, about a second per volume on one core at the size of BIMCV-COVID19+; decoding a
MIMIC-CXR-sized JPEG takes about 9 ms even at its smallest useful DCT scale (both measured by
``benchmarks/data_pipeline.py``). What the loader needs of a file is the same every epoch (a CT
volume's fixed-size input, since volumes get no augmentation; an X-ray decoded and resized as the
augmented views start from it), so each prepared array is written once as a ``.npy`` file
(bit-identical to a fresh read) and read back from then on: ``data.volume_cache`` for the 3D loader,
``data.image_cache`` for the X-ray loaders.

An entry is keyed by the source file's resolved path, size and modification time (a source that is a
folder, a DICOM series or slice images: those of every file in it, since a file rewritten in place
leaves the folder's own time as it was; a MetaImage header: those of its data file too), and by a
tag that names the preparation (a volume's shape and HU window, an image's decoding scale and size):
a changed file or a different preset never reads a stale entry. Entries are written to a temporary
name and renamed into place, so loader workers and ranks that prepare the same file at once cannot
leave a half-written entry. An entry that cannot be read (a truncated file, say) is prepared again
from its source and rewritten, with a warning naming it, as is one that is not what it was prepared
as (its `check`, such as :func:`unit_array`, says what is wrong). A source that cannot be read
raises its :class:`~unimed.data.errors.DataError` as without a cache, and nothing is written for it.
A write that fails (a full disk, say) is said once; that process then reads from the cache what is
there and writes no more.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from unimed.data.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "2"
"""Bumped when the preparation of an entry changes in a way its tag does not say."""


UNIT_TOLERANCE = 1e-4
"""How far a cached input's values may stray from [0, 1] (float rounding of a resize whose weights
are not negative)."""


def unit_array(shape: tuple[int, ...]) -> Callable[[np.ndarray], str | None]:
    """The `check` of a cache whose entries are float32 arrays of `shape` with values in [0, 1]: what
    an entry overwritten with another valid ``.npy`` (trained on as the input without a word, a NaN one
    stopping training as "diverged") has otherwise, or None."""
    size = " x ".join(map(str, shape))

    def wrong(array: np.ndarray) -> str | None:
        if array.shape != shape or array.dtype != np.float32:
            return f"a {array.dtype} array of shape {array.shape}, not float32 {size}"
        if not (array.min() >= -UNIT_TOLERANCE and array.max() <= 1 + UNIT_TOLERANCE):  # NaN fails
            return f"values {array.min():g} .. {array.max():g}, outside 0 .. 1"
        return None

    return wrong


def source_files(path: Path) -> list[Path]:
    """The files a source is read from: a folder's files (a DICOM series, slice images), by name;
    a file alone."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _state(path: Path, files: list[Path]) -> tuple[str, ...]:
    """What tells a changed source: the size and modification time of each of its files."""
    if files == [path]:
        stat = path.stat()
        return str(stat.st_size), str(stat.st_mtime_ns)
    return tuple(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


class PreparedCache:
    """Prepared inputs under `folder`, one ``<hash>.npy`` per (source file, `tag`); `setting` is
    the config key that named the folder and `what` the kind of source, for the messages."""

    def __init__(self, folder: str | Path, tag: str, *, setting: str = "data.volume_cache",
                 what: str = "volume", check: Callable[[np.ndarray], str | None] | None = None,
                 files: Callable[[Path], list[Path]] = source_files) -> None:
        self.folder = Path(folder)
        self.tag = tag
        self.files = files  # the files a source is read from, whose changes make a new entry
        self.setting, self.what = setting, what
        self.check = check  # what is wrong with an entry that `prepare` would not have made, if anything
        self.writing = True  # until a write fails (a full disk, say): then reads only
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise DataError(f"{self.setting}: cannot write here ({err.strerror or err})",
                            self.folder) from None

    def entry(self, path: Path) -> Path | None:
        """The cache file of `path`, or None when `path` cannot be stat'ed (the reader says why)."""
        try:
            state = _state(path, self.files(path))
        except OSError:
            return None
        key = "\0".join((FORMAT, str(path.resolve()), *state, self.tag))
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def load(self, path: str | Path, prepare: Callable[[Path], np.ndarray]) -> np.ndarray:
        """The prepared input of `path`: read from the cache, or `prepare(path)` then cached."""
        path = Path(path)
        entry = self.entry(path)
        if entry is None:
            return prepare(path)
        try:
            array = np.load(entry, allow_pickle=False)
            wrong = None if self.check is None else self.check(array)
            if wrong is None:
                return array
            log.warning("%s cache entry %s of %s is not what it was prepared as (%s); preparing it "
                        "again", self.what, entry, path, wrong)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError) as err:
            log.warning("%s cache entry %s of %s is unreadable (%s); preparing it again",
                        self.what, entry, path, err)
        array = prepare(path)
        if self.writing:
            self._write(entry, array)
        return array

    def _write(self, entry: Path, array: np.ndarray) -> None:
        tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            self.writing = False
            log.warning("%s cache entry %s not written (%s); this process writes no more entries "
                        "to %s and reads its other %ss from their sources", self.what, entry,
                        err.strerror or err, self.folder, self.what)
