"""3D fine-tuning (UniMedI Table 3): CC-CCII and LUNA16 volume classification, encoder trained.

Per dataset of `eval.volume_finetune.datasets` and label fraction, a deep copy of the encoder's
model (the text tower is shared with the original, never copied nor trained) and a linear head on
its pooled volume feature train together; the encoder under evaluation is left as it was.

* A 2D encoder sees a volume through the slice-wise adapter of ``volume_probe``, now with
  gradients: `slices` axial slices (``eval.volume.window``), each through ``pooled_image``, their
  features mean-pooled.
* A native 3D model (``pooled_volume(stacks)``: (N, D, 1, S, S) in [0, 1] -> (N, width), UniMedI)
  is fine-tuned through its own volume path.

What trains (`trainable`): "all", every parameter of the copy outside the text tower that the
pooled feature depends on (the paper's full fine-tuning; parameters off that path, e.g. the
projectors, get no gradient and do not move), or "last", the encoder's last feature level (the
module of the backbone ``visual``'s timm ``feature_info[-1]``: ResNet ``layer4``, EfficientNet
``blocks.6``, the last ViT block), the parameters registered after it in the same module (the final
norm of a ViT, EfficientNet's ``conv_head``) and the head. Everything else, UniMedI's 3D tokenizer
and PRIOR's attention pool included, keeps its pre-trained values under "last". The copy stays in
eval mode: batch norms keep their pre-trained statistics (the evaluation's encoders have them folded
into their convolutions), no dropout. Each row reports how many parameters received gradients.

Targets as ``volume_probe``'s: CC-CCII accuracy over NCP / CP / Normal (cross-entropy), LUNA16 the
"nodule" label column (binary cross-entropy), scored by AUC and, beside it, by accuracy at
probability 0.5. AdamW, training volumes flipped left-right at random (the paper's "randomflip"),
one shuffled pass per epoch. Model selection uses the validation split only: after each epoch the
validation metric (ties broken by the lower validation loss), or the validation loss alone where
the metric is undefined there (a LUNA16 validation split of one class); training stops after
`patience` epochs without improvement and the best state is scored on the test split, with
bootstrap intervals over the test volumes on the context's shared resamples (the volume probe's).

Under "last" the frozen part of a slice-wise model computes the same activations for a slice in
every epoch, so it runs once per slice (:class:`FrozenPrefix`; the training volumes once more,
flipped) and each epoch runs the trainable part only: on the demo's encoders the frozen part is
all but the last of EfficientNet's seven stages. A native 3D model's attentive selection pass
through its frozen blocks runs once per volume the same way (:class:`FrozenSelection`, UniMedI's
first five of six blocks), and its pass over the volume and the selected slices once per volume,
orientation and selection.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unimed.eval.config import VolumeFinetuneConfig
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.linear_probe import ProbeTarget, label_target, score, targets, test_estimate
from unimed.eval.metrics import Estimate, batched_mean, bootstrap
from unimed.eval.segmentation import seeded_generator
from unimed.eval.tasks import TASKS, TaskContext, sweep_fractions, training_rows
from unimed.eval.volumes import SPLITS, VOLUME_TARGETS
from unimed.models.unimedi import CtTrunk, SelectionTrunk

log = logging.getLogger(__name__)

Split = tuple[torch.Tensor, torch.Tensor]  # (N, K, 1, S, S) slice stacks in [0, 1], targets


class VolumeClassifier(nn.Module):
    """An encoder's model (a trainable copy) and a linear head on its pooled volume feature."""

    def __init__(self, model: nn.Module, classes: int, width: int) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(width, classes)

    def features(self, stacks: torch.Tensor) -> torch.Tensor:
        """(B, K, 1, S, S) axial slices in [0, 1] -> (B, width): the model's own ``pooled_volume``
        (a native 3D model), else the mean of the K slices' ``pooled_image`` features."""
        native = getattr(self.model, "pooled_volume", None)
        if native is not None:
            return native(stacks)
        batch, k = stacks.shape[:2]
        return self.model.pooled_image(rgb(stacks.flatten(0, 1))).reshape(batch, k, -1).mean(1)

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        """(B, K, 1, S, S) -> (B, classes) logits."""
        return self.head(self.features(stacks))


