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
  own study), with bootstrap intervals over the queries;
* ``slice_localisation``: for every finding of a test volume in `eval.volume.localisation_datasets`,
  the `eval.volume.localisation_k` slices whose score for the finding's prompt is highest (the
  zero-shot rule per slice, each prompt language), a hit when one of them holds the finding by the
  phantom's ground truth (``phantom_findings.csv``: the slices each finding occupies), beside the
  hit rate of k slices drawn at random (exact: 1 - C(n - m, k) / C(n, k) for a finding on m of n
  slices). This is what UniMedI's attentive slice selection claims to do; the paper could only
  show pictures of it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unimed.data.adapters.tables import CsvTable, parse_number
from unimed.data.labels import CCII_CLASSES
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.linear_probe import ProbeTarget, label_target, probe_fractions, targets
from unimed.eval.metrics import batched_mean, bootstrap
from unimed.eval.prompts import corpus_stemming, load_prompts
from unimed.eval.retrieval import recall_hits, same_value, with_mean_intervals
from unimed.eval.tasks import TASKS, TaskContext, with_intervals
from unimed.eval.zero_shot import own_scores, prompt_scores

log = logging.getLogger(__name__)

VOLUME_TARGETS: dict[str, ProbeTarget] = {"cc-ccii": ProbeTarget("accuracy", CCII_CLASSES)}
SPLITS = ("train", "valid", "test")
GROUND_TRUTH_FILE = "phantom_findings.csv"
FINDING_CLASSES = {
    "covid": "ground-glass opacity", "pneumonia": "consolidation", "pleural_effusion": "pleural effusion",
    "pneumothorax": "pneumothorax", "nodule": "nodule",
}
"""The prompt class of each finding the phantom's CT world draws (COVID-19 as its bilateral
peripheral ground-glass pattern, pneumonia as lobar consolidation)."""


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
    test = ctx.data.require(dataset, "test")
    keep = [i for i, r in enumerate(test) if r.report]
    records = [test[i] for i in keep]
    if len(records) < 2:
        return {"skipped": f"{len(records)} test volume(s) with a report"}
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


@dataclasses.dataclass(frozen=True)
class TruthRow:
    """One finding of a phantom volume, a row of ``phantom_findings.csv``: the volume's path relative
    to the dataset folder, the finding, the slices it occupies (RAS z indices, 0 the most inferior)
    and, for a nodule, its centre in RAS world mm and its diameter."""

    key: str
    finding: str
    slices: tuple[int, ...]
    centre_mm: tuple[float, float, float] | None = None
    diameter_mm: float | None = None


def read_ground_truth(path: Path) -> list[TruthRow]:
    """The rows of a ``phantom_findings.csv``; a malformed row is a DataError naming the file, the
    line and the column."""
    table = CsvTable(path, ("key", "finding", "slices"))
    rows = []
    for line, values in table:
        row = table.row(line, values)
        try:
            slices = tuple(sorted({int(v) for v in row["slices"].split()}))
        except ValueError:
            raise table.error(f"slices {row['slices']!r} must be slice numbers separated by spaces",
                              line, "slices") from None
        if any(k < 0 for k in slices):
            raise table.error(f"slices {row['slices']!r} must not be negative", line, "slices")
        centre = tuple(parse_number(table, line, row, c) if c in row else math.nan
                       for c in ("x_mm", "y_mm", "z_mm"))
        diameter = parse_number(table, line, row, "diameter_mm") if "diameter_mm" in row else math.nan
        rows.append(TruthRow(row["key"].strip(), row["finding"].strip(), slices,
                             centre if all(math.isfinite(v) for v in centre) else None,
                             diameter if math.isfinite(diameter) and diameter > 0 else None))
    return rows


def finding_slices(ctx: TaskContext, dataset: str) -> dict[str, list[tuple[str, set[int]]]]:
    """Volume path relative to the dataset folder -> [(finding, slices it occupies)] from the
    phantom's ground truth; an EvalError when the dataset has none (real data)."""
    path = Path(ctx.data.cfg.root) / dataset / GROUND_TRUTH_FILE
    if not path.is_file():
        raise EvalError(f"slice_localisation needs the slice ground truth {path}, which only the "
                        "phantom world writes")
    truth: dict[str, list[tuple[str, set[int]]]] = {}
    for row in read_ground_truth(path):
        if row.finding in FINDING_CLASSES and row.slices:
            truth.setdefault(row.key, []).append((row.finding, set(row.slices)))
    return truth


