"""Which training levers make Med-UniC learn the findings? Pre-trains one row per lever setting and
scores it on the *validation* splits only (never on a test set), so settings can be chosen here.

Each row is a name and dotted overrides on top of the preset; every row starts from the same MLM
text encoder and tokenizer (``--text-encoder``, default the demo's ``runs/demo/mlm``). Per row and
seed it prints the last losses and, on the validation splits of the pre-training datasets:

* zero-shot macro AUC with English and Spanish prompts on MIMIC-CXR valid (the CXP500 classes) and
  PadChest valid (the PDC classes), positive vs negative prompt as in the evaluation protocol;
* within-language image->report retrieval: the true report's median rank among the reports of the
  same language (chance: half their number) and R@5;
* for a model with an attentive slice selection (UniMedI), the share of the volumes with a finding
  where one of its selected slices holds it, beside k random slices' exact rate, and the share of
  its selected slices on a finding, beside the position prior's (``eval.volume.selection_datasets``,
  the slice_selection task), on the validation split and on the training split (pre-training
  reads those volumes, never their slice ground truth);
* for a model pre-trained on CT volumes with reports (UniMedI), volume->report retrieval on each
  volume retrieval dataset (``eval.volume.retrieval_datasets``): the true report's median rank among
  the split's reports and R@5, on the validation split and on the training split (the pairs
  pre-training read);
* a diagnostic that is not the evaluation protocol: Spanish zero-shot with the negative prompt in the
  phrasing the phantom's Spanish reports use ("no se observa {disease}") instead of the protocol's
  "No hay {disease}", which those reports never contain. The gap between the two says how much of
  the Spanish deficit is the prompt's wording rather than the learned alignment.

With ``--per-class`` each row also prints, per validation set and class, the zero-shot AUC beside
that of a logistic probe on the pooled image features trained on the train split: a class whose
probe is weak is missed by the image features, one whose probe is strong but zero-shot weak by the
alignment. ``--checkpoint RUN`` scores a trained run (with its own config) instead of training
rows, e.g. ``--checkpoint runs/demo/pretrain --per-class`` for the demo's Med-UniC.

Usage (after ``make demo`` or ``unimed phantom/vocab/mlm`` with the preset)::

    .venv/bin/python benchmarks/learning_levers.py configs/demo.yaml --seeds 0 1 \
        --row paper: --row community:data.batch_composition=community
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from unimed.commands.train import run_pretrain, start_stage_over, text_encoder_dir, tokenizer_dir
from unimed.commands.tables import print_table
from unimed.config import load_config, load_run_config
from unimed.eval.config import ZERO_SHOT_CLASSES, EvalConfig
from unimed.eval.data import EvalData, rgb
from unimed.eval.encoders import build_encoder
from unimed.eval.metrics import auc_or_none, macro, per_class_auc
from unimed.eval.prompts import corpus_stemming, load_prompts
from unimed.eval.tasks import TaskContext
from unimed.eval.volumes import select, selects_slices, volume_features
from unimed.eval.zero_shot import prompt_scores
from unimed.train.checkpoint import checkpoint_config, find_checkpoint

SPLIT = "valid"
# Validation sets for the two zero-shot sets: the pre-training datasets' own validation splits.
ZERO_SHOT_VALID = {"mimic-cxr": "cxp500", "padchest": "pdc"}
# PadChest spells some PDC classes differently.
ALIASES = {"edema": ("edema", "pulmonary edema")}
REPORT_NEGATION_ES = "no se observa {disease}"


def positives(labels: dict[str, float], name: str) -> int:
    """1 when any spelling of class `name` is labelled 1 (uncertain and unstated count as 0)."""
    lowered = {k.lower(): v for k, v in labels.items()}
    return int(any(lowered.get(alias) == 1.0 for alias in ALIASES.get(name.lower(), (name.lower(),))))


def class_labels(records, classes: list[str]) -> np.ndarray:
    """(N, C) 0/1 labels of `classes` (see :func:`positives`)."""
    return np.array([[positives(r.labels, c) for c in classes] for r in records])


class ValidSet(NamedTuple):
    """One pre-training dataset's validation split, encoded once: the (N, C) labels of its zero-shot
    set's classes, the pooled and the L2-normalised projected image features, and the (N, C)
    positive-minus-negative prompt scores per prompt set ("en", "es", and the "es*" diagnostic)."""

    labels: np.ndarray
    pooled: torch.Tensor
    projected: torch.Tensor
    scores: dict[str, np.ndarray]


def valid_scores(encoder, data: EvalData, cfg: EvalConfig) -> dict[str, ValidSet]:
    """:class:`ValidSet` per pre-training dataset (one pass of the image tower each)."""
    out = {}
    corpus = corpus_stemming(encoder.tokenizer)
    prompts = {lang: load_prompts(lang, cfg.zero_shot.prompt_dir, cfg.prompt_stemming, corpus)
               for lang in ("en", "es")}
    prompts["es*"] = dataclasses.replace(prompts["es"], negative_template=REPORT_NEGATION_ES)
    for dataset, zero_shot_set in ZERO_SHOT_VALID.items():
        classes = ZERO_SHOT_CLASSES[zero_shot_set]
        spaces = encoder.image_spaces(rgb(data.images(dataset, SPLIT)))
        projected = F.normalize(spaces["projected"], dim=-1)
        scores = {lang: prompt_scores(encoder, projected, prompt, classes)
                  for lang, prompt in prompts.items()}
        out[dataset] = ValidSet(class_labels(data.require(dataset, SPLIT), classes),
                                spaces["pooled"], projected, scores)
    return out


def zero_shot_valid(scored: dict[str, ValidSet]) -> dict[str, float | None]:
    """Macro AUC per dataset and prompt set."""
    return {f"{dataset} {lang}": macro(per_class_auc(valid.labels, scores))
            for dataset, valid in scored.items() for lang, scores in valid.scores.items()}


def probe_auc(train_x: np.ndarray, train_y: np.ndarray, valid_x: np.ndarray,
              valid_y: np.ndarray) -> float | None:
    """Validation AUC of a logistic probe (standardised features, L2 C = 0.1) trained on
    (train_x, train_y); None when either split holds one class only."""
    if len(np.unique(train_y)) < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return auc_or_none(valid_y, probe.fit(train_x, train_y).decision_function(valid_x))


def per_class_rows(encoder, data: EvalData, scored: dict[str, ValidSet]) -> list[list[str]]:
    """Per validation set and class: positives, the probe's AUC on the pooled image features
    (trained on the train split) and the zero-shot AUC per prompt set. A weak probe says the image
    features miss the finding; a strong probe with a weak zero-shot says the alignment does."""
    rows = []
    for dataset, valid in scored.items():
        classes = ZERO_SHOT_CLASSES[ZERO_SHOT_VALID[dataset]]
        labels, pooled = valid.labels, valid.pooled.numpy()
        train_labels = class_labels(data.require(dataset, "train"), classes)
        train_pooled = encoder.image_features(rgb(data.images(dataset, "train")), projected=False).numpy()
        for c, name in enumerate(classes):
            aucs = [probe_auc(train_pooled, train_labels[:, c], pooled, labels[:, c]),
                    *(auc_or_none(labels[:, c], scores[:, c]) for scores in valid.scores.values())]
            rows.append([dataset, name, f"{train_labels[:, c].sum()} / {labels[:, c].sum()}",
                         *(f"{100 * a:.1f}" if a is not None else "-" for a in aucs)])
    return rows


def retrieval_valid(encoder, data: EvalData, scored: dict[str, ValidSet]) -> dict[str, float]:
    ranks, hits = [], []
    for dataset, valid in scored.items():
        records = data.require(dataset, SPLIT)
        text = encoder.text_features([r.report for r in records], normalize=True)
        rank = true_ranks(valid.projected @ text.T)  # (N, N), one language
        ranks.append(rank / len(records))
        hits.append(rank <= 5)
    return {"median rank": float(np.median(np.concatenate(ranks))),
            "R@5": float(np.mean(np.concatenate(hits)))}


def true_ranks(sims: torch.Tensor) -> np.ndarray:
    """The rank of each query's true match, the diagonal of the (N, N) `sims` (1 = first)."""
    return ((sims > sims.diagonal().unsqueeze(1)).sum(1) + 1).numpy()