def last_level(model: nn.Module) -> list[str]:
    """Names (in `model`) of the parameters of the last feature level of the backbone
    ``model.visual`` (timm ``feature_info[-1]["module"]``) and of those registered after it in the
    module that holds the level (its sequence of blocks or stages)."""
    visual = getattr(model, "visual", None)
    info = getattr(visual, "feature_info", None)
    if visual is None or not info:
        raise EvalError("eval.volume_finetune.trainable=last needs a backbone `visual` with timm "
                        "feature_info (which module is the last feature level); use trainable=all")
    level = str(info[-1]["module"])  # "layer4", "blocks.6", "vit.blocks.5"
    parts = level.split(".")
    owner = parts[:-2] if parts[-1].isdigit() else parts[:-1]  # "vit" holds "vit.blocks.5"
    prefix = "".join(f"{p}." for p in owner)
    names = [name for name, _ in visual.named_parameters() if name.startswith(prefix)]
    first = next((i for i, name in enumerate(names) if name.startswith(f"{level}.")), None)
    if first is None:
        raise EvalError(f"eval.volume_finetune.trainable=last: the backbone's last feature level "
                        f"'{level}' has no parameters; use trainable=all")
    return [f"visual.{name}" for name in names[first:]]


def trainable_copy(encoder: Encoder, trainable: str) -> nn.Module:
    """A deep copy of the encoder's model whose `trainable` parameters ("all" or "last", see the
    module docstring) require gradients; its text tower (``model.text``) is the original's, shared
    and frozen. The encoder's own model is not touched."""
    model = encoder.model
    text = getattr(model, "text", None)
    memo: dict[int, Any] = {id(text): text} if isinstance(text, nn.Module) else {}
    clone = copy.deepcopy(model, memo).eval()
    shared = {id(p) for p in text.parameters()} if isinstance(text, nn.Module) else set()
    names = None if trainable == "all" else set(last_level(clone))
    for name, param in clone.named_parameters():
        if id(param) not in shared:
            param.requires_grad_(names is None or name in names)
    return clone


