"""Structured training logs: one JSON line per logged step, mirrored to TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Appends rows to `<out_dir>/train_log.jsonl` and, if asked, writes them as TensorBoard
    scalars under `<out_dir>/tensorboard`. Disabled (writes nothing) on ranks other than 0.

    A run that starts at `start_step` (a resumed one; 0 for a fresh one) continues the log: rows
    of later steps, left by an earlier run past the checkpoint resumed from, are dropped first
    (TensorBoard events too), so each step is logged once.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True,
                 filename: str = "train_log.jsonl", start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._file = None
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, start_step)
            self._file = self.path.open("a", encoding="utf-8")
            if tensorboard:
                self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                             purge_step=start_step + 1)

    def log(self, row: dict[str, float]) -> None:
        """Write one row (must hold `step`); numbers other than step/epoch become scalars."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of `path` up to `step` (rewritten atomically); a row cut short by a crash is
    dropped too. Nothing to do without a file."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    """The step of a log line; infinity for a line that is not a whole row."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
