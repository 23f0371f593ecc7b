"""Structured training logs: one JSON line per logged step, mirrored to TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Appends rows to `<out_dir>/train_log.jsonl` and, if asked, writes them as TensorBoard
    scalars under `<out_dir>/tensorboard`. Disabled (writes nothing) on ranks other than 0."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True,
                 filename: str = "train_log.jsonl") -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._file = None
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Append, so a resumed run continues the same log.
            self._file = self.path.open("a", encoding="utf-8")
            if tensorboard:
                self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

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