@torch.no_grad()
def predict(model: VolumeClassifier, stacks: torch.Tensor, batch_size: int, device: torch.device
            ) -> torch.Tensor:
    """(N, classes) float32 logits of (N, K, 1, S, S) stacks, on the CPU."""
    parts = [model(stacks[start : start + batch_size].to(device)).float().cpu()
             for start in range(0, len(stacks), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, model.head.out_features)


def flip_draw(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which volumes of a batch are flipped left-right (each with probability 1/2)."""
    return torch.rand(n, generator=generator) < 0.5


def flipped(stacks: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The (K, 1, S, S) volumes of a batch flipped left-right where the (B,) bool `flip` is set
    (:func:`flip_draw`)."""
    return torch.where(flip.view(-1, 1, 1, 1, 1), stacks.flip(-1), stacks)


class FrozenPrefix:
    """The frozen part of a slice-wise classifier under trainable="last", run once per slice.

    Everything before the backbone's last feature level (`level`, timm ``feature_info[-1]``) is
    frozen and the copy is in eval mode, so the input `level` receives for a slice is the same in
    every epoch. :meth:`inputs` records it once per slice. :meth:`features` runs the model's own
    ``pooled_image`` on an *empty* batch of the slices' shape while a forward pre-hook hands `level`
    the recorded inputs instead, so every module from the level on (the trainable level, what the
    backbone registers after it, a timm pooling head, PRIOR's attention pool) runs as it does
    without the cache. :func:`frozen_prefix` checks that on training volumes before it is used.
    """

    def __init__(self, model: VolumeClassifier, level: nn.Module, image_shape: tuple[int, ...]) -> None:
        self.model, self.level, self.image_shape = model, level, image_shape
        self.device = next(model.head.parameters()).device

    @torch.no_grad()
    def inputs(self, stacks: torch.Tensor, batch_size: int, mirrored: bool = False) -> torch.Tensor:
        """(N, K, 1, S, S) slice stacks (flipped left-right if `mirrored`, batch by batch) ->
        (N, K, *A): the input of the last level per slice, on the CPU. An EvalError when the level
        does not run exactly once per forward pass."""
        captured: list[torch.Tensor] = []
        hook = self.level.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0].detach().cpu()))
        try:
            chunks = stacks.split(batch_size)
            for chunk in chunks:
                chunk = chunk.flip(-1) if mirrored else chunk  # one batch's copy, not the split's
                self.model.model.pooled_image(rgb(chunk.flatten(0, 1).to(self.device)))
        finally:
            hook.remove()
        if len(captured) != len(chunks):
            raise EvalError(f"the last feature level ran {len(captured)} times in {len(chunks)} "
                            "forward pass(es)")
        flat = torch.cat(captured)
        return flat.view(len(stacks), stacks.shape[1], *flat.shape[1:])

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, K, *A) inputs of the last level -> (B, width): :meth:`VolumeClassifier.features`
        of the volumes they were recorded from."""
        batch, k = inputs.shape[:2]
        flat = inputs.flatten(0, 1).to(self.device)
        hook = self.level.register_forward_pre_hook(lambda _module, args: (flat, *args[1:]))
        try:
            pooled = self.model.model.pooled_image(flat.new_zeros(0, *self.image_shape))
        finally:
            hook.remove()
        return pooled.reshape(batch, k, -1).mean(1)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, K, *A) -> (B, classes)."""
        return self.model.head(self.features(inputs))

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, classes) float32 logits on the CPU, as :func:`predict` of the recorded volumes."""
        return torch.cat([self.logits(chunk).float().cpu() for chunk in inputs.split(batch_size)])


CHECKED_VOLUMES = 2  # training volumes on which the cache must reproduce the model's features


def frozen_prefix(model: VolumeClassifier, train: torch.Tensor, valid: torch.Tensor,
                  cfg: VolumeFinetuneConfig) -> FrozenPrefix | None:
    """A :class:`FrozenPrefix` of `model` for the (N, K, 1, S, S) `train` and `valid` stacks, or
    None (the frozen part then runs every epoch): with trainable "all", a native 3D model, or
    ``frozen_cache_gb`` 0; with a line saying why when the inputs of the training (both
    orientations with flips) and validation volumes would not fit in ``frozen_cache_gb``, or the
    cache does not reproduce the model's features on the first training volumes."""
    body = model.model
    if cfg.trainable != "last" or cfg.frozen_cache_gb <= 0 or hasattr(body, "pooled_volume"):
        return None
    visual = body.visual
    level = visual.get_submodule(str(visual.feature_info[-1]["module"]))
    prefix = FrozenPrefix(model, level, (3, *train.shape[-2:]))
    sample = train[:CHECKED_VOLUMES]
    try:
        inputs = prefix.inputs(sample, cfg.batch_size)
        with torch.no_grad():
            cached, direct = prefix.features(inputs), model.features(sample.to(prefix.device))
        same = torch.allclose(cached, direct, rtol=1e-4, atol=1e-5)
        reason = f"largest difference {float((cached - direct).abs().max()):.2g}"
    except (EvalError, RuntimeError) as exc:
        same, reason = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not same:
        log.warning("volume fine-tuning: the inputs of the last feature level do not reproduce the "
                    "model's features (%s); the frozen part runs every epoch", reason)
        return None
    per_volume = inputs[0].numel() * inputs.element_size()
    if not fits(cfg, len(train), len(valid), per_volume, "the frozen part's activations", "it runs"):
        return None
    return prefix


def fits(cfg: VolumeFinetuneConfig, train: int, valid: int, per_volume: int, what: str,
         then: str) -> bool:
    """Whether `per_volume` bytes kept for each training volume (twice with flips) and each
    validation volume fit in ``frozen_cache_gb``; if not, it logs "`what` (size) exceed
    eval.volume_finetune.frozen_cache_gb=...; `then` every epoch"."""
    gigabytes = (train * (2 if cfg.flip else 1) + valid) * per_volume / 2**30
    if gigabytes <= cfg.frozen_cache_gb:
        return True
    log.info("volume fine-tuning: %s (%.1f GB) exceed eval.volume_finetune.frozen_cache_gb=%g; %s "
             "every epoch", what, gigabytes, cfg.frozen_cache_gb, then)
    return False


