"""Retrieval: image->report and report->image on each dataset's test split, and cross-lingual
report<->report retrieval on a parallel (translated) test corpus.

Similarities are cosines of the projected, L2-normalised features (Med-UniC's shared embedding
space). Every query ranks the whole test gallery:

* Recall@K: share of queries with at least one *matching* item (same study: the query's own report
  or image) among the first K;
* Precision@K: mean share of the first K items that are *relevant*, i.e. whose set of positive
  labels (value 1.0) equals the query's (two studies without positive label are relevant to each
  other), as in label-based report retrieval.

Ties are broken against the query: among items with equal similarity, non-matching (non-relevant)
ones rank first, so an encoder that maps everything to one point scores chance, never 100%. Every
value carries a bootstrap 95 % interval over resamples of the queries.

Two parts check for the language shortcut (a model that tells English from Spanish finds the right
*language* of report for free): image->report retrieval on the pooled test sets with the gallery
restricted to the image's own language (:func:`within_language`), and a diagnostic on the
pre-training pairs (:func:`shortcut_diagnostic`).

The cross-lingual part needs the same reports in English and Spanish: a CSV with columns
``study_id,en,es`` (``retrieval.parallel_file``, default ``<data.root>/parallel-reports/test.csv``,
which the phantom world writes for its MIMIC test studies). Without a file at the default place the
part is skipped with a warning and absent from the metrics; a `parallel_file` that is set must exist.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unimed.data.adapters.tables import CsvTable
from unimed.data.records import Record
from unimed.data.reports import clean_report
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.metrics import batched_mean, bootstrap
from unimed.eval.tasks import TASKS, TaskContext, with_intervals

log = logging.getLogger(__name__)

SPLIT = "test"
PARALLEL_DEFAULT = "parallel-reports/test.csv"
PARALLEL_COLUMNS = ("study_id", "en", "es")


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q, G) gallery indices of each query, best first; ties put non-relevant items first."""
    return np.lexsort((relevant.astype(np.int8), -scores), axis=-1)


def recall_hits(scores: np.ndarray, match: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """{"R@k": (Q,) 1.0 where the query has a matching item in its top k} for (Q, G) `scores` and
    boolean `match`; ties are broken against the query. Recall@K is their mean."""
    ranked = np.take_along_axis(match, pessimistic_order(scores, match), axis=-1)  # (Q, G)
    return {f"R@{k}": ranked[:, :k].any(axis=1).astype(np.float64) for k in ks}


def precision_values(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]
                     ) -> dict[str, np.ndarray]:
    """{"P@k": (Q,) share of relevant items in the query's top min(k, G)} for (Q, G) `scores` and
    boolean `relevant`; ties are broken against the query. Precision@K is their mean."""
    ranked = np.take_along_axis(relevant, pessimistic_order(scores, relevant), axis=-1)  # (Q, G)
    return {f"P@{k}": ranked[:, :k].mean(axis=1) for k in ks}


def with_mean_intervals(per_query: dict[str, np.ndarray], resamples: np.ndarray) -> dict[str, Any]:
    """Means of per-query values with their bootstrap intervals over the query `resamples`."""
    return with_intervals({name: bootstrap(batched_mean, [values], resamples)
                           for name, values in per_query.items()})


def positive_set(record: Record) -> frozenset[str]:
    """The names of the record's labels that are positive (1.0)."""
    return frozenset(name for name, value in record.labels.items() if value == 1.0)


def same_value(values: Sequence[Hashable]) -> np.ndarray:
    """(N, N) boolean: item i equals item j."""
    codes = {value: i for i, value in enumerate(dict.fromkeys(values))}
    ids = np.array([codes[v] for v in values])  # (N,)
    return ids[:, None] == ids[None, :]


