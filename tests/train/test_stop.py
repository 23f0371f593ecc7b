"""SIGINT / SIGTERM during training: the step in progress finishes, a checkpoint is saved there,
training ends with TrainingInterrupted, and --resume continues on the uninterrupted loss curve;
every rank stops at the same step; DataLoader workers leave the signals to the training loop, and
worker pools leave Ctrl-C to their parent, so a command ends in one line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from test_distributed import _free_port
from train_helpers import ToyDataset, ToyMethod, ToyModel, contrastive_loss, tiny_cfg, toy_loader
from unimed.cli import main
from unimed.train.checkpoint import save_checkpoint, training_progress, unfinished
from unimed.train.distributed import DistInfo, cleanup, init_distributed
from unimed.train.loop import CHECKPOINT_DIR, train
from unimed.train.stop import (
    StopRequest,
    TrainingInterrupted,
    leave_interrupts_to_parent,
    leave_stop_signals_to_training,
)


class SignalledMethod(ToyMethod):
    """The toy method, sending `sig` to its own process during the forward of step `at` (1-based)."""

    def __init__(self, model, sig: signal.Signals | None, at: int) -> None:
        super().__init__(model, contrastive_loss)
        self.sig, self.at, self.calls = sig, at, 0

    def forward(self, batch, ctx):
        self.calls += 1
        if self.sig is not None and self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return super().forward(batch, ctx)


def _run(out_dir, *, sig=None, at=0, resume=False, seed=0, dist=DistInfo(), batch_size=4):
    torch.manual_seed(seed)
    model = ToyModel(dropout=0.3)
    loader = toy_loader(ToyDataset(), batch_size, rank=dist.rank, world_size=dist.world_size)
    return model, train(SignalledMethod(model, sig, at), loader, tiny_cfg(), out_dir, dist,
                        resume=resume, progress=False)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_training_after_the_step_and_resume_continues_the_curve(tmp_path, sig):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    full_model, full = _run(tmp_path / "full")
    assert full.steps == 16

    with pytest.raises(TrainingInterrupted) as stopped:
        _run(tmp_path / "cut", sig=sig, at=5)  # mid-epoch (8 steps per epoch)
    assert (stopped.value.received, stopped.value.step) == (sig, 5)
    assert stopped.value.checkpoint == tmp_path / "cut" / CHECKPOINT_DIR / "step_00000005"
    assert stopped.value.exit_code == 128 + sig
    assert str(stopped.value) == (f"training stopped by {sig.name} after step 5: checkpoint "
                                  f"{tmp_path / 'cut' / CHECKPOINT_DIR / 'step_00000005'}")
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    assert training_progress(stopped.value.checkpoint) == (5, 16)
    assert unfinished(stopped.value.checkpoint).startswith(
        f"checkpoint {stopped.value.checkpoint} is step 5 of the 16 its run trains")
    log = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4, 5]

    resumed_model, rest = _run(tmp_path / "cut", resume=True, seed=99)
    assert [row["step"] for row in rest.history] == list(range(6, 17))
    assert training_progress(rest.checkpoint) == (16, 16) and unfinished(rest.checkpoint) is None
    cut_log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in cut_log] == pytest.approx(full.losses, abs=1e-6, rel=0)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_signal_at_an_epochs_last_step_resumes_at_the_next_epoch(tmp_path):
    _, full = _run(tmp_path / "full")
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(tmp_path / "cut", sig=signal.SIGTERM, at=8)
    assert stopped.value.step == 8
    _, rest = _run(tmp_path / "cut", resume=True, seed=99)
    assert [row["step"] for row in rest.history] == list(range(9, 17))
    assert rest.losses == pytest.approx(full.losses[8:], abs=1e-6, rel=0)


def test_a_signal_during_the_last_step_saves_the_whole_run_and_still_stops(tmp_path):
    """The stage's training is complete, but the command that trains it (an ablation's rows, the
    demo's stages) must not go on as if no one had asked it to stop."""
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(tmp_path / "run", sig=signal.SIGTERM, at=16)
    assert stopped.value.complete and stopped.value.step == 16
    assert stopped.value.checkpoint == tmp_path / "run" / CHECKPOINT_DIR / "step_00000016"
    assert "after step 16 (its last: the stage's training is complete)" in str(stopped.value)
    assert training_progress(stopped.value.checkpoint) == (16, 16)
    assert unfinished(stopped.value.checkpoint) is None


@pytest.mark.parametrize("before", [signal.default_int_handler, signal.SIG_IGN])
def test_a_second_signal_acts_as_before(before):
    """Python's own handler raises again; an ignored SIGINT (a process a non-interactive shell
    started in the background begins so) stays ignored, and the handler found is put back."""
    previous = signal.signal(signal.SIGINT, before)
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.received == signal.SIGINT
            if before is signal.SIG_IGN:
                signal.raise_signal(signal.SIGINT)
            else:
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGINT)  # Python's own handler again
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, previous)


class PidDataset(Dataset):
    """Items that say which process made them and what the user's worker_init_fn set there."""

    tag = "main"

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        return {"pid": torch.tensor(os.getpid()), "tagged": torch.tensor(PidDataset.tag == "worker")}


def _tag_worker(worker_id: int) -> None:
    PidDataset.tag = "worker"


