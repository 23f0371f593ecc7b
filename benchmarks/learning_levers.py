"""Which training levers make Med-UniC learn the findings? Pre-trains one row per lever setting and
scores it on the *validation* splits only (never on a test set), so settings can be chosen here.

Each row is a name and dotted overrides on top of the preset; every row starts from the same MLM
text encoder and tokenizer (``--text-encoder``, default the demo's ``runs/demo/mlm``). Per row and
seed it prints the last losses and, on the validation splits of the pre-training datasets:

* zero-shot macro AUC with English and Spanish prompts on MIMIC-CXR valid (the CXP500 classes) and
  PadChest valid (the PDC classes), positive vs negative prompt as in the evaluation protocol;
* within-language image->report retrieval: the true report's median rank among the reports of the
  same language (chance: half their number) and R@5;
* a diagnostic that is not the evaluation protocol: Spanish zero-shot with the negative prompt in the
  phrasing the phantom's Spanish reports use ("no se observa {disease}") instead of the protocol's
  "No hay {disease}", which those reports never contain. The gap between the two says how much of
  the Spanish deficit is the prompt's wording rather than the learned alignment.

Usage (after ``make demo`` or ``unimed phantom/vocab/mlm`` with the preset)::

    .venv/bin/python benchmarks/learning_levers.py configs/demo.yaml --seeds 0 1 \
        --row paper: --row community:data.batch_composition=community
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from unimed.commands.train import run_pretrain, text_encoder_dir, tokenizer_dir
from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.eval.config import ZERO_SHOT_CLASSES, EvalConfig
from unimed.eval.data import EvalData, rgb
from unimed.eval.encoders import build_encoder
from unimed.eval.metrics import auc_or_none, macro
from unimed.eval.prompts import corpus_stemming, load_prompts
from unimed.eval.zero_shot import prompt_scores

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


def zero_shot_valid(encoder, data: EvalData, cfg: EvalConfig) -> dict[str, float | None]:
    out = {}
    corpus = corpus_stemming(encoder.tokenizer)
    prompts = {lang: load_prompts(lang, cfg.zero_shot.prompt_dir, cfg.prompt_stemming, corpus)
               for lang in ("en", "es")}
    prompts["es*"] = dataclasses.replace(prompts["es"], negative_template=REPORT_NEGATION_ES)
    for dataset, zero_shot_set in ZERO_SHOT_VALID.items():
        records = data.require(dataset, SPLIT)
        classes = ZERO_SHOT_CLASSES[zero_shot_set]
        labels = np.array([[positives(r.labels, c) for c in classes] for r in records])
        features = encoder.image_features(rgb(data.images(dataset, SPLIT)), normalize=True)
        for lang, prompt in prompts.items():
            scores = prompt_scores(encoder, features, prompt, classes)
            out[f"{dataset} {lang}"] = macro(
                [auc_or_none(labels[:, c], scores[:, c]) for c in range(len(classes))]
            )
    return out


def retrieval_valid(encoder, data: EvalData) -> dict[str, float]:
    ranks, hits = [], []
    for dataset in ZERO_SHOT_VALID:
        records = data.require(dataset, SPLIT)
        image = encoder.image_features(rgb(data.images(dataset, SPLIT)), normalize=True)
        text = encoder.text_features([r.report for r in records], normalize=True)
        sims = image @ text.T  # (N, N), one language
        rank = ((sims > sims.diagonal().unsqueeze(1)).sum(1) + 1).numpy()  # 1 = the true report
        ranks.append(rank / len(records))
        hits.append(rank <= 5)
    return {"median rank": float(np.median(np.concatenate(ranks))),
            "R@5": float(np.mean(np.concatenate(hits)))}


def parse_row(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--row", action="append", default=[], help="NAME:key=value,key=value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--text-encoder", default="runs/demo/mlm")
    parser.add_argument("--output-dir", default="runs/levers")
    parser.add_argument("--untrained", action="store_true", help="also score the untrained model")
    args = parser.parse_args()
    rows = [parse_row(r) for r in args.row] or [("preset", [])]
    base = [f"method.text.encoder={args.text_encoder}", f"run.output_dir={args.output_dir}",
            "train.tensorboard=false", "train.checkpoint_every=1000"]
    table = []
    data = None
    for name, overrides in rows:
        for seed in args.seeds:
            cfg = load_config(args.config, [*base, *overrides, f"run.name={name}_s{seed}",
                                            f"run.seed={seed}"])
            data = data or EvalData(cfg.data)
            start = time.perf_counter()
            result = run_pretrain(cfg, resume=False, progress=False)
            seconds = time.perf_counter() - start
            texts = {"text_encoder": text_encoder_dir(cfg), "tokenizer": tokenizer_dir(cfg)}
            encoder = build_encoder(name, name, cfg.method, weights=result.checkpoint, seed=seed,
                                    **texts)
            table.append(_row(name, seed, encoder, data, cfg, result.history, seconds))
            if args.untrained and seed == args.seeds[0]:
                untrained = build_encoder("untrained", "untrained", cfg.method, seed=seed, **texts)
                table.append(_row(f"{name} untrained", seed, untrained, data, cfg, [], 0.0))
            print_table("Learning levers (validation splits)", HEADER, table)
    print(f"Sp*: diagnostic, not the protocol: Spanish negative prompt '{REPORT_NEGATION_ES}' "
          "(the phantom reports' negation) instead of 'No hay {disease}'")


HEADER = ["row", "seed", "cvl", "ssv", "grad norm", "MIMIC En", "MIMIC Sp", "MIMIC Sp*", "PadChest En",
          "PadChest Sp", "PadChest Sp*", "median rank %", "R@5 %", "train s"]


def _row(name, seed, encoder, data, cfg, history, seconds) -> list[str]:
    last = history[-10:]

    def mean(key: str) -> str:
        values = [h[key] for h in last if key in h]
        return f"{np.mean(values):.3f}" if values else "-"

    zs = zero_shot_valid(encoder, data, cfg.eval)
    ret = retrieval_valid(encoder, data)
    cells = [f"{100 * v:.1f}" if v is not None else "-" for v in zs.values()]
    return [name, str(seed), mean("cvl_loss"), mean("ssv_loss"), mean("grad_norm"), *cells,
            f"{100 * ret['median rank']:.1f}", f"{100 * ret['R@5']:.1f}", f"{seconds:.0f}"]


if __name__ == "__main__":
    main()