class FrozenSelection:
    """The frozen start of a native 3D model's two passes, recorded once per volume.

    UniMedI's pooled volume feature is two passes of its ViT: the selection pass ([CLS] + the
    volume's 3D tokens, eq. 1), whose [CLS] attention summed over every block picks the slices,
    then a pass over the volume's and those slices' tokens. Under "last" the blocks before the
    trained one, and everything the passes read before them (the 3D tokenizer, T_2D), are frozen,
    so the selection pass gives a volume the same tokens and attention rows through them in every
    epoch: the model's ``selection_trunk`` records them once per volume (training volumes in both
    orientations with flips), with a hybrid T_3D's slice maps (its frozen CNN's, which the CT pass
    projects again rather than running the CNN), and ``pooled_volume(stacks, trunk, ...)`` runs
    only the blocks after them. The second pass's input holds the selected slices, which the
    trained block's attention picks, so its frozen blocks' tokens (``ct_trunk``) are recorded per
    volume, orientation and selected slices: an epoch that selects the slices an earlier one did
    for that volume reads them, one that selects others computes and records them, while
    ``frozen_cache_gb`` lasts.
    :func:`frozen_selection` checks on training volumes that both records reproduce the model's
    features.
    """

    def __init__(self, model: VolumeClassifier, budget: int = 0) -> None:
        self.model = model
        self.device = next(model.head.parameters()).device
        self.budget = budget  # bytes the second pass's records may take
        self.second: dict[tuple[Any, ...], torch.Tensor] = {}
        self.used = 0

    @torch.no_grad()
    def trunks(self, stacks: torch.Tensor, batch_size: int, mirrored: bool = False) -> SelectionTrunk:
        """(N, K, 1, S, S) slice stacks (flipped left-right if `mirrored`, batch by batch) -> their
        ``selection_trunk``, on the CPU."""
        parts = [self.model.model.selection_trunk((chunk.flip(-1) if mirrored else chunk).to(self.device))
                 for chunk in stacks.split(batch_size)]
        return parts[0]._replace(**{name: torch.cat([getattr(t, name).cpu() for t in parts])
                                    for name in parts[0].tensors()})

    def second_pass(self, keys: list[tuple[Any, ...]], blocks: int) -> CtTrunk:
        """The second pass's tokens after `blocks` frozen blocks for the volumes `keys` name (one
        key per row: which split and volume, which orientation), read from the record where that
        volume's selected slices were met before, else computed (and recorded)."""
        body = self.model.model

        def tokens(volume: torch.Tensor, slices: torch.Tensor, maps: torch.Tensor | None
                   ) -> torch.Tensor:
            rows = [(*key, *chosen) for key, chosen in zip(keys, slices.tolist())]
            missing = [i for i, row in enumerate(rows) if row not in self.second]
            fresh: dict[tuple[Any, ...], torch.Tensor] = {}
            if missing:
                index = torch.tensor(missing, device=volume.device)
                computed = body.ct_trunk(volume[index], slices[index], blocks,
                                         None if maps is None else maps[index]).cpu()
                for i, out in zip(missing, computed):
                    fresh[rows[i]] = out
                    if self.used + out.numel() * out.element_size() <= self.budget:
                        self.second[rows[i]] = out.clone()
                        self.used += out.numel() * out.element_size()
            kept = [fresh[row] if row in fresh else self.second[row] for row in rows]
            return torch.stack(kept).to(self.device)

        return tokens

    def logits(self, stacks: torch.Tensor, trunk: SelectionTrunk, keys: list[tuple[Any, ...]]
               ) -> torch.Tensor:
        """(B, K, 1, S, S) stacks, their trunks and record keys -> (B, classes)."""
        trunk = trunk._replace(**{name: t.to(self.device) for name, t in trunk.tensors().items()})
        second = self.second_pass(keys, trunk.blocks) if self.budget > 0 else None
        return self.model.head(self.model.model.pooled_volume(stacks.to(self.device), trunk, second))

    @torch.no_grad()
    def predict(self, stacks: torch.Tensor, trunk: SelectionTrunk, batch_size: int) -> torch.Tensor:
        """(N, classes) float32 logits on the CPU of the validation volumes, as :func:`predict`
        of the same volumes."""
        parts = []
        for start in range(0, len(stacks), batch_size):
            window = slice(start, min(start + batch_size, len(stacks)))
            keys = [("valid", i, False) for i in range(window.start, window.stop)]
            parts.append(self.logits(stacks[window], pick(trunk, window), keys).float().cpu())
        return torch.cat(parts)


def pick(trunk: SelectionTrunk, index: torch.Tensor | slice, mirrored: SelectionTrunk | None = None,
         flip: torch.Tensor | None = None) -> SelectionTrunk:
    """The rows `index` of a selection trunk; with `flip` (bool per row), those of `mirrored`
    where it is set."""
    def rows(name: str, plain: torch.Tensor) -> torch.Tensor:
        if flip is None:
            return plain[index]
        return torch.where(flip.view(-1, *[1] * (plain.dim() - 1)), getattr(mirrored, name)[index],
                           plain[index])

    return trunk._replace(**{name: rows(name, t) for name, t in trunk.tensors().items()})


