"""2D vs 3D embeddings of the same findings (UniMedI Fig. 2), measured: the ``modality_gap`` task.

UniMedI claims that report guidance puts chest X-rays and CT volumes of one finding into a common
space; the paper shows a t-SNE picture of it. This task draws that picture for every encoder and puts
numbers beside it. The samples (``eval.modality_gap``): test X-ray images and test CT volumes positive
for exactly one of the configured finding classes, up to `per_class` seeded samples per class and
modality, the same for every encoder; a class enters when each modality has `min_per_class`.
Embeddings are the projected ones (P_v, where images meet reports), L2-normalised. A 2D encoder's
volume embedding comes from the slice-wise adapter, a native 3D model's from its own volume path
(:meth:`unimed.eval.features.FeatureCache.volumes`).

* ``gap``: the distance between the X-ray centroid and the CT centroid divided by the mean of the
  two modalities' spreads (RMS distance of a modality's embeddings to its own centroid). Centroid
  and spread weigh every class alike (:func:`balanced_centre`), so a modality's class mix does not
  move its centroid: with the same findings on both sides only the modality can. 0 when the two
  clouds share a centre, 1 when their centres lie one spread apart; lower is a more shared space.
* ``chance_gap``: the mean gap over `NULL_PERMUTATIONS` shuffles of the modality labels within each
  class, what sampling alone gives when modality carries no signal: a gap near it means no
  measurable modality gap at this sample size.
* ``ct_to_xray`` / ``xray_to_ct``: share of CT volumes whose nearest X-ray class centroid (cosine) is
  of their own finding, and the reverse; ``chance_accuracy`` is 1 / classes. With one class
  entered they are None (every sample's nearest centroid would be its own) and
  ``accuracy_note`` says why.
* ``per_finding``: the gap of each class's X-ray and CT embeddings alone.

Intervals are bootstrap intervals over the samples, resampled within each modality and class, so
every class keeps its count; the resamples depend only on the seed and the counts, so two encoders'
replicates pair (the checks' paired differences, e.g. UniMedI against its ablation). The gap is a
distance, so sampling noise alone makes it positive: its floor at these sample sizes is
``chance_gap``, not 0, and near that floor the percentile interval lies above the estimate (each
resample adds its own noise; one distribution, 300 samples per modality: gap 0.053, interval
0.060-0.100, chance 0.059). Read a gap against ``chance_gap``, two encoders by their paired difference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from unimed.data.records import Record
from unimed.eval.bias import tsne_2d, unit_rows
from unimed.eval.encoders import Encoder
from unimed.eval.metrics import Estimate, percentile_interval, resample_indices
from unimed.eval.tasks import TASKS, TaskContext, with_intervals
from unimed.eval.volumes import volume_features

log = logging.getLogger(__name__)

SPLIT = "test"
MODALITIES = ("xray", "ct")
MODALITY_NAMES = {"xray": "X-ray", "ct": "CT"}
MARKERS = {"xray": "o", "ct": "^"}
NULL_PERMUTATIONS = 200
Drawn = tuple[str, int, int]  # (dataset, row in its test split, class index)


def finding_of(record: Record, classes: Sequence[str]) -> int | None:
    """Index of the one class of `classes` the record is positive for (label 1.0, names matched
    case-insensitively); None when it is positive for none or for several."""
    labels = {name.lower(): value for name, value in record.labels.items()}
    found = [c for c, name in enumerate(classes) if labels.get(name.lower()) == 1.0]
    return found[0] if len(found) == 1 else None


def draw_samples(ctx: TaskContext, datasets: Sequence[str], classes: Sequence[str], per_class: int
                 ) -> list[Drawn]:
    """Up to `per_class` seeded samples per class from the test splits of `datasets` together."""
    candidates = [(dataset, row, c) for dataset in datasets
                  for row, record in enumerate(ctx.data.require(dataset, SPLIT))
                  if (c := finding_of(record, classes)) is not None]
    rng = np.random.default_rng(ctx.cfg.seed)
    picked = []
    for c in range(len(classes)):
        members = [sample for sample in candidates if sample[2] == c]
        picked += [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
    return picked


def embed(samples: list[Drawn], features: Callable[[str], torch.Tensor]) -> np.ndarray:
    """(N, D) unit rows of the samples' embeddings; `features(dataset)` gives a split's (n, D)."""
    return unit_rows(torch.stack([features(dataset)[row] for dataset, row, _ in samples]).double().numpy())


def class_weights(y: np.ndarray) -> np.ndarray:
    """(N,) weights summing to 1 that give every class present in `y` the same total weight."""
    present, counts = np.unique(y, return_counts=True)
    return 1.0 / (len(present) * counts[np.searchsorted(present, y)])


def balanced_centre(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The class-balanced centroid of rows `x` (N, D) with classes `y` (N,) and the class-balanced
    RMS distance of the rows to it."""
    weights = class_weights(y)
    centre = weights @ x  # (D,)
    return centre, float(np.sqrt(weights @ ((x - centre) ** 2).sum(1)))


