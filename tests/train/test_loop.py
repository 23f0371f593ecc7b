import itertools
import json
import logging
import math
import signal

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from train_helpers import (
    DIM,
    LoaderRecorder,
    StagedToyMethod,
    ToyDataset,
    ToyMethod,
    ToyModel,
    contrastive_loss,
    mse_loss,
    tiny_cfg,
    toy_loader,
)
from unimed.errors import ConfigError
from unimed.train import checkpoint as ckpt
from unimed.train.distributed import DistInfo
from unimed.train.loop import CHECKPOINT_DIR, mix_schedule, resolve_precision, train
from unimed.train.stop import TrainingDiverged

CPU = DistInfo()


def _run(out_dir, cfg, *, seed=0, resume=False, dropout=0.3, loss=contrastive_loss, batch_size=4):
    torch.manual_seed(seed)
    model = ToyModel(dropout=dropout)
    loader = toy_loader(ToyDataset(), batch_size)
    result = train(ToyMethod(model, loss), loader, cfg, out_dir, CPU, resume=resume, progress=False)
    return model, result


@pytest.mark.parametrize("stop_at", [5, 8])
def test_resume_gives_the_same_loss_curve(tmp_path, stop_at):
    cfg = tiny_cfg()
    full_model, full = _run(tmp_path / "full", cfg)
    assert full.steps == 16 and len(full.losses) == 16

    _, first = _run(tmp_path / "cut", tiny_cfg(max_steps=stop_at))
    assert first.steps == stop_at
    # A different init seed: everything must come from the checkpoint.
    resumed_model, rest = _run(tmp_path / "cut", cfg, seed=99, resume=True)
    assert [r["step"] for r in rest.history] == list(range(stop_at + 1, 17))
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_resuming_past_the_runs_last_step_is_refused(tmp_path):
    """`--resume train.max_steps=10` on a run at step 16 trained nothing, said only "no optimizer
    step was run", and its stage folder's config then said max_steps 10 beside a step-16 checkpoint."""
    _run(tmp_path, tiny_cfg())
    with pytest.raises(ConfigError, match=rf"checkpoint {tmp_path / CHECKPOINT_DIR / 'step_00000016'} is "
                                          r"step 16, past this run's last step 10 \(train.max_steps"):
        _run(tmp_path, tiny_cfg(max_steps=10), resume=True)
    _, same = _run(tmp_path, tiny_cfg(), resume=True)  # at its last step: nothing to do, said so
    assert same.steps == 16 and same.history == []


def test_resume_without_a_checkpoint_starts_from_step_0_with_a_warning(tmp_path, caplog):
    """A requeued job passes --resume from its first start; a misspelt run.name would train from
    scratch for hours: the run goes on, and says so above the INFO lines."""
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        _, result = _run(tmp_path / "new", tiny_cfg(max_steps=2), resume=True)
    assert result.steps == 2
    assert f"--resume: no checkpoint under {tmp_path / 'new' / CHECKPOINT_DIR}; starting from step 0" \
        in caplog.text

def test_a_run_without_loss_scaling_resumes_with_it(tmp_path, monkeypatch, caplog):
    """A CPU fp32 checkpoint holds a disabled scaler's empty state; resumed where fp16 enables the
    scaler (a GPU) it starts a fresh one instead of failing in GradScaler.load_state_dict."""
    _run(tmp_path, tiny_cfg(max_steps=5))
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler(device, enabled=True))
    with caplog.at_level("INFO", logger="unimed.train.loop"):
        _, rest = _run(tmp_path, tiny_cfg(), resume=True)
    assert [r["step"] for r in rest.history] == list(range(6, 17))
    assert any("without fp16 loss scaling" in r.getMessage() for r in caplog.records)


