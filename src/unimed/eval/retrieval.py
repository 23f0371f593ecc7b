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
ones rank first, so an encoder that maps everything to one point scores chance, never 100%.

The cross-lingual part needs the same reports in English and Spanish: a CSV with columns
``study_id,en,es`` (``retrieval.parallel_file``, default ``<data.root>/parallel-reports/test.csv``,
which the phantom world writes for its MIMIC test studies). Without that file the part is skipped
with a warning and absent from the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unimed.data.adapters.tables import CsvTable
from unimed.data.records import Record
from unimed.data.reports import clean_report
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)

SPLIT = "test"
PARALLEL_DEFAULT = "parallel-reports/test.csv"
PARALLEL_COLUMNS = ("study_id", "en", "es")


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q, G) gallery indices of each query, best first; ties put non-relevant items first."""
    return np.lexsort((relevant.astype(np.int8), -scores), axis=-1)


def recall_at_k(scores: np.ndarray, match: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """{"R@k": share of queries with a matching item in the top k} for (Q, G) `scores` and
    boolean `match`; ties are broken against the query."""
    ranked = np.take_along_axis(match, pessimistic_order(scores, match), axis=-1)  # (Q, G)
    return {f"R@{k}": float(ranked[:, :k].any(axis=1).mean()) for k in ks}


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """{"P@k": mean share of relevant items in the top min(k, G)} for (Q, G) `scores` and boolean
    `relevant`; ties are broken against the query."""
    ranked = np.take_along_axis(relevant, pessimistic_order(scores, relevant), axis=-1)  # (Q, G)
    return {f"P@{k}": float(ranked[:, :k].mean(axis=1).mean()) for k in ks}


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
    scores: np.ndarray, match: np.ndarray, relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@K and Precision@K of one direction ((Q, G) arrays)."""
    return {**recall_at_k(scores, match, ks), **precision_at_k(scores, relevant, ks)}


def dataset_retrieval(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """Image->report and report->image metrics on the test split of `dataset`."""
    cfg = ctx.cfg.retrieval
    records = ctx.data.require(dataset, SPLIT)
    keep = [i for i, r in enumerate(records) if r.report]
    if not keep:
        raise EvalError(f"retrieval: no test records with a report in dataset '{dataset}'")
    records = [records[i] for i in keep]
    images = rgb(ctx.data.images(dataset, SPLIT, "crop")[keep])  # (N, 3, S, S)
    image = encoder.image_features(images, normalize=True, batch_size=ctx.cfg.batch_size)  # (N, E)
    text = encoder.text_features([r.report for r in records], normalize=True,
                                 batch_size=ctx.cfg.batch_size)  # (N, E)
    match = same_value([r.study_id for r in records])  # (N, N)
    relevant = same_value([positive_set(r) for r in records])  # (N, N)
    sims = (image @ text.T).numpy()  # (N images, N reports)
    queries = sample_queries(len(records), cfg.max_queries, ctx.cfg.seed)
    return {
        "image_to_report": score_direction(sims[queries], match[queries], relevant[queries], cfg.ks),
        "report_to_image": score_direction(sims.T[queries], match[queries], relevant[queries], cfg.ks),
        "queries": len(queries),
        "gallery": len(records),
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
    """`retrieval.parallel_file`, or the default file under the data root."""
    configured = ctx.cfg.retrieval.parallel_file
    return Path(configured) if configured else Path(ctx.data.cfg.root) / PARALLEL_DEFAULT


def cross_lingual(encoder: Encoder, corpus: ParallelCorpus, ks: Sequence[int], max_queries: int,
                  seed: int, batch_size: int = 64) -> dict[str, Any]:
    """English->Spanish and Spanish->English report Recall@K over the whole corpus as gallery."""
    en = encoder.text_features(corpus.en, normalize=True, batch_size=batch_size)  # (N, E)
    es = encoder.text_features(corpus.es, normalize=True, batch_size=batch_size)  # (N, E)
    match = same_value(corpus.study_ids)  # (N, N)
    sims = (en @ es.T).numpy()  # (N English, N Spanish)
    queries = sample_queries(len(match), max_queries, seed)
    return {
        "en_to_es": recall_at_k(sims[queries], match[queries], ks),
        "es_to_en": recall_at_k(sims.T[queries], match[queries], ks),
        "queries": len(queries),
        "gallery": len(match),
    }


@TASKS.register("retrieval")
@torch.no_grad()
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Retrieval metrics of `encoder`: per dataset and direction, plus cross-lingual when a
    parallel corpus exists (see the module docstring for the definitions)."""
    cfg = ctx.cfg.retrieval
    out: dict[str, Any] = {"image_to_report": {}, "report_to_image": {}, "queries": {}}
    for dataset in tqdm(cfg.datasets, desc="retrieval", unit="dataset", disable=not ctx.progress):
        result = dataset_retrieval(encoder, ctx, dataset)
        out["image_to_report"][dataset] = result["image_to_report"]
        out["report_to_image"][dataset] = result["report_to_image"]
        out["queries"][dataset] = {"queries": result["queries"], "gallery": result["gallery"]}
        log.info("%s retrieval on %s: image->report %s", encoder.name, dataset,
                 result["image_to_report"])
    path = parallel_path(ctx)
    if not path.is_file():
        log.warning("no parallel report corpus at %s: cross-lingual retrieval skipped", path)
        return out
    result = cross_lingual(encoder, read_parallel(path), cfg.ks, cfg.max_queries, ctx.cfg.seed,
                           ctx.cfg.batch_size)
    out["cross_lingual"] = {"en_to_es": result["en_to_es"], "es_to_en": result["es_to_en"]}
    out["queries"]["cross_lingual"] = {"queries": result["queries"], "gallery": result["gallery"]}
    return out
