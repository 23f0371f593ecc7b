import errno
import os
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

from unimed.train import checkpoint as ckpt


class Tied(nn.Module):
    """Input embedding and output layer share one tensor, as BERT's MLM head does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def _state(step: int) -> dict:
    return {"step": step, "values": [1.5, 2], "nested": {"t": torch.arange(3)}, "rng": ckpt.rng_state()}


def test_roundtrip_with_shared_tensors_and_weights_only(tmp_path):
    model = Tied()
    path = ckpt.save_checkpoint(tmp_path, 7, model, _state(7))
    other = Tied()
    state = ckpt.load_checkpoint(path, other)
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.out.weight.data_ptr() == other.embed.weight.data_ptr()
    assert state["step"] == 7 and torch.equal(state["nested"]["t"], torch.arange(3))
    # The state file really is weights_only-loadable on its own.
    torch.load(path / ckpt.STATE_FILE, weights_only=True)
    assert ckpt.latest_checkpoint(tmp_path) == path


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_the_weights_file_gets_the_permissions_of_the_umask(tmp_path, mask):
    """safetensors creates its files 0o600 whatever the umask (safetensors#782): a checkpoint's
    weights get the mode that open() gives its checksums file, so a run shared with other users
    (a lab server, a container running as another user) loads there."""
    old = os.umask(mask)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, Tied(), _state(1))
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((path / name).stat().st_mode)
             for name in (ckpt.WEIGHTS_FILE, ckpt.CHECKSUM_FILE)}
    assert modes == {ckpt.WEIGHTS_FILE: 0o666 & ~mask, ckpt.CHECKSUM_FILE: 0o666 & ~mask}


def test_rng_state_roundtrip():
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    first = ckpt.save_checkpoint(tmp_path, 1, model, _state(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot save checkpoint .*step_00000002 "
                       r"\(disk full\); the previous checkpoint step_00000001 is intact"):
        ckpt.save_checkpoint(tmp_path, 2, model, _state(2))
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert not (tmp_path / ckpt.checkpoint_name(2)).exists()
    restored = nn.Linear(2, 2)
    assert ckpt.load_checkpoint(first, restored)["step"] == 1
    assert torch.equal(restored.weight, before["weight"])


def test_a_full_disk_under_torch_save_is_one_line_and_a_bug_keeps_its_error(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, model, _state(1))

    def full_disk(obj, f):  # what torch.save does on a full disk (measured on a 1 MB tmpfs)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"^cannot save checkpoint .*step_00000002 \(No space "
                       r"left on device\); the previous checkpoint step_00000001 is intact$"):
        ckpt.save_checkpoint(tmp_path, 2, model, _state(2))

    def bug(obj, f):
        raise RuntimeError("a tensor torch cannot pickle")

    monkeypatch.setattr(ckpt.torch, "save", bug)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        ckpt.save_checkpoint(tmp_path, 3, model, _state(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_keeps_only_last_n_and_cleans_interrupted_writes(tmp_path):
    model = nn.Linear(2, 2)
    stale = tmp_path / ".tmp-step_00000009-999999"
    stale.mkdir(parents=True)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, _state(step), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", ckpt.checkpoint_name(2), ckpt.checkpoint_name(3)]


def test_a_checkpoint_below_an_earlier_runs_steps_is_kept(tmp_path):
    """A run started afresh in a folder an earlier, longer run left: pruning by step alone deleted
    every checkpoint the new run wrote, and `latest` named a deleted folder."""
    model = nn.Linear(2, 2)
    for step in (300, 344):
        ckpt.save_checkpoint(tmp_path, step, model, _state(step), keep=2)
    written = ckpt.save_checkpoint(tmp_path, 50, model, _state(50), keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == written
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == [ckpt.checkpoint_name(50), ckpt.checkpoint_name(344)]
    ckpt.save_checkpoint(tmp_path, 100, model, _state(100), keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == [ckpt.checkpoint_name(100), ckpt.checkpoint_name(344)]
    assert ckpt.checkpoints(tmp_path / "none") == []


def test_missing_or_mismatched_checkpoint_errors(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    path = ckpt.save_checkpoint(tmp_path, 1, nn.Linear(2, 2), _state(1))
    with pytest.raises(RuntimeError, match="model.safetensors"):
        ckpt.load_checkpoint(path, nn.Linear(2, 3))
    (path / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: no state.pt"):
        ckpt.latest_checkpoint(tmp_path)


def test_the_weights_digest_is_the_checked_one_or_computed(tmp_path):
    import hashlib

    folder = tmp_path / "step"
    folder.mkdir()
    (folder / ckpt.WEIGHTS_FILE).write_bytes(b"weights")
    computed = hashlib.sha256(b"weights").hexdigest()
    assert ckpt.weights_sha256(folder) == computed  # a folder from before checksums were written
    ckpt.write_checksums(folder, (ckpt.WEIGHTS_FILE,))
    (folder / ckpt.WEIGHTS_FILE).write_bytes(b"other")  # the digest loading checked, not a new read
    assert ckpt.weights_sha256(folder) == computed
    (folder / ckpt.CHECKSUM_FILE).write_text("{")
    assert ckpt.weights_sha256(folder) == hashlib.sha256(b"other").hexdigest()
