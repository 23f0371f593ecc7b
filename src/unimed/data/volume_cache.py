"""A persistent on-disk cache of prepared CT inputs, for the 3D pre-training loader.

Reading a CT volume means decompressing a NIfTI file of a few hundred slices, orienting it and
resizing it, about a second per volume on one core at the size of BIMCV-COVID19+ (measured by
``benchmarks/data_pipeline.py --volumes``). The network sees a small fixed-size input (UniMedI's
preset: 32 x 128 x 128), the same every epoch since CT volumes get no augmentation. So each prepared
input is written once as a ``.npy`` file (float32, bit-identical to a fresh read) and read back
from then on.

An entry is keyed by the source file's resolved path, size and modification time, and by a tag
that names the preparation (shape and HU window): a changed file or a different preset never reads
a stale entry. Entries are written to a temporary name and renamed into place, so loader workers
and ranks that prepare the same volume at once cannot leave a half-written entry. An entry that
cannot be read (a truncated file, say) is prepared again from its source and rewritten, with a
warning naming it. A source that cannot be read raises its :class:`~unimed.data.errors.DataError`
as without a cache, and nothing is written for it.
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

FORMAT = "1"
"""Bumped when the preparation of an entry changes in a way its tag does not say."""


class VolumeCache:
    """Prepared inputs under `folder`, one ``<hash>.npy`` per (source file, `tag`)."""

    def __init__(self, folder: str | Path, tag: str) -> None:
        self.folder = Path(folder)
        self.tag = tag
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise DataError(f"data.volume_cache: cannot write here ({err.strerror or err})",
                            self.folder) from None

    def entry(self, path: Path) -> Path | None:
        """The cache file of `path`, or None when `path` cannot be stat'ed (the reader says why)."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = "\0".join((FORMAT, str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), self.tag))
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def load(self, path: str | Path, prepare: Callable[[Path], np.ndarray]) -> np.ndarray:
        """The prepared input of `path`: read from the cache, or `prepare(path)` then cached."""
        path = Path(path)
        entry = self.entry(path)
        if entry is None:
            return prepare(path)
        try:
            return np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError) as err:
            log.warning("volume cache entry %s of %s is unreadable (%s); preparing it again",
                        entry, path, err)
        array = prepare(path)
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
            log.warning("volume cache entry %s not written (%s); the volume is read from its "
                        "source again next time", entry, err.strerror or err)