def test_dropout_really_draws_from_the_restored_rng(tmp_path):
    """Guard for the test above: with a different RNG after resume the curves do differ."""
    cfg = tiny_cfg()
    _, full = _run(tmp_path / "full", cfg)
    _run(tmp_path / "cut", tiny_cfg(max_steps=5))
    state_file = ckpt.latest_checkpoint(tmp_path / "cut" / CHECKPOINT_DIR) / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    torch.manual_seed(1234)
    state["rng"][0]["torch"] = torch.get_rng_state()
    torch.save(state, state_file)
    (state_file.parent / ckpt.CHECKSUM_FILE).unlink()  # edited on purpose: read without checksums
    _, rest = _run(tmp_path / "cut", cfg, resume=True)
    assert rest.losses[0] != pytest.approx(full.losses[5], abs=1e-6)


def test_gradient_accumulation_matches_a_double_batch(tmp_path):
    kwargs = dict(dropout=0.0, loss=mse_loss)
    big_model, big = _run(tmp_path / "big", tiny_cfg(grad_accum=1), batch_size=8, **kwargs)
    acc_model, acc = _run(tmp_path / "acc", tiny_cfg(grad_accum=2), batch_size=4, **kwargs)
    assert len(big.losses) == len(acc.losses) == 8
    assert acc.losses == pytest.approx(big.losses, abs=1e-6, rel=0)
    for a, b in zip(big_model.parameters(), acc_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_jsonl_log_and_checkpoints(tmp_path):
    cfg = tiny_cfg(log_every=3, checkpoint_every_steps=5, keep_checkpoints=3, tensorboard=True)
    _, result = _run(tmp_path, cfg)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15, 16]
    for key in ("loss", "cvl_loss", "mse_loss", "lr", "samples_per_s", "data_time",
                "compute_time", "data_wait_share", "grad_norm"):
        assert all(key in r for r in rows), key
    assert rows[1]["loss"] == pytest.approx(result.losses[5])
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in rows)
    # Steps 5, 8 (epoch end), 10, 15, 16 (epoch end) were saved; the last 3 remain.
    names = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).glob("step_*"))
    assert names == [ckpt.checkpoint_name(s) for s in (10, 15, 16)]
    assert result.checkpoint == tmp_path / CHECKPOINT_DIR / ckpt.checkpoint_name(16)
    assert any((tmp_path / "tensorboard").iterdir())


def test_precision_resolution_stays_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    for precision in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            resolve_precision(precision, cpu)
    with pytest.raises(ValueError, match="one of"):
        resolve_precision("fp8", cpu)


def test_too_few_batches_and_loss_without_total_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum=16"):
        _run(tmp_path, tiny_cfg(grad_accum=16))

    def no_total(image_features, text_features, *, rank, world_size):
        return {"mse_loss": (image_features - text_features).pow(2).mean()}

    with pytest.raises(KeyError, match="without the total under 'loss'"):
        _run(tmp_path, tiny_cfg(), loss=no_total)


def _staged(out_dir, cfg, *, seed=0, resume=False):
    torch.manual_seed(seed)
    method = StagedToyMethod()
    result = train(method, toy_loader(ToyDataset(), 4), cfg, out_dir, CPU, resume=resume,
                   progress=False)
    return method, result