def volume_retrieval(encoder, data: EvalData, cfg) -> str:
    """"median rank % / R@5 %" of volume->report retrieval on the validation split, then on the
    training split, of each volume retrieval dataset pre-training read; "-" when it read none."""
    datasets = [d for d in cfg.eval.volume.retrieval_datasets if d in cfg.data.pretrain_datasets]
    if not datasets:
        return "-"
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TaskContext(data, cfg.eval, Path(tmp))
        for dataset in datasets:
            for split in (SPLIT, "train"):
                records = data.require(dataset, split)
                keep = [i for i, r in enumerate(records) if r.report]
                volumes = volume_features(encoder, ctx, dataset, split, "projected")[keep]
                volumes = F.normalize(volumes, dim=-1)
                reports = ctx.text_features(encoder, [records[i].report for i in keep], "projected",
                                            normalize=True)
                ranks = true_ranks(volumes @ reports.T)
                cells.append(f"{100 * np.median(ranks) / len(ranks):.1f} / {100 * np.mean(ranks <= 5):.1f}")
    return ", ".join(cells)


def selection_rates(encoder, data: EvalData, cfg: EvalConfig) -> str:
    """"hit / random; on a finding / prior" % of the attentive selection on the validation volumes,
    then on the training volumes (more of them; pre-training never sees the slice ground truth), of
    each selection dataset: its hit rate beside k random slices', then the share of its slices on
    a finding beside the position prior's (the hit rate saturates where findings span most
    slices); "-" for a model without one."""
    if not selects_slices(encoder):
        return "-"
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TaskContext(data, cfg, Path(tmp))
        results = [select(encoder, ctx, dataset, split=split)
                   for dataset in cfg.volume.selection_datasets for split in (SPLIT, "train")]
    return ", ".join(_selection_cell(result) for result in results)


