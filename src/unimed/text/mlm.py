"""Cross-lingual masked language modelling: adapt an English BERT to the extended vocabulary.

Med-UniC (supplement 3.1, Table 1): English and Spanish reports mixed and shuffled at report level,
15% masking with BERT's 80/10/10 replacement, Adam lr 5e-4 with a linear warm-up over 10% of the
steps, max length 256, 15 epochs. The M new word-embedding rows start random, not at the mean.

The loop is hand-written rather than the HF ``Trainer``: the Trainer pulls in ``accelerate``, owns
device placement, logging and checkpoint layout, and the loop needed here is ~40 lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from unimed.text.config import MLMConfig
from unimed.text.corpus import require_texts

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MLMResult:
    """What a cross-lingual MLM run produced.

    ``loss_history`` is the mean training loss of each epoch; ``steps`` counts optimizer steps.
    """

    loss_history: list[float]
    out_dir: Path
    steps: int


def train_mlm(
    corpus: Sequence[str],
    tokenizer_dir: str | Path,
    cfg: MLMConfig,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> MLMResult:
    """Train a ``BertForMaskedLM`` on the mixed-language ``corpus`` and save it with its tokenizer.

    ``tokenizer_dir`` holds the cross-lingual tokenizer (see ``build_cross_lingual_tokenizer``);
    ``base_model`` is a local Hugging Face BERT folder (CXR-BERT, BioClinicalBERT, MiniLM) whose
    embeddings are extended to the tokenizer, or ``None`` for a fresh BERT sized by ``cfg``. Seeds
    torch's global RNG with ``seed``. Writes the model and tokenizer (``save_pretrained``) and
    ``mlm_log.jsonl`` into ``out_dir``.
    """
    _check_config(cfg)
    texts = [t for t in require_texts(corpus, "corpus") if t.strip()]
    tokenizer = _load_tokenizer(Path(tokenizer_dir))
    torch.manual_seed(seed)
    model = build_mlm_model(tokenizer, cfg, base_model=base_model, seed=seed, corpus=texts)
    loader = _make_loader(texts, tokenizer, cfg, model.config.max_position_embeddings, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(out / "mlm_log.jsonl", "w", encoding="utf-8") as log_file:
        history, steps = _train(model.to(device), loader, cfg, device, log_file, progress)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    logger.info("MLM: %d steps, loss %.3f -> %.3f, saved to %s", steps, history[0], history[-1], out)
    return MLMResult(loss_history=history, out_dir=out, steps=steps)


NEW_ROWS = ("random", "subword_mean")


def build_mlm_model(
    tokenizer: PreTrainedTokenizerBase,
    cfg: MLMConfig,
    *,
    base_model: str | Path | None = None,
    seed: int = 0,
    corpus: Sequence[str] = (),
) -> BertForMaskedLM:
    """A masked LM whose word embeddings have one row per token of ``tokenizer``.

    From ``base_model`` the first rows keep their pre-trained values and the rows of the new tokens
    start as ``cfg.new_rows`` says: drawn from normal(0, initializer_range) as in the paper, or the
    mean of their base-tokenizer pieces' rows. transformers' default resizing would set them all to
    the mean of the old rows, which makes every new term start as the same vector.
    A base model without an MLM head (a sentence encoder such as MiniLM) gets the head of
    :func:`init_missing_head` instead of a random one. Without a base model, a fresh BERT is built
    from the sizes in ``cfg``.
    """
    if base_model is None:
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_length,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BertForMaskedLM(config)
    path = Path(base_model)
    if not path.is_dir():
        raise ValueError(f"base model folder {path} does not exist; models are never downloaded")
    model, info = BertForMaskedLM.from_pretrained(str(path), output_loading_info=True)
    n_old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) < n_old:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but {path} has {n_old} embedding rows: the tokenizer "
            "must extend the base model's vocabulary (build it with base_model set to the same folder)"
        )
    base_tokenizer = _check_vocab_prefix(tokenizer, path)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if cfg.new_rows == "subword_mean":
        if base_tokenizer is None:
            raise ValueError(f"mlm.new_rows=subword_mean needs the base tokenizer, but {path} has none")
        _init_new_rows_from_subwords(model, n_old, tokenizer, base_tokenizer)
    else:
        _init_new_rows(model, n_old, seed)
    init_missing_head(model, set(info["missing_keys"]), _token_counts(tokenizer, corpus))
    return model


def init_missing_head(model: BertForMaskedLM, missing: set[str], counts: torch.Tensor) -> None:
    """Give the parts of the MLM head that the checkpoint lacks a start that keeps the encoder's
    geometry, so the first updates do not push a random head's errors into a pre-trained encoder.

    * The decoder is the word-embedding matrix (tied), so a hidden state predicts the tokens whose
      embeddings it resembles.
    * A missing transform (dense -> GELU -> LayerNorm) starts as the identity dense layer.
    * A missing output bias starts at the log unigram frequency of each token in the MLM corpus
      (`counts`, add-one smoothed), the best guess of a masked token before reading its context.
    """
    heads = model.cls.predictions
    if heads.decoder.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise ValueError("the MLM decoder is not tied to the word embeddings (tie_word_embeddings)")
    with torch.no_grad():
        if any(k.startswith("cls.predictions.transform.dense") for k in missing):
            heads.transform.dense.weight.copy_(torch.eye(heads.transform.dense.weight.shape[0]))
            heads.transform.dense.bias.zero_()
        if "cls.predictions.bias" in missing:
            prior = torch.log((counts + 1.0) / (counts.sum() + len(counts)))
            heads.bias.copy_((prior - prior.mean()).to(heads.bias.dtype))
    initialised = sorted(k for k in missing if k.startswith("cls."))
    if initialised:
        logger.info("MLM head: %s absent from the checkpoint, initialised (identity transform, "
                    "tied decoder, log-frequency bias)", ", ".join(initialised))


def _token_counts(tokenizer: PreTrainedTokenizerBase, corpus: Sequence[str]) -> torch.Tensor:
    """(V,) how often each token id occurs in the tokenised `corpus`."""
    counts = torch.zeros(len(tokenizer))
    for ids in tokenizer(list(corpus), add_special_tokens=False)["input_ids"] if corpus else []:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=len(tokenizer))
    return counts


def _check_config(cfg: MLMConfig) -> None:
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"mlm.max_steps must be at least 1 (or null), got {cfg.max_steps}")
    for key in ("epochs", "batch_size", "grad_accum_steps", "max_length", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"mlm.{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ValueError(f"mlm.mask_prob must be in (0, 1), got {cfg.mask_prob}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ValueError(f"mlm.warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.new_rows not in NEW_ROWS:
        raise ValueError(f"mlm.new_rows must be one of {', '.join(NEW_ROWS)}, got {cfg.new_rows!r}")


def _check_vocab_prefix(tokenizer: PreTrainedTokenizerBase, path: Path) -> PreTrainedTokenizerBase | None:
    """Old embedding rows are only meaningful if every base token keeps its id in the new tokenizer.

    Returns the base tokenizer (None when the base folder has none)."""
    if not any((path / name).exists() for name in ("tokenizer.json", "vocab.txt")):
        return None
    base = AutoTokenizer.from_pretrained(str(path))
    base_vocab = base.get_vocab()
    moved = [t for t, i in base_vocab.items() if tokenizer.convert_tokens_to_ids(t) != i]
    if moved:
        raise ValueError(
            f"tokenizer does not extend the vocabulary of {path}: {len(moved)} tokens changed id "
            f"(e.g. {moved[:3]}); build the tokenizer with base_model set to this folder"
        )
    return base


def _init_new_rows(model: BertForMaskedLM, n_old: int, seed: int) -> None:
    """Draw the embedding rows from ``n_old`` on from normal(0, initializer_range); old rows untouched."""
    weight = model.get_input_embeddings().weight  # (V, D)
    generator = torch.Generator().manual_seed(seed)
    new_rows = torch.randn(weight.shape[0] - n_old, weight.shape[1], generator=generator)  # (M, D)
    with torch.no_grad():
        weight[n_old:] = (new_rows * model.config.initializer_range).to(weight.dtype)


def _init_new_rows_from_subwords(
    model: BertForMaskedLM, n_old: int, tokenizer: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase
) -> None:
    """Row of each new token (ids from ``n_old`` on) = mean of the old rows of the pieces ``base``
    tokenizes it into; a term the base tokenizer maps to [UNK] alone keeps the [UNK] row."""
    weight = model.get_input_embeddings().weight  # (V, D)
    terms = tokenizer.convert_ids_to_tokens(list(range(n_old, weight.shape[0])))
    pieces = base(terms, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for row, ids in enumerate(pieces, start=n_old):
            weight[row] = weight[torch.as_tensor(ids or [base.unk_token_id])].mean(0)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist; run the vocabulary stage first")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ValueError(f"tokenizer in {path} has no [MASK] or [PAD] token; masked LM needs both")
    return tokenizer


def _make_loader(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: MLMConfig, max_positions: int, seed: int
) -> DataLoader:
    """Shuffled (seeded, every epoch) report-level batches with 80/10/10 masking of ``mask_prob`` tokens."""
    max_length = min(cfg.max_length, max_positions)
    if max_length < cfg.max_length:
        logger.warning("mlm.max_length=%d exceeds the model's %d positions", cfg.max_length, max_positions)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    features = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mask_prob, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(features, batch_size=cfg.batch_size, shuffle=True, generator=generator, collate_fn=collator)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and LayerNorm weights (1-D) are not decayed, as in BERT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


@dataclasses.dataclass
class _Optim:
    """Optimizer, schedule and fp16 scaler of one run, and the number of optimizer steps taken."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    steps: int = 0


