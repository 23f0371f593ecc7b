"""How far does the MLM stage move the appended second-language rows? Held-out masked-token loss.

Each row trains the MLM stage of the preset (``unimed mlm``'s :func:`train_mlm`, same tokenizer
and base model) with dotted ``mlm.*`` overrides, optionally on the reports of one language only
(``lang=es``: with ``mlm.trainable: new_rows`` only reports that hold an appended term carry signal
for those rows), into ``--output-dir/<row>``. It prints the masked-token cross-entropy on the
*validation* reports of each pre-training dataset (the same masks for every row: fixed seeds), over
all masked tokens and over the masked appended terms alone, and the cosine of a few appended rows'
pairs (Spanish terms whose base-tokenizer pieces overlap, such as ``neumon`` / ``neumotorax``).
The folder of a row is a complete MLM output: pass it to ``benchmarks/learning_levers.py
--text-encoder`` to see what the row does to zero-shot. Run from the repository root after
``unimed vocab`` (or ``make demo``)::

    python benchmarks/mlm_new_rows.py configs/demo.yaml --row demo: \\
        --row es_2ep:lang=es,lr=1e-2,epochs=2,max_steps=null
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

from unimed.commands.tables import print_table
from unimed.commands.train import resolve_encoder
from unimed.config import load_config
from unimed.data.adapters import load_texts
from unimed.eval.data import EvalData
from unimed.text.mlm import base_vocab_size, train_mlm

PAIRS = (("neumon", "neumotorax"), ("neumon", "consolid"), ("consolid", "condens"))
MASK_DRAWS = 4


def parse_row(text: str, mlm_cfg) -> tuple[str, str, object]:
    name, _, overrides = text.partition(":")
    items = [item for item in overrides.split(",") if item]
    if any("=" not in item for item in items):
        raise SystemExit(f"row {text!r}: overrides must be key=value pairs separated by commas")
    values = dict(item.split("=", 1) for item in items)
    language = values.pop("lang", "all")
    changes = {}
    for key, value in values.items():
        if not hasattr(mlm_cfg, key):
            raise SystemExit(f"row {name}: mlm has no key {key!r}")
        current = getattr(mlm_cfg, key)
        try:
            changes[key] = None if value == "null" else type(current or 0)(value)
        except ValueError:
            kind = type(current or 0).__name__
            raise SystemExit(f"row {name}: mlm.{key}={value!r} is not a {kind}") from None
    return name, language, dataclasses.replace(mlm_cfg, **changes)


def heldout_loss(model: BertForMaskedLM, tokenizer, texts: list[str], n_old: int,
                 max_length: int) -> tuple[float, float]:
    """Mean cross-entropy of the masked tokens (all, appended terms only) over `MASK_DRAWS` seeded
    BERT maskings of `texts`."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    features = [{"input_ids": ids} for ids in
                tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    losses, appended = [], []
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for draw in range(MASK_DRAWS):
            torch.manual_seed(draw)
            batch = collator(features)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            masked = batch["labels"] != -100
            ce = F.cross_entropy(logits[masked], batch["labels"][masked], reduction="none")
            losses.append(ce)
            appended.append(ce[batch["labels"][masked] >= n_old])
    new = torch.cat(appended)
    return torch.cat(losses).mean().item(), new.mean().item() if len(new) else float("nan")


def row_cosines(model: BertForMaskedLM, tokenizer) -> list[str]:
    weight = F.normalize(model.get_input_embeddings().weight.detach(), dim=1)
    ids = tokenizer.convert_tokens_to_ids
    return [f"{(weight[ids(a)] @ weight[ids(b)]).item():.2f}" if tokenizer.unk_token_id not in
            (ids(a), ids(b)) else "-" for a, b in PAIRS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides of the preset")
    parser.add_argument("--row", action="append", default=[],
                        help="NAME:key=value,... with mlm keys and lang=all|<language>")
    parser.add_argument("--output-dir", default="runs/mlm_rows")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    vocab = cfg.run.dir / "vocab"
    if not (vocab / "vocab.txt").is_file():
        raise SystemExit(f"no tokenizer at {vocab}: run `unimed vocab` with this config first")
    base = resolve_encoder(cfg.vocab.base_model)
    n_old = base_vocab_size(base)
    tokenizer = AutoTokenizer.from_pretrained(str(vocab), local_files_only=True)
    reports = load_texts(cfg.data)
    data = EvalData(cfg.data, progress=False)
    valid = {d: [r.report for r in data.records(d, "valid")] for d in cfg.data.pretrain_datasets}
    valid = {d: texts for d, texts in valid.items() if texts}
    header = ["row", "reports", "n", "steps", "lr",
              *[f"{d} {kind}" for d in valid for kind in ("all", "appended")],
              *[f"cos {a}/{b}" for a, b in PAIRS], "s"]
    rows = []
    for text in args.row or ["preset:"]:
        name, language, mlm_cfg = parse_row(text, cfg.mlm)
        corpus = [r.report for r in reports if language in ("all", r.language)]
        out = Path(args.output_dir) / name
        start = time.perf_counter()
        try:
            result = train_mlm(corpus, vocab, mlm_cfg, out, base_model=base, seed=cfg.run.seed,
                               progress=True)
        except ValueError as error:  # a setting train_mlm rejects, e.g. mlm.max_steps=0
            raise SystemExit(f"row {name}: {error}") from None
        seconds = time.perf_counter() - start
        model = BertForMaskedLM.from_pretrained(str(out), local_files_only=True)
        cells = []
        for texts in valid.values():
            cells += [f"{v:.3f}" for v in heldout_loss(model, tokenizer, texts, n_old, mlm_cfg.max_length)]
        rows.append([name, language, str(len(corpus)), str(result.steps), f"{mlm_cfg.lr:g}",
                     *cells, *row_cosines(model, tokenizer), f"{seconds:.0f}"])
        print_table("MLM held-out masked-token loss (validation reports)", header, rows)


if __name__ == "__main__":
    main()