def _selection_cell(result: dict) -> str:
    """"100.0 / 84.0; 91.9 / 95.2" from a slice-selection result ("-" where it was skipped or lacks
    a value)."""
    if "hit_rate" not in result:
        return "-"

    def pct(key: str) -> str:
        return "-" if result.get(key) is None else f"{100 * result[key]:.1f}"
    return f"{pct('hit_rate')} / {pct('random')}; {pct('precision')} / {pct('prior_precision')}"


def parse_row(text: str) -> tuple[str, list[str]]:
    """"NAME:key=value,key=[a,b]" -> (NAME, ["key=value", "key=[a,b]"]): commas inside brackets
    belong to a list value."""
    name, _, overrides = text.partition(":")
    return name, [o for o in re.split(r",(?![^\[]*\])", overrides) if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="preset the rows override (not with --checkpoint)")
    parser.add_argument("--row", action="append", default=[], help="NAME:key=value,key=[a,b]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--text-encoder", default="runs/demo/mlm")
    parser.add_argument("--output-dir", default="runs/levers")
    parser.add_argument("--untrained", action="store_true", help="also score the untrained model")
    parser.add_argument("--checkpoint", help="score this trained checkpoint or run folder (with its "
                        "run's config) instead of training rows, e.g. runs/demo/pretrain")
    parser.add_argument("--per-class", action="store_true", help="also print the zero-shot AUC "
                        "per class beside a logistic probe on the pooled image features")
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.config is None):
        parser.error("give a preset to train rows on, or --checkpoint, not both")
    if args.checkpoint and (args.row or args.untrained):
        parser.error("--checkpoint scores that run only: --row and --untrained train rows on a preset")
    table = []
    if args.checkpoint:
        checkpoint = find_checkpoint(args.checkpoint)
        cfg = load_run_config(checkpoint_config(checkpoint))
        encoder = build_encoder("checkpoint", "checkpoint", cfg.method, weights=checkpoint,
                                text_encoder=text_encoder_dir(cfg), tokenizer=tokenizer_dir(cfg))
        table.append(_row(str(checkpoint), cfg.run.seed, encoder, EvalData(cfg.data), cfg, [], 0.0,
                          args.per_class))
        print_table("Learning levers (validation splits)", HEADER, table)
        return
    rows = [parse_row(r) for r in args.row] or [("preset", [])]
    base = [f"method.text.encoder={args.text_encoder}", f"run.output_dir={args.output_dir}",
            "train.tensorboard=false", "train.checkpoint_every=1000"]
    data = None
    for name, overrides in rows:
        for seed in args.seeds:
            cfg = load_config(args.config, [*base, *overrides, f"run.name={name}_s{seed}",
                                            f"run.seed={seed}"])
            data = data or EvalData(cfg.data)
            start_stage_over(cfg.run.dir / "pretrain")  # a row of an earlier call trains again
            start = time.perf_counter()
            result = run_pretrain(cfg, resume=False, progress=False)
            seconds = time.perf_counter() - start
            texts = {"text_encoder": text_encoder_dir(cfg), "tokenizer": tokenizer_dir(cfg)}
            encoder = build_encoder(name, name, cfg.method, weights=result.checkpoint, seed=seed,
                                    **texts)
            table.append(_row(name, seed, encoder, data, cfg, result.history, seconds, args.per_class))
            if args.untrained and seed == args.seeds[0]:
                untrained = build_encoder("untrained", "untrained", cfg.method, seed=seed, **texts)
                table.append(_row(f"{name} untrained", seed, untrained, data, cfg, [], 0.0,
                                  args.per_class))
            print_table("Learning levers (validation splits)", HEADER, table)
    print(f"Sp*: diagnostic, not the protocol: Spanish negative prompt '{REPORT_NEGATION_ES}' "
          "(the phantom reports' negation) instead of 'No hay {disease}'")