def test_loader_workers_leave_the_stop_signals_to_training():
    """Ctrl-C reaches a terminal's whole process group, and a worker killed by SIGTERM would make
    PyTorch raise in the main process; the training loop's loaders' workers ignore both, and the
    user's worker_init_fn still runs."""
    loader = DataLoader(PidDataset(), batch_size=4, num_workers=1, worker_init_fn=_tag_worker)
    leave_stop_signals_to_training(loader)
    leave_stop_signals_to_training(loader)  # once is enough: not wrapped twice
    assert loader.worker_init_fn.args == (_tag_worker,)
    batches = iter(loader)
    first = next(batches)
    worker = int(first["pid"][0])
    assert worker != os.getpid() and bool(first["tagged"].all())
    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGINT)
    rest = list(batches)
    assert len(rest) == 15 and all(int(b["pid"][0]) == worker for b in rest)


def _rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist = init_distributed()
    try:
        _run(out_dir, sig=signal.SIGTERM if rank == 1 else None, at=3, dist=dist, batch_size=2)
        outcome = {"finished": True}
    except TrainingInterrupted as exc:
        outcome = {"step": exc.step, "received": exc.received and exc.received.name,
                   "checkpoint": str(exc.checkpoint)}
    finally:
        cleanup()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


def test_every_rank_stops_at_the_step_one_rank_was_signalled(tmp_path):
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    checkpoint = str(tmp_path / CHECKPOINT_DIR / "step_00000003")
    assert outcomes == [{"step": 3, "received": None, "checkpoint": checkpoint},
                        {"step": 3, "received": "SIGTERM", "checkpoint": checkpoint}]
    assert (tmp_path / CHECKPOINT_DIR / "step_00000003").is_dir()


@pytest.mark.parametrize(("command", "complete", "hint"), [
    ("pretrain", False, "run the same command with --resume to continue from it"),
    ("pretrain", True, "nothing is left to train"),
    ("demo", False, "the main job starts its stages over when run again"),
    ("demo", True, "the main job starts its stages over when run again"),
])
def test_the_command_line_says_where_training_stopped_and_how_to_go_on(command, complete, hint, monkeypatch,
                                                                         capsys, tmp_path):
    checkpoint = tmp_path / "runs" / "demo" / "pretrain" / CHECKPOINT_DIR / "step_00000007"

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGINT, 7, checkpoint, complete=complete)

    monkeypatch.setattr("unimed.commands.train.run_pretrain", interrupted)
    monkeypatch.setattr("unimed.commands.demo.phantom", interrupted)
    assert main([command, "configs/demo.yaml", f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 130
    last = " (its last: the stage's training is complete)" if complete else ""
    assert capsys.readouterr().err.strip() == (f"unimed: interrupted: training stopped by SIGINT after step "
                                               f"7{last}: checkpoint {checkpoint}; {hint}")


def test_ctrl_c_twice_in_training_names_the_newest_checkpoint_kept(monkeypatch, capsys, tmp_path):
    """The second Ctrl-C stops at once, without the step's checkpoint: the line said only
    "stopped by Ctrl-C", not what was kept nor that the steps after it were lost."""
    root = tmp_path / "runs" / "demo" / "pretrain" / CHECKPOINT_DIR

    def stopped_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("unimed.commands.train.run_pretrain", stopped_at_once)
    argv = ["pretrain", "configs/demo.yaml", f"run.output_dir={tmp_path / 'runs'}", "--quiet"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"unimed: interrupted: unimed pretrain stopped by Ctrl-C before any checkpoint was saved in {root}")
    save_checkpoint(root, 24, torch.nn.Linear(2, 2), {"step": 24})
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"unimed: interrupted: unimed pretrain stopped by Ctrl-C; its newest checkpoint is "
        f"{root / 'step_00000024'} (the steps after it are lost): run the same command with --resume "
        "to continue from it")


def test_a_worker_pool_leaves_ctrl_c_to_its_parent():
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1, initializer=leave_interrupts_to_parent) as pool:
        worker = pool.apply(os.getpid)
        os.kill(worker, signal.SIGINT)
        assert pool.apply(os.getpid) == worker  # alive, and serving


def test_a_worker_ends_with_its_parent_killed_outright():
    """A parent killed by SIGKILL (or the OOM killer) runs no exception handler that could stop
    its workers: the parent-death signal does. A process pool's worker (the evaluation's kind)
    would otherwise wait for work forever, holding its memory."""
    import concurrent.futures
    import multiprocessing

    read, write = os.pipe()
    parent = os.fork()
    if parent == 0:  # the parent of the pool: says its worker's pid, then waits to be killed
        try:
            os.close(read)
            pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("fork"), initializer=leave_interrupts_to_parent)
            os.write(write, str(pool.submit(os.getpid).result()).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    worker = int(os.read(read, 32))
    os.close(read)
    assert _alive(worker)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_sigterm_outside_training_is_one_line(monkeypatch, capsys, tmp_path):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal ends the command at once, as Ctrl-C would

    monkeypatch.setattr("unimed.phantom.world.write_world", terminated)
    start = time.monotonic()
    assert main(["phantom", "configs/demo.yaml", f"phantom.root={tmp_path / 'world'}",
                 f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 143
    assert time.monotonic() - start < 20
    assert capsys.readouterr().err.strip() == "unimed: terminated: unimed phantom stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("unimed.phantom.world.write_world", interrupted)
    assert main(["phantom", "configs/demo.yaml", f"phantom.root={tmp_path / 'world'}",
                 f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "unimed: interrupted: unimed phantom stopped by Ctrl-C"

