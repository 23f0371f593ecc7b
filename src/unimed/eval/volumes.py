"""3D downstream tasks on CT volumes, for every encoder the framework loads (UniMedI Tables 2-3).

A 2D encoder (Med-UniC, PRIOR, the baselines) sees a volume through the slice-wise adapter of
:meth:`unimed.eval.features.FeatureCache.volumes`: `eval.volume.slices` axial slices, each encoded,
their embeddings mean-pooled. The tasks read those volume embeddings the way the 2D tasks read image
embeddings:

* ``volume_probe``: a linear layer on the frozen pooled volume features of each dataset in
  `eval.volume.probe_datasets`, trained on every label fraction exactly as the 2D linear probe
  (:func:`unimed.eval.linear_probe.probe_fractions`), scored on the test split with a bootstrap interval
  (CC-CCII: accuracy over NCP / CP / Normal);
* ``volume_retrieval``: volume -> report and report -> volume Recall@K on the test split of each
  dataset in `eval.volume.retrieval_datasets` (projected, cosine similarity; a hit is the query's
  own study), with bootstrap intervals over the queries.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from unimed.data.labels import CCII_CLASSES
from unimed.eval.encoders import Encoder
from unimed.eval.linear_probe import ProbeTarget, label_target, probe_fractions, targets
from unimed.eval.retrieval import recall_hits, same_value, with_mean_intervals
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)

VOLUME_TARGETS: dict[str, ProbeTarget] = {"cc-ccii": ProbeTarget("accuracy", CCII_CLASSES)}
SPLITS = ("train", "valid", "test")


def volume_features(encoder: Encoder, ctx: TaskContext, dataset: str, split: str, space: str
                    ) -> torch.Tensor:
    """(N, D) `space` embeddings of the split's volumes through the slice-wise adapter, cached."""
    cfg = ctx.cfg.volume
    return ctx.features.volumes(encoder, ctx.data, dataset, split, space=space, slices=cfg.slices,
                                window=cfg.window, batch_size=ctx.cfg.batch_size)


def probe_volumes(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """One dataset's volume probe at every configured label fraction."""
    records = {s: ctx.data.require(dataset, s) for s in SPLITS}
    target = VOLUME_TARGETS.get(dataset) or label_target(records["train"], dataset)
    split_y = {s: targets(records[s], target, dataset) for s in SPLITS}
    split_x = {s: volume_features(encoder, ctx, dataset, s, "pooled") for s in SPLITS}
    fractions = probe_fractions(ctx, split_x, split_y, target, dataset, f"volume probe {dataset}")
    return {"metric": target.metric, "volumes": {s: len(split_y[s]) for s in SPLITS},
            "fractions": fractions}


@TASKS.register("volume_probe")
def run_probe(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"metric", "volumes", "fractions": {"1%": {"value", "ci", "train_images"}, ...}}}."""
    out = {}
    for dataset in ctx.cfg.volume.probe_datasets:
        out[dataset] = probe_volumes(encoder, ctx, dataset)
        log.info("%s volume probe on %s: %s", encoder.label, dataset,
                 {k: v["value"] for k, v in out[dataset]["fractions"].items()})
    return out


def retrieve_volumes(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """Volume -> report and report -> volume Recall@K on the test split of `dataset`."""
    records = [r for r in ctx.data.require(dataset, "test") if r.report]
    if len(records) < 2:
        return {"skipped": f"{len(records)} test volume(s) with a report"}
    keep = [i for i, r in enumerate(ctx.data.records(dataset, "test")) if r.report]
    volumes = volume_features(encoder, ctx, dataset, "test", "projected")[keep]
    reports = ctx.text_features(encoder, [r.report for r in records], "projected")
    sims = (F.normalize(volumes, dim=-1) @ F.normalize(reports, dim=-1).T).numpy()  # (N, N)
    match = same_value([(r.patient_id, r.study_id) for r in records])
    ks = [k for k in ctx.cfg.retrieval.ks if k <= len(records)]
    resamples = ctx.resamples(dataset, "test", len(records))
    return {
        "queries": len(records),
        "volume_to_report": with_mean_intervals(recall_hits(sims, match, ks), resamples),
        "report_to_volume": with_mean_intervals(recall_hits(sims.T, match.T, ks), resamples),
    }


@TASKS.register("volume_retrieval")
def run_retrieval(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"queries", "volume_to_report": {"R@1", ..., "ci"}, "report_to_volume": {...}}}."""
    out = {dataset: retrieve_volumes(encoder, ctx, dataset)
           for dataset in ctx.cfg.volume.retrieval_datasets}
    for dataset, result in out.items():
        log.info("%s volume retrieval on %s: %s", encoder.label, dataset,
                 {k: v for k, v in result.get("volume_to_report", {}).items() if k.startswith("R@")})
    return out