def modality_gap(x2: np.ndarray, y2: np.ndarray, x3: np.ndarray, y3: np.ndarray) -> float:
    """Distance between the class-balanced centroids of the unit-normalised rows `x2` (2D) and `x3`
    (3D) over the mean of their class-balanced spreads; NaN when both spreads are 0."""
    (c2, s2), (c3, s3) = balanced_centre(unit_rows(x2), y2), balanced_centre(unit_rows(x3), y3)
    spread = (s2 + s3) / 2
    return float(np.linalg.norm(c2 - c3) / spread) if spread > 0 else math.nan


def nearest_centre_hits(queries: np.ndarray, yq: np.ndarray, gallery: np.ndarray, yg: np.ndarray
                        ) -> np.ndarray:
    """(Nq,) 1.0 where the gallery's class centroid most cosine-similar to a query is its class."""
    classes = np.unique(yg)
    centres = unit_rows(np.stack([gallery[yg == c].mean(0) for c in classes]))  # (C, D)
    nearest = classes[np.argmax(unit_rows(queries) @ centres.T, axis=1)]
    return (nearest == yq).astype(np.float64)


def split_gap(x: np.ndarray, y: np.ndarray, modality: np.ndarray) -> float:
    """:func:`modality_gap` of rows `x` (N, D) with classes `y`, split by modality 0 (X-ray) / 1 (CT)."""
    xray, ct = modality == 0, modality == 1
    return modality_gap(x[xray], y[xray], x[ct], y[ct])