@pytest.mark.parametrize("stop_at", [5, 8, 11])
def test_stages_own_optimizers_hooks_and_state_survive_resume(tmp_path, stop_at):
    full_method, full = _staged(tmp_path / "full", tiny_cfg())
    assert full.steps == 16 and full_method.started == ["align", "teacher"]
    assert [r["stage"] for r in full.history] == [0] * 8 + [1] * 8
    assert all("pull_loss" in r for r in full.history[8:]) and "pull_loss" not in full.history[0]
    assert full_method.hook_calls == 16
    # Stage 2's optimizer holds only the text tower: the image tower ends as stage 1 left it.
    stage1, _ = _staged(tmp_path / "stage1", tiny_cfg(max_steps=8))
    for a, b in zip(stage1.model.image.parameters(), full_method.model.image.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(stage1.model.text.weight, full_method.model.text.weight)

    _, first = _staged(tmp_path / "cut", tiny_cfg(max_steps=stop_at))
    resumed, rest = _staged(tmp_path / "cut", tiny_cfg(), seed=99, resume=True)
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    assert resumed.hook_calls == 16
    torch.testing.assert_close(resumed.teacher, full_method.teacher, atol=1e-6, rtol=0)


def _two_loaders(out_dir, cfg, *, seed=0, resume=False, data_seed=3):
    torch.manual_seed(seed)
    method = LoaderRecorder()
    loaders = {"a": toy_loader(ToyDataset(n=32, seed=0), 4, seed=data_seed),  # 8 batches
               "b": toy_loader(ToyDataset(n=24, seed=1), 4, seed=data_seed)}  # 6: the epoch length
    return method, train(method, loaders, cfg, out_dir, CPU, resume=resume, progress=False)


def test_several_loaders_alternate_and_resume_mid_epoch(tmp_path):
    cfg = tiny_cfg(grad_accum=1, loader_mix="alternate")
    method, full = _two_loaders(tmp_path / "full", cfg)
    assert full.steps == 2 * 12  # two epochs of 6 batches from each loader
    assert method.seen == ["a", "b"] * 12
    # Stopped after an "a" batch, in the middle of both loaders' epoch.
    _, first = _two_loaders(tmp_path / "cut", tiny_cfg(grad_accum=1, loader_mix="alternate",
                                                      max_steps=7))
    resumed, rest = _two_loaders(tmp_path / "cut", cfg, seed=5, resume=True)
    assert resumed.seen[0] == "b" and len(resumed.seen) == 17
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)


def test_resuming_another_methods_checkpoint_names_its_weights_before_its_training_state(tmp_path):
    """A UniMedI run's checkpoint (two loaders, stopped mid-epoch) resumed by a Med-UniC run was
    refused for its loaders' seeds, with advice (resume with the checkpoint's run.seed) that could
    not help: its weights are another model's."""
    _two_loaders(tmp_path, tiny_cfg(grad_accum=1, loader_mix="alternate", max_steps=7))
    other = ToyMethod(nn.Sequential(nn.Linear(DIM, 4)), contrastive_loss)
    weights = tmp_path / CHECKPOINT_DIR / "step_00000007" / ckpt.WEIGHTS_FILE
    with pytest.raises(ckpt.CheckpointError) as err:
        train(other, toy_loader(ToyDataset(), 4), tiny_cfg(), tmp_path, CPU, resume=True, progress=False)
    assert str(err.value).startswith(f"the weights in {weights} do not fit the model (")
    assert str(err.value).endswith("trained under other method settings (method.name, image encoder, "
                                   "text encoder, sizes) than this config's")


def test_a_resume_at_an_epoch_end_under_other_settings_says_so(tmp_path, caplog):
    """Allowed (no batch of the epoch is half used), but the curve is no longer the one an
    uninterrupted run would give: a warning names both settings."""
    _two_loaders(tmp_path / "cut", tiny_cfg(grad_accum=1, loader_mix="alternate", max_steps=12))
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        _two_loaders(tmp_path / "cut", tiny_cfg(grad_accum=2, loader_mix="alternate"), resume=True)
    assert "resuming at an epoch end with (world size, batch sizes, grad_accum, loader_mix) = " \
           "(1, [4, 4], 2, 'alternate') where checkpoint" in caplog.text
    assert "had (1, [4, 4], 1, 'alternate')" in caplog.text


def test_a_resume_under_another_data_seed_is_refused_mid_epoch_and_said_at_an_epoch_end(tmp_path, caplog):
    """Mid-epoch, the checkpoint's position counts batches of its seed's order: under another
    seed the rest of the epoch would repeat some samples and skip others (it went on silently)."""
    cfg = tiny_cfg(grad_accum=1, loader_mix="alternate")
    _two_loaders(tmp_path / "mid", tiny_cfg(grad_accum=1, loader_mix="alternate", max_steps=7))
    with pytest.raises(ConfigError, match=r"the data order of the seeds \[3, 3\]; this run's are \[4, 4\]"):
        _two_loaders(tmp_path / "mid", cfg, resume=True, data_seed=4)
    _two_loaders(tmp_path / "mid", cfg, resume=True)  # the checkpoint's seed: resumes
    _two_loaders(tmp_path / "end", tiny_cfg(grad_accum=1, loader_mix="alternate", max_steps=12))
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        method, _ = _two_loaders(tmp_path / "end", cfg, resume=True, data_seed=4)
    assert "drew its data with the seeds [3, 3] and this run's are [4, 4] (run.seed)" in caplog.text
    assert len(method.seen) == 12