def sample_queries(n: int, max_queries: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of at most `max_queries` of `n` items."""
    if n <= max_queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


def score_direction(
    scores: np.ndarray, match: np.ndarray, relevant: np.ndarray, ks: Sequence[int],
    resamples: np.ndarray,
) -> dict[str, Any]:
    """Recall@K and Precision@K of one direction ((Q, G) arrays) with their intervals."""
    per_query = {**recall_hits(scores, match, ks), **precision_values(scores, relevant, ks)}
    return with_mean_intervals(per_query, resamples)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Image-report pairs of one dataset split and their projected, L2-normalised features."""

    records: list[Record]
    image: torch.Tensor  # (N, E)
    text: torch.Tensor  # (N, E)


def dataset_pairs(encoder: Encoder, ctx: TaskContext, dataset: str) -> Pairs:
    """The test records of `dataset` that have a report, with their features (from the context's
    cache, shared with zero-shot and the bias audit)."""
    records = ctx.data.require(dataset, SPLIT)
    keep = [i for i, r in enumerate(records) if r.report]
    if not keep:
        raise EvalError(f"retrieval: no test records with a report in dataset '{dataset}'")
    chosen = [records[i] for i in keep]
    image = ctx.image_features(encoder, dataset, SPLIT, "projected", normalize=True)[keep]
    text = ctx.text_features(encoder, [r.report for r in chosen], "projected", normalize=True)
    return Pairs(chosen, image, text)


def encode_pairs(encoder: Encoder, ctx: TaskContext, records: list[Record], images: torch.Tensor
                 ) -> Pairs:
    """Features of the images (N, 1, S, S) and reports (through the context's text cache) of
    `records`."""
    image = encoder.image_features(rgb(images), normalize=True, batch_size=ctx.cfg.batch_size)
    text = ctx.text_features(encoder, [r.report for r in records], "projected", normalize=True)
    return Pairs(records, image, text)


def study_keys(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(dataset, study id) of each record: the identity of a study across pooled datasets."""
    return [(r.dataset, r.study_id) for r in records]


def dataset_retrieval(pairs: Pairs, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """Image->report and report->image metrics of one dataset's test pairs."""
    cfg = ctx.cfg.retrieval
    match = same_value(study_keys(pairs.records))  # (N, N)
    relevant = same_value([positive_set(r) for r in pairs.records])  # (N, N)
    sims = (pairs.image @ pairs.text.T).numpy()  # (N images, N reports)
    queries = sample_queries(len(pairs.records), cfg.max_queries, ctx.cfg.seed)
    resamples = ctx.resamples(dataset, SPLIT, len(queries))
    return {
        "image_to_report": score_direction(sims[queries], match[queries], relevant[queries], cfg.ks,
                                           resamples),
        "report_to_image": score_direction(sims.T[queries], match[queries], relevant[queries],
                                           cfg.ks, resamples),
        "queries": len(queries),
        "gallery": len(pairs.records),
    }


def within_language(pairs: Sequence[Pairs], ctx: TaskContext) -> dict[str, Any]:
    """Image->report Recall@K on the pooled test pairs of every dataset: over the whole gallery
    ("all_languages"), and over the reports of the image's own language only ("within_language"),
    where telling the languages apart cannot help; "chance" is the within-language Recall@K of a
    random ranking, k / (reports in the image's language), averaged over the queries."""
    ks = ctx.cfg.retrieval.ks
    records = [r for p in pairs for r in p.records]
    sims = (torch.cat([p.image for p in pairs]) @ torch.cat([p.text for p in pairs]).T).numpy()
    match = same_value(study_keys(records))  # (N, N)
    languages = np.array([str(r.language) for r in records])
    same_language = languages[:, None] == languages[None, :]  # (N, N)
    queries = sample_queries(len(records), ctx.cfg.retrieval.max_queries, ctx.cfg.seed)
    resamples = ctx.resamples("+".join(p.records[0].dataset for p in pairs), SPLIT, len(queries))
    masked = np.where(same_language, sims, -np.inf)
    gallery = same_language[queries].sum(1)  # (Q,)
    return {
        "all_languages": with_mean_intervals(recall_hits(sims[queries], match[queries], ks), resamples),
        "within_language": with_mean_intervals(recall_hits(masked[queries], match[queries], ks),
                                               resamples),
        "chance": {f"R@{k}": float(np.mean(np.minimum(k, gallery) / gallery)) for k in ks},
    }


def info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float) -> float:
    """Symmetric InfoNCE (L_CVL) of one batch of matched, normalised (B, E) image and text features."""
    logits = image @ text.T / temperature  # (B, B)
    target = torch.arange(len(image))
    return float((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)


def mean_batch_loss(pairs: Pairs, orders: Sequence[np.ndarray], batch_size: int,
                    temperature: float) -> float | None:
    """Mean InfoNCE over the full batches of `batch_size` consecutive items of each order (a
    permutation of pair indices); None when no order fills one batch."""
    batches = [torch.from_numpy(order[start : start + batch_size])
               for order in orders for start in range(0, len(order) - batch_size + 1, batch_size)]
    losses = [info_nce(pairs.image[batch], pairs.text[batch], temperature) for batch in batches]
    return float(np.mean(losses)) if losses else None


def shortcut_diagnostic(encoder: Encoder, ctx: TaskContext, records: Sequence[Record]
                        ) -> dict[str, Any]:
    """Can the image-text alignment lean on the language instead of the findings?

    On the pre-training pairs (`records`: train records with reports; at most
    ``retrieval.diagnostic_pairs`` per language, seeded, whose images alone are decoded, once for
    every encoder), the CVL InfoNCE loss (the encoder's temperature) over batches that mix the
    languages and over single-language batches of the same size: when the mixed loss is clearly
    lower, other-language negatives were easy, i.e. language was a shortcut (chance is ln B for
    both). And where each image's top-1 report lands over the pooled pairs: its own study, the
    right language but a wrong study, or the other language.
    """
    cfg = ctx.cfg.retrieval
    languages = np.array([str(r.language) for r in records])
    rng = np.random.default_rng(ctx.cfg.seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(languages == lang))[
        : cfg.diagnostic_pairs] for lang in np.unique(languages)]))
    chosen = [records[i] for i in keep]
    images = ctx.data.sample_images(chosen, "crop", "shortcut diagnostic")
    pairs = encode_pairs(encoder, ctx, chosen, images)
    languages = languages[keep]
    size, temperature = cfg.diagnostic_batch_size, encoder.temperature
    mixed = [rng.permutation(len(keep))]
    single = [rng.permutation(np.flatnonzero(languages == lang)) for lang in np.unique(languages)]
    sims = (pairs.image @ pairs.text.T).numpy()  # (N images, N reports)
    match = same_value(study_keys(pairs.records))
    top = pessimistic_order(sims, match)[:, 0]  # (N,)
    rows = np.arange(len(top))
    right_study, right_language = match[rows, top], languages[top] == languages
    top1 = {"right_study": right_study, "right_language_wrong_study": right_language & ~right_study,
            "wrong_language": ~right_language}
    resamples = ctx.resamples("+".join(cfg.datasets), "train", len(top))
    return {
        "pairs": {str(lang): int((languages == lang).sum()) for lang in np.unique(languages)},
        "batch_size": size,
        "temperature": temperature,
        "chance_loss": math.log(size),
        "loss_mixed": mean_batch_loss(pairs, mixed, size, temperature),
        "loss_single_language": mean_batch_loss(pairs, single, size, temperature),
        "top1": with_mean_intervals({k: v.astype(np.float64) for k, v in top1.items()}, resamples),
    }


