"""Community-bias audit: how separable languages and sites are in the embeddings (Med-UniC Fig. 1, 4).

Up to `samples_per_group` records per language are drawn (seeded) from the test splits of the
audited datasets (all splits when a dataset has no test records). Four embedding spaces are
audited: the text encoder's un-projected sentence feature ("pooled": [CLS] state or token mean, per
method.text.pooling) and its projection P_l, the image backbone's
pooled features and their projection P_v. For the language and the site of every record:

* ``probe_accuracy``: stratified k-fold accuracy of a logistic-regression probe (standardised
  features) -- can a linear model tell the groups apart?
* ``knn_accuracy``: leave-one-out accuracy of a k-nearest-neighbour vote under cosine similarity --
  how mixed are the neighbourhoods (what a t-SNE plot shows)?
* ``silhouette``: cosine silhouette score of the groups (1 separated, 0 mixed).
* ``distance_ratio``: mean cosine distance between groups over mean distance within groups
  (:func:`distance_ratio`; 1 mixed, above 1 clustered by group).
* ``chance``: the majority group's share, the accuracy of always guessing it.

High values mean a biased, community-separated space; a debiased model brings them towards chance.
Records of one patient share anatomy, so they are kept on one side of every probe fold, are never
each other's kNN neighbours and are left out of the distance ratio's pairs: otherwise a probe names
a community by recognising a patient (random image features scored 70% on the phantom's control
community with record-level folds, chance with patient-level folds).
Two numbers cannot fail on their own: reports in two languages with disjoint vocabularies are
linearly separable whatever the encoder (text probe near 100%), and sites that differ in acquisition
separate in image space whatever the text does. Hence two measurements that can:

* ``parallel`` (text spaces): every report of a parallel corpus (``retrieval.parallel_file``, the
  same test studies in English and Spanish) queries all other reports of both languages
  (:func:`parallel_hits`), with bootstrap intervals.
* ``control``: a control community -- a site with records in several languages, whose acquisition
  and prevalence are the same for every language (the phantom's `miami`) -- audited on its own,
  split into the records pre-training saw (``seen``: the pre-training split) and the others
  (``unseen``), see :func:`control_section`. On real data without such a site the section is None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from unimed.data.records import Record
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.features import SPACES
from unimed.eval.retrieval import (
    parallel_path,
    pessimistic_order,
    read_parallel,
    sample_queries,
    with_mean_intervals,
)
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)

SPLIT = "test"
PRETRAIN_SPLIT = "train"
GROUPINGS = ("language", "site")


@dataclasses.dataclass(frozen=True)
class Sample:
    """The audited records, each record's language, site and patient ("<dataset>/<patient_id>"),
    and where their images are: `images` (N, 1, S, S), the sample's own (``ctx.data.sample_images``,
    one decode for every encoder), or else `rows`, per (dataset, split) the rows of the cached split
    (``ctx.data.images(dataset, split, "crop")``) in sample order, so the split's features are
    shared with the other tasks."""

    records: list[Record]
    languages: np.ndarray
    sites: np.ndarray
    patients: np.ndarray
    images: torch.Tensor | None = None
    rows: tuple[tuple[str, str | None, np.ndarray], ...] = ()


def _dataset_pool(ctx: TaskContext, dataset: str) -> tuple[list[Record], str | None, np.ndarray]:
    """Test records with a report and a language (all splits when there is no test split), the
    split read and their rows in it."""
    split: str | None = SPLIT if ctx.data.records(dataset, SPLIT) else None
    records = ctx.data.require(dataset, split)
    keep = np.array([i for i, r in enumerate(records) if r.report and r.language], dtype=np.int64)
    return [records[i] for i in keep], split, keep


def draw_sample(ctx: TaskContext, datasets: Sequence[str], per_group: int, seed: int) -> Sample:
    """Up to `per_group` seeded records per language from `datasets`, with their image rows."""
    pools = [_dataset_pool(ctx, d) for d in datasets]
    records = [r for recs, _, _ in pools for r in recs]
    languages = np.array([r.language for r in records])
    if len(set(languages)) < 2:
        raise EvalError(
            f"bias audit: records with a report in datasets {list(datasets)} have languages "
            f"{sorted(set(languages.tolist()))}; at least two languages are needed"
        )
    chosen = np.array(per_language(languages, per_group, np.random.default_rng(seed)), dtype=np.int64)
    picked = [records[i] for i in chosen]
    sites = np.array([r.site or "unknown" for r in picked])
    rows, start = [], 0
    for dataset, (recs, split, keep) in zip(datasets, pools):
        inside = chosen[(chosen >= start) & (chosen < start + len(recs))] - start
        rows.append((dataset, split, keep[inside]))
        start += len(recs)
    return Sample(picked, languages[chosen], sites, patient_ids(picked), rows=tuple(rows))


def patient_ids(records: Sequence[Record]) -> np.ndarray:
    """(N,) "<dataset>/<patient_id>" of every record."""
    return np.array([f"{r.dataset}/{r.patient_id}" for r in records])


def per_language(languages: np.ndarray, per_group: int, rng: np.random.Generator) -> list[int]:
    """Sorted indices of up to `per_group` seeded members of every language."""
    chosen = []
    for language in sorted(set(languages.tolist())):
        members = np.flatnonzero(languages == language)
        chosen += rng.permutation(members)[:per_group].tolist()
    return sorted(chosen)


def control_sites(records: Sequence[Record]) -> list[str]:
    """Sites with records in more than one language: where language is decoupled from the site's
    acquisition, so the control community of the audit."""
    languages: dict[str, set[str]] = {}
    for record in records:
        if record.site and record.language:
            languages.setdefault(record.site, set()).add(record.language)
    return sorted(site for site, found in languages.items() if len(found) > 1)


def draw_control(ctx: TaskContext, datasets: Sequence[str], per_group: int, seed: int
                 ) -> dict[str, Sample] | None:
    """The control community's records with a report, from every split of `datasets`: "seen"
    (the pre-training split) and "unseen" (the others), each with up to `per_group` seeded records
    per language and their images; None when no site has records in two languages."""
    records = [r for d in datasets for r in ctx.data.require(d) if r.report and r.language]
    sites = control_sites(records)
    if not sites:
        return None
    rng = np.random.default_rng(seed)
    out = {}
    for subset, seen in (("seen", True), ("unseen", False)):
        pool = [r for r in records if r.site in sites and (r.split == PRETRAIN_SPLIT) == seen]
        languages = np.array([r.language for r in pool])
        picked = [pool[i] for i in per_language(languages, per_group, rng)]
        images = ctx.data.sample_images(picked, "crop", f"bias control/{subset}")  # (N, 1, S, S)
        out[subset] = Sample(picked, np.array([r.language for r in picked]),
                             np.array([r.site for r in picked]), patient_ids(picked), images)
    return out


def unit_rows(features: np.ndarray) -> np.ndarray:
    """(N, D) rows scaled to unit L2 norm (zero rows stay zero)."""
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def other_patients(n: int, patients: np.ndarray | None) -> np.ndarray:
    """(N, N) bool: pairs of distinct records of different patients (any distinct pair without
    `patients`)."""
    if patients is None:
        return ~np.eye(n, dtype=bool)
    return patients[:, None] != patients[None, :]


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int,
                 patients: np.ndarray | None = None) -> float | None:
    """Leave-one-out accuracy of a cosine k-NN majority vote among the records of other patients
    (k lowered to the fewest such records); a tied vote goes to the class of the nearest of the
    tied neighbours. None when a record has no other patient's record to vote."""
    x = unit_rows(features)  # (N, D)
    candidates = other_patients(len(x), patients)  # (N, N)
    sims = np.where(candidates, x @ x.T, -np.inf)  # (N, N)
    k = min(k, int(candidates.sum(axis=1).min()))
    if k < 1:
        return None
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (N, k), nearest first
    votes = labels[neighbours]  # (N, k)
    correct = 0
    for i, row in enumerate(votes):
        counts = {c: int(np.sum(row == c)) for c in set(row.tolist())}
        best = max(counts.values())
        winner = next(c for c in row.tolist() if counts[c] == best)
        correct += int(winner == labels[i])
    return correct / len(x)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                   patients: np.ndarray | None = None) -> float | None:
    """Stratified `folds`-fold accuracy of a logistic-regression probe, each patient's records in
    one fold (so the probe cannot name a group by recognising a patient seen in training); None
    when a group has fewer than two members (patients)."""
    units = patients if patients is not None else np.arange(len(labels))
    smallest = min(len(set(units[labels == g].tolist())) for g in np.unique(labels))
    if smallest < 2:
        return None
    cv = StratifiedGroupKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(probe, features, labels, groups=units, cv=cv).mean())


