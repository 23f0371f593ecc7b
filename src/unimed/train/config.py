"""Configuration of the pre-training loop."""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds, path_option

LOADER_MIXES = ("alternate", "proportional")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings (paper: AdamW 4e-5, wd 5e-2, warm-up + cosine).

    `batch_size` is per rank and per micro-step; the global batch is
    `batch_size * grad_accum * world_size`. `max_steps` stops early (tests, benchmarks) without
    changing the schedule, which always spans `epochs`. `precision` is "auto" (fp16 on CUDA, fp32
    elsewhere), "fp32", "fp16" (CUDA only) or "bf16" (only where the device runs it natively).
    `checkpoint_every` counts epochs, `checkpoint_every_steps` optimizer steps (0 = off).
    `find_unused_parameters` is DDP's; the loop also turns it on where the method says some
    parameter can get no gradient in a step (:meth:`unimed.methods.base.Method.unused_parameters`:
    UniMedI's X-ray steps, a loss weight of 0).
    `sync_batchnorm` turns BatchNorm into SyncBatchNorm under DDP on CUDA (batch statistics over
    the global batch; per-rank statistics otherwise, as in the reference implementations).
    `channels_last` stores the 4-D (convolution) weights in channels-last memory format, which the
    CPU (oneDNN) and CUDA convolution kernels run faster; numerics agree to float rounding.
    `epoch_steps` caps the optimizer steps of every epoch (None: a full pass over the data): each
    epoch then trains on the first batches of its own shuffled order, so short CPU presets of
    multi-stage methods still see different data in every stage; the schedule spans the capped
    epochs. `loader_mix` says how a method's several loaders (UniMedI: X-rays and CT volumes) make an
    epoch: "proportional" (default) is one pass over every loader, each loader's batches spread
    evenly; "alternate" takes them in turn and stops when the shortest is spent, so the longer
    loaders' later batches are never reached in that epoch (see
    :func:`unimed.train.loop.mix_schedule`).
    `init_from` starts the run from another run's weights (a warm start: continued pre-training on
    other data, say) under this run's fresh optimizer and schedule: a run or checkpoint folder of
    the same method (every tensor, heads and teachers included) or a folder of ``unimed export``
    (its model; the method's own parts start fresh). It applies when the run starts; a resumed run
    continues from its own checkpoint. See :func:`unimed.commands.train.warm_start`.
    """

    epochs: int = 50
    batch_size: int = 128
    lr: float = 4.0e-5
    weight_decay: float = 5.0e-2
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1.0e-8
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    max_steps: int | None = None
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    tensorboard: bool = True
    channels_last: bool = False
    epoch_steps: int | None = None
    loader_mix: str = "proportional"
    init_from: str | None = path_option(None)

    def __post_init__(self) -> None:
        check_bounds("train", self,
                     at_least_one=("epochs", "batch_size", "grad_accum", "keep_checkpoints"),
                     positive=("lr", "eps"),
                     non_negative=("weight_decay", "grad_clip", "log_every", "checkpoint_every",
                                   "checkpoint_every_steps"),  # 0: no clipping, the period off
                     unit_interval=("warmup_ratio", "min_lr_ratio"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 (or null), got {self.max_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if self.loader_mix not in LOADER_MIXES:
            raise ValueError(f"train.loader_mix must be one of {', '.join(LOADER_MIXES)}, got "
                             f"{self.loader_mix!r}")
        if self.epoch_steps is not None and self.epoch_steps < 1:
            raise ValueError(f"train.epoch_steps must be >= 1 (or null), got {self.epoch_steps}")