def test_a_run_resumed_with_other_settings_trains_under_them(tmp_path, caplog):
    """The checkpoint's optimizer settings give way to the resumed run's: a finished run resumed
    with more epochs goes on along the longer run's schedule (not at the old schedule's final rate,
    0), a lower learning rate or another weight decay is used from the resumed step, each said in
    one warning; the same settings resume silently (and exactly: the tests above)."""
    _, first = _run(tmp_path / "longer", tiny_cfg(epochs=2))
    _, longer = _run(tmp_path / "fresh", tiny_cfg(epochs=4))
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        _, rest = _run(tmp_path / "longer", tiny_cfg(epochs=4), resume=True)
    assert [r["step"] for r in rest.history] == list(range(17, 33))
    assert [r["lr"] for r in rest.history] == pytest.approx([r["lr"] for r in longer.history[16:]])
    assert min(r["lr"] for r in rest.history) > 0 and first.history[-1]["lr"] < rest.history[0]["lr"]
    assert "warmup_steps 4 -> 8, total_steps 16 -> 32" in caplog.text
    assert "apply from step 16, at a learning rate of 0.0075 where the checkpoint's schedule has 0" \
        in caplog.text

    caplog.clear()
    _run(tmp_path / "lower", tiny_cfg(max_steps=5))
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        model, rest = _run(tmp_path / "lower", tiny_cfg(lr=5e-3, weight_decay=0.05), resume=True)
    _, same = _run(tmp_path / "same", tiny_cfg(lr=5e-3, weight_decay=0.05))
    assert [r["lr"] for r in rest.history] == pytest.approx([r["lr"] for r in same.history[5:]])
    assert "lr 0.01 -> 0.005, weight_decay 0.01 -> 0.05" in caplog.text
    saved = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "lower" / CHECKPOINT_DIR))
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert saved["scheduler"]["base_lrs"] == [5e-3] * len(saved["scheduler"]["base_lrs"])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        _run(tmp_path / "lower", tiny_cfg(lr=5e-3, weight_decay=0.05, epochs=3), resume=True)
    assert "total_steps 16 -> 24" in caplog.text and "lr 0.01" not in caplog.text

    caplog.clear()
    _run(tmp_path / "unchanged", tiny_cfg(max_steps=5))
    with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
        _run(tmp_path / "unchanged", tiny_cfg(), resume=True)
    assert "optimizer settings" not in caplog.text


def _run_on(out_dir, n, cfg, *, resume=False):
    return train(ToyMethod(ToyModel(), contrastive_loss), toy_loader(ToyDataset(n), 4), cfg, out_dir, CPU,
                 resume=resume, progress=False)


def _alarm(signum, frame):
    raise TimeoutError("the resumed run did not end")


@pytest.mark.parametrize("n, position, steps", [(16, "that epoch is over", [8]),
                                                (48, "the rest of that epoch is drawn", [8, 9, 10, 11, 12])])