def distance_ratio(features: np.ndarray, labels: np.ndarray,
                   patients: np.ndarray | None = None) -> float | None:
    """Mean cosine distance (1 - cos) over pairs of records from different groups, divided by the
    mean over pairs of distinct records from the same group (all groups' pairs pooled); pairs of
    one patient's records are left out. None with fewer than two groups or no within-group pair,
    inf when every group is a single point.

    Why this statistic: it lives in the cosine geometry that retrieval and zero-shot use, it does
    not depend on the scale of the features, and it has a fixed null: when the labels carry no
    information about the features, between- and within-group pairs are both random pairs, so the
    ratio is 1 up to sampling noise. Unlike the probe it measures how far apart the communities are
    relative to how spread each is, not whether a hyperplane exists, so it does not saturate at
    100% for two languages with disjoint vocabularies.
    How it fails: a value well above 1 means the space is organised by community (language or
    site) rather than by content; a debiased space is near 1.
    """
    pairs = other_patients(len(labels), patients)  # (N, N)
    same = labels[:, None] == labels[None, :]  # (N, N)
    within_pairs, between_pairs = same & pairs, ~same & pairs
    if not within_pairs.any() or not between_pairs.any():
        return None
    x = unit_rows(features)
    distance = 1.0 - x @ x.T  # (N, N)
    within, between = float(distance[within_pairs].mean()), float(distance[between_pairs].mean())
    return between / within if within > 0 else math.inf


