"""The training loop: stages, AdamW + warm-up/cosine, accumulation, clipping, AMP, DDP, logs, resume.

One loop for every method (:class:`unimed.methods.base.Method`): per micro-batch it calls
``method(batch, ctx)``, which returns a dict with the total under "loss" and each term beside it;
per optimizer step it steps the current stage's optimizer and schedule, then calls
``method.after_optimizer_step(ctx)``. Stages run one after the other, each with the optimizer and
schedule the method configures for it. Several named loaders are mixed as ``train.loader_mix``
says (:func:`mix_schedule`): "alternate" takes them in turn (loader 1, loader 2, ..., loader 1, ...)
and ends the epoch when the shortest is spent; "proportional" makes an epoch one pass over every
loader, each loader's batches spread evenly through it. Only rank 0 writes (JSONL log,
TensorBoard, checkpoints).

SIGINT / SIGTERM end training after the step in progress, with a checkpoint there
(:mod:`unimed.train.stop`). Resume is exact (same loss curve as an uninterrupted run) when every
loader's sampler has `set_epoch` / `set_start` (see :mod:`unimed.data.pretrain`) and the loader
carries its own `generator`, so building an iterator does not draw from the global RNG that dropout
uses, and the run keeps its optimizer settings (a run resumed under others trains under them from
the resumed step, with a warning: `Trainer.resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unimed.errors import ConfigError
from unimed.methods.base import Method, Stage, StepContext
from unimed.models.image import to_channels_last
from unimed.train import checkpoint as ckpt
from unimed.train.config import LOADER_MIXES, PRECISIONS, TrainConfig
from unimed.train.distributed import EACH_RANK, DistInfo, all_reduce_mean, barrier, gather_objects
from unimed.train.logs import RunLogger
from unimed.train.stop import (
    StopRequest,
    TrainingDiverged,
    TrainingInterrupted,
    end_workers,
    leave_stop_signals_to_training,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ckpt.CHECKPOINT_DIR
OPTIMIZER_SETTINGS = ("weight_decay", "betas", "eps")
"""The optimizer's settings besides the learning rate that a run's config sets (TrainConfig)."""


@dataclasses.dataclass
class TrainResult:
    """What a call to :func:`train` did: one history row per optimizer step it ran."""

    history: list[dict[str, float]]
    steps: int
    checkpoint: Path | None
    skipped: int = 0  # samples this call replaced because their data could not be read

    @property
    def losses(self) -> list[float]:
        """The total loss of every optimizer step run by this call."""
        return [row["loss"] for row in self.history]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain fp32.

    fp16 and bf16 run on CUDA only; bf16 also needs native support. On CPUs we stay in fp32: bf16
    matmuls there can be hundreds of times slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return None
    if not cuda:
        raise ConfigError(f"train.precision={precision} needs a CUDA device, this run is on {device}")
    if precision == "bf16":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ConfigError("train.precision=bf16 but this GPU has no native bf16 support")
        return torch.bfloat16
    return torch.float16


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class Trainer:
    """Owns the method (DDP-wrapped when world size > 1), the current stage's optimizer and
    schedule, the scaler and the counters."""

    def __init__(
        self,
        method: Method,
        loaders: DataLoader | Mapping[str, DataLoader],
        cfg: TrainConfig,
        out_dir: str | Path,
        dist: DistInfo,
        progress: bool = True,
    ) -> None:
        self.cfg, self.dist, self.progress = cfg, dist, progress
        self.loaders = {"train": loaders} if isinstance(loaders, DataLoader) else dict(loaders)
        if not self.loaders:
            raise ValueError("the training loop needs at least one loader")
        for loader in self.loaders.values():
            leave_stop_signals_to_training(loader)
        self.out_dir = Path(out_dir)
        self.method = self._convert(method.to(dist.device))
        if cfg.channels_last:
            to_channels_last(self.method)
        self.schedule = mix_schedule([len(v) for v in self.loaders.values()], cfg.loader_mix)
        self.batches_per_epoch = len(self.schedule)
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        if cfg.epoch_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.epoch_steps)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.batches_per_epoch} batches per epoch cannot make an optimizer step with "
                f"train.grad_accum={cfg.grad_accum}; use a smaller batch size or more data"
            )
        self.stages = method.stages(cfg)
        _check_stages(self.stages)
        self.total_epochs = sum(stage.epochs for stage in self.stages)
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.amp_dtype = resolve_precision(cfg.precision, dist.device)
        self.scaler = torch.amp.GradScaler(
            dist.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.step = 0
        self.skipped = 0
        self.skipped_files: set[str] = set()
        self.epoch = 0
        self.step_in_epoch = 0
        self.stage_index = -1
        self.stop_request: StopRequest | None = None  # set while :meth:`run` runs under :func:`train`
        self.stopping = False  # some rank was asked to stop: every rank stops after this step
        self._enter_stage(0)

    def _convert(self, method: Method) -> Method:
        if self.dist.distributed and self.cfg.sync_batchnorm:
            if self.dist.device.type != "cuda":
                raise ConfigError("train.sync_batchnorm needs CUDA; on CPU put BatchNorm in eval mode")
            return nn.SyncBatchNorm.convert_sync_batchnorm(method)
        return method

    def _wrap(self) -> nn.Module:
        """DDP around the method, built per stage (a stage may freeze or unfreeze parameters)."""
        if not self.dist.distributed:
            return self.method
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        find_unused = self.cfg.find_unused_parameters
        reason = self.method.unused_parameters(tuple(self.loaders))
        if reason and not find_unused:
            find_unused = True
            if self.dist.is_main:
                log.info("DDP finds unused parameters (train.find_unused_parameters on): %s", reason)
        return DistributedDataParallel(self.method, device_ids=device_ids,
                                       find_unused_parameters=find_unused)

    # ---------------------------------------------------------------- stages
    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    def _stage_of_epoch(self, epoch: int) -> int:
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.epochs
            if epoch < end:
                return index
        return len(self.stages) - 1

    def _stage_start_epoch(self, index: int) -> int:
        return sum(stage.epochs for stage in self.stages[:index])

    def _enter_stage(self, index: int) -> None:
        """Start stage `index`: the method's hook, a fresh optimizer and schedule, DDP."""
        self.stage_index = index
        stage = self.stages[index]
        self.method.start_stage(stage)
        self.optimizer, self.scheduler = self.method.configure_optimizer(
            stage, self.cfg, stage.epochs * self.steps_per_epoch
        )
        self.net = self._wrap()

    def _stage_step(self) -> int:
        return self.step - self._stage_start_epoch(self.stage_index) * self.steps_per_epoch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resumed run needs (weights_only-loadable)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.train_state(),
            "step": self.step,
            "last_step": self._last_step(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "stage": self.stage.name,
            "world_size": self.dist.world_size,
            "batch_size": self._batch_sizes(),
            "grad_accum": self.cfg.grad_accum,
            "loader_mix": self.cfg.loader_mix,
            "steps_per_epoch": self.steps_per_epoch,
            "data_seeds": self._data_seeds(),
        }

    def _batch_sizes(self) -> list[int]:
        return [int(loader.batch_size or 0) for loader in self.loaders.values()]

    def _data_seeds(self) -> list[int | None]:
        """The seed of each loader's sampler (``run.seed`` on the command line), which orders and
        augments its data; None for a loader without a seeded sampler."""
        return [getattr(getattr(loader, "sampler", None), "seed", None) for loader in self.loaders.values()]

    def save(self) -> Path:
        """Collect every rank's RNG state, then rank 0 writes the checkpoint (all ranks must call);
        every rank returns its folder."""
        rngs = gather_objects(ckpt.rng_state(), self.dist)
        path = self.out_dir / CHECKPOINT_DIR / ckpt.checkpoint_name(self.step)
        if self.dist.is_main:
            state = {**self.state_dict(), "rng": rngs}
            path = ckpt.save_checkpoint(
                self.out_dir / CHECKPOINT_DIR, self.step, self.method, state, self.cfg.keep_checkpoints
            )
        barrier(self.dist)
        return path

    def resume(self) -> bool:
        """Load the newest intact checkpoint under `out_dir`, if any; True when one was loaded.

        The stage the checkpoint was taken in is entered first (its hook, optimizer and schedule),
        then weights, buffers and the optimizer's and schedule's state are loaded into it, under
        this run's optimizer settings (:meth:`_load_optimizer_state`).
        """
        path = ckpt.latest_checkpoint(self.out_dir / CHECKPOINT_DIR, fallback=True)
        if path is None:
            # A job resubmitted with --resume starts this way the first time; a misspelt run.name
            # would train from scratch for hours, so it is said above the INFO lines.
            log.warning("--resume: no checkpoint under %s; starting from step 0",
                        self.out_dir / CHECKPOINT_DIR)
            return False
        # Weights of another method or architecture are the first thing to say: the training
        # state's checks below would otherwise name a symptom (its loaders' seeds, its stages).
        ckpt.check_weights_fit(self.method, path / ckpt.WEIGHTS_FILE)
        state = ckpt.load_state(path, map_location=self.dist.device)
        self._check_compatible(state, path)
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        index = self._stage_of_epoch(self.epoch)
        if index != self.stage_index:
            self._enter_stage(index)
        ckpt.load_weights(self.method, path / ckpt.WEIGHTS_FILE)
        self._load_optimizer_state(state, path)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():  # e.g. a CPU fp32 checkpoint resumed on a GPU in fp16
            log.info("checkpoint %s was trained without fp16 loss scaling: the scaler starts fresh",
                     path)
        self.method.load_train_state(state["method"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(_to_cpu(rngs[self.dist.rank]))
        else:
            log.warning("checkpoint has RNG states of %d ranks, job has %d: keeping fresh seeds",
                        len(rngs), self.dist.world_size)
        if self.step > self._last_step():  # nothing to train, and the saved config would lie
            raise ConfigError(f"checkpoint {path} is step {self.step}, past this run's last step "
                              f"{self._last_step()} (train.max_steps, train.epochs): nothing is left to "
                              "train; resume without lowering them")
        log.info("resumed from %s at step %d (epoch %d, stage %s)", path, self.step, self.epoch,
                 self.stage.name)
        return True

    def _load_optimizer_state(self, state: dict[str, Any], path: Path) -> None:
        """The optimizer's moments and the schedule's position from the checkpoint, under this
        run's settings: its learning rate, warm-up, number of steps, weight decay, betas and eps.
        The checkpoint holds the settings it was trained with too; loaded as they are, a run
        resumed with more epochs would go on at the schedule's final rate (0 by default) and one
        resumed with a lower rate would ignore it. Where the settings differ, a warning names them
        and the rate at the resumed step under both; where they are the same, resume is exact."""
        saved_sizes = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        sizes = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved_sizes != sizes:
            raise ConfigError(
                f"checkpoint {path} trained other parameters than this run would (tensors per "
                f"optimizer group: {saved_sizes}; this run's: {sizes}): a setting that freezes or adds "
                "parameters changed since; resume with the settings it was trained with, or train "
                "afresh under another run.name")
        schedule = self.scheduler.state_dict()
        ours = _optimizer_settings(self.optimizer.param_groups, schedule)
        self.optimizer.load_state_dict(state["optimizer"])
        loaded = state["scheduler"]
        theirs = _optimizer_settings(self.optimizer.param_groups, loaded)
        changes = [f"{name} {then} -> {now}" for then_group, now_group in zip(theirs, ours)
                   for name, now in now_group.items() if (then := then_group.get(name)) != now]
        if not changes:
            self.scheduler.load_state_dict(loaded)
            return
        rates = [base * rule(loaded["last_epoch"])
                 for base, rule in zip(schedule["base_lrs"], self.scheduler.lr_lambdas)]
        for group, settings, rate in zip(self.optimizer.param_groups, ours, rates):
            group.update({key: settings[key] for key in OPTIMIZER_SETTINGS if key in group},
                         lr=rate, initial_lr=settings["lr"])
        self.scheduler.load_state_dict({**loaded, "base_lrs": schedule["base_lrs"],
                                        "lr_lambdas": schedule["lr_lambdas"], "_last_lr": rates})
        log.warning("checkpoint %s was trained with other optimizer settings than this run's (%s): "
                    "this run's apply from step %d, at a learning rate of %.3g where the "
                    "checkpoint's schedule has %.3g", path, ", ".join(dict.fromkeys(changes)),
                    self.step, rates[0], loaded["_last_lr"][0])

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        """The checkpoint's stage must be this run's, and a mid-epoch position only means
        something with the same per-rank data split."""
        missing = [k for k in ("step", "epoch", "step_in_epoch", "stage", "method") if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} has no {missing} in its training state: "
                                       "it was not written by this training loop; start a fresh run")
        names = [stage.name for stage in self.stages]
        expected = names[self._stage_of_epoch(state["epoch"])]
        if state["stage"] != expected:
            raise ConfigError(
                f"checkpoint {path} was taken in stage '{state['stage']}' at epoch {state['epoch']}, "
                f"where this run's stages ({', '.join(names)}) are in '{expected}'"
            )
        now = (self.dist.world_size, self._batch_sizes(), self.cfg.grad_accum, self.cfg.loader_mix)
        then = (state["world_size"], list(state["batch_size"]), state["grad_accum"],
                state.get("loader_mix", "alternate"))
        seeds = self._data_seeds()
        saved_seeds = state.get("data_seeds", seeds)
        if seeds != saved_seeds and state["step_in_epoch"] == 0:
            log.warning("checkpoint %s drew its data with the seeds %s and this run's are %s "
                        "(run.seed): the epochs from here are ordered and augmented by this run's",
                        path, saved_seeds, seeds)
        elif seeds != saved_seeds:
            raise ConfigError(
                f"checkpoint {path} stopped mid-epoch in the data order of the seeds {saved_seeds}; "
                f"this run's are {seeds} (run.seed), so the rest of that epoch would repeat some "
                "samples and skip others. Resume with the checkpoint's run.seed or from an epoch end.")
        if state["step_in_epoch"] == 0:
            if now != then:
                log.warning("resuming at an epoch end with (world size, batch sizes, grad_accum, "
                            "loader_mix) = %s where checkpoint %s had %s: the epochs from here use "
                            "this run's", now, path, then)
            return
        if now != then:
            raise ConfigError(
                f"checkpoint {path} stopped mid-epoch with (world size, batch sizes, grad_accum, "
                f"loader_mix) = "
                f"{then}; this run has {now}. Resume with the same settings or from an epoch end."
            )
        steps = state.get("steps_per_epoch")
        past = state["step_in_epoch"] >= self.steps_per_epoch
        if steps != self.steps_per_epoch and (steps is not None or past):
            rest = ("that epoch is over in this run's" if past
                    else "the rest of that epoch is drawn from this run's order")
            log.warning("checkpoint %s stopped after step %d of an epoch of %s steps; this run's data "
                        "and train.epoch_steps make epochs of %d (the data changed since?): %s",
                        path, state["step_in_epoch"], steps if steps is not None else "more",
                        self.steps_per_epoch, rest)

    # ------------------------------------------------------------------ data
    def _epoch_batches(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The epoch's (loader name, batch) pairs from the current position, loaders mixed by the
        schedule (samplers seeded by epoch)."""
        names = list(self.loaders)
        done = self.step_in_epoch * self.cfg.grad_accum  # batches of this epoch already used
        used = self.schedule[:done]
        iterators = []
        for i, name in enumerate(names):
            loader = self.loaders[name]
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            skip = used.count(i)  # this loader's batches among the first `done`
            if skip and hasattr(sampler, "set_start"):
                sampler.set_start(skip * int(loader.batch_size))
                skip = 0
            batches = iter(loader)
            for _ in range(skip):  # a sampler that cannot start mid-epoch: read and drop
                next(batches)
            iterators.append(batches)
        return ((names[i], next(iterators[i])) for i in self.schedule[done:])

    def _data_errors(self, batch: dict[str, Any]) -> None:
        """Take the dataset's error fields out of `batch`: raise the first of "data_errors" here in
        the main process (one line naming the file, even from a loader worker); count and log
        each of "skipped" (samples replaced under ``data.on_error=skip``)."""
        errors = batch.pop("data_errors", None)
        if errors:
            raise errors[0]
        for error in batch.pop("skipped", ()):
            self.skipped += 1
            if str(error) not in self.skipped_files:  # named once, however many epochs meet it
                self.skipped_files.add(str(error))
                log.warning("skipped in training (data.on_error=skip; another pair of its community "
                            "takes its place): %s", error, extra=EACH_RANK)

    # --------------------------------------------------------------- compute
    def _context(self, loader: str) -> StepContext:
        return StepContext(
            step=self.step, epoch=self.epoch, stage=self.stage.name, stage_step=self._stage_step(),
            loader=loader, rank=self.dist.rank, world_size=self.dist.world_size,
        )

    def _micro_step(self, batch: dict[str, Any], ctx: StepContext, sync: bool) -> dict[str, torch.Tensor]:
        batch = _to_device(batch, self.dist.device)
        no_sync = self.net.no_sync() if self.dist.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(
                self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                losses = self.net(batch, ctx)
            if "loss" not in losses:
                raise KeyError(f"the method returned {sorted(losses)}, without the total under 'loss'")
            self.scaler.scale(losses["loss"] / self.cfg.grad_accum).backward()
        return {k: v.detach() for k, v in losses.items() if v.ndim == 0}

    def _optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def train_step(self, batches: Iterator[tuple[str, dict[str, Any]]]) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's log row."""
        lr = self.optimizer.param_groups[0]["lr"]
        data_time, terms, samples = 0.0, {}, 0
        start = time.perf_counter()
        for micro in range(self.cfg.grad_accum):
            t0 = time.perf_counter()
            item = next(batches, None)
            if item is None:
                raise RuntimeError(
                    f"the loaders ran out at optimizer step {self.step_in_epoch} of epoch "
                    f"{self.epoch}, though they promised {self.batches_per_epoch} batches"
                )
            name, batch = item
            self._data_errors(batch)
            data_time += time.perf_counter() - t0
            samples += _batch_len(batch)
            out = self._micro_step(batch, self._context(name), sync=micro == self.cfg.grad_accum - 1)
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + v / self.cfg.grad_accum
        grad_norm = self._optimizer_step()
        self.method.after_optimizer_step(self._context(name))
        # The global batch's terms (each rank's mean over ranks, so every rank and the log hold
        # the loss of the whole batch, not rank 0's share); one host sync per step, after the update.
        # A stop request rides along: when any rank has one, every rank stops after this step.
        names = list(terms)
        asked = self.stop_request is not None and self.stop_request.received is not None
        flag = terms[names[0]].new_full((), float(asked), dtype=torch.float32)  # on the device: no host copy
        values = torch.stack([*(terms[k].float() for k in names), flag])
        means = all_reduce_mean(values, self.dist).tolist()
        row = dict(zip(names, means))
        self.stopping = means[-1] > 0
        total = time.perf_counter() - start
        self.step += 1
        self.step_in_epoch += 1
        row.update(
            step=self.step, epoch=self.epoch, stage=self.stage_index, lr=lr, grad_norm=grad_norm,
            data_time=data_time, compute_time=total - data_time,
            data_wait_share=data_time / total if total > 0 else 0.0,
            samples_per_s=samples * self.dist.world_size / total if total > 0 else 0.0,
        )
        return row

    # ------------------------------------------------------------------- run
    def _last_step(self) -> int:
        cap = self.cfg.max_steps
        return self.total_steps if cap is None else min(cap, self.total_steps)

    def _check_finite(self, row: dict[str, float], logger: RunLogger) -> None:
        """A step whose loss is not finite (or whose gradient norm is not, where no fp16 loss
        scaler skips such steps) has put NaN or inf into the weights: the row is logged and the
        run stops with :class:`TrainingDiverged` before any checkpoint holds them, so the newest
        checkpoint on disk is still one to resume from."""
        losses = {k: v for k, v in row.items() if k == "loss" or k.endswith("_loss")}
        scaled = self.scaler.is_enabled()
        if all(math.isfinite(v) for v in losses.values()) and (scaled or math.isfinite(row["grad_norm"])):
            return
        logger.log(row)
        bad = ", ".join(f"{k} {v:.4g}" for k, v in {**losses, "grad_norm": row["grad_norm"]}.items()
                        if not math.isfinite(v)) or "none"
        newest = ckpt.latest_checkpoint(self.out_dir / CHECKPOINT_DIR)
        raise TrainingDiverged(
            f"step {self.step} (epoch {self.epoch}, stage {self.stage.name}) gave a non-finite "
            f"{bad} at learning rate {row['lr']:.3g}; its update was not saved, and the newest "
            f"checkpoint is {newest or 'none yet'}: --resume from it with a lower train.lr or "
            "train.grad_clip, or look at that step's data")

    def _due(self, every: int, count: int) -> bool:
        return every > 0 and count % every == 0

    def run(self, logger: RunLogger) -> TrainResult:
        """Train from the current position to the end of the last stage or `max_steps`."""
        history: list[dict[str, float]] = []
        saved_at, path = -1, None
        last = self._last_step()
        bar = tqdm(total=last, initial=self.step, desc=self.stage.name, unit="step",
                   dynamic_ncols=True, disable=not (self.progress and self.dist.is_main))
        self.method.train()
        while self.step < last:
            # None left where a resumed run's epochs are shorter than the checkpoint's position
            batches = self._epoch_batches() if self.step_in_epoch < self.steps_per_epoch else iter(())
            while self.step_in_epoch < self.steps_per_epoch and self.step < last and not self.stopping:
                row = self.train_step(batches)
                self._check_finite(row, logger)
                history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if self._due(self.cfg.log_every, self.step) or self.step == last or self.stopping:
                    logger.log(row)
                if self._due(self.cfg.checkpoint_every_steps, self.step):
                    path, saved_at = self.save(), self.step
            if self.step_in_epoch >= self.steps_per_epoch:  # past it: resumed on fewer steps per epoch
                self.epoch += 1
                self.step_in_epoch = 0
                if self.epoch < self.total_epochs and self._stage_of_epoch(self.epoch) != self.stage_index:
                    self._enter_stage(self._stage_of_epoch(self.epoch))
                    bar.set_description(self.stage.name)
                if self._due(self.cfg.checkpoint_every, self.epoch) and saved_at != self.step:
                    path, saved_at = self.save(), self.step
            if self.stopping and self.step < last:
                bar.close()
                raise TrainingInterrupted(self._received(), self.step,
                                          path if saved_at == self.step else self.save())
        bar.close()
        if history and saved_at != self.step:
            path = self.save()
        if self.skipped:
            log.warning("%d sample(s) could not be read and were replaced in training "
                        "(data.on_error=skip): %d file(s), each named above", self.skipped,
                        len(self.skipped_files), extra=EACH_RANK)
        if self.stopping:  # asked during the last step: the stage is whole, the command stops
            raise TrainingInterrupted(self._received(), self.step, path, complete=True)
        return TrainResult(history=history, steps=self.step, checkpoint=path, skipped=self.skipped)

    def _received(self) -> signal.Signals | None:
        """The stop signal this rank received (None: another rank's stopped every rank)."""
        return self.stop_request.received if self.stop_request is not None else None


def mix_schedule(lengths: list[int], mode: str) -> list[int]:
    """The loader index of every batch of an epoch, for loaders of `lengths` batches.

    "alternate": loaders in turn, ``min(lengths)`` batches of each. "proportional": every batch of
    every loader once, batch k of loader j placed at its share ``(k + 0.5) / lengths[j]`` of the
    epoch (ties in loader order), so a loader with three times the batches of another comes three
    times as often, all through the epoch.
    """
    if mode == "alternate":
        return [i % len(lengths) for i in range(len(lengths) * min(lengths))]
    if mode == "proportional":
        places = [((k + 0.5) / n, j) for j, n in enumerate(lengths) for k in range(n)]
        return [j for _, j in sorted(places)]
    raise ValueError(f"train.loader_mix must be one of {', '.join(LOADER_MIXES)}, got {mode!r}")


def _check_stages(stages: list[Stage]) -> None:
    names = [stage.name for stage in stages]
    if not stages or len(set(names)) != len(names):
        raise ValueError(f"a method needs one or more stages with distinct names, got {names}")
    for stage in stages:
        if stage.epochs < 1:
            raise ValueError(f"stage '{stage.name}' must last at least one epoch, got {stage.epochs}")


def _batch_len(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def _optimizer_settings(groups: list[dict[str, Any]], schedule: dict[str, Any]) -> list[dict[str, Any]]:
    """Per parameter group, what a run's config sets: the base learning rate, `OPTIMIZER_SETTINGS`
    and the schedule's numbers (:class:`unimed.train.optim.WarmupCosine`), from the optimizer's
    groups and a LambdaLR state dict."""
    return [{"lr": base, **{key: group[key] for key in OPTIMIZER_SETTINGS if key in group}, **(rule or {})}
            for group, base, rule in zip(groups, schedule["base_lrs"], schedule["lr_lambdas"])]


def _to_cpu(value: Any) -> Any:
    """RNG states must be CPU byte tensors even when the checkpoint was mapped to a GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def train(
    method: Method,
    loaders: DataLoader | Mapping[str, DataLoader],
    cfg: TrainConfig,
    out_dir: str | Path,
    dist: DistInfo,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `method` on `loaders` (one, or several by name, alternated) through its stages;
    checkpoints and logs go under `out_dir`.

    With `resume`, continue from the newest checkpoint there (weights and buffers, method state,
    stage, optimizer, schedule, scaler, RNG and data position), so the loss curve matches an
    uninterrupted run; log rows after the resumed step (written by the interrupted run past its last
    checkpoint) are dropped, so the log has each step once. SIGINT / SIGTERM stop it after the
    step in progress, with a checkpoint there (:class:`unimed.train.stop.TrainingInterrupted`).
    Call on every rank.
    """
    if dist.is_main:
        ckpt.check_writable(Path(out_dir) / CHECKPOINT_DIR)
    trainer = Trainer(method, loaders, cfg, out_dir, dist, progress)
    try:
        if resume:
            trainer.resume()
        with RunLogger(out_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                       start_step=trainer.step) as logger, StopRequest() as trainer.stop_request:
            return trainer.run(logger)
    finally:
        for loader in trainer.loaders.values():
            end_workers(loader)