def test_a_mid_epoch_resume_on_data_of_another_size_goes_on_and_says_so(tmp_path, caplog, n, position,
                                                                       steps):
    """Stopped 7 steps into an epoch of 8 (32 samples, batches of 4) and resumed on 16 samples
    (epochs of 4: the position is past the epoch's end, which once spun the loop forever, deaf to
    SIGTERM) or on 48: the epoch goes on from this run's data, and a warning says so."""
    _run_on(tmp_path, 32, tiny_cfg(max_steps=7))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        with caplog.at_level(logging.WARNING, logger="unimed.train.loop"):
            rest = _run_on(tmp_path, n, tiny_cfg(max_steps=12), resume=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [r["step"] for r in rest.history] == steps
    assert f"stopped after step 7 of an epoch of 8 steps; this run's data and train.epoch_steps make " \
           f"epochs of {n // 4}" in caplog.text and position in caplog.text


def _diverging(after: int, *, gradient_only: bool = False):
    """mse_loss for `after` calls, then NaN: in the loss itself, or (`gradient_only`) only in the
    gradient, through a term worth 0 whose derivative is 0/0."""
    calls = itertools.count(1)

    def loss(image_features, text_features, *, rank, world_size):
        out = mse_loss(image_features, text_features, rank=rank, world_size=world_size)
        if next(calls) <= after:
            return out
        if gradient_only:
            zero = image_features - image_features.detach()
            return {**out, "loss": out["loss"] + torch.sqrt(zero**2).sum()}
        return {k: v * float("nan") for k, v in out.items()}

    return loss


@pytest.mark.parametrize("gradient_only, bad", [(False, "loss nan, mse_loss nan, grad_norm nan"),
                                                (True, "grad_norm nan")])
def test_a_non_finite_step_ends_training_before_a_checkpoint_takes_it(tmp_path, gradient_only, bad):
    """NaN from step 5 on: the run stops there with one message naming the step, the values and
    the newest checkpoint (step 4, finite), logs the step's row, and writes no checkpoint of the
    NaN weights (which pruning would otherwise let replace every good one)."""
    cfg = tiny_cfg(checkpoint_every_steps=2, keep_checkpoints=2)
    torch.manual_seed(0)
    method = ToyMethod(ToyModel(), _diverging(4, gradient_only=gradient_only))
    message = (rf"step 5 \(epoch 0, stage \w+\) gave a non-finite {bad} at learning rate .*newest "
               r"checkpoint is .*step_00000004: --resume")
    with pytest.raises(TrainingDiverged, match=message):
        train(method, toy_loader(ToyDataset(), 4), cfg, tmp_path, CPU, progress=False)
    assert [p.name for p in ckpt.checkpoints(tmp_path / CHECKPOINT_DIR)] == ["step_00000002", "step_00000004"]
    weights = safetensors.torch.load_file(tmp_path / CHECKPOINT_DIR / "step_00000004" / ckpt.WEIGHTS_FILE)
    assert all(torch.isfinite(w).all() for w in weights.values())
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5] and not math.isfinite(log[-1]["grad_norm"])


def test_mix_schedules_by_hand():
    assert mix_schedule([3, 2], "alternate") == [0, 1, 0, 1]
    # Shares: loader 0 at 1/6, 3/6, 5/6; loader 1 at 1/4, 3/4.
    assert mix_schedule([3, 2], "proportional") == [0, 1, 0, 1, 0]
    # Ten to two: loader 1 at 1/4 and 3/4 of the epoch, between loader 0's 3rd / 4th and 8th / 9th.
    # Ten to two: loader 1 at 1/4 and 3/4, each after loader 0's batch at the same share.
    assert mix_schedule([10, 2], "proportional") == [0, 0, 0, 1] + [0] * 5 + [1] + [0] * 2
    with pytest.raises(ValueError, match="loader_mix"):
        mix_schedule([3, 2], "shortest")
    with pytest.raises(ValueError, match="train.loader_mix"):
        tiny_cfg(loader_mix="shortest")


def test_proportional_mix_is_one_pass_over_every_loader_and_resumes_mid_epoch(tmp_path):
    cfg = tiny_cfg(grad_accum=1)  # the default mix
    assert cfg.loader_mix == "proportional"
    method, full = _two_loaders(tmp_path / "full", cfg)
    assert full.steps == 2 * 14  # two epochs of all 8 "a" and all 6 "b" batches
    epoch = method.seen[:14]
    assert epoch.count("a") == 8 and epoch.count("b") == 6 and method.seen[14:] == epoch
    assert epoch[:2] == ["a", "b"] and "b" in epoch[-2:]  # spread through the epoch
    # Stopped mid-epoch; the resumed run continues where the schedule stood.
    _, first = _two_loaders(tmp_path / "cut", tiny_cfg(grad_accum=1, max_steps=9))
    resumed, rest = _two_loaders(tmp_path / "cut", cfg, seed=5, resume=True)
    assert resumed.seen == method.seen[9:]
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    # A mid-epoch checkpoint does not resume under the other mix.
    _two_loaders(tmp_path / "cut2", tiny_cfg(grad_accum=1, max_steps=9))
    with pytest.raises(ConfigError, match="loader_mix"):  # one line on the command line
        _two_loaders(tmp_path / "cut2", tiny_cfg(grad_accum=1, loader_mix="alternate"), resume=True)