HEADER = ["row", "seed", "cvl", "ssv", "grad norm", "MIMIC En", "MIMIC Sp", "MIMIC Sp*", "PadChest En",
          "PadChest Sp", "PadChest Sp*", "median rank %", "R@5 %",
          "selection hit / random; on a finding / prior %, valid, train",
          "volume->report median rank % / R@5 %, valid, train", "train s"]
PER_CLASS_HEADER = ["dataset", "class", "positives train / valid", "probe", "En", "Sp", "Sp*"]


def _row(name, seed, encoder, data, cfg, history, seconds, per_class) -> list[str]:
    last = history[-10:]

    def mean(key: str) -> str:
        values = [h[key] for h in last if key in h]
        return f"{np.mean(values):.3f}" if values else "-"

    scored = valid_scores(encoder, data, cfg.eval)
    if per_class:
        print_table(f"{name}, seed {seed}: AUC per class (validation), probe vs zero-shot",
                    PER_CLASS_HEADER, per_class_rows(encoder, data, scored))
    zs = zero_shot_valid(scored)
    ret = retrieval_valid(encoder, data, scored)
    cells = [f"{100 * v:.1f}" if v is not None else "-" for v in zs.values()]
    return [name, str(seed), mean("cvl_loss"), mean("ssv_loss"), mean("grad_norm"), *cells,
            f"{100 * ret['median rank']:.1f}", f"{100 * ret['R@5']:.1f}",
            selection_rates(encoder, data, cfg.eval), volume_retrieval(encoder, data, cfg), f"{seconds:.0f}"]


if __name__ == "__main__":
    main()
