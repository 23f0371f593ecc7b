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
  slices); beside it the share of the k slices that hold the finding (``precision``; random: m /
  n), which still tells encoders apart where a finding spans so many slices that k random ones
  nearly always hit it. This is what UniMedI's attentive slice selection claims to do; the paper
  could only show pictures of it. The reference that needs the image is the position prior: per
  finding, the k slices at the relative depths where the training volumes most often hold that
  finding (any finding's, for one no training volume holds): ``prior`` and ``prior_precision``,
  and per language ``prior_precision_gain``, per pair the encoder's precision less the prior's.
  A score that ranks slices by their anatomy (a fixed prompt direction meets the features of
  axial slices from the abdomen to the apices) can sit far from random without looking at the
  finding; one that finds the finding beats the prior.
* ``slice_selection``: that claim measured on the model itself. A native 3D model with attentive
  slice selection (UniMedI) has ``slice_attention(volumes) -> (N, D)``, its selection score of each
  of the D axial slices of (N, D, 1, S, S) volumes in [0, 1] (inferior to superior, the input of
  :meth:`unimed.eval.encoders.Encoder.volume_maps`), and ``selection_k``, how many slices it
  selects; a model that scores slabs of several slices (tied scores) and feeds one slice per
  selected slab says which with ``selected_slices(volumes) -> (N, k)`` indices, which the task then
  scores instead. On the test volumes of `eval.volume.selection_datasets` that hold a finding,
  resized to the depth and side the model reads a volume at (its ``volume_depth`` and
  ``volume_side``, UniMedI's ``method.volume_shape``; else `eval.volume.selection_slices` of
  ``data.image_size``), the k selected slices hit when one of them
  holds a finding of the volume (per finding class: that finding), beside the exact hit rate of k
  random slices and
  the per-volume gain over it, with bootstrap intervals over the volumes. Where findings span
  most slices (the phantom's COVID-19 pattern), k random slices nearly always hit, so beside it
  stands the share of the selected slices that hold a finding (``precision``; random: the share
  of the volume's slices that do; ``precision_gain``, per volume the one less the other).
  Findings gather in the middle of the chest, so any selection
  that prefers central slices beats random ones without looking at the volume (an untrained
  UniMedI did); the reference that needs the image is the position prior: the k slices that most
  often hold a finding in the training volumes, the same for every volume (``prior`` and
  ``prior_precision``, and the per-volume gains over them, ``prior_gain`` and
  ``prior_precision_gain``). An encoder without ``slice_attention`` (every 2D
  encoder) is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

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
from unimed.eval.prompts import PromptSet, corpus_stemming, load_prompts
from unimed.eval.retrieval import recall_hits, same_value, with_mean_intervals
from unimed.eval.tasks import TASKS, TaskContext, with_intervals
from unimed.eval.zero_shot import own_prompts, prompt_differences, prompt_texts, scores_with_own_prompts

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


def finding_slices(ctx: TaskContext, dataset: str, task: str) -> dict[str, list[tuple[str, set[int]]]]:
    """Volume path relative to the dataset folder -> [(finding, slices it occupies)] from the
    phantom's ground truth; an EvalError naming `task` when the dataset has none (real data)."""
    path = Path(ctx.data.cfg.root) / dataset / GROUND_TRUTH_FILE
    if not path.is_file():
        raise EvalError(f"{task} needs the slice ground truth {path}, which only the "
                        "phantom world writes")
    truth: dict[str, list[tuple[str, set[int]]]] = {}
    for row in read_ground_truth(path):
        if row.finding in FINDING_CLASSES and row.slices:
            truth.setdefault(row.key, []).append((row.finding, set(row.slices)))
    return truth


def truth_keys(ctx: TaskContext, dataset: str, split: str) -> list[str]:
    """The ground-truth key of each volume of `dataset`/`split`: its path relative to the dataset folder."""
    root = Path(ctx.data.cfg.root) / dataset
    return [Path(r.image_path).relative_to(root).as_posix() for r in ctx.data.require(dataset, split)]


def random_hit_rate(n: int, m: int, k: int) -> float:
    """Chance that k of n slices drawn without replacement include one of the m that hold a finding."""
    k = min(k, n)
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def overlaps(tops: Sequence[set[int]], held: Sequence[set[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of selected slices `tops` and slices `held` (the ones holding a finding): 1.0 when
    one of the selected slices holds it (a hit), else 0.0, and the share of them that do."""
    hits = np.array([float(bool(top & found)) for top, found in zip(tops, held)])
    shares = np.array([len(top & found) / len(top) for top, found in zip(tops, held)])
    return hits, shares


def top_slices(scores: np.ndarray, k: int) -> set[int]:
    """Indices of the k highest of (Z,) slice `scores` (ties: the lower index first)."""
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def slice_prompt_scores(encoder: Encoder, ctx: TaskContext, stacks: Sequence[torch.Tensor],
                        prompt_sets: Sequence[PromptSet], classes: list[str]) -> list[list[np.ndarray]]:
    """Per prompt set, per volume, the (Z, C) zero-shot scores of each of the volume's (Z, 1, S, S)
    slices in `stacks` for each class: the slices' normalised projected embeddings against the
    prompts, whose features are computed once (through the context's text cache), or the model's
    own rule when it has one (its prompts encoded once for all volumes). Each volume's slices pass
    through the image tower once, whatever the number of prompt sets."""
    if hasattr(encoder.model, "zero_shot_scores"):
        prompts = own_prompts(encoder, prompt_sets, classes)

        def score(stack: torch.Tensor) -> list[np.ndarray]:
            return scores_with_own_prompts(encoder, rgb(stack), prompts, len(prompt_sets),
                                           ctx.cfg.batch_size)
    else:
        texts = [ctx.text_features(encoder, prompt_texts(p, classes), "projected", normalize=True)
                 for p in prompt_sets]

        def score(stack: torch.Tensor) -> list[np.ndarray]:
            features = encoder.image_features(rgb(stack), normalize=True, batch_size=ctx.cfg.batch_size)
            return [prompt_differences(features, text) for text in texts]
    per_volume = [score(stack) for stack in stacks]  # (sets, Z, C) of each volume
    return [[scores[k] for scores in per_volume] for k in range(len(prompt_sets))]


DEPTH_CELLS = 4096
"""Cells of relative depth a finding's position prior is counted in: finer than a volume's slices."""


def depth_profile(held: Sequence[tuple[int, set[int]]]) -> np.ndarray:
    """(DEPTH_CELLS,) over relative depth (0 inferior, 1 superior), how many of the (depth, slices
    holding the finding) volumes hold it there: volumes of any depth count alike."""
    centres = (np.arange(DEPTH_CELLS) + 0.5) / DEPTH_CELLS
    profile = np.zeros(DEPTH_CELLS)
    for depth, slices in held:
        profile += np.isin(np.floor(centres * depth).astype(int), sorted(slices))
    return profile


def profile_scores(profile: np.ndarray, depth: int) -> np.ndarray:
    """(depth,) each slice of a `depth`-slice volume scored by the mean of `profile` over the
    relative depths it spans."""
    cells = np.floor((np.arange(len(profile)) + 0.5) / len(profile) * depth).astype(int)
    return np.bincount(cells, profile, depth) / np.maximum(np.bincount(cells, minlength=depth), 1)


def finding_profiles(ctx: TaskContext, dataset: str, truth: dict[str, list[tuple[str, set[int]]]]
                     ) -> dict[str | None, np.ndarray]:
    """{finding: :func:`depth_profile` of the training volumes of `dataset` that hold it, None:
    that of every finding (for a finding no training volume holds)}; empty without a training
    volume that holds a finding."""
    if not ctx.data.records(dataset, "train"):
        return {}
    held: dict[str | None, list[tuple[int, set[int]]]] = {}
    for key, depth in zip(truth_keys(ctx, dataset, "train"), ctx.data.native_depths(dataset, "train")):
        for finding, slices in truth.get(key, []):
            held.setdefault(finding, []).append((depth, slices))
            held.setdefault(None, []).append((depth, slices))
    return {finding: depth_profile(volumes) for finding, volumes in held.items()}


def relative_depth(slices: set[int], depth: int) -> float:
    """Mean relative depth of `slices` of a `depth`-slice volume (slice centres: 0 inferior, 1 superior)."""
    return float(np.mean([(k + 0.5) / depth for k in slices]))


def localise(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """Hit rates and precision of the top-k slices per prompt language on the test volumes of
    `dataset`, beside k random slices' and the position prior's."""
    cfg = ctx.cfg.volume
    truth = finding_slices(ctx, dataset, "slice_localisation")
    stacks = ctx.data.native_slices(dataset, "test", cfg.window)
    pairs = [(i, finding, slices) for i, key in enumerate(truth_keys(ctx, dataset, "test"))
             for finding, slices in truth.get(key, [])]
    if not pairs:
        return {"skipped": "no test volume has a finding"}
    classes = sorted({FINDING_CLASSES[finding] for _, finding, _ in pairs})
    chance = np.array([random_hit_rate(len(stacks[i]), len(slices), cfg.localisation_k)
                       for i, _, slices in pairs])
    # The share of a volume's slices that hold the finding: what k random slices' precision expects.
    covered = np.array([len(slices) / len(stacks[i]) for i, _, slices in pairs])
    resamples = ctx.resamples(dataset, "test/localisation", len(pairs))
    findings = sorted({finding for _, finding, _ in pairs})
    out: dict[str, Any] = {
        "k": cfg.localisation_k, "pairs": len(pairs), "random": float(chance.mean()),
        "random_precision": float(covered.mean()),
        "pairs_per_finding": {f: sum(p[1] == f for p in pairs) for f in findings},
        "random_per_finding": {f: float(np.mean([c for c, p in zip(chance, pairs) if p[1] == f]))
                               for f in findings},
        "finding_depth": float(np.mean([relative_depth(slices, len(stacks[i])) for i, _, slices in pairs])),
    }
    profiles = finding_profiles(ctx, dataset, truth)
    held = [slices for _, _, slices in pairs]
    prior_share = None
    if profiles:
        prior = [top_slices(profile_scores(profiles.get(finding, profiles[None]), len(stacks[i])),
                            cfg.localisation_k) for i, finding, _ in pairs]
        prior_hits, prior_share = overlaps(prior, held)
        out.update(prior=float(prior_hits.mean()), prior_precision=float(prior_share.mean()))
    corpus = corpus_stemming(encoder.tokenizer)
    languages = ctx.cfg.zero_shot.languages
    prompt_sets = [load_prompts(language, ctx.cfg.zero_shot.prompt_dir, ctx.cfg.prompt_stemming, corpus)
                   for language in languages]
    for language, scores in zip(languages, slice_prompt_scores(encoder, ctx, stacks, prompt_sets, classes)):
        tops = [top_slices(scores[i][:, classes.index(FINDING_CLASSES[finding])], cfg.localisation_k)
                for i, finding, _ in pairs]
        hits, share = overlaps(tops, held)
        per_finding = {f: float(np.mean([h for h, p in zip(hits, pairs) if p[1] == f])) for f in findings}
        estimates = {"hit_rate": bootstrap(batched_mean, [hits], resamples),
                     "precision": bootstrap(batched_mean, [share], resamples)}
        if prior_share is not None:
            estimates["prior_precision_gain"] = bootstrap(batched_mean, [share - prior_share], resamples)
        depth = np.mean([relative_depth(top, len(stacks[i])) for top, (i, _, _) in zip(tops, pairs)])
        out[language] = {**with_intervals(estimates), "per_finding": per_finding, "depth": float(depth)}
    return out


@TASKS.register("slice_localisation")
def run_localisation(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"k", "pairs", "random", "random_precision", "prior", "prior_precision",
    "pairs_per_finding", "random_per_finding", "finding_depth", language: {"hit_rate",
    "precision", "prior_precision_gain", "ci", "per_finding", "depth"}}}: ``finding_depth`` and
    ``depth`` are the mean relative depth (:func:`relative_depth`) of the findings' slices and of
    the top-k slices (no prior without a training volume that holds a finding)."""
    out = {dataset: localise(encoder, ctx, dataset) for dataset in ctx.cfg.volume.localisation_datasets}
    for dataset, result in out.items():
        log.info("%s slice localisation on %s: %s (random %s)", encoder.label, dataset,
                 {lang: round(v["hit_rate"], 3) for lang, v in result.items() if isinstance(v, dict)
                  and "hit_rate" in v}, round(result.get("random", float("nan")), 3))
    return out


SELECTION_INTERFACE = ("selected_slices", "slice_attention")
"""What a model with attentive slice selection has, either one (see the module docstring)."""


def selects_slices(encoder: Encoder) -> bool:
    """Whether `encoder`'s model has an attentive slice selection (:data:`SELECTION_INTERFACE`)."""
    return any(callable(getattr(encoder.model, name, None)) for name in SELECTION_INTERFACE)


def resampled_slices(held: set[int], depth: int, slices: int) -> set[int]:
    """Which of `slices` axial slices, resized from a volume of `depth` slices, hold one of the
    `held` slices: those whose extent (resized slice j spans the stored slices' [j, j + 1) x depth
    / slices) overlaps a held slice's: when downsampling, exactly the resized slices whose average
    includes it (:func:`unimed.data.volumes.axial_slices` averages before it interpolates), one or
    two; the same set when `slices` equals `depth`."""
    out: set[int] = set()
    for z in held:
        first, last = z * slices // depth, -(-(z + 1) * slices // depth) - 1
        out.update(range(first, min(last, slices - 1) + 1))
    return out


def selection_k(encoder: Encoder) -> int:
    """How many slices the encoder's model selects (``selection_k``), checked to be a positive int."""
    k = getattr(encoder.model, "selection_k", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EvalError(f"{encoder.name}: the model has slice_attention but its selection_k is {k!r}; "
                        "it must be a positive integer (how many slices it selects)")
    return k


def batched(method: Callable[[torch.Tensor], torch.Tensor], encoder: Encoder, volumes: torch.Tensor,
            batch_size: int, rows: Sequence[int] | None = None) -> torch.Tensor:
    """`method` of the model on (N, D, 1, S, S) `volumes` (or on their `rows`, each batch copied
    out of `volumes` on its own: the stacks may be memory-mapped), batch by batch, concatenated on
    the CPU."""
    def batch(start: int) -> torch.Tensor:
        index = slice(start, start + batch_size) if rows is None else list(rows[start : start + batch_size])
        return method(volumes[index].to(encoder.device)).cpu()

    parts = [batch(start) for start in range(0, len(volumes) if rows is None else len(rows), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 0)


def model_selection(encoder: Encoder, volumes: torch.Tensor, batch_size: int, seed: int,
                    rows: Sequence[int] | None = None) -> list[set[int]]:
    """Per volume of (N, D, 1, S, S) `volumes` (or of their `rows`), the input slices the model
    selects: its own ``selected_slices`` when it has them (a model that scores slabs ties every
    slice of a slab and feeds one slice per selected slab: UniMedI), else the ``selection_k``
    slices that ``slice_attention`` scores highest. Under `seed`, so a model that picks a random
    slice of each slab picks the same ones every run."""
    own = getattr(encoder.model, "selected_slices", None)
    devices = [encoder.device] if encoder.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        shape = volumes.shape if rows is None else torch.Size((len(rows), *volumes.shape[1:]))
        if own is not None:
            return checked_selection(encoder, batched(own, encoder, volumes, batch_size, rows), shape)
        k = selection_k(encoder)
        scores = batched(encoder.model.slice_attention, encoder, volumes, batch_size, rows).float()
    if scores.shape != shape[:2]:
        raise EvalError(f"{encoder.name}: slice_attention returned shape {tuple(scores.shape)} for volumes "
                        f"of shape {tuple(shape)}; expected (N, D) = {tuple(shape[:2])}")
    return [top_slices(row, k) for row in scores.numpy()]


def checked_selection(encoder: Encoder, picked: torch.Tensor, shape: torch.Size) -> list[set[int]]:
    """The rows of `selected_slices`' (N, k) output as sets, checked to be slice indices of the
    (N, D, 1, S, S) input `shape`; an EvalError naming the encoder otherwise."""
    n, depth = shape[:2]
    valid = (picked.ndim == 2 and len(picked) == n and not picked.is_floating_point() and picked.numel() > 0
             and 0 <= int(picked.min()) and int(picked.max()) < depth)
    if not valid:
        raise EvalError(f"{encoder.name}: selected_slices must return (N, k) integer slice indices in "
                        f"[0, {depth}) for volumes of shape {tuple(shape)}, got {picked.dtype} "
                        f"{tuple(picked.shape)}" + (f" from {int(picked.min())} to {int(picked.max())}"
                                                    if picked.numel() else ""))
    return [set(row.tolist()) for row in picked]


def held_slices(truth: list[tuple[str, set[int]]], depth: int, slices: int, where: str
                ) -> dict[str, set[int]]:
    """{finding: the resized slices that hold it} of one volume (a finding drawn twice, e.g. two
    nodules, merged); an EvalError naming `where` when the ground truth lies outside the volume."""
    out: dict[str, set[int]] = {}
    for finding, held in truth:
        if max(held) >= depth:
            raise EvalError(f"{GROUND_TRUTH_FILE}: {where} puts {finding} on slice {max(held)}, but the "
                            f"volume has {depth} slices")
        out.setdefault(finding, set()).update(resampled_slices(held, depth, slices))
    return out


def held_by_volume(ctx: TaskContext, dataset: str, split: str, truth: dict[str, list[tuple[str, set[int]]]],
                   slices: int) -> dict[int, dict[str, set[int]]]:
    """Row in `dataset`/`split` -> {finding: the slices of the volume resized to `slices` that hold
    it} of each volume of the split that holds a finding by the ground truth `truth`."""
    keys = truth_keys(ctx, dataset, split)
    rows = [i for i, key in enumerate(keys) if key in truth]
    depths = ctx.data.native_depths(dataset, split) if rows else []
    return {i: held_slices(truth[keys[i]], depths[i], slices, f"{dataset}/{keys[i]}") for i in rows}


def position_prior(ctx: TaskContext, dataset: str, truth: dict[str, list[tuple[str, set[int]]]], k: int,
                   slices: int) -> set[int] | None:
    """The k of `slices` slices that most often hold a finding in the training volumes of `dataset`
    (ties: the lower index): the best a selection can do without looking at the volume. None
    without any."""
    if not ctx.data.records(dataset, "train"):
        return None
    held = held_by_volume(ctx, dataset, "train", truth, slices)
    counts = np.zeros(slices)
    for found in held.values():
        counts[sorted(set().union(*found.values()))] += 1
    return top_slices(counts, k) if held else None


def finding_rates(top: list[set[int]], held: list[dict[str, set[int]]], slices: int) -> dict[str, Any]:
    """{finding: {"volumes", "hit_rate", "random"}}: per finding, over the volumes that hold it, the
    share whose selected slices `top` include one of its slices, and the random selection's."""
    out = {}
    for finding in sorted({f for found in held for f in found}):
        rows = [(bool(t & found[finding]), random_hit_rate(slices, len(found[finding]), len(t)))
                for t, found in zip(top, held) if finding in found]
        out[finding] = {"volumes": len(rows), "hit_rate": float(np.mean([h for h, _ in rows])),
                        "random": float(np.mean([c for _, c in rows]))}
    return out


def select(encoder: Encoder, ctx: TaskContext, dataset: str, split: str = "test") -> dict[str, Any]:
    """The slices the model selects on the `split` volumes of `dataset` that hold a finding, against
    k random slices and against the position prior, all at the depth the model reads a volume at
    (:meth:`Encoder.volume_grid`; ``eval.volume.selection_slices`` for a model that does not say):
    a selected slice is the one the model saw, and the ground truth names what that slice holds."""
    slices, side = encoder.volume_grid(ctx.cfg.volume.selection_slices, ctx.data.image_size)
    truth = finding_slices(ctx, dataset, "slice_selection")
    stacks = ctx.data.slice_stacks(dataset, split, slices, ctx.cfg.volume.window, side)  # (N, D, 1, S, S)
    held = held_by_volume(ctx, dataset, split, truth, slices)  # depths noted while the stacks were read
    if not held:
        return {"skipped": f"no {split} volume has a finding"}
    top = model_selection(encoder, stacks, ctx.cfg.batch_size, ctx.cfg.seed, list(held))
    union = [set().union(*found.values()) for found in held.values()]
    hits, share = overlaps(top, union)
    chance = np.array([random_hit_rate(slices, len(u), len(t)) for t, u in zip(top, union)])
    covered = np.array([len(u) / slices for u in union])  # a random slice's chance to hold a finding
    resamples = ctx.resamples(dataset, f"{split}/selection", len(held))
    estimates = {"hit_rate": bootstrap(batched_mean, [hits], resamples),
                 "gain": bootstrap(batched_mean, [hits - chance], resamples),
                 "precision": bootstrap(batched_mean, [share], resamples),
                 "precision_gain": bootstrap(batched_mean, [share - covered], resamples)}
    k = max(len(t) for t in top)
    picks = Counter(s for t in top for s in t).most_common(k)  # ties: the first selected first
    out: dict[str, Any] = {"k": k, "slices": slices, "volumes": len(held), "random": float(chance.mean()),
                           "random_precision": float(covered.mean()),
                           "most_selected": [[int(s), n / len(top)] for s, n in picks]}
    prior = position_prior(ctx, dataset, truth, k, slices)
    if prior is not None:
        prior_hits, prior_share = overlaps([prior] * len(union), union)
        estimates["prior_gain"] = bootstrap(batched_mean, [hits - prior_hits], resamples)
        estimates["prior_precision_gain"] = bootstrap(batched_mean, [share - prior_share], resamples)
        out.update(prior=float(prior_hits.mean()), prior_precision=float(prior_share.mean()),
                   prior_slices=sorted(prior))
    per_finding = finding_rates(top, list(held.values()), slices)
    return {**out, **with_intervals(estimates), "per_finding": per_finding}


@TASKS.register("slice_selection")
def run_selection(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"k", "slices", "volumes", "random", "random_precision", "most_selected" (the k
    slices selected most often, [slice, share of volumes]), "prior", "prior_precision",
    "prior_slices", "hit_rate", "gain", "prior_gain", "precision", "precision_gain",
    "prior_precision_gain", "ci", "per_finding": {finding:
    {"volumes", "hit_rate", "random"}}}}, or {"skipped": why} for an encoder whose model has no
    attentive slice selection."""
    if not selects_slices(encoder):
        why = f"{encoder.label} has no attentive slice selection (no slice_attention: a 2D encoder)"
        log.info("slice selection skipped: %s", why)
        return {"skipped": why}
    out = {dataset: select(encoder, ctx, dataset) for dataset in ctx.cfg.volume.selection_datasets}
    for dataset, result in out.items():
        log.info("%s slice selection on %s: hit rate %s (random %s)", encoder.label, dataset,
                 result.get("hit_rate"), result.get("random"))
    return out