class ConvToy(ToyModel):
    """The toy model with a convolution in the image tower (x[:, :4] as a 2-channel 1x2 'image')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, batch):
        out = super().forward(batch)
        pooled = self.conv(batch["x"][:, :4].reshape(-1, 2, 1, 2)).mean((2, 3))  # (B, 4)
        out["image_features"] = out["image_features"] + pooled
        return out


def test_channels_last_changes_the_layout_not_the_loss_curve(tmp_path):
    curves = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = ConvToy()
        result = train(ToyMethod(model, contrastive_loss), toy_loader(ToyDataset(), 4),
                       tiny_cfg(channels_last=channels_last), tmp_path / str(channels_last), CPU,
                       progress=False)
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        curves[channels_last] = result.losses
    assert curves[True] == pytest.approx(curves[False], abs=1e-5, rel=0)


def test_epoch_steps_caps_every_epoch_and_resumes_on_the_same_curve(tmp_path):
    epochs = tiny_cfg().epochs
    _, full = _run(tmp_path / "full", tiny_cfg(epoch_steps=3))
    assert full.steps == 3 * epochs
    assert [r["epoch"] for r in full.history] == [e for e in range(epochs) for _ in range(3)]
    _, first = _run(tmp_path / "cut", tiny_cfg(epoch_steps=3, max_steps=4))
    _, rest = _run(tmp_path / "cut", tiny_cfg(epoch_steps=3), seed=99, resume=True)
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    with pytest.raises(ValueError, match="train.epoch_steps must be >= 1"):
        tiny_cfg(epoch_steps=0)


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, "train.epochs must be >= 1, got 0"),
    ("batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("batch_size", -1, "train.batch_size must be >= 1, got -1"),
    ("grad_accum", 0, "train.grad_accum must be >= 1, got 0"),
    ("keep_checkpoints", 0, "train.keep_checkpoints must be >= 1, got 0"),
    ("lr", -1.0, "train.lr must be > 0, got -1.0"),
    ("eps", 0.0, "train.eps must be > 0, got 0.0"),
    ("weight_decay", -0.1, "train.weight_decay must be >= 0, got -0.1"),
    ("grad_clip", -1.0, "train.grad_clip must be >= 0, got -1.0"),
    ("log_every", -1, "train.log_every must be >= 0, got -1"),
    ("checkpoint_every", -1, "train.checkpoint_every must be >= 0, got -1"),
    ("warmup_ratio", 2.0, r"train.warmup_ratio must be in \[0, 1\], got 2.0"),
    ("min_lr_ratio", -1.0, r"train.min_lr_ratio must be in \[0, 1\], got -1.0"),
    ("betas", (0.9,), r"train.betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ("betas", (0.9, 1.0), r"train.betas must be two numbers in \[0, 1\)"),
    ("max_steps", 0, r"train.max_steps must be >= 1 \(or null\), got 0"),
    ("precision", "fp8", "train.precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
])
def test_a_train_value_out_of_range_names_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(**{key: value})


def _damage(step_dir, how: str) -> tuple[str, int]:
    """Damage the checkpoint in `step_dir` as `how` says; returns what the warning must name and
    the step of the newest intact checkpoint left."""
    if how == "truncated weights":
        weights = step_dir / ckpt.WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return f"{weights} is truncated or corrupt", 4
    if how == "corrupt state":
        state = step_dir / ckpt.STATE_FILE
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
        state.write_bytes(bytes(data))
        return f"{state} is truncated or corrupt", 4
    pointer = step_dir.parent / ckpt.LATEST_FILE
    if how == "latest is empty":  # a pointer emptied by a full disk or an editor: it read the folder itself
        pointer.write_text("")
        return f"{pointer} names no checkpoint folder (''): it should hold the newest one's name", 6
    pointer.write_text("step_00000099\n")  # e.g. a copy of the run that lost its newest step
    return f"{pointer} names step_00000099, which does not exist", 6


@pytest.mark.parametrize("how", ["truncated weights", "corrupt state", "latest names a missing step",
                                 "latest is empty"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_logs_each_step_once(
        tmp_path, how, caplog):
    cfg = tiny_cfg(checkpoint_every=0, checkpoint_every_steps=4)
    _, full = _run(tmp_path / "full", cfg)
    _run(tmp_path / "cut", tiny_cfg(checkpoint_every=0, checkpoint_every_steps=4, max_steps=6))
    root = tmp_path / "cut" / CHECKPOINT_DIR
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    named, start = _damage(root / "step_00000006", how)
    with caplog.at_level("WARNING", logger="unimed.train.checkpoint"):
        _, rest = _run(tmp_path / "cut", cfg, seed=99, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(named), warnings
    intact = root / ckpt.checkpoint_name(start)
    assert warnings[0].endswith(f"resuming from the newest intact checkpoint {intact} instead")
    # Steps after the checkpoint are trained again, as the uninterrupted run did, and logged once.
    assert [r["step"] for r in rest.history] == list(range(start + 1, 17))
    assert rest.losses == pytest.approx(full.losses[start:], abs=1e-6, rel=0)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["loss"] for r in rows] == pytest.approx(full.losses, abs=1e-6, rel=0)


def test_an_empty_latest_pointer_is_named_as_such_not_as_a_checkpoint_lacking_its_weights(tmp_path):
    _run(tmp_path, tiny_cfg(checkpoint_every=0, checkpoint_every_steps=4, max_steps=4))
    root = tmp_path / CHECKPOINT_DIR
    named, _ = _damage(root / "step_00000004", "latest is empty")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.find_checkpoint(tmp_path)
    assert str(err.value) == f"{named}, such as step_00000000"


def test_resume_without_any_intact_checkpoint_is_one_checkpoint_error(tmp_path):
    _run(tmp_path, tiny_cfg(checkpoint_every=0, checkpoint_every_steps=4, max_steps=6))
    for step in ("step_00000004", "step_00000006"):
        _damage(tmp_path / CHECKPOINT_DIR / step, "truncated weights")
    with pytest.raises(ckpt.CheckpointError) as err:
        _run(tmp_path, tiny_cfg(), resume=True)
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"no other intact checkpoint under {tmp_path / CHECKPOINT_DIR}")
    assert message.startswith(f"{tmp_path / CHECKPOINT_DIR / 'step_00000006' / ckpt.WEIGHTS_FILE} is truncated")


def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # safetensors writes through its Rust core, which reports a full disk as a SafetensorError
    # (the message below is what it raised on a full disk), not as an OSError.
    real_write, calls = safetensors.torch.serialize_file, []

    def disk_full_after_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_write(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", disk_full_after_first)
    root = tmp_path / CHECKPOINT_DIR
    with pytest.raises(ckpt.CheckpointError) as err:
        _run(tmp_path, tiny_cfg(checkpoint_every=0, checkpoint_every_steps=4))
    assert str(err.value) == (f"cannot save checkpoint {root / 'step_00000008'} (Error while serializing: "
                              "I/O error: No space left on device (os error 28)); the previous "
                              "checkpoint step_00000004 is intact")
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root), ToyMethod(ToyModel(), contrastive_loss))["step"] == 4


def test_unwritable_checkpoints_folder_fails_before_training(tmp_path):
    (tmp_path / CHECKPOINT_DIR).write_text("a file where the folder should be")
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write checkpoints to {tmp_path / CHECKPOINT_DIR} "):
        _run(tmp_path, tiny_cfg())
    assert not (tmp_path / "train_log.jsonl").exists()
