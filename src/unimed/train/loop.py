"""The pre-training loop: AdamW + warm-up/cosine, accumulation, clipping, AMP, DDP, logs, resume.

The model takes a canonical batch dict and returns a dict of named tensors; the loss takes those
tensors plus `rank` / `world_size` and returns a dict with the total under "loss" and each term
beside it. Only rank 0 writes (JSONL log, TensorBoard, checkpoints).

Resume is exact (same loss curve as an uninterrupted run) when the loader's sampler has
`set_epoch` / `set_start` (see :mod:`unimed.data.pretrain`) and the loader carries its own
`generator`, so building an iterator does not draw from the global RNG that dropout uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unimed.train import checkpoint as ckpt
from unimed.train.config import TrainConfig
from unimed.train.distributed import DistInfo, barrier, gather_objects
from unimed.train.logs import RunLogger
from unimed.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclasses.dataclass
class TrainResult:
    """What a call to :func:`train` did: one history row per optimizer step it ran."""

    history: list[dict[str, float]]
    steps: int
    checkpoint: Path | None

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
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return None
    if not cuda:
        raise ValueError(f"train.precision={precision} needs a CUDA device, this run is on {device}")
    if precision == "bf16":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError("train.precision=bf16 but this GPU has no native bf16 support")
        return torch.bfloat16
    return torch.float16


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class Trainer:
    """Owns the model (DDP-wrapped when world size > 1), optimizer, schedule, scaler and counters."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., dict[str, torch.Tensor]],
        loader: DataLoader,
        cfg: TrainConfig,
        out_dir: str | Path,
        dist: DistInfo,
        progress: bool = True,
    ) -> None:
        self.cfg, self.dist, self.loader, self.progress = cfg, dist, loader, progress
        self.out_dir = Path(out_dir)
        self.model = model.to(dist.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss_fn = _prepare_loss(loss_fn, dist.device)
        self.net = self._wrap(self.model)
        if cfg.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {cfg.grad_accum}")
        self.steps_per_epoch = len(loader) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(loader)} batches per epoch cannot make an optimizer step with "
                f"train.grad_accum={cfg.grad_accum}; use a smaller batch size or more data"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.amp_dtype = resolve_precision(cfg.precision, dist.device)
        self.scaler = torch.amp.GradScaler(
            dist.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        if self.cfg.sync_batchnorm:
            if self.dist.device.type != "cuda":
                raise ValueError("train.sync_batchnorm needs CUDA; on CPU put BatchNorm in eval mode")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=self.cfg.find_unused_parameters
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resumed run needs (weights_only-loadable)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.dist.world_size,
            "batch_size": int(self.loader.batch_size or 0),
            "grad_accum": self.cfg.grad_accum,
        }

    def save(self) -> Path | None:
        """Collect every rank's RNG state, then rank 0 writes the checkpoint (all ranks must call)."""
        rngs = gather_objects(ckpt.rng_state(), self.dist)
        path = None
        if self.dist.is_main:
            state = {**self.state_dict(), "rng": rngs}
            path = ckpt.save_checkpoint(
                self.out_dir / CHECKPOINT_DIR, self.step, self.model, state, self.cfg.keep_checkpoints
            )
        barrier(self.dist)
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint under `out_dir`, if any; True when one was loaded."""
        path = ckpt.latest_checkpoint(self.out_dir / CHECKPOINT_DIR)
        if path is None:
            log.info("no checkpoint under %s; starting from step 0", self.out_dir / CHECKPOINT_DIR)
            return False
        state = ckpt.load_checkpoint(path, self.model, map_location=self.dist.device)
        self._check_compatible(state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(_to_cpu(rngs[self.dist.rank]))
        else:
            log.warning("checkpoint has RNG states of %d ranks, job has %d: keeping fresh seeds",
                        len(rngs), self.dist.world_size)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return True

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        """A mid-epoch position only means something with the same per-rank data split."""
        if state["step_in_epoch"] == 0:
            return
        now = (self.dist.world_size, int(self.loader.batch_size or 0), self.cfg.grad_accum)
        then = (state["world_size"], state["batch_size"], state["grad_accum"])
        if now != then:
            raise ValueError(
                f"checkpoint {path} stopped mid-epoch with (world size, batch size, grad_accum) = "
                f"{then}; this run has {now}. Resume with the same settings or from an epoch end."
            )

    # ------------------------------------------------------------------ data
    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """The epoch's batches from the current position (sampler seeded by epoch)."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip = self.step_in_epoch * self.cfg.grad_accum
        if skip and hasattr(sampler, "set_start"):
            sampler.set_start(skip * int(self.loader.batch_size))
            skip = 0
        batches = iter(self.loader)
        for _ in range(skip):  # a sampler that cannot start mid-epoch: read and drop
            next(batches)
        return batches

    # --------------------------------------------------------------- compute
    def _micro_step(self, batch: dict[str, Any], sync: bool) -> dict[str, torch.Tensor]:
        batch = _to_device(batch, self.dist.device)
        no_sync = self.net.no_sync() if self.dist.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(
                self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                out = self.net(batch)
                losses = self.loss_fn(**out, rank=self.dist.rank, world_size=self.dist.world_size)
            if "loss" not in losses:
                raise KeyError(f"the loss returned {sorted(losses)}, without the total under 'loss'")
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

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's log row."""
        lr = self.optimizer.param_groups[0]["lr"]
        data_time, terms, samples = 0.0, {}, 0
        start = time.perf_counter()
        for micro in range(self.cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"the loader ran out at optimizer step {self.step_in_epoch} of epoch "
                    f"{self.epoch}, though len(loader) promised {len(self.loader)} batches"
                )
            data_time += time.perf_counter() - t0
            samples += _batch_len(batch)
            out = self._micro_step(batch, sync=micro == self.cfg.grad_accum - 1)
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + v / self.cfg.grad_accum
        grad_norm = self._optimizer_step()
        row = {k: float(v) for k, v in terms.items()}  # one host sync per step, after the update
        total = time.perf_counter() - start
        self.step += 1
        self.step_in_epoch += 1
        row.update(
            step=self.step, epoch=self.epoch, lr=lr, grad_norm=grad_norm,
            data_time=data_time, compute_time=total - data_time,
            data_wait_share=data_time / total if total > 0 else 0.0,
            samples_per_s=samples * self.dist.world_size / total if total > 0 else 0.0,
        )
        return row

    # ------------------------------------------------------------------- run
    def _last_step(self) -> int:
        cap = self.cfg.max_steps
        return self.total_steps if cap is None else min(cap, self.total_steps)

    def _due(self, every: int, count: int) -> bool:
        return every > 0 and count % every == 0

    def run(self, logger: RunLogger) -> TrainResult:
        """Train from the current position to the end of the schedule or `max_steps`."""
        history: list[dict[str, float]] = []
        saved_at, path = -1, None
        last = self._last_step()
        bar = tqdm(total=last, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.is_main))
        self.net.train()
        while self.step < last:
            batches = self._epoch_batches()
            while self.step_in_epoch < self.steps_per_epoch and self.step < last:
                row = self.train_step(batches)
                history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if self._due(self.cfg.log_every, self.step) or self.step == last:
                    logger.log(row)
                if self._due(self.cfg.checkpoint_every_steps, self.step):
                    path, saved_at = self.save(), self.step
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
                if self._due(self.cfg.checkpoint_every, self.epoch) and saved_at != self.step:
                    path, saved_at = self.save(), self.step
        bar.close()
        if history and saved_at != self.step:
            path = self.save()
        return TrainResult(history=history, steps=self.step, checkpoint=path)


def _batch_len(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def _to_cpu(value: Any) -> Any:
    """RNG states must be CPU byte tensors even when the checkpoint was mapped to a GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _prepare_loss(loss_fn: Callable, device: torch.device) -> Callable:
    if isinstance(loss_fn, nn.Module):
        if any(p.requires_grad for p in loss_fn.parameters()):
            raise ValueError(
                "the loss has trainable parameters, which this loop would neither optimise nor "
                "save; put learnable parts (e.g. a temperature) in the model"
            )
        return loss_fn.to(device)
    return loss_fn


def train(
    model: nn.Module,
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    loader: DataLoader,
    cfg: TrainConfig,
    out_dir: str | Path,
    dist: DistInfo,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Pre-train `model` on `loader` with `loss_fn`; checkpoints and logs go under `out_dir`.

    With `resume`, continue from the newest checkpoint there (weights, optimizer, schedule, scaler,
    RNG and data position), so the loss curve matches an uninterrupted run. Call on every rank.
    """
    trainer = Trainer(model, loss_fn, loader, cfg, out_dir, dist, progress)
    if resume:
        trainer.resume()
    with RunLogger(out_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard) as logger:
        return trainer.run(logger)