@dataclasses.dataclass(frozen=True)
class ParallelCorpus:
    """The same reports in two languages, row i of `en` translating row i of `es`."""

    study_ids: list[str]
    en: list[str]
    es: list[str]


def read_parallel(path: Path) -> ParallelCorpus:
    """Read a `study_id,en,es` CSV; a DataError naming the file, line and column for a bad row."""
    table = CsvTable(path, PARALLEL_COLUMNS)
    corpus = ParallelCorpus([], [], [])
    for line, values in table:
        row = table.row(line, values)
        for column in PARALLEL_COLUMNS:
            if not row[column].strip():
                raise table.error("empty cell", line, column)
        corpus.study_ids.append(row["study_id"].strip())
        corpus.en.append(clean_report(row["en"]))
        corpus.es.append(clean_report(row["es"]))
    if not corpus.study_ids:
        raise table.error("no rows", 2)
    return corpus


def parallel_path(ctx: TaskContext) -> Path:
    """`retrieval.parallel_file`, which must exist, or else the default file under the data root,
    which may not (real datasets rarely come with parallel reports: the callers then skip)."""
    configured = ctx.cfg.retrieval.parallel_file
    if not configured:
        return Path(ctx.data.cfg.root) / PARALLEL_DEFAULT
    if not Path(configured).is_file():
        raise EvalError(f"eval.retrieval.parallel_file={configured}: no such file (leave it empty "
                        f"for <data.root>/{PARALLEL_DEFAULT}, or for none)")
    return Path(configured)


