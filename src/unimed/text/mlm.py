"""Cross-lingual masked language modelling: adapt an English BERT to the extended vocabulary.

Med-UniC (supplement 3.1, Table 1): English and Spanish reports mixed and shuffled at report level,
15% masking with BERT's 80/10/10 replacement, Adam lr 5e-4 with a linear warm-up over 10% of the
steps, max length 256, 15 epochs. The M new word-embedding rows start random, not at the mean.

The stage runs on the project's one training loop (:mod:`unimed.train.loop`) as the method
:class:`MaskedLM`, so it gets DDP (torchrun), gradient accumulation, fp16 on CUDA, checkpoints and
exact resume like pre-training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unimed.data.pretrain import PretrainSampler
from unimed.data.reports import warn_truncated
from unimed.methods.base import Method, Stage, StepContext
from unimed.models.dropout import use_fast_dropout
from unimed.models.text import (
    BASE_VOCAB_KEY,
    load_pretrained,
    load_tokenizer,
    mean_pool,
    token_states,
    train_appended_rows,
)
from unimed.text.config import MLMConfig
from unimed.text.corpus import require_texts
from unimed.text.lexicon import load_lexicon
from unimed.text.stemming import copy_corpus_stemming
from unimed.text.vocab import normalizer_of
from unimed.train.checkpoint import WRITE_ERRORS, CheckpointError, umask_permissions, write_failure
from unimed.train.config import TrainConfig
from unimed.train.distributed import DistInfo
from unimed.train.loop import CHECKPOINT_DIR, train
from unimed.train.optim import param_groups

logger = logging.getLogger(__name__)

START_ROWS_FILE = "appended_rows_start.safetensors"  # the appended rows as MLM started them


@dataclasses.dataclass(frozen=True)
class MLMResult:
    """What a cross-lingual MLM run produced.

    ``loss_history`` is the mean training loss of each epoch this call trained in; ``steps`` is
    the optimizer step count reached (including steps of a resumed run before it).
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
    dist: DistInfo | None = None,
    resume: bool = False,
) -> MLMResult:
    """Train a ``BertForMaskedLM`` on the mixed-language ``corpus`` and save it with its tokenizer.

    ``tokenizer_dir`` holds the cross-lingual tokenizer (see ``build_cross_lingual_tokenizer``);
    ``base_model`` is a local Hugging Face BERT folder (CXR-BERT, BioClinicalBERT, MiniLM) whose
    embeddings are extended to the tokenizer, or ``None`` for a fresh BERT sized by ``cfg``. Seeds
    torch's global RNG with ``seed`` (offset by the rank). The training loop writes
    ``train_log.jsonl`` and ``checkpoints/`` into ``out_dir``; with ``resume`` it continues from the
    newest checkpoint there. Rank 0 then writes the model and tokenizer (``save_pretrained``); from
    a base model it first writes the appended rows as they start (:func:`save_start_rows`).
    Call on every rank of a torchrun job (``dist``; default: one process).
    """
    _check_config(cfg)
    dist = dist or DistInfo()
    texts = [t for t in require_texts(corpus, "corpus") if t.strip()]
    tokenizer = _load_tokenizer(Path(tokenizer_dir))
    torch.manual_seed(seed + dist.rank)
    model = build_mlm_model(tokenizer, cfg, base_model=base_model, seed=seed, corpus=texts,
                            progress=progress and dist.is_main)
    out = Path(out_dir)
    if base_model is not None and dist.is_main:
        save_start_rows(model, out)
    if cfg.trainable == "new_rows":
        if base_model is None:
            raise ValueError("mlm.trainable=new_rows needs a base model (vocab.base_model): a fresh "
                             "BERT has no pre-trained rows to keep")
        train_new_rows_only(model, base_vocab_size(base_model))
    loader = _make_loader(texts, tokenizer, cfg, model.config.max_position_embeddings, seed, dist)
    result = train(MaskedLM(model, cfg), loader, loop_config(cfg), out, dist, resume=resume,
                   progress=progress and dist.is_main)
    if dist.is_main:
        try:
            model.save_pretrained(str(out))
            umask_permissions(*out.glob("*.safetensors"))
            tokenizer.save_pretrained(str(out))
            copy_corpus_stemming(tokenizer_dir, out)
        except WRITE_ERRORS as exc:
            raise CheckpointError(f"cannot save the MLM encoder to {out} ({write_failure(exc)}); "
                                  f"its training checkpoints are in {out / CHECKPOINT_DIR}") from None
    history = _epoch_means(result.history)
    if result.history and dist.is_main:
        first, last = result.history[0], result.history[-1]
        logger.info("MLM: %d steps, batch loss %.3f (step %d) -> %.3f (step %d), saved to %s",
                    result.steps, first["loss"], first["step"], last["loss"], last["step"], out)
    return MLMResult(loss_history=history, out_dir=out, steps=result.steps)


