"""CLI sub-commands: each turns a resolved Config into library calls and prints a summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from unimed.config import Config, save_config
from unimed.errors import ConfigError, why_unwritable
from unimed.machine import describe_software, software

log = logging.getLogger(__name__)

Handler = Callable[[Config, argparse.Namespace], int]
ArgAdder = Callable[[argparse.ArgumentParser], None]
DefaultConfig = Callable[[argparse.Namespace], str | None]


def _no_args(parser: argparse.ArgumentParser) -> None:
    """Sub-commands without arguments of their own."""


def _no_default(args: argparse.Namespace) -> None:
    """Sub-commands whose config comes only from a preset and overrides."""


@dataclasses.dataclass(frozen=True)
class Command:
    """A sub-command: its help, handler, own arguments (added before the shared preset and
    overrides, so they may be positional), the preset used when none is given, and whether it runs
    under torchrun (one process per rank) or only as one process."""

    help: str
    handler: Handler
    add_args: ArgAdder = _no_args
    default_config: DefaultConfig = _no_default
    distributed: bool = False


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help_text: str, add_args: ArgAdder = _no_args, default_config: DefaultConfig = _no_default,
    *, distributed: bool = False,
) -> Callable[[Handler], Handler]:
    """Register a sub-command handler under `name`."""

    def decorator(fn: Handler) -> Handler:
        COMMANDS[name] = Command(help_text, fn, add_args, default_config, distributed)
        return fn

    return decorator


def run_dir(cfg: Config, subdir: str | None = None) -> Path:
    """The run's output directory, created, with the resolved config saved in it; a folder that
    cannot be written is a ConfigError naming it."""
    out = cfg.run.dir if subdir is None else cfg.run.dir / subdir
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    return out


def _unwritable(folder: Path, exc: OSError, setting: str = "run.output_dir") -> ConfigError:
    """Why `folder` cannot be written, naming the file that stands where it or a folder above it
    should be (the OSError says only "File exists" or "Not a directory")."""
    what = "the run folder" if setting == "run.output_dir" else "the folder"
    return ConfigError(f"cannot write {what} {folder} ({why_unwritable(folder, exc)}); set {setting} to a "
                       "writable folder")


class JobLog(logging.FileHandler):
    """A job's log file (:func:`job_log`). A write that fails (a full disk) is said once on the
    console, and the file takes no more lines: the job goes on, as it does where the file cannot be
    opened. A log is not worth a run."""

    def __init__(self, path: Path, job: str) -> None:
        super().__init__(path, encoding="utf-8")
        self.job = job
        self.failed = False
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))
        self.setLevel(logging.INFO)

    def write(self, text: str) -> None:
        """`text` straight into the file (a header, the line saying why the job stopped)."""
        if self.failed:
            return
        try:
            self.stream.write(text)
            self.flush()
        except OSError as exc:
            self.fail(exc)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.fail(sys.exc_info()[1])

    def fail(self, exc: BaseException | None) -> None:
        """Stop writing the file and say so, once."""
        if self.failed:
            return
        self.failed = True
        logging.getLogger().removeHandler(self)
        why = getattr(exc, "strerror", None) or exc
        log.warning("cannot write the log file %s (%s): this %s is logged on the console only from "
                    "here", self.baseFilename, why, self.job)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # the last lines could not be flushed
            self.fail(exc)


def to_job_logs(text: str) -> None:
    """Append `text` as it is to the job logs open in this process (:func:`job_log`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, JobLog):
            handler.write(f"{text}\n")


def say(text: str) -> None:
    """Print a line of a command's summary (a failed check and its cause, the tally of the checks)
    and append it to the open job logs, so that a log ends as the console does."""
    print(text)
    to_job_logs(text)


@contextlib.contextmanager
def job_log(folder: Path, job: str) -> Iterator[None]:
    """Append what this process logs while `job` runs (the lines the console shows, each with its
    time; a forked evaluation worker's too) to ``<job>.log`` in `folder`, under a line naming the
    job; when the job raises, why it stopped is the last line. The console's progress bars and
    summary tables are not log lines and stay on the console. A file that cannot be opened or
    written is a warning (:class:`JobLog`), and the job goes on without it."""
    path = folder / f"{job.replace(' ', '-')}.log"
    try:
        handler: JobLog | None = JobLog(path, job)
    except OSError as exc:
        log.warning("cannot write the log file %s (%s): this %s is logged on the console only",
                    path, exc.strerror or exc, job)
        handler = None
    if handler is not None:
        since = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        handler.write(f"--- unimed {job}, pid {os.getpid()} on {socket.gethostname()}, {since}\n"
                      f"--- {describe_software(software())}\n")
        if not handler.failed:
            logging.getLogger().addHandler(handler)
    try:
        yield
    except BaseException as exc:
        if handler is not None:
            handler.write(f"stopped: {type(exc).__name__}: {exc}\n" if str(exc) else
                          f"stopped: {type(exc).__name__}\n")
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


@contextlib.contextmanager
def holding(folder: Path, job: str, setting: str = "run.output_dir", *, logged: bool = True
            ) -> Iterator[None]:
    """Hold `folder` for this process while it writes `job` there (a stage's checkpoints, an
    evaluation, the phantom world): a second unimed process that would write the same `job` into
    the same folder at the same time (a job started twice, a scheduler's requeue while the first
    still runs) stops with one ConfigError naming the holder, before it writes anything; two
    processes writing one folder would mix their checkpoints, or move each other's evaluation away.

    The hold is an advisory lock (``flock``) on ``.unimed-<job>.lock`` in `folder`, released when
    the process ends however it ends, so a killed run leaves none behind; the file holds the
    holder's line while the job runs and is left empty after it. A file system without
    locks (some network mounts) is a warning, and the job goes on unguarded; a folder that cannot
    be written is a ConfigError naming the `setting` that chose it.

    While it holds the folder, what the process logs also goes to ``<job>.log`` there
    (:func:`job_log`) unless `logged` is False."""
    path = folder / f".unimed-{job.replace(' ', '-')}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise _unwritable(folder, exc, setting) from None
    with handle:
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has just started"
            raise ConfigError(f"{folder} is in use: another unimed process ({holder}) is writing "
                              f"its {job} there; wait for it to end, or write to another folder "
                              "(run.output_dir, run.name)") from None
        except OSError as exc:
            log.warning("cannot lock %s (%s): a second process writing the %s there at the same "
                        "time would not be stopped", path, exc.strerror or exc, job)
            locked = False
        if locked:
            since = datetime.datetime.now().isoformat(timespec="seconds")
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
            handle.flush()
        logging_to = job_log(folder, job) if logged else contextlib.nullcontext()
        try:
            with logging_to:
                yield
        finally:  # the holder's line goes with the hold: two worlds of one seed stay equal, file for file
            if locked:
                with contextlib.suppress(OSError):
                    handle.truncate(0)


from unimed.commands import phantom  # noqa: E402,F401  (each module registers its sub-commands)
from unimed.commands import train  # noqa: E402,F401
from unimed.commands import evaluate  # noqa: E402,F401
from unimed.commands import ablate  # noqa: E402,F401
from unimed.commands import demo  # noqa: E402,F401
from unimed.commands import check_data  # noqa: E402,F401
from unimed.commands import inference  # noqa: E402,F401