def separability(features: np.ndarray, labels: np.ndarray, *, knn_k: int, folds: int,
                 seed: int, patients: np.ndarray | None = None) -> dict[str, float | None]:
    """How well `labels` (N,) can be told apart in `features` (N, D); None where undefined (a
    single group, or a group too small). With `patients` (N,), records of one patient never meet
    across probe folds, as kNN neighbours or as a distance-ratio pair (the silhouette keeps them)."""
    groups, counts = np.unique(labels, return_counts=True)
    chance = float(counts.max() / counts.sum())
    if len(groups) < 2:
        return {"probe_accuracy": None, "knn_accuracy": None, "silhouette": None,
                "distance_ratio": None, "chance": chance}
    return {
        "probe_accuracy": probe_accuracy(features, labels, folds, seed, patients),
        "knn_accuracy": knn_accuracy(features, labels, knn_k, patients),
        "silhouette": float(silhouette_score(features, labels, metric="cosine"))
        if len(groups) < len(labels) else None,
        "distance_ratio": distance_ratio(features, labels, patients),
        "chance": chance,
    }


def parallel_hits(first: np.ndarray, second: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Row i of `first` (N, D) and row i of `second` (N, D) embed one report in two languages.

    Every one of the 2N reports queries the other 2N - 1 of both languages by cosine similarity
    (ties ranked against the query, so repeated report texts count against it). Per query
    language ("first", "second"), (N,) per-query values whose means are:

    * ``R@1``: share of queries whose nearest report is their own translation. Chance 1/(2N - 1);
      an encoder that separates the languages puts same-language reports first and scores near 0,
      whatever its probe accuracy, so this fails where the probe cannot.
    * ``cross_top1``: share of queries whose nearest report is in the other language at all. About
      N/(2N - 1) (one half) for a language-blind space; near 0 means every neighbourhood is
      monolingual (the clusters of Fig. 1a-b).
    * ``translation_rank``: how many of the other 2N - 2 reports are at least as similar to the
      query as its translation, over 2N - 2 (0: the translation comes first; 1: last). It keeps
      resolving where R@1 sits at 0: a space clustered by language puts the translation behind the
      N - 1 reports of the query's language (about 0.5 or more), a language-blind one ahead.
    """
    n = len(first)
    x = unit_rows(np.concatenate([first, second]))  # (2N, D)
    sims = x @ x.T  # (2N, 2N)
    np.fill_diagonal(sims, -np.inf)
    side = np.repeat([0, 1], n)  # (2N,)
    other = side[:, None] != side[None, :]  # (2N, 2N)
    own = np.zeros_like(other)
    own[np.arange(2 * n), (np.arange(2 * n) + n) % (2 * n)] = True
    top_own = np.take_along_axis(own, pessimistic_order(sims, own)[:, :1], axis=1)[:, 0]
    top_other = np.take_along_axis(other, pessimistic_order(sims, other)[:, :1], axis=1)[:, 0]
    own_sim = sims[own]  # (2N,) row-major: the translation's similarity to each query
    ahead = (sims >= own_sim[:, None]).sum(1) - 1  # (2N,) others at least as close, ties included
    rank = ahead / max(2 * n - 2, 1)
    return {name: {"R@1": top_own[side == k].astype(np.float64),
                   "cross_top1": top_other[side == k].astype(np.float64),
                   "translation_rank": rank[side == k].astype(np.float64)}
            for k, name in enumerate(("first", "second"))}


def image_embeddings(encoder: Encoder, ctx: TaskContext, sample: Sample) -> dict[str, np.ndarray]:
    """{"pooled", "projected"}: (N, D) features of the sample's images, both from one pass of the
    image tower."""
    if sample.images is not None:
        spaces = encoder.image_spaces(rgb(sample.images), batch_size=ctx.cfg.batch_size)
        return {space: spaces[space].numpy() for space in SPACES}
    return {space: torch.cat([ctx.image_features(encoder, dataset, split, space)[torch.from_numpy(rows)]
                              for dataset, split, rows in sample.rows]).numpy()
            for space in SPACES}


def embeddings(encoder: Encoder, ctx: TaskContext, sample: Sample) -> dict[str, dict[str, np.ndarray]]:
    """{"text": {"pooled", "projected"}, "image": {"pooled", "projected"}} -> (N, D) arrays (texts
    and the cached splits' images through the context's feature cache)."""
    texts = [r.report or "" for r in sample.records]
    return {
        "text": {
            "pooled": ctx.text_features(encoder, texts, "pooled").numpy(),
            "projected": ctx.text_features(encoder, texts, "projected").numpy(),
        },
        "image": image_embeddings(encoder, ctx, sample),
    }


TSNE_ITERATIONS = 500
"""Gradient steps of the figures' t-SNE (sklearn's default 1000): the first 250 are the early
exaggeration; at the audit's few hundred points per group the layout has settled by 500 (KL
divergence within 1 % of 1000 steps' on 600 clustered 256-d points), at half the cost. The figure is
the only use of the layout."""


def tsne_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE of the L2-normalised features, perplexity adapted to small N."""
    x = unit_rows(features)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS,
                random_state=seed).fit_transform(x)


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


