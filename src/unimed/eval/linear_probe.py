"""Linear classification on the frozen image encoder (Med-UniC Table 2).

Pooled image-encoder features are computed once per split (the context's feature cache); a single linear layer is trained on a
seeded `fraction` of the training images with AdamW (paper: lr 5e-4, weight decay 1e-6), early
stopping on the validation metric, and scored on the test split with the best validation state,
with a bootstrap 95 % interval over resamples of the test images. A fraction below 100 % is the
mean over `draws` seeded training subsets (the interval: of that mean, over the same resamples).
Features are standardised with the training subset's mean and standard deviation (an affine map the
linear layer could learn itself; it only makes one learning rate fit every encoder).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unimed.data.records import Record
from unimed.eval.config import LinearProbeConfig
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.metrics import (
    Estimate,
    accuracy,
    batched_auc,
    batched_mean,
    bootstrap,
    macro,
    mean_estimate,
    per_class_auc,
)
from unimed.eval.tasks import TASKS, TaskContext, sweep_fractions
from unimed.data.labels import COVIDX_CLASSES

log = logging.getLogger(__name__)

CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    """What a dataset's probe predicts: label columns scored by macro AUC (multi-label / binary),
    or the class of `Record.target` scored by accuracy (multi-class). A dataset not in
    PROBE_TARGETS (a generic records table) predicts all its label columns (:func:`label_target`)."""

    metric: str
    classes: tuple[str, ...]


PROBE_TARGETS: dict[str, ProbeTarget] = {
    "chexpert": ProbeTarget("auc", CHEXPERT_COMPETITION),
    "rsna": ProbeTarget("auc", ("Pneumonia",)),
    "covidx": ProbeTarget("accuracy", COVIDX_CLASSES),
}


def label_target(records: Sequence[Record], dataset: str) -> ProbeTarget:
    """The probe of a dataset without a built-in target (a generic records table): every label
    column its records state, scored by macro AUC."""
    classes = tuple(dict.fromkeys(name for record in records for name in record.labels))
    if not classes:
        raise EvalError(f"no linear-probe target for '{dataset}': its records have no label columns "
                        f"(built-in targets: {sorted(PROBE_TARGETS)})")
    return ProbeTarget("auc", classes)


def targets(records: Sequence[Record], target: ProbeTarget, dataset: str) -> torch.Tensor:
    """(N, C) float 0/1 labels for "auc" probes, (N,) class indices for "accuracy" probes.

    Uncertain labels (-1) count as positive and unstated ones (NaN) as negative (the "U-Ones"
    policy of CheXpert linear probes).
    """
    if target.metric == "accuracy":
        index = {name: i for i, name in enumerate(target.classes)}
        missing = [r.image_path for r in records if r.target not in index]
        if missing:
            raise EvalError(f"{dataset}: record {missing[0]} has no class in {list(target.classes)}")
        return torch.tensor([index[r.target] for r in records])
    rows = []
    for record in records:
        values = [record.label(name) for name in target.classes]
        rows.append([0.0 if math.isnan(v) else float(v != 0.0) for v in values])
    return torch.tensor(rows, dtype=torch.float32)


def score(logits: torch.Tensor, y: torch.Tensor, metric: str) -> float | None:
    """Macro AUC over label columns, or accuracy of the arg-max class."""
    logits = logits.detach()
    if metric == "accuracy":
        return accuracy(y.numpy(), logits.argmax(1).numpy())
    return macro(per_class_auc(y.numpy(), logits.numpy()))


def test_estimate(logits: torch.Tensor, y: torch.Tensor, metric: str, resamples: np.ndarray
                  ) -> Estimate:
    """:func:`score` on the test split with its interval over the (R, N) `resamples`."""
    logits, y = logits.detach().numpy(), y.numpy()
    if metric == "accuracy":
        return bootstrap(batched_mean, [logits.argmax(1) == y], resamples)
    return mean_estimate([bootstrap(batched_auc, [y[:, c], logits[:, c]], resamples)
                          for c in range(y.shape[1])])


def metric_undefined(y: torch.Tensor, metric: str) -> bool:
    """Whether `metric` is undefined on targets `y` whatever the logits: AUC with one class in
    every column, as the validation split of a handful of volumes can be."""
    return score(torch.zeros(len(y), y.shape[1] if y.ndim == 2 else 1), y, metric) is None


def train_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    metric: str,
    cfg: LinearProbeConfig,
    seed: int,
) -> nn.Linear:
    """A linear layer fitted on `train` (features, targets), the state of best `valid` metric,
    ties broken by the lower validation loss (a small validation split reaches its best AUC or
    accuracy early, while the probe still barely separates the classes; training on while the
    metric holds and the loss falls keeps the better-fitted state, as the 3D fine-tuning does).

    A validation split on which the metric is undefined (:func:`metric_undefined`) selects by
    validation loss alone: no state is kept by accident. :func:`probe_fractions` says so once
    per dataset."""
    x, y = train
    # An accuracy probe has a logit for every class of either split (a small training subset may
    # lack the last class; the validation loss needs its logit).
    classes = int(max(y.max(), valid[1].max())) + 1 if metric == "accuracy" else y.shape[1]
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer.reset_parameters()
    loss_fn = F.cross_entropy if metric == "accuracy" else F.binary_cross_entropy_with_logits
    by_loss = metric_undefined(valid[1], metric)

    def validation() -> tuple[float, float]:
        """(metric, -loss), compared in that order; (-loss, -loss) where the metric is undefined."""
        with torch.no_grad():
            logits = layer(valid[0])
            neg_loss = -float(loss_fn(logits, valid[1]))
            return (neg_loss if by_loss else score(logits, valid[1], metric)), neg_loss

    opt = torch.optim.AdamW(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, stale = (-math.inf, -math.inf), None, 0
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(layer(x[batch]), y[batch]).backward()
            opt.step()
        value = validation()
        if best_state is None or value > best:
            best, best_state, stale = value, {k: v.clone() for k, v in layer.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        layer.load_state_dict(best_state)
    return layer


def standardiser(reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension z-scores with the mean and (biased) standard deviation of (N, D) `reference`,
    the probe's training features; a dimension without spread is divided by 1e-6."""
    mean, std = reference.mean(0), reference.std(0, unbiased=False).clamp_min(1e-6)
    return lambda x: (x - mean) / std