def frozen_selection(model: VolumeClassifier, train: torch.Tensor, valid: torch.Tensor,
                     cfg: VolumeFinetuneConfig) -> FrozenSelection | None:
    """A :class:`FrozenSelection` of `model` for the `train` and `valid` stacks, or None (the
    selection pass then runs whole every epoch): with trainable "all", a model without
    ``selection_trunk`` (or with no frozen block), ``frozen_cache_gb`` 0; with a line saying why
    when the trunks would not fit in ``frozen_cache_gb`` or do not reproduce the model's features
    on the first training volumes. The second pass's record takes what the trunks leave of
    ``frozen_cache_gb``; it is not kept (the second pass runs whole) where T_2D trains or it does
    not reproduce the model's features."""
    body = model.model
    if cfg.trainable != "last" or cfg.frozen_cache_gb <= 0 or not hasattr(body, "selection_trunk"):
        return None
    sample = train[:CHECKED_VOLUMES].to(next(model.head.parameters()).device)
    with torch.no_grad():
        trunk = body.selection_trunk(sample)
        if trunk is None:
            return None
        direct = model.features(sample)
        cached = body.pooled_volume(sample, trunk)
    if not torch.allclose(cached, direct, rtol=1e-4, atol=1e-5):
        log.warning("volume fine-tuning: the recorded selection pass does not reproduce the "
                    "model's features (largest difference %.2g); it runs whole every epoch",
                    float((cached - direct).abs().max()))
        return None
    per_volume = sum(t[0].numel() * t.element_size() for t in trunk.tensors().values())
    if not fits(cfg, len(train), len(valid), per_volume, "the selection pass's frozen blocks",
                "they run"):
        return None
    trunks = (len(train) * (2 if cfg.flip else 1) + len(valid)) * per_volume
    cache = FrozenSelection(model, int(cfg.frozen_cache_gb * 2**30) - trunks
                            if body.frozen_slice_tokens() else 0)
    if cache.budget > 0:
        keys = [("check", i, False) for i in range(len(sample))]
        with torch.no_grad():
            recorded = [body.pooled_volume(sample, trunk, cache.second_pass(keys, trunk.blocks))
                        for _ in range(2)]  # computing the record, then reading it
        cache.second.clear()
        cache.used = 0
        if not all(torch.allclose(r, direct, rtol=1e-4, atol=1e-5) for r in recorded):
            log.warning("volume fine-tuning: the recorded second pass does not reproduce the "
                        "model's features (largest difference %.2g); it runs whole every epoch",
                        max(float((r - direct).abs().max()) for r in recorded))
            cache.budget = 0
    return cache


@dataclasses.dataclass
class Fitted:
    """A fine-tuned classifier and how it was selected on the validation split: the validation
    metric (None where undefined) and loss of the kept state, its epoch (1-based), the epochs run,
    whether the metric or the loss selected, the parameters that received gradients, and whether
    the frozen part ran once per slice (:class:`FrozenPrefix`) or once per volume
    (:class:`FrozenSelection`) rather than every epoch."""

    model: VolumeClassifier
    valid_value: float | None
    valid_loss: float
    epoch: int
    epochs_run: int
    selected_by: str
    trained_parameters: int
    cached: bool