def language_counts(languages: np.ndarray) -> dict[str, int]:
    """{language: number of records}."""
    found, counts = np.unique(languages, return_counts=True)
    return {str(k): int(v) for k, v in zip(found, counts)}


def parallel_section(encoder: Encoder, ctx: TaskContext) -> dict[str, Any] | None:
    """:func:`parallel_hits` in both text spaces on up to `samples_per_group` seeded pairs of the
    parallel corpus, per query language the means with bootstrap intervals over resamples of the
    queries (shared by every encoder, so the checks pair encoders); None (with a warning) when
    there is no corpus."""
    path = parallel_path(ctx)
    if not path.is_file():
        log.warning("no parallel report corpus at %s: parallel-report retrieval skipped", path)
        return None
    corpus = read_parallel(path)
    keep = sample_queries(len(corpus.study_ids), ctx.cfg.bias.samples_per_group, ctx.cfg.seed)
    texts = {"en": [corpus.en[i] for i in keep], "es": [corpus.es[i] for i in keep]}
    n = len(keep)
    chance = {"R@1": 1 / (2 * n - 1), "cross_top1": n / (2 * n - 1), "translation_rank": 0.5}
    out: dict[str, Any] = {"pairs": n, "chance": chance}
    for space in ("pooled", "projected"):
        en, es = (ctx.text_features(encoder, texts[lang], space).numpy() for lang in ("en", "es"))
        got = parallel_hits(en, es)
        out[space] = {lang: with_mean_intervals(got[side], ctx.resamples("parallel", lang, n))
                      for lang, side in (("en", "first"), ("es", "second"))}
    return out