def random_hit_rate(n: int, m: int, k: int) -> float:
    """Chance that k of n slices drawn without replacement include one of the m that hold a finding."""
    k = min(k, n)
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def top_slices(scores: np.ndarray, k: int) -> set[int]:
    """Indices of the k highest of (Z,) slice `scores` (ties: the lower index first)."""
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def slice_scores(encoder: Encoder, ctx: TaskContext, slices: torch.Tensor, prompts, classes: list[str]
                 ) -> np.ndarray:
    """(Z, C) zero-shot scores of each slice for each class (the model's own rule when it has one)."""
    images = rgb(slices)  # (Z, 3, S, S)
    if hasattr(encoder.model, "zero_shot_scores"):
        return own_scores(encoder, images, prompts, classes, ctx.cfg.batch_size)
    features = encoder.image_features(images, normalize=True, batch_size=ctx.cfg.batch_size)
    return prompt_scores(encoder, features, prompts, classes)


def localise(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """Hit rates of the top-k slices per prompt language on the test volumes of `dataset`."""
    cfg = ctx.cfg.volume
    truth = finding_slices(ctx, dataset)
    records = ctx.data.require(dataset, "test")
    stacks = ctx.data.native_slices(dataset, "test", cfg.window)
    root = Path(ctx.data.cfg.root) / dataset
    pairs = [(i, finding, slices) for i, record in enumerate(records)
             for finding, slices in truth.get(Path(record.image_path).relative_to(root).as_posix(), [])]
    if not pairs:
        return {"skipped": "no test volume has a finding"}
    classes = sorted({FINDING_CLASSES[finding] for _, finding, _ in pairs})
    chance = np.array([random_hit_rate(len(stacks[i]), len(slices), cfg.localisation_k)
                       for i, _, slices in pairs])
    resamples = ctx.resamples(dataset, "test/localisation", len(pairs))
    findings = sorted({finding for _, finding, _ in pairs})
    out: dict[str, Any] = {
        "k": cfg.localisation_k, "pairs": len(pairs), "random": float(chance.mean()),
        "pairs_per_finding": {f: sum(p[1] == f for p in pairs) for f in findings},
        "random_per_finding": {f: float(np.mean([c for c, p in zip(chance, pairs) if p[1] == f]))
                               for f in findings},
    }
    corpus = corpus_stemming(encoder.tokenizer)
    for language in ctx.cfg.zero_shot.languages:
        prompts = load_prompts(language, ctx.cfg.zero_shot.prompt_dir, ctx.cfg.prompt_stemming, corpus)
        scores = [slice_scores(encoder, ctx, stack, prompts, classes) for stack in stacks]  # (Z, C) each
        hits = np.array([float(bool(top_slices(scores[i][:, classes.index(FINDING_CLASSES[finding])],
                                               cfg.localisation_k) & slices))
                         for i, finding, slices in pairs])
        per_finding = {f: float(np.mean([h for h, p in zip(hits, pairs) if p[1] == f])) for f in findings}
        out[language] = {**with_intervals({"hit_rate": bootstrap(batched_mean, [hits], resamples)}),
                         "per_finding": per_finding}
    return out


@TASKS.register("slice_localisation")
def run_localisation(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"k", "pairs", "random", "pairs_per_finding", "random_per_finding",
    language: {"hit_rate", "ci", "per_finding"}}}."""
    out = {dataset: localise(encoder, ctx, dataset) for dataset in ctx.cfg.volume.localisation_datasets}
    for dataset, result in out.items():
        log.info("%s slice localisation on %s: %s (random %s)", encoder.label, dataset,
                 {lang: round(v["hit_rate"], 3) for lang, v in result.items() if isinstance(v, dict)
                  and "hit_rate" in v}, round(result.get("random", float("nan")), 3))
    return out