def build_classifier(encoder: Encoder, sample: torch.Tensor, classes: int, trainable: str, seed: int
                     ) -> VolumeClassifier:
    """A trainable copy of `encoder` (:func:`trainable_copy`) with a seeded linear head as wide as
    its pooled feature of the (1, K, 1, S, S) `sample` volume, on the encoder's device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = trainable_copy(encoder, trainable)
        with torch.no_grad():
            width = VolumeClassifier(body, 1, 1).features(sample.to(encoder.device)).shape[-1]
        return VolumeClassifier(body, classes, width).to(encoder.device)


def train_epoch(model: VolumeClassifier, optimizer: torch.optim.Optimizer, labels: torch.Tensor,
                logits_of: Callable[[torch.Tensor], torch.Tensor],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                cfg: VolumeFinetuneConfig, generator: torch.Generator) -> int:
    """One shuffled pass over the training volumes, `logits_of` a batch's indices giving its
    logits; returns how many parameters received a gradient."""
    device = next(model.head.parameters()).device
    trained = 0
    for index in torch.randperm(len(labels), generator=generator).split(cfg.batch_size):
        loss = loss_fn(logits_of(index), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = sum(p.numel() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    return trained


def fine_tune(encoder: Encoder, train: Split, valid: Split, target: ProbeTarget,
              cfg: VolumeFinetuneConfig, *, seed: int, desc: str = "volume fine-tuning",
              progress: bool = False) -> Fitted:
    """Fine-tune a copy of `encoder` + a linear head on `train`, selecting on `valid` only."""
    device = encoder.device
    classes = len(target.classes)
    model = build_classifier(encoder, train[0][:1], classes, cfg.trainable, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = F.cross_entropy if target.metric == "accuracy" else F.binary_cross_entropy_with_logits
    generator = seeded_generator(seed)
    by_loss = score(torch.zeros(len(valid[1]), classes), valid[1], target.metric) is None
    if by_loss:
        log.warning("%s: %s is undefined on the validation split (%d volumes); selecting by the "
                    "validation loss", desc, target.metric, len(valid[1]))
    stacks, labels = train
    prefix = frozen_prefix(model, stacks, valid[0], cfg)
    selector = frozen_selection(model, stacks, valid[0], cfg) if prefix is None else None
    if selector is not None:
        plain_trunk = selector.trunks(stacks, cfg.batch_size)
        mirrored_trunk = selector.trunks(stacks, cfg.batch_size, mirrored=True) if cfg.flip else None
        held_out_trunk = selector.trunks(valid[0], cfg.batch_size)

        def logits_of(index: torch.Tensor) -> torch.Tensor:
            if not cfg.flip:
                keys = [("train", i, False) for i in index.tolist()]
                return selector.logits(stacks[index], pick(plain_trunk, index), keys)
            flip = flip_draw(len(index), generator)
            keys = [("train", i, f) for i, f in zip(index.tolist(), flip.tolist())]
            return selector.logits(flipped(stacks[index], flip),
                                   pick(plain_trunk, index, mirrored_trunk, flip), keys)

        def valid_logits() -> torch.Tensor:
            return selector.predict(valid[0], held_out_trunk, cfg.batch_size)
    elif prefix is None:
        def logits_of(index: torch.Tensor) -> torch.Tensor:
            batch = stacks[index]
            if cfg.flip:
                batch = flipped(batch, flip_draw(len(index), generator))
            return model(batch.to(device))

        def valid_logits() -> torch.Tensor:
            return predict(model, valid[0], cfg.batch_size, device)
    else:
        plain = prefix.inputs(stacks, cfg.batch_size)  # (N, K, *A)
        mirrored = prefix.inputs(stacks, cfg.batch_size, mirrored=True) if cfg.flip else plain
        held_out = prefix.inputs(valid[0], cfg.batch_size)

        def logits_of(index: torch.Tensor) -> torch.Tensor:
            if not cfg.flip:
                return prefix.logits(plain[index])
            flip = flip_draw(len(index), generator).view(-1, *[1] * (plain.dim() - 1))
            return prefix.logits(torch.where(flip, mirrored[index], plain[index]))

        def valid_logits() -> torch.Tensor:
            return prefix.predict(held_out, cfg.batch_size)
    trained = 0
    best: tuple[float, ...] | None = None
    kept: dict[str, torch.Tensor] = {}
    selection = (None, math.inf, 0)
    stale, epoch = 0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", leave=False, disable=not progress)
    for epoch in bar:
        trained = train_epoch(model, optimizer, labels, logits_of, loss_fn, cfg, generator) or trained
        logits = valid_logits()
        value = None if by_loss else score(logits, valid[1], target.metric)
        valid_loss = float(loss_fn(logits, valid[1]))
        key = (-valid_loss,) if value is None else (value, -valid_loss)
        bar.set_postfix(val=f"{key[0]:.3f}")
        if best is None or key > best:
            best, stale, selection = key, 0, (value, valid_loss, epoch)
            kept = {name: p.detach().clone() for name, p in model.named_parameters()
                    if p.requires_grad}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(kept, strict=False)
    value, valid_loss, best_epoch = selection
    return Fitted(model, value, valid_loss, best_epoch, epoch, "loss" if by_loss else target.metric,
                  trained, prefix is not None or selector is not None)


def split_data(encoder: Encoder, ctx: TaskContext, dataset: str, target: ProbeTarget,
               splits: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """Slice stacks (at the encoder's :meth:`~Encoder.volume_grid`) and targets of each of the
    `splits` of `dataset`."""
    slices, side = encoder.volume_grid(ctx.cfg.volume_finetune.slices, ctx.data.image_size)
    return {s: (ctx.data.slice_stacks(dataset, s, slices, ctx.cfg.volume.window, side),
                targets(ctx.data.require(dataset, s), target, dataset)) for s in splits}


def dataset_target(ctx: TaskContext, dataset: str) -> ProbeTarget:
    """What `dataset`'s volumes are classified into (as the volume probe's)."""
    return VOLUME_TARGETS.get(dataset) or label_target(ctx.data.require(dataset, "train"), dataset)


def test_scores(logits: torch.Tensor, y: torch.Tensor, target: ProbeTarget, resamples: np.ndarray
                ) -> dict[str, Estimate]:
    """{"value": the target's metric} on the test split, plus {"accuracy"} at probability 0.5 for
    a binary (one-column AUC) target, each with its interval over `resamples`."""
    out = {"value": test_estimate(logits, y, target.metric, resamples)}
    if target.metric == "auc" and y.shape[1] == 1:
        correct = ((logits[:, 0] > 0) == (y[:, 0] > 0.5)).numpy()
        out["accuracy"] = bootstrap(batched_mean, [correct], resamples)
    return out


def finetune_dataset(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """One dataset's rows: the test metric of the best-validation state per label fraction."""
    cfg = ctx.cfg.volume_finetune
    target = dataset_target(ctx, dataset)
    splits = split_data(encoder, ctx, dataset, target)
    resamples = ctx.resamples(dataset, "test", len(splits["test"][1]))
    extras: dict[str, dict[str, Any]] = {}

    def fit_and_score(index: np.ndarray, label: str) -> Estimate:
        train = (training_rows(splits["train"][0], index), training_rows(splits["train"][1], index))
        fitted = fine_tune(encoder, train, splits["valid"], target, cfg, seed=ctx.cfg.seed,
                           desc=f"{dataset} {label}", progress=ctx.progress)
        logits = predict(fitted.model, splits["test"][0], cfg.batch_size, encoder.device)
        estimates = test_scores(logits, splits["test"][1], target, resamples)
        extras[label] = {
            "valid": fitted.valid_value, "valid_loss": fitted.valid_loss, "epoch": fitted.epoch,
            "epochs_run": fitted.epochs_run, "selected_by": fitted.selected_by,
            "trained_parameters": fitted.trained_parameters, "frozen_part_cached": fitted.cached,
        }
        if "accuracy" in estimates:
            accuracy = estimates["accuracy"]
            extras[label].update(accuracy=accuracy.value, accuracy_ci=accuracy.json_ci(),
                                 replicates={"accuracy": accuracy.replicates})
        log.info("volume fine-tuning %s %s %s: epoch %d of %d by validation %s, test %s %s",
                 encoder.name, dataset, label, fitted.epoch, fitted.epochs_run, fitted.selected_by,
                 target.metric, estimates["value"].value)
        return estimates["value"]

    rows = sweep_fractions(ctx, len(splits["train"][1]), fit_and_score,
                           f"volume fine-tuning {dataset}", fractions=cfg.fractions,
                           min_images=cfg.min_train_volumes)
    for label, row in rows.items():
        extra = extras[label]
        row.setdefault("replicates", {}).update(extra.pop("replicates", {}))
        row.update(extra)
    return {"metric": target.metric, "trainable": cfg.trainable,
            "volumes": {s: len(splits[s][1]) for s in SPLITS}, "fractions": rows}


@TASKS.register("volume_finetune")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"metric", "trainable", "volumes", "fractions": {"100%": {"value", "ci",
    "train_images", "valid", "valid_loss", "epoch", "epochs_run", "selected_by",
    "trained_parameters", "frozen_part_cached", and for a binary AUC target "accuracy",
    "accuracy_ci"}}}}."""
    out = {}
    for dataset in ctx.cfg.volume_finetune.datasets:
        out[dataset] = finetune_dataset(encoder, ctx, dataset)
        log.info("%s volume fine-tuning on %s: %s", encoder.label, dataset,
                 {k: v["value"] for k, v in out[dataset]["fractions"].items()})
    return out

