"""Community-bias audit: how separable languages and sites are in the embeddings (Med-UniC Fig. 1, 4).

Up to `samples_per_group` records per language are drawn (seeded) from the test splits of the
audited datasets (all splits when a dataset has no test records). Four embedding spaces are
audited: the text encoder's un-projected [CLS] state and its projection P_l, the image backbone's
pooled features and their projection P_v. For the language and the site of every record:

* ``probe_accuracy``: stratified k-fold accuracy of a logistic-regression probe (standardised
  features) -- can a linear model tell the groups apart?
* ``knn_accuracy``: leave-one-out accuracy of a k-nearest-neighbour vote under cosine similarity --
  how mixed are the neighbourhoods (what a t-SNE plot shows)?
* ``silhouette``: cosine silhouette score of the groups (1 separated, 0 mixed).
* ``chance``: the majority group's share, the accuracy of always guessing it.

High values mean a biased, community-separated space; a debiased model brings them towards chance.
In the phantom world language and site coincide; on real data they differ.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from unimed.data.records import Record
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)

SPLIT = "test"
GROUPINGS = ("language", "site")


@dataclasses.dataclass(frozen=True)
class Sample:
    """The audited records, their (N, 1, S, S) images, and each record's language and site."""

    records: list[Record]
    images: torch.Tensor
    languages: np.ndarray
    sites: np.ndarray


def _dataset_pool(ctx: TaskContext, dataset: str) -> tuple[list[Record], torch.Tensor]:
    """Test records with a report and a language (all splits when there is no test split)."""
    split: str | None = SPLIT if ctx.data.records(dataset, SPLIT) else None
    records = ctx.data.require(dataset, split)
    keep = [i for i, r in enumerate(records) if r.report and r.language]
    return [records[i] for i in keep], ctx.data.images(dataset, split, "crop")[keep]


def draw_sample(ctx: TaskContext, datasets: Sequence[str], per_group: int, seed: int) -> Sample:
    """Up to `per_group` seeded records per language from `datasets`, with their images."""
    pools = [_dataset_pool(ctx, d) for d in datasets]
    records = [r for recs, _ in pools for r in recs]
    images = torch.cat([imgs for _, imgs in pools])  # (N_all, 1, S, S)
    languages = np.array([r.language for r in records])
    if len(set(languages)) < 2:
        raise EvalError(
            f"bias audit: records with a report in datasets {list(datasets)} have languages "
            f"{sorted(set(languages))}; at least two languages are needed"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for language in sorted(set(languages)):
        members = np.flatnonzero(languages == language)
        chosen += rng.permutation(members)[:per_group].tolist()
    chosen = sorted(chosen)
    picked = [records[i] for i in chosen]
    sites = np.array([r.site or "unknown" for r in picked])
    return Sample(picked, images[chosen], languages[chosen], sites)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out accuracy of a cosine k-NN majority vote; a tied vote goes to the class of the
    nearest of the tied neighbours."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (N, D)
    sims = x @ x.T  # (N, N)
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(x) - 1)
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (N, k), nearest first
    votes = labels[neighbours]  # (N, k)
    correct = 0
    for i, row in enumerate(votes):
        counts = {c: int(np.sum(row == c)) for c in set(row.tolist())}
        best = max(counts.values())
        winner = next(c for c in row.tolist() if counts[c] == best)
        correct += int(winner == labels[i])
    return correct / len(x)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> float | None:
    """Stratified `folds`-fold accuracy of a logistic-regression probe; None when a group has
    fewer than two members."""
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < 2:
        return None
    cv = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(probe, features, labels, cv=cv).mean())


def separability(features: np.ndarray, labels: np.ndarray, *, knn_k: int, folds: int,
                 seed: int) -> dict[str, float | None]:
    """How well `labels` (N,) can be told apart in `features` (N, D); None where undefined (a
    single group, or a group too small)."""
    groups, counts = np.unique(labels, return_counts=True)
    chance = float(counts.max() / counts.sum())
    if len(groups) < 2:
        return {"probe_accuracy": None, "knn_accuracy": None, "silhouette": None, "chance": chance}
    return {
        "probe_accuracy": probe_accuracy(features, labels, folds, seed),
        "knn_accuracy": knn_accuracy(features, labels, knn_k),
        "silhouette": float(silhouette_score(features, labels, metric="cosine"))
        if len(groups) < len(labels) else None,
        "chance": chance,
    }


def embeddings(encoder: Encoder, sample: Sample, batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """{"text": {"cls", "projected"}, "image": {"pooled", "projected"}} -> (N, D) arrays."""
    texts = [r.report or "" for r in sample.records]
    images = rgb(sample.images)  # (N, 3, S, S)
    return {
        "text": {
            "cls": encoder.text_features(texts, projected=False, batch_size=batch_size).numpy(),
            "projected": encoder.text_features(texts, batch_size=batch_size).numpy(),
        },
        "image": {
            "pooled": encoder.image_features(images, projected=False, batch_size=batch_size).numpy(),
            "projected": encoder.image_features(images, batch_size=batch_size).numpy(),
        },
    }


def tsne_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE of the L2-normalised features, perplexity adapted to small N."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_tsne(points: dict[str, np.ndarray], sample: Sample, title: str, path: str) -> None:
    """One panel per space: colour = language, marker = site."""
    fig = Figure(figsize=(5 * len(points), 4.5))
    markers = dict(zip(sorted(set(sample.sites)), "os^Dvx*"))
    for ax, (space, xy) in zip(fig.subplots(1, len(points), squeeze=False)[0], points.items()):
        for c, language in enumerate(sorted(set(sample.languages))):
            for site, marker in markers.items():
                keep = (sample.languages == language) & (sample.sites == site)
                if keep.any():
                    ax.scatter(xy[keep, 0], xy[keep, 1], s=10, marker=marker, color=f"C{c}",
                               alpha=0.7, label=f"{language} / {site}")
        ax.set_title(f"{title}: {space}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@TASKS.register("bias")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Language / site separability of every embedding space, and t-SNE figures by language."""
    cfg = ctx.cfg.bias
    sample = draw_sample(ctx, cfg.datasets, cfg.samples_per_group, ctx.cfg.seed)
    spaces = embeddings(encoder, sample, ctx.cfg.batch_size)
    groups = {"language": sample.languages, "site": sample.sites}
    out: dict[str, Any] = {"text": {}, "image": {}, "figures": {}}
    jobs = [(m, s) for m in spaces for s in spaces[m]]
    for modality, space in tqdm(jobs, desc="bias audit", unit="space", disable=not ctx.progress):
        out[modality][space] = {
            name: separability(spaces[modality][space], labels, knn_k=cfg.knn_k, folds=cfg.folds,
                               seed=ctx.cfg.seed)
            for name, labels in groups.items()
        }
    for modality, feats in spaces.items():
        points = {space: tsne_2d(x, ctx.cfg.seed) for space, x in feats.items()}
        path = ctx.figure_path(encoder, f"tsne_{modality}")
        plot_tsne(points, sample, f"{encoder.label} {modality}", str(path))
        out["figures"][f"tsne_{modality}"] = str(path.relative_to(ctx.out_dir))
    languages, counts = np.unique(sample.languages, return_counts=True)
    out["samples"] = {str(k): int(v) for k, v in zip(languages, counts)}
    log.info("%s bias audit: text/projected language %s", encoder.name, out["text"]["projected"])
    return out