def cross_lingual(encoder: Encoder, corpus: ParallelCorpus, ctx: TaskContext, name: str
                  ) -> dict[str, Any]:
    """English->Spanish and Spanish->English report Recall@K over the whole corpus as gallery."""
    cfg = ctx.cfg
    en = ctx.text_features(encoder, corpus.en, "projected", normalize=True)  # (N, E)
    es = ctx.text_features(encoder, corpus.es, "projected", normalize=True)  # (N, E)
    match = same_value(corpus.study_ids)  # (N, N)
    sims = (en @ es.T).numpy()  # (N English, N Spanish)
    queries = sample_queries(len(match), cfg.retrieval.max_queries, cfg.seed)
    resamples = ctx.resamples(name, SPLIT, len(queries))
    ks = cfg.retrieval.ks
    return {
        "en_to_es": with_mean_intervals(recall_hits(sims[queries], match[queries], ks), resamples),
        "es_to_en": with_mean_intervals(recall_hits(sims.T[queries], match[queries], ks), resamples),
        "queries": len(queries),
        "gallery": len(match),
    }


@TASKS.register("retrieval")
@torch.no_grad()
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Retrieval metrics of `encoder`: per dataset and direction, pooled within-language, the
    language-shortcut diagnostic on the pre-training pairs, and cross-lingual when a parallel
    corpus exists (see the module docstring for the definitions)."""
    cfg = ctx.cfg.retrieval
    out: dict[str, Any] = {"image_to_report": {}, "report_to_image": {}, "queries": {}}
    test_pairs = []
    for dataset in tqdm(cfg.datasets, desc="retrieval", unit="dataset", disable=not ctx.progress):
        pairs = dataset_pairs(encoder, ctx, dataset)
        test_pairs.append(pairs)
        result = dataset_retrieval(pairs, ctx, dataset)
        out["image_to_report"][dataset] = result["image_to_report"]
        out["report_to_image"][dataset] = result["report_to_image"]
        out["queries"][dataset] = {"queries": result["queries"], "gallery": result["gallery"]}
        log.info("%s retrieval on %s: image->report %s", encoder.name, dataset,
                 {k: round(v, 4) for k, v in result["image_to_report"].items() if k.startswith("R@")})
    out["pooled"] = within_language(test_pairs, ctx)
    train = [r for d in cfg.datasets for r in ctx.data.require(d, "train") if r.report]
    if not train:
        raise EvalError(f"retrieval: no train records with a report in datasets {list(cfg.datasets)}")
    out["shortcut"] = shortcut_diagnostic(encoder, ctx, train)
    path = parallel_path(ctx)
    if not path.is_file():
        log.warning("no parallel report corpus at %s: cross-lingual retrieval skipped", path)
        return out
    result = cross_lingual(encoder, read_parallel(path), ctx, "parallel-reports")
    out["cross_lingual"] = {"en_to_es": result["en_to_es"], "es_to_en": result["es_to_en"]}
    out["queries"]["cross_lingual"] = {"queries": result["queries"], "gallery": result["gallery"]}
    return out