def probe_dataset(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict:
    """One dataset's probe at every configured label fraction."""
    target = PROBE_TARGETS.get(dataset) or label_target(ctx.data.require(dataset, "train"), dataset)
    split_y = {s: targets(ctx.data.require(dataset, s), target, dataset) for s in ("train", "valid", "test")}
    split_x = {s: ctx.image_features(encoder, dataset, s, "pooled") for s in split_y}
    return {"metric": target.metric,
            "fractions": probe_fractions(ctx, split_x, split_y, target, dataset, f"linear probe {dataset}")}


def probe_fractions(ctx: TaskContext, split_x: dict[str, torch.Tensor], split_y: dict[str, torch.Tensor],
                    target: ProbeTarget, dataset: str, desc: str) -> dict[str, dict]:
    """The probe protocol on frozen features ("train" / "valid" / "test" features and targets):
    per label fraction, standardise with the training subset, fit :func:`train_probe`, score the
    test split with its bootstrap interval (:func:`unimed.eval.tasks.sweep_fractions` rows); a
    fraction below the whole training split is the mean of ``linear_probe.draws`` subsets."""
    resamples = ctx.resamples(dataset, "test", len(split_y["test"]))
    if target.metric == "auc":
        one = [c for c, column in zip(target.classes, split_y["test"].T) if column.min() == column.max()]
        if one:
            log.warning("%s: one class only (no positive, or no negative) in the %d test rows for %s: "
                        "left out of the macro AUC, which covers %s", desc, len(split_y["test"]),
                        ", ".join(one), ", ".join(c for c in target.classes if c not in one) or "no class")
    if metric_undefined(split_y["valid"], target.metric):
        log.warning("%s: %s is undefined on the validation split (%d rows, one class); every "
                    "fraction's probe early-stops on the validation loss", desc, target.metric,
                    len(split_y["valid"]))

    def fit_and_score(index: np.ndarray, label: str) -> Estimate:
        subset = torch.from_numpy(index)
        scale = standardiser(split_x["train"][subset])
        norm = {s: scale(x) for s, x in split_x.items()}
        layer = train_probe((norm["train"][subset], split_y["train"][subset]),
                            (norm["valid"], split_y["valid"]), target.metric, ctx.cfg.linear_probe,
                            ctx.cfg.seed)
        with torch.no_grad():
            return test_estimate(layer(norm["test"]), split_y["test"], target.metric, resamples)

    return sweep_fractions(ctx, len(split_x["train"]), fit_and_score, desc,
                           draws=ctx.cfg.linear_probe.draws)


@TASKS.register("linear_probe")
def run(encoder: Encoder, ctx: TaskContext) -> dict:
    """{dataset: {"metric", "fractions": {"1%": {"value", "ci", "train_images"}, ...}}}."""
    out = {}
    for dataset in ctx.cfg.linear_probe.datasets:
        out[dataset] = probe_dataset(encoder, ctx, dataset)
        log.info("%s linear probe on %s: %s", encoder.label, dataset,
                 {k: v["value"] for k, v in out[dataset]["fractions"].items()})
    return out
