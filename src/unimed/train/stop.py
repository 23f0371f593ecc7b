"""Stopping a training run without losing it: SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption or
time limit, ``scancel``, torchrun shutting its workers down) lets the optimizer step in progress
finish; the training loop then saves a checkpoint at that step and ends with
:class:`TrainingInterrupted`, from which ``--resume`` continues on the same loss curve. A second
signal acts as it did before (Ctrl-C twice stops at once).

Under torchrun the ranks stop at the same step even when the signal reaches only some of them (the
loop adds the request to the all-reduce every step already makes). DataLoader workers ignore the
two signals (:func:`leave_stop_signals_to_training`): Ctrl-C reaches a terminal's whole process group, and a
worker killed by SIGTERM would make PyTorch raise in the main process before the checkpoint is
written; the workers are ended when training ends, however it ends (:func:`end_workers`).

A step whose loss or gradient is not finite ends training with :class:`TrainingDiverged` before a
checkpoint takes the NaN or inf weights (:meth:`unimed.train.loop.Trainer._check_finite`), so the
newest checkpoint is still one to resume from.

Outside training, :func:`terminate_as_interrupt` (around every command) turns SIGTERM into
:class:`Terminated`, so a command ends as Ctrl-C ends it, and worker pools' processes
(:func:`leave_interrupts_to_parent`) leave both signals to their parent and end with it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


class TrainingDiverged(RuntimeError):
    """A training step gave a non-finite loss or gradient; the message names the step, the values
    and the newest checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after `step`, with a checkpoint saved at that step; a
    KeyboardInterrupt, so ``except Exception`` does not swallow it. `complete`: the signal came
    during the stage's last step, so its training is whole, and the command stops all the same
    (an ablation's next row, the demo's next stage are not started)."""

    def __init__(self, received: signal.Signals | None, step: int, checkpoint: Path,
                 complete: bool = False) -> None:
        self.received, self.step, self.checkpoint = received, step, checkpoint
        self.complete = complete
        what = received.name if received is not None else "a stop signal to another rank"
        done = " (its last: the stage's training is complete)" if complete else ""
        super().__init__(f"training stopped by {what} after step {step}{done}: checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.received if self.received is not None else signal.SIGTERM)


class StopRequest:
    """While entered, the first SIGINT or SIGTERM is recorded in :attr:`received` (and said)
    instead of ending the process, and the previous handlers are put back at once (and on exit).
    Outside the main thread, where Python cannot catch signals, it installs nothing and
    :attr:`received` stays None."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self._restore()  # a second signal, of either kind, acts as it did before
        log.warning("%s: the step in progress finishes, then a checkpoint is saved and training stops "
                    "(send it again to stop at once)", self.received.name)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (:func:`terminate_as_interrupt`): the command ends as Ctrl-C ends
    it, its workers stopped and a replaced evaluation put back, in one line with the shell's 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While entered, SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt, instead of ending the process where it stands (its worker processes left
    running, files half written). Training's :class:`StopRequest` takes SIGTERM over while it
    runs. Outside the main thread it installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def leave_interrupts_to_parent() -> None:
    """A worker process's initializer (the phantom's writers, the evaluation's workers): Ctrl-C,
    which a terminal sends to its whole process group, is left to the parent, which stops its
    workers, so an interrupted command ends in one line rather than a traceback per worker.
    SIGTERM kills the worker as it would have before the parent's :func:`terminate_as_interrupt`,
    and on Linux the worker ends with its parent (the parent-death signal): a parent killed
    outright (SIGKILL, the OOM killer) leaves no worker behind, idle and holding its memory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)


@contextlib.contextmanager
def forked_pool(workers: int, killed: Callable[[str], Exception], initializer: Callable[..., None],
                initargs: tuple = ()) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """A pool of `workers` forked processes (`initializer` should leave interrupts to this process:
    :func:`leave_interrupts_to_parent`), shut down when the block ends. An exception in the block
    (a failed job, an interrupt, a caller that stopped reading) stops it now: its workers are
    terminated rather than left to finish the jobs they hold, the jobs not started dropped. A worker
    that died (the kernel's out-of-memory killer sends SIGKILL) is raised as ``killed(how)``, `how`
    saying how it ended (:func:`how_it_ended`), instead of the pool's BrokenProcessPool. The pool's
    own thread reaps the stopped workers; joining them here as well raced with it (a worker could
    be left looking alive, its exit status taken by the other thread's wait)."""
    others = set(multiprocessing.active_children())
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=initializer, initargs=initargs)
    pool.submit(os.getpid)  # a forked pool starts all its workers with its first job
    started = set(multiprocessing.active_children()) - others
    try:
        yield pool
    except BaseException as exc:
        for worker in set(multiprocessing.active_children()) - others:
            worker.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, BrokenProcessPool):
            raise killed(how_it_ended(started)) from None
        raise
    pool.shutdown()


def how_it_ended(workers: Iterable[multiprocessing.process.BaseProcess]) -> str:
    """How a worker of `workers` that ended abruptly ended, for an error message: "was killed by
    SIGKILL" (the kernel's out-of-memory killer), "exited with code 1", or "ended abruptly" when
    none says. SIGTERM is how a pool and its parent stop the workers left, so it does not count."""
    codes = sorted({w.exitcode for w in workers} - {None, 0, -signal.SIGTERM})
    if not codes:
        return "ended abruptly"
    if codes[0] < 0:  # ended by a signal
        return f"was killed by {signal.Signals(-codes[0]).name}"
    return f"exited with code {codes[0]}"


def leave_stop_signals_to_training(loader: DataLoader) -> None:
    """Make the workers of `loader` ignore SIGINT and SIGTERM (see the module docstring), before
    its own ``worker_init_fn``, if any."""
    if loader.num_workers > 0 and getattr(loader.worker_init_fn, "func", None) is not _ignore_stop_signals:
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)


def end_workers(loader: DataLoader) -> None:
    """End the worker processes of `loader`'s persistent iterator now, as deleting the iterator
    would. Call it when training ends, by an error too: a worker ignores SIGTERM, and Python's
    exit, which asks child processes to end with SIGTERM and then waits for them, would wait
    forever for workers that an exception's reference cycle still holds (a training data error
    raised from a worker's batch is one)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


def _ignore_stop_signals(then: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)