class MaskedLM(Method):
    """Masked language modelling of a ``BertForMaskedLM`` as a method of the training loop: one
    stage "mlm", Adam(W) with the schedule ``mlm.lr_schedule`` over the parameters left trainable
    (``mlm.trainable``; with "new_rows" there is no weight decay, which would shrink the frozen
    base rows that share one matrix with the new ones).

    The loss is the mean cross-entropy over the masked tokens of the batch; a batch without any
    masked token (possible with a few short reports) gives 0 and no gradient instead of NaN.
    """

    def __init__(self, model: BertForMaskedLM, cfg: MLMConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = batch["labels"]  # (B, L), -100 where not masked
        # Reports are single segments (token type 0, the embeddings' default); the layers run on
        # the real tokens only (packed_layers).
        hidden = token_states(self.model.bert, batch["input_ids"], batch["attention_mask"])  # (B, L, H)
        chosen = labels != -100
        # The vocabulary head only where a token is masked: the same loss as scoring every
        # position, without the (B, L, V) logits (most of the step's FLOPs on a 30k vocabulary).
        logits = self.model.cls(hidden[chosen])  # (M, V)
        masked = chosen.sum()
        loss = F.cross_entropy(logits.float(), labels[chosen], reduction="sum") / masked.clamp_min(1)
        return {"loss": loss, "masked_tokens": masked.float()}

    def stages(self, train: TrainConfig) -> list[Stage]:
        return [Stage("mlm", train.epochs)]

    def configure_optimizer(
        self, stage: Stage, train: TrainConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """AdamW (weight decay on matrices only, as BERT), warm-up over ``warmup_ratio`` of the
        steps actually run (``mlm.max_steps`` shortens the schedule)."""
        cfg = self.cfg
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        decay = cfg.weight_decay if cfg.trainable == "all" else 0.0
        optimizer = torch.optim.AdamW(param_groups(self.model, decay), lr=cfg.lr, eps=cfg.adam_eps)
        scheduler = get_scheduler(cfg.lr_schedule, optimizer, round(cfg.warmup_ratio * total_steps),
                                  total_steps)
        return optimizer, scheduler


def loop_config(cfg: MLMConfig) -> TrainConfig:
    """The training loop's settings of the MLM stage (fp16 autocast on CUDA when ``mlm.fp16``)."""
    return TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum_steps,
        grad_clip=cfg.max_grad_norm, precision="auto" if cfg.fp16 else "fp32",
        max_steps=cfg.max_steps, log_every=cfg.log_every, tensorboard=False,
    )


def _epoch_means(history: list[dict[str, float]]) -> list[float]:
    """The mean loss of the steps of each epoch in `history`, in order."""
    by_epoch: dict[int, list[float]] = {}
    for row in history:
        by_epoch.setdefault(int(row["epoch"]), []).append(row["loss"])
    return [sum(v) / len(v) for v in by_epoch.values()]


DISTIL_STEPS = 300
DISTIL_LR = 3.0e-3


def build_mlm_model(
    tokenizer: PreTrainedTokenizerBase,
    cfg: MLMConfig,
    *,
    base_model: str | Path | None = None,
    seed: int = 0,
    corpus: Sequence[str] = (),
    progress: bool = False,
) -> BertForMaskedLM:
    """A masked LM whose word embeddings have one row per token of ``tokenizer``.

    From ``base_model`` the first rows keep their pre-trained values and the rows of the new tokens
    start as ``cfg.new_rows`` says: drawn from normal(0, initializer_range) as in the paper, the
    mean of their base-tokenizer pieces' rows, or that mean fitted to read like the pieces
    (:func:`distil_new_rows`, with a progress bar when `progress`), or the same from the term's
    translation in the bilingual lexicon ``cfg.lexicon`` where it has one. transformers' default
    resizing would set them all to the mean of the old rows, which makes every new term start as
    the same vector.
    A base model without an MLM head (a sentence encoder such as MiniLM) gets the head of
    :func:`init_missing_head` instead of a random one. Without a base model, a fresh BERT is built
    from the sizes in ``cfg``. Its dropouts draw their CPU masks as the pre-training text tower's
    (:func:`unimed.models.dropout.use_fast_dropout`).
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
            return use_fast_dropout(BertForMaskedLM(config))
    path = Path(base_model)
    if not path.is_dir():
        raise ValueError(f"base model folder {path} does not exist; models are never downloaded")
    # A sentence encoder has no MLM head: init_missing_head gives it one.
    model, info = load_pretrained(BertForMaskedLM, path, initialised=("cls.",))
    n_old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) < n_old:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but {path} has {n_old} embedding rows: the tokenizer "
            "must extend the base model's vocabulary (build it with base_model set to the same folder)"
        )
    base_tokenizer = _check_vocab_prefix(tokenizer, path)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    setattr(model.config, BASE_VOCAB_KEY, n_old)  # saved in config.json: which rows are appended
    if cfg.new_rows != "random":
        if base_tokenizer is None:
            raise ValueError(f"mlm.new_rows={cfg.new_rows} needs the base tokenizer, but {path} has none")
        sources = row_sources(tokenizer, n_old, base_tokenizer, cfg)
        _init_new_rows_from_subwords(model, n_old, sources, base_tokenizer)
        if cfg.new_rows in ("subword_distilled", "lexicon"):
            distil_new_rows(model, n_old, sources, base_tokenizer, tokenizer, progress=progress)
    else:
        _init_new_rows(model, n_old, seed)
    init_missing_head(model, set(info["missing_keys"]), _token_counts(tokenizer, corpus))
    return use_fast_dropout(model)


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


def save_start_rows(model: BertForMaskedLM, out_dir: Path) -> None:
    """Write the appended word-embedding rows of a base model's MLM start to
    ``out_dir/START_ROWS_FILE``: the MLM check's "before" encoder (:func:`start_encoder`) reads
    them instead of starting them again (a distilled start takes seconds to minutes)."""
    n_old = getattr(model.config, BASE_VOCAB_KEY)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({"rows": model.get_input_embeddings().weight.detach()[n_old:].contiguous()},
                  str(out_dir / START_ROWS_FILE))
        umask_permissions(out_dir / START_ROWS_FILE)
    except WRITE_ERRORS as exc:
        raise CheckpointError(f"cannot write {out_dir / START_ROWS_FILE} ({write_failure(exc)})") from None


def start_encoder(tokenizer: PreTrainedTokenizerBase, base_model: str | Path, mlm_dir: Path) -> BertModel:
    """The text encoder an MLM run in `mlm_dir` started from: the base model's body, its vocabulary
    grown to `tokenizer`, the appended rows read from the start :func:`train_mlm` saved there. A
    missing or unreadable file, or rows of another number or width, is a ValueError naming it."""
    path = mlm_dir / START_ROWS_FILE
    try:
        rows = load_file(str(path))["rows"]
    except (OSError, SafetensorError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the appended rows MLM started from ({exc}); "
                         "run `unimed mlm` again") from None
    encoder, _ = load_pretrained(BertModel, base_model, add_pooling_layer=False)
    base = encoder.get_input_embeddings().weight
    appended = (len(tokenizer) - base.shape[0], base.shape[1])
    if tuple(rows.shape) != appended:
        raise ValueError(f"{path}: {tuple(rows.shape)} rows, but the vocabulary appends "
                         f"{appended} to {base_model}")
    n_old = base.shape[0]
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[n_old:] = rows
    return encoder


def train_new_rows_only(model: BertForMaskedLM, n_old: int) -> None:
    """Leave only the word-embedding rows from ``n_old`` on and the MLM head trainable: the
    transformer body is frozen and the gradient of every base-vocabulary row (ids below ``n_old``,
    input embedding and tied decoder alike) is zeroed before it is accumulated (so before DDP
    averages it), so with Adam and no weight decay those rows keep their exact values."""
    model.bert.requires_grad_(False)
    train_appended_rows(model.get_input_embeddings().weight, n_old,  # also the tied decoder
                        "mlm.trainable=new_rows")


def base_vocab_size(base_model: str | Path) -> int:
    """Embedding rows of the base checkpoint in ``base_model`` (its vocabulary before growing)."""
    return BertConfig.from_pretrained(str(base_model), local_files_only=True).vocab_size


def _token_counts(tokenizer: PreTrainedTokenizerBase, corpus: Sequence[str]) -> torch.Tensor:
    """(V,) how often each token id occurs in the tokenised `corpus`."""
    counts = torch.zeros(len(tokenizer))
    for ids in tokenizer(list(corpus), add_special_tokens=False)["input_ids"] if corpus else []:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=len(tokenizer))
    return counts


def _check_config(cfg: MLMConfig) -> None:
    """What `cfg`'s own checks cannot see: the lexicon `mlm.new_rows: lexicon` reads."""
    if cfg.new_rows == "lexicon":
        load_lexicon(cfg.lexicon)


def _check_vocab_prefix(tokenizer: PreTrainedTokenizerBase, path: Path) -> PreTrainedTokenizerBase | None:
    """Old embedding rows are only meaningful if every base token keeps its id in the new tokenizer.

    Returns the base tokenizer (None when the base folder has none)."""
    if not any((path / name).exists() for name in ("tokenizer.json", "vocab.txt")):
        return None
    base = load_tokenizer(path)
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


def row_sources(tokenizer: PreTrainedTokenizerBase, n_old: int, base: PreTrainedTokenizerBase,
                cfg: MLMConfig) -> list[str]:
    """The text each appended row (ids from ``n_old`` on) starts from: the term itself, or with
    ``new_rows: lexicon`` its translation in ``cfg.lexicon`` where the lexicon has one."""
    terms = tokenizer.convert_ids_to_tokens(list(range(n_old, len(tokenizer))))
    if cfg.new_rows != "lexicon":
        return terms
    lexicon = load_lexicon(cfg.lexicon)
    translations = lexicon.translations(terms, normalizer_of(base))
    missing = [term for term, translation in zip(terms, translations) if translation is None]
    logger.info("lexicon %s (%s -> %s) translates %d of the %d appended terms%s", lexicon.path,
                lexicon.source, lexicon.target, len(terms) - len(missing), len(terms),
                f"; from their own pieces: {', '.join(missing)}" if missing else "")
    return [translation or term for term, translation in zip(terms, translations)]


def _init_new_rows_from_subwords(
    model: BertForMaskedLM, n_old: int, sources: Sequence[str], base: PreTrainedTokenizerBase
) -> None:
    """Row ``n_old + i`` = mean of the old rows of the pieces ``base`` tokenizes ``sources[i]``
    into; a text the base tokenizer maps to [UNK] alone keeps the [UNK] row."""
    weight = model.get_input_embeddings().weight  # (V, D)
    pieces = base(list(sources), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for row, ids in enumerate(pieces, start=n_old):
            weight[row] = weight[torch.as_tensor(ids or [base.unk_token_id])].mean(0)


def _mean_states(encoder: nn.Module, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, H) mean over the unmasked tokens of the last layer's states of (N, L, H) input embeddings."""
    return mean_pool(encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask)


def distil_new_rows(model: BertForMaskedLM, n_old: int, sources: Sequence[str],
                    base: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase, *,
                    steps: int = DISTIL_STEPS, lr: float = DISTIL_LR, progress: bool = False) -> None:
    """Fit row ``n_old + i`` so that the frozen encoder reads the term alone ("[CLS] term [SEP]")
    as it reads the base tokenizer's pieces of ``sources[i]``, the term itself ("[CLS] ne ##um
    ##oto ##ra ##x [SEP]") or its translation ("[CLS] p ##ne ##um ##otho ##ra ##x [SEP]"): Adam on
    the rows, each row's mean-pooled last-layer states' squared error (summed over rows, so a row's
    fit does not depend on how many others are fitted), starting from where the rows are (the
    pieces' mean). The mean of the pieces' rows loses their order and lets terms that share their
    first pieces start together ('neumon' and 'neumotorax' share 'ne ##um'); the encoder reading
    the pieces in order tells them apart, and the distilled rows inherit that. A source of one
    piece is read exactly by the row its mean gave, so only rows of several pieces are fitted."""
    weight = model.get_input_embeddings().weight  # (V, H)
    pieces = base(list(sources), padding=True, return_tensors="pt")
    fitted = torch.nonzero(pieces["attention_mask"].sum(1) > 3).flatten()  # [CLS] + 2 pieces + [SEP] or more
    if not len(fitted):
        return
    encoder = model.bert
    was_training, grads = encoder.training, [p.requires_grad for p in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        target = _mean_states(encoder, encoder.embeddings.word_embeddings(pieces["input_ids"][fitted]),
                              pieces["attention_mask"][fitted])  # (T, H)
        ends = weight[[tokenizer.cls_token_id, tokenizer.sep_token_id]]  # (2, H)
    rows = weight[n_old + fitted].detach().clone().requires_grad_(True)  # (T, H)
    mask = torch.ones(len(fitted), 3, dtype=torch.long)
    optimizer = torch.optim.Adam([rows], lr=lr)
    for _ in tqdm(range(steps), desc="distilling new rows", unit="step", disable=not progress):
        embeds = torch.stack([ends[0].expand_as(rows), rows, ends[1].expand_as(rows)], dim=1)  # (T, 3, H)
        errors = (_mean_states(encoder, embeds, mask) - target).pow(2).mean(1)  # (T,)
        optimizer.zero_grad(set_to_none=True)
        errors.sum().backward()
        optimizer.step()
    with torch.no_grad():
        weight[n_old + fitted] = rows
    encoder.train(was_training)
    for param, grad in zip(encoder.parameters(), grads):
        param.requires_grad_(grad)
    logger.info("%d new rows distilled from their sources' pieces: mean squared error %.4f after %d steps",
                len(fitted), errors.mean().item(), steps)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist; run the vocabulary stage first")
    tokenizer = load_tokenizer(path)
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ValueError(f"tokenizer in {path} has no [MASK] or [PAD] token; masked LM needs both")
    return tokenizer


class _Encoded(Dataset):
    """Tokenised reports, indexed by the `(index, seed)` keys of :class:`PretrainSampler`."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, list[int]]:
        return self.features[key[0]]


def _make_loader(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: MLMConfig, max_positions: int,
    seed: int, dist: DistInfo,
) -> DataLoader:
    """This rank's shard, shuffled (seeded, every epoch), report-level batches with 80/10/10 masking
    of ``mask_prob`` tokens. The masks are drawn from the global RNG, whose state checkpoints
    carry, so a resumed run masks as the uninterrupted one."""
    max_length = min(cfg.max_length, max_positions)
    if max_length < cfg.max_length:
        logger.warning("mlm.max_length=%d exceeds the model's %d positions", cfg.max_length, max_positions)
    warn_truncated({"the MLM corpus": texts}, tokenizer, max_length, "mlm.max_length")
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    features = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
    dataset = _Encoded(features)
    sampler = PretrainSampler(dataset, rank=dist.rank, world_size=dist.world_size, seed=seed,
                              drop_last=False)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mask_prob)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))