def statistics(x: np.ndarray, y: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """[gap, ct_to_xray, xray_to_ct] of unit rows `x` (N, D), classes `y`, modality 0 (X-ray) / 1 (CT)."""
    xray, ct = modality == 0, modality == 1
    return np.array([split_gap(x, y, modality),
                     nearest_centre_hits(x[ct], y[ct], x[xray], y[xray]).mean(),
                     nearest_centre_hits(x[xray], y[xray], x[ct], y[ct]).mean()])


def stratified_resamples(ctx: TaskContext, y: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """(R, N) bootstrap indices that resample within every modality x class cell."""
    out = np.empty((ctx.cfg.bootstrap_resamples, len(y)), dtype=np.int64)
    for m, c in sorted(set(zip(modality.tolist(), y.tolist()))):
        members = np.flatnonzero((modality == m) & (y == c))
        cell = resample_indices(len(members), ctx.cfg.bootstrap_resamples, ctx.cfg.seed, "modality_gap",
                                f"{SPLIT}/{MODALITIES[m]}/{c}")
        out[:, members] = members[cell]
    return out


def null_gap(x: np.ndarray, y: np.ndarray, modality: np.ndarray, seed: int) -> float:
    """Mean gap over `NULL_PERMUTATIONS` shuffles of the modality labels within each class."""
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(NULL_PERMUTATIONS):
        shuffled = modality.copy()
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            shuffled[members] = rng.permutation(modality[members])
        gaps.append(split_gap(x, y, shuffled))
    return float(np.mean(gaps))


def plot_modalities(xy: np.ndarray, y: np.ndarray, modality: np.ndarray, classes: Sequence[str],
                    title: str, path: str) -> None:
    """The t-SNE points: X-ray circles, CT triangles, colour = finding."""
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        for m, key in enumerate(MODALITIES):
            keep = (y == c) & (modality == m)
            if keep.any():
                ax.scatter(xy[keep, 0], xy[keep, 1], s=14 if key == "xray" else 36, marker=MARKERS[key],
                           color=f"C{c}", alpha=0.7, label=f"{name} / {MODALITY_NAMES[key]}")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def finite(value: float) -> float | None:
    """The value as a float, None when it is not finite (JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def counts(samples: list[Drawn], classes: Sequence[str]) -> dict[str, int]:
    """{class: number of samples}."""
    return {name: sum(s[2] == c for s in samples) for c, name in enumerate(classes)}


def measure(ctx: TaskContext, x: np.ndarray, y: np.ndarray, modality: np.ndarray,
            classes: Sequence[str]) -> dict[str, Any]:
    """Gap, cross-modal class accuracy (with intervals), chance gap and per-class gaps of unit rows
    `x` (N, D) with class indices `y` (N,) into `classes` and modality 0 (X-ray) / 1 (CT) (N,)."""
    values = statistics(x, y, modality)
    resamples = stratified_resamples(ctx, y, modality)  # (R, N)
    replicates = np.stack([statistics(x[rows], y, modality) for rows in resamples])  # (R, 3)
    present = np.unique(y)
    # With one finding class every sample's nearest centroid is its own: 100 % says nothing.
    names = ("gap", "ct_to_xray", "xray_to_ct") if len(present) > 1 else ("gap",)
    estimates = {name: Estimate(finite(values[i]), percentile_interval(replicates[:, i]), replicates[:, i])
                 for i, name in enumerate(names)}
    out = {**with_intervals(estimates), "chance_gap": finite(null_gap(x, y, modality, ctx.cfg.seed)),
           "chance_accuracy": 1 / len(present) if len(present) > 1 else None,
           "per_finding": {classes[c]: finite(split_gap(x[y == c], y[y == c], modality[y == c]))
                           for c in present}}
    if len(present) == 1:
        out.update(ct_to_xray=None, xray_to_ct=None,
                   accuracy_note="one finding class entered: a nearest class centroid needs two")
    return out


@TASKS.register("modality_gap")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{"classes", "samples": {"xray": {class: n}, "ct": {...}}, "gap", "ct_to_xray", "xray_to_ct",
    "ci", "chance_gap", "chance_accuracy", "per_finding": {class: gap}, "figures"} (module docstring),
    or {"skipped": why, "samples"} when no class has `min_per_class` samples in each modality."""
    cfg = ctx.cfg.modality_gap
    classes = list(cfg.classes)
    xray = draw_samples(ctx, cfg.xray_datasets, classes, cfg.per_class)
    ct = draw_samples(ctx, cfg.volume_datasets, classes, cfg.per_class)
    found = {"xray": counts(xray, classes), "ct": counts(ct, classes)}
    least = cfg.min_per_class
    kept = [c for c, name in enumerate(classes) if min(found["xray"][name], found["ct"][name]) >= least]
    if not kept:
        return {"skipped": f"no class of {classes} has {least} X-ray and {least} CT test samples "
                           "(eval.modality_gap.min_per_class)", "samples": found}
    xray, ct = [s for s in xray if s[2] in kept], [s for s in ct if s[2] in kept]
    x = np.concatenate([
        embed(xray, lambda d: ctx.image_features(encoder, d, SPLIT, "projected")),
        embed(ct, lambda d: volume_features(encoder, ctx, d, SPLIT, "projected"))])  # (N, D)
    y = np.array([s[2] for s in xray + ct])
    modality = np.repeat([0, 1], [len(xray), len(ct)])
    out = {"classes": [classes[c] for c in kept], "samples": found, **measure(ctx, x, y, modality, classes)}
    path = ctx.figure_path(encoder, "modality_tsne")
    gap, chance = (math.nan if out[k] is None else out[k] for k in ("gap", "chance_gap"))
    plot_modalities(tsne_2d(x, ctx.cfg.seed), y, modality, classes,
                    f"{encoder.label}: X-ray (o) vs CT (^), gap {gap:.2f} (chance {chance:.2f})", str(path))
    out["figures"] = {"modality_tsne": str(path.relative_to(ctx.out_dir))}
    log.info("%s modality gap %.3f (chance %.3f)", encoder.label, gap, chance)
    return out