def control_section(encoder: Encoder, ctx: TaskContext) -> dict[str, Any] | None:
    """Language separability (every metric of :func:`separability`) inside the control community,
    per subset ("seen", "unseen") and embedding space; None when there is no control community.

    The control community's images are acquired alike whatever the report language, so:
    * text spaces: its two languages describe the same disease mix, so ``distance_ratio`` is 1 for
      a language-blind encoder; above 1 is a language offset that content cannot explain (the
      main sample's ratio also carries the sites' different prevalence).
    * image spaces, ``unseen``: an image carries no trace of its report's language, so every
      encoder reads chance (probe near 50%, ratio near 1). This is the null reference of the
      image numbers at this sample size; above it, language leaks through the pipeline (the two
      layouts store images differently: 8-bit JPEG vs 16-bit PNG), not through training.
    * image spaces, ``seen``: the images pre-training paired with reports of one language. A
      language signal here beyond ``unseen`` can only come from training -- the image encoder
      pulled towards language-clustered text (Fig. 4 without CTR); with CTR it should be at the
      ``unseen`` level.
    """
    cfg = ctx.cfg.bias
    subsets = draw_control(ctx, cfg.datasets, cfg.samples_per_group, ctx.cfg.seed)
    if subsets is None:
        log.warning("bias audit: no site has records in two languages in %s, so language cannot be "
                    "told from acquisition (no control community)", list(cfg.datasets))
        return None
    out: dict[str, Any] = {
        "sites": sorted({str(site) for sample in subsets.values() for site in sample.sites}),
        "samples": {subset: language_counts(sample.languages) for subset, sample in subsets.items()},
    }
    for subset, sample in subsets.items():
        if len(set(sample.languages.tolist())) < 2:
            out[subset] = None
            continue
        spaces = embeddings(encoder, ctx, sample)
        out[subset] = {
            modality: {space: separability(x, sample.languages, knn_k=cfg.knn_k, folds=cfg.folds,
                                           seed=ctx.cfg.seed, patients=sample.patients)
                       for space, x in feats.items()}
            for modality, feats in spaces.items()
        }
    return out


@TASKS.register("bias")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Language / site separability of every embedding space, t-SNE figures by language,
    parallel-report retrieval and the control community (see the module docstring)."""
    cfg = ctx.cfg.bias
    sample = draw_sample(ctx, cfg.datasets, cfg.samples_per_group, ctx.cfg.seed)
    spaces = embeddings(encoder, ctx, sample)
    groups = {"language": sample.languages, "site": sample.sites}
    out: dict[str, Any] = {"text": {}, "image": {}, "figures": {}}
    jobs = [(m, s) for m in spaces for s in spaces[m]]
    for modality, space in tqdm(jobs, desc="bias audit", unit="space", disable=not ctx.progress):
        out[modality][space] = {
            name: separability(spaces[modality][space], labels, knn_k=cfg.knn_k, folds=cfg.folds,
                               seed=ctx.cfg.seed, patients=sample.patients)
            for name, labels in groups.items()
        }
    for modality, feats in spaces.items():
        points = {space: tsne_2d(x, ctx.cfg.seed) for space, x in feats.items()}
        path = ctx.figure_path(encoder, f"tsne_{modality}")
        plot_tsne(points, sample, f"{encoder.label} {modality}", str(path))
        out["figures"][f"tsne_{modality}"] = str(path.relative_to(ctx.out_dir))
    out["samples"] = language_counts(sample.languages)
    out["parallel"] = parallel_section(encoder, ctx)
    out["control"] = control_section(encoder, ctx)
    log.info("%s bias audit: text/projected language %s", encoder.name, out["text"]["projected"])
    return out