def _train(
    model: BertForMaskedLM, loader: DataLoader, cfg: MLMConfig, device: torch.device, log_file: IO[str], progress: bool
) -> tuple[list[float], int]:
    """Run ``cfg.epochs`` epochs; returns the mean loss of each epoch and the optimizer step count."""
    total = math.ceil(len(loader) / cfg.grad_accum_steps) * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_eps)
    use_amp = cfg.fp16 and device.type == "cuda"  # fp16 only on CUDA; CPUs stay in fp32
    optim = _Optim(
        optimizer=optimizer,
        scheduler=get_scheduler(cfg.lr_schedule, optimizer, round(cfg.warmup_ratio * total), total),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
        use_amp=use_amp,
    )
    model.train()
    history: list[float] = []
    with tqdm(total=total, desc="mlm", disable=not progress) as bar:
        for epoch in range(cfg.epochs):
            if optim.steps >= total:
                break
            history.append(_run_epoch(model, loader, cfg, device, optim, bar, log_file, epoch, total))
            bar.set_postfix(loss=f"{history[-1]:.3f}")
            _log(log_file, event="epoch", epoch=epoch, step=optim.steps, loss=history[-1])
    return history, optim.steps


def _run_epoch(
    model: BertForMaskedLM,
    loader: DataLoader,
    cfg: MLMConfig,
    device: torch.device,
    optim: _Optim,
    bar: tqdm,
    log_file: IO[str],
    epoch: int,
    total: int,
) -> float:
    """One pass over the loader with gradient accumulation, stopping at `total` optimizer steps;
    returns the mean loss of its batches."""
    losses: list[float] = []
    pending = 0
    for i, batch in enumerate(loader):
        if optim.steps >= total:
            break
        # A batch of short reports can come out of the collator with no masked token; its loss is
        # NaN (a mean over zero targets) and would poison the weights, so it is skipped.
        if (batch["labels"] != -100).any():
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.float16, enabled=optim.use_amp):
                loss = model(**batch).loss
            optim.scaler.scale(loss / cfg.grad_accum_steps).backward()
            losses.append(loss.item())
            pending += 1
        if (i + 1) % cfg.grad_accum_steps and i + 1 < len(loader):
            continue
        bar.update(1)
        if pending:
            _optimizer_step(model, optim, cfg.max_grad_norm)
            pending = 0
            if optim.steps % cfg.log_every == 0:
                lr = optim.scheduler.get_last_lr()[0]
                _log(log_file, event="step", epoch=epoch, step=optim.steps, loss=losses[-1], lr=lr)
    if not losses:
        logger.warning("epoch %d had no masked token in any batch; corpus too small or mask_prob too low", epoch)
    return sum(losses) / len(losses) if losses else float("nan")


def _optimizer_step(model: torch.nn.Module, optim: _Optim, max_grad_norm: float) -> None:
    """Unscale (fp16), clip, step, advance the schedule and clear the accumulated gradients."""
    optim.scaler.unscale_(optim.optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    optim.steps += 1


def _log(log_file: IO[str], **record: float | int | str) -> None:
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
