import dataclasses
import io
import json
import logging
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_methods import DATA, TINY_METHODS
from train_helpers import (
    ToyDataset,
    ToyMedUniC,
    ToyMethod,
    ToyModel,
    contrastive_loss,
    make_tokenizer,
    tiny_cfg,
    toy_loader,
    write_records,
    write_volume_records,
)
from unimed.errors import ConfigError
from unimed.losses.medunic import MedUniCLoss
from unimed.methods import create_method
from unimed.models.config import MedUniCLossConfig
from unimed.train.distributed import (EACH_RANK, DistInfo, cleanup, dist_info_from_env, init_distributed,
                                      log_on_rank_zero)
from unimed.train.loop import train

# lr 1, eps 1, no decay, no clipping: Adam's first update is g / (|g| + 1) elementwise, which is
# one-to-one in g, so equal parameter updates mean equal (DDP-averaged) gradients.
STEP_CFG = dict(lr=1.0, eps=1.0, weight_decay=0.0, grad_clip=0.0, warmup_ratio=0.0, max_steps=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No BatchNorm in these models: in train mode it normalises with per-rank statistics, which a
# single process on the global batch cannot match (SyncBatchNorm fixes that, on CUDA only).
SETUPS = {
    "toy": (lambda: ToyModel(dropout=0.0), lambda: contrastive_loss, "cvl_loss"),
    "medunic_loss": (ToyMedUniC, lambda: MedUniCLoss(MedUniCLossConfig()), "tf_loss"),
}


def _one_step(out_dir, dist: DistInfo, batch_size: int, setup: str) -> dict:
    make_model, make_loss, _ = SETUPS[setup]
    torch.manual_seed(0)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    loader = toy_loader(ToyDataset(), batch_size, rank=dist.rank, world_size=dist.world_size)
    result = train(ToyMethod(model, make_loss()), loader, tiny_cfg(**STEP_CFG), out_dir, dist,
                   progress=False)
    update = [p.detach() - b for p, b in zip(model.parameters(), before)]
    return {"row": result.history[0], "update": update}


def _worker(rank: int, world_size: int, port: int, out_dir: str, setup: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist = init_distributed()
    try:
        out = _one_step(out_dir, dist, batch_size=4, setup=setup)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_two_rank_gloo_step_equals_one_process_on_the_global_batch(tmp_path, setup):
    # fork, not spawn: the children skip re-importing torch (seconds each on a busy machine).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), setup), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _one_step(tmp_path / "single", DistInfo(), batch_size=8, setup=setup)

    # Each rank's loss is its share of the batch (per-rank convention of the losses); the loop
    # logs their mean, so every rank's row (and rank 0's log) holds the global batch's loss terms.
    term = SETUPS[setup][2]
    for out in ranks:
        for key in (term, "loss"):
            assert out["row"][key] == pytest.approx(single["row"][key], abs=1e-6), key
    for a, b, c in zip(ranks[0]["update"], ranks[1]["update"], single["update"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        # float32 sums in another order (gathered halves, DDP's average): rounding-level gaps only.
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    # Only rank 0 wrote logs and checkpoints; the log holds the global loss.
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["loss"] == pytest.approx(single["row"]["loss"], abs=1e-6)


# UniMedI's X-ray steps leave T_3D without a gradient; Med-UniC without CVL leaves P_l without one,
# PRIOR without its local sentence term the attention only that term reads.
UNUSED = {
    "unimedi": TINY_METHODS["unimedi"],
    "medunic-no-cvl": dataclasses.replace(TINY_METHODS["medunic"], loss=dataclasses.replace(
        TINY_METHODS["medunic"].loss, cvl_weight=0.0)),
    "prior-no-local-sentence": dataclasses.replace(TINY_METHODS["prior"], local_sentence_weight=0.0),
}


def _method_worker(rank: int, world_size: int, port: int, out_dir: str, name: str, world) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    tokenizer, records = world
    dist = init_distributed()
    try:
        torch.manual_seed(0)
        method = create_method(UNUSED[name], vocab_size=len(tokenizer))
        loaders = method.build_loaders(records, tokenizer, DATA, batch_size=2, rank=rank,
                                       world_size=world_size, seed=5)
        result = train(method, loaders, tiny_cfg(max_steps=2), out_dir, dist, progress=False)
        torch.save([row["loss"] for row in result.history], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


@pytest.mark.parametrize("name", sorted(UNUSED))
def test_a_method_whose_steps_leave_parameters_without_gradient_trains_under_ddp(tmp_path, name):
    """The loop turns on DDP's unused-parameter detection where the method says it needs it
    (train.find_unused_parameters stays false), instead of failing at the second step."""
    tokenizer = make_tokenizer(tmp_path)
    records = write_records(tmp_path, 8)
    if name == "unimedi":
        records += write_volume_records(tmp_path, 8)
    mp.start_processes(_method_worker, args=(2, _free_port(), str(tmp_path), name,
                                             (tokenizer, records)),
                       nprocs=2, join=True, start_method="fork")
    losses = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]  # both ranks log the global loss


def test_dist_info_from_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = dist_info_from_env("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = dist_info_from_env("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer, got 'two'"):
        dist_info_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="RANK=3, LOCAL_RANK=1, WORLD_SIZE=3"):
        dist_info_from_env("cpu")


def test_world_size_one_creates_no_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(device="cpu")
    assert info.world_size == 1 and not torch.distributed.is_initialized()


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_other_than_zero_log_their_own_events_and_errors_only(monkeypatch, rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    log_on_rank_zero()
    log = logging.getLogger("unimed.data.adapters")
    log.warning("padchest: 2 row(s) left out")
    log.error("a shared failure")
    log.warning("skipped in training: a.png", extra=EACH_RANK)
    if rank == 0:
        assert stream.getvalue().splitlines() == [
            "WARNING unimed.data.adapters: padchest: 2 row(s) left out",
            "ERROR unimed.data.adapters: a shared failure",
            "WARNING unimed.data.adapters: skipped in training: a.png"]
    else:
        assert stream.getvalue().splitlines() == [
            "rank 1: ERROR unimed.data.adapters: a shared failure",
            "rank 1: WARNING unimed.data.adapters: skipped in training: a.png"]
