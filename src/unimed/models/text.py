"""Text encoder: a Hugging Face ``BertModel``, loaded from a local folder or freshly initialised.

Sentence features are the last layer's [CLS] hidden state or its mean over tokens
(``method.text.pooling``; see :func:`pool_text`). The pooler is not built: Med-UniC does
not use it, and a parameter that never receives a gradient breaks DDP without
``find_unused_parameters``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoTokenizer, BertConfig, BertModel, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward
from transformers.utils import logging as hf_logging

from unimed.errors import ConfigError
from unimed.models.config import TextTowerConfig
from unimed.models.dropout import dropout as masked_dropout
from unimed.models.dropout import use_fast_dropout
from unimed.train.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def create_text_encoder(
    path: str | Path | PretrainedConfig | None, cfg: TextTowerConfig, *, vocab_size: int | None = None
) -> BertModel:
    """A BERT encoder from the local folder `path`, or a fresh one of `cfg`'s sizes, or (when
    `path` is a Hugging Face config object) an uninitialised one of that architecture whose weights
    the caller loads next (an exported model: the text weights are in its own weights file).

    Dropout (hidden and attention) is set to ``cfg.dropout`` either way, since it makes the two
    CTR text views; its CPU masks are drawn by :mod:`unimed.models.dropout` (the hidden dropout
    modules are replaced, and :func:`packed_layers` drops the attention probabilities with it).
    `vocab_size` is the tokenizer's size: it is required for a fresh encoder, and a loaded encoder
    with fewer embedding rows grows to it (new rows randomly initialised, as for the appended
    Spanish terms); a tokenizer smaller than the encoder's vocabulary is an error.
    """
    dropout = {
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
    }
    if path is None:
        if vocab_size is None:
            raise ValueError("a fresh text encoder (method.text.encoder unset) needs vocab_size")
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            **dropout,
        )
        return use_fast_dropout(BertModel(config, add_pooling_layer=False))
    if isinstance(path, PretrainedConfig):
        config = BertConfig.from_dict({**path.to_dict(), **dropout})
        return use_fast_dropout(BertModel(config, add_pooling_layer=False))
    return use_fast_dropout(_load_text_encoder(Path(path), vocab_size, dropout))


def _load_text_encoder(path: Path, vocab_size: int | None, dropout: dict[str, float]) -> BertModel:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {path} has no config.json; expected a Hugging Face model folder "
            "(save_pretrained output)"
        )
    model, _ = load_pretrained(BertModel, path, add_pooling_layer=False, **dropout)
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size != rows:
        if vocab_size < rows:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but the text encoder at {path} has {rows} "
                "embedding rows; use the tokenizer saved with this encoder"
            )
        log.info("growing word embeddings of %s from %d to %d rows", path, rows, vocab_size)
        # Plain random rows like the MLM stage's (paper: "M random initialized vectors"), not
        # transformers' default draw from the old rows' mean and covariance.
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' warnings (its LOAD REPORT tables among them) and progress bars (a "Loading
    weights" bar over the tensors of every load) off inside; restored after."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# What a folder may hold beside the weights of a pooler-less encoder: BERT's pooler (a sentence
# encoder's checkpoint) and an MLM head (the MLM stage's folder).
ENCODER_EXTRAS = ("pooler.", "cls.")
Model = TypeVar("Model", bound=PreTrainedModel)


def load_pretrained(cls: type[Model], path: str | Path, *, initialised: tuple[str, ...] = (),
                    **kwargs: Any) -> tuple[Model, dict[str, Any]]:
    """``cls.from_pretrained`` of the local folder `path` (never the hub) and transformers' loading
    info, the loading report checked here instead of printed as transformers' tables.

    A folder transformers cannot read (a truncated weights file), a weight the model needs that the
    folder lacks (other than those starting with one of `initialised`, which the caller sets
    itself) or holds in another shape is a :class:`CheckpointError` naming the folder and the keys:
    transformers would start such weights at random and only warn, losing trained state silently.
    Weights the model has no place for are expected when they are a pooler or an MLM head
    (`ENCODER_EXTRAS`) and a warning naming them otherwise.
    """
    try:
        with transformers_quiet():
            model, info = cls.from_pretrained(str(path), output_loading_info=True,
                                              local_files_only=True, **kwargs)
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"text encoder folder {path} cannot be loaded: {reason}") from exc
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(initialised))
    mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"])
    if missing or mismatched:
        keys = missing + mismatched
        what = " or ".join(w for w, ks in (("lacks", missing), ("has another shape for", mismatched))
                           if ks)
        raise CheckpointError(f"text encoder folder {path} {what} {len(keys)} weight(s) of the "
                              f"model, e.g. {', '.join(keys[:3])}: it is incomplete or of another "
                              "architecture")
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(ENCODER_EXTRAS))
    if unexpected:
        log.warning("text encoder folder %s holds %d weight(s) the model does not use, e.g. %s",
                    path, len(unexpected), ", ".join(unexpected[:3]))
    return model, info


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """transformers' tokenizer of the local folder `path` (never the hub); a folder whose tokenizer
    files or ``config.json`` cannot be read is a :class:`CheckpointError` naming it."""
    return _read_local("tokenizer", path, lambda: AutoTokenizer.from_pretrained(
        str(path), local_files_only=True))


def load_text_config(path: str | Path) -> PretrainedConfig:
    """transformers' model config (``config.json``) of the local folder `path`; one that cannot be
    read is a :class:`CheckpointError` naming the folder."""
    return _read_local("text encoder config", path, lambda: AutoConfig.from_pretrained(
        str(path), local_files_only=True))


Loaded = TypeVar("Loaded")


def _read_local(what: str, path: str | Path, read: Callable[[], Loaded]) -> Loaded:
    """`read()`, whose failure on the files of the folder `path` is one CheckpointError line. Any
    exception counts: an empty tokenizer.json is a JSONDecodeError, one without ``added_tokens``
    a KeyError, one whose model is not a mapping an AttributeError, a config.json that is not JSON
    an OSError, a file that is not UTF-8 a UnicodeDecodeError."""
    try:
        with transformers_quiet():
            return read()
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{what} folder {path} cannot be read: {type(exc).__name__}: "
                              f"{reason}") from exc


def freeze_text_layers(encoder: BertModel, n: int) -> None:
    """Freeze the embeddings and the first `n` transformer layers (``n == 0`` freezes nothing).

    Frozen layers still apply dropout in train mode, which is what makes the two CTR views differ.
    """
    layers = encoder.encoder.layer
    if not 0 <= n <= len(layers):
        raise ValueError(
            f"method.text.frozen_layers={n} but the text encoder has {len(layers)} layers; "
            f"use a value in 0..{len(layers)}"
        )
    if n == 0:
        return
    for module in (encoder.embeddings, *layers[:n]):
        for param in module.parameters():
            param.requires_grad_(False)


BASE_VOCAB_KEY = "unimed_base_vocab_size"
"""Key of a grown encoder's config.json (written by ``unimed mlm``): the number of embedding rows of
the base model it grew from; the rows from there on are the appended (Spanish) terms."""


def train_appended_rows(embedding: torch.nn.Parameter, n_old: int, setting: str) -> None:
    """Make the rows of `embedding` (V, D) from ``n_old`` on trainable and keep the first ``n_old``
    exact: their gradient is zeroed before it is accumulated (so before DDP averages it), and with
    Adam and no weight decay on `embedding` a zero gradient moves nothing. `setting` names the
    config key that asked for it, in the error when there are no appended rows."""
    if not 0 < n_old < embedding.shape[0]:
        raise ValueError(f"{setting}: the base model has {n_old} rows and the grown vocabulary "
                         f"{embedding.shape[0]}; there are no appended rows to train")
    embedding.requires_grad_(True)
    appended = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype)  # (V, 1)
    appended[n_old:] = 1
    embedding.register_hook(lambda grad: grad * appended.to(grad.device))


def appended_rows_start(encoder: BertModel, source: object) -> int:
    """The first appended row of `encoder` as its config records it (``unimed mlm`` writes it)."""
    n_old = getattr(encoder.config, BASE_VOCAB_KEY, None)
    if n_old is None:
        raise ValueError(f"method.text.train_appended_rows: the text encoder {source} does not record "
                         f"which embedding rows were appended ({BASE_VOCAB_KEY} in its config.json); "
                         "use the output of `unimed mlm`, which grows the vocabulary")
    return int(n_old)


POOLINGS = ("cls", "mean")


def pool_text(
    encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "cls",
    *, views: int = 1, shared_layers: int = 0, trainable_rows_from: int | None = None,
    cache: FrozenTrunkCache | None = None,
) -> torch.Tensor:
    """(views * B, hidden) sentence features of the last layer: the [CLS] state ("cls", BERT /
    CXR-BERT) or the mean over the non-padding tokens ("mean", how sentence-transformers encoders
    such as MiniLM were trained).

    `views` > 1 encodes every report that many times (rows ``v * B + b``); in train mode each view
    draws its own dropout masks (the CTR views). With `shared_layers` N > 0 the embeddings and the
    first N layers (which must be frozen) run once per report, without dropout and without autograd,
    and only the layers above them run per view: the views then differ by the dropout of the
    trainable layers alone, at a fraction of the cost (``method.text.frozen_dropout: false``).
    `trainable_rows_from` N says that the word-embedding rows from N on train
    (``method.text.train_appended_rows``): the shared layers then keep autograd for a batch that
    holds such a token, so the gradient reaches those rows through them. `cache` keeps the shared
    layers' output of every report it has seen (:class:`FrozenTrunkCache`).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"method.text.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    hidden = token_states(encoder, input_ids, attention_mask, views=views,
                          shared_layers=shared_layers, trainable_rows_from=trainable_rows_from,
                          cache=cache)  # (VB, L, H)
    mask = attention_mask.repeat(views, 1)
    if pooling == "cls":
        return hidden[:, 0]
    return mean_pool(hidden, mask)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, H) mean of (N, L, H) token states over the tokens where the (N, L) `mask` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def token_states(
    encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, views: int = 1,
    shared_layers: int = 0, trainable_rows_from: int | None = None,
    cache: FrozenTrunkCache | None = None,
) -> torch.Tensor:
    """(views * B, L, H) last-layer token states, zero at padding (:func:`packed_layers`); `views`,
    `shared_layers`, `trainable_rows_from` and `cache` as in :func:`pool_text`."""
    if shared_layers:
        grad = trainable_rows_from is not None and bool((input_ids >= trainable_rows_from).any())
        return _shared_trunk_states(encoder, input_ids, attention_mask, views, shared_layers,
                                    grad=grad and torch.is_grad_enabled(), cache=cache)
    input_ids = input_ids.repeat(views, 1)
    return packed_layers(encoder.encoder.layer, encoder.embeddings(input_ids=input_ids),
                         attention_mask.repeat(views, 1))


def packed_layers(layers: Sequence[BertLayer], hidden: torch.Tensor, attention_mask: torch.Tensor
                  ) -> torch.Tensor:
    """(B, L, H) output of the BERT `layers` on (B, L, H) `hidden`, where the (B, L)
    `attention_mask` is 1 at tokens and 0 at padding; the output is zero at padding.

    Only attention needs the padded (B, L) layout: the query, key, value and output projections,
    the feed-forward block, the layer norms and the hidden dropout act on each token alone, so they
    run on the N real tokens packed into (N, H), and no work goes to padding (a report batch is
    padded to its longest report: the demo's MIMIC-CXR batches are about a third padding, its
    PadChest batches nearly half). The layers' own modules do the work, so at every real token the
    result is the layers' own forward on the padded batch (equal to the last bit on the CPU in eval
    mode; `tests/models/test_text_encoder.py` compares values and gradients). In train mode the
    hidden dropout masks are drawn for the packed tokens only: the same distribution, another
    stream of random numbers than the padded forward's.
    """
    batch, length, width = hidden.shape
    index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of the tokens
    mask = create_bidirectional_mask(config=layers[0].attention.self.config, inputs_embeds=hidden,
                                     attention_mask=attention_mask) if len(layers) else None
    tokens = hidden.reshape(batch * length, width)[index]  # (N, H)
    for layer in layers:
        tokens = _packed_layer(layer, tokens, index, batch, length, mask)
    return _unpack(tokens, index, batch, length)


def _unpack(tokens: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(N, D) packed rows -> (B, L, D), zero at padding."""
    padded = tokens.new_zeros(batch * length, tokens.shape[-1]).index_copy(0, index, tokens)
    return padded.view(batch, length, -1)


def _packed_layer(layer: BertLayer, tokens: torch.Tensor, index: torch.Tensor, batch: int,
                  length: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One BERT layer on (N, H) packed tokens (:func:`packed_layers`): ``BertLayer.forward`` with
    the projections taken out of the padded layout."""
    attention = layer.attention.self
    heads = (batch, length, -1, attention.attention_head_size)
    query, key, value = (_unpack(projection(tokens), index, batch, length).view(heads).transpose(1, 2)
                         for projection in (attention.query, attention.key, attention.value))
    p = attention.dropout.p if attention.training else 0.0
    if p and query.device.type == "cpu":
        context = _attention_cpu_dropout(query, key, value, mask, p, attention.scaling)
    else:
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                          eager_attention_forward)
        context, _ = interface(attention, query, key, value, mask, dropout=p,
                               scaling=attention.scaling)  # (B, L, heads, head size)
    context = context.reshape(batch * length, -1)[index]  # (N, H)
    return layer.feed_forward_chunk(layer.attention.output(context, tokens))


def _attention_cpu_dropout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, p: float, scaling: float) -> torch.Tensor:
    """(B, L, heads, head size) attention of (B, heads, L, head size) `query`, `key`, `value`
    with dropout `p` on the probabilities, masks from :func:`unimed.models.dropout.dropout`: SDPA
    with dropout runs this arithmetic too (its math path, as the CPU has no fused kernel with
    dropout) but with torch's slower masks. `mask` is SDPA's: bool (True where a key is attended)
    or additive, broadcast over heads and queries; None attends everywhere."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)  # (B, heads, L, L)
    if mask is not None:
        scores = (scores.masked_fill_(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    probs = masked_dropout(scores.softmax(-1), p)
    return torch.matmul(probs, value).transpose(1, 2)


def _check_shared_trunk(encoder: BertModel, n: int) -> list[torch.nn.Module]:
    """The embeddings and the first `n` layers, which must be frozen (the word rows aside)."""
    trunk = [encoder.embeddings, *encoder.encoder.layer[:n]]
    words = encoder.embeddings.word_embeddings.weight
    if any(p.requires_grad for module in trunk for p in module.parameters() if p is not words):
        raise ValueError(f"the first {n} text layers are shared by the views, so they must be frozen "
                         f"(method.text.frozen_layers >= {n})")
    return trunk


def _trunk_states(encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n: int, grad: bool = False) -> torch.Tensor:
    """(B, L, H) output of the embeddings + layers[:n] in eval mode, without autograd unless
    `grad`; the modules' own modes are restored."""
    trunk = _check_shared_trunk(encoder, n)
    modes = [module.training for module in trunk]
    try:
        with torch.set_grad_enabled(grad):
            for module in trunk:
                module.eval()
            embedded = encoder.embeddings(input_ids=input_ids)  # (B, L, H)
            hidden = packed_layers(encoder.encoder.layer[:n], embedded, attention_mask)
    finally:
        for module, mode in zip(trunk, modes):
            module.train(mode)
    return hidden


class FrozenTrunkCache:
    """The shared frozen layers' output per report, computed the first time the report is met and
    reused in every later epoch (``method.text.cache_frozen``; the frozen layers run without
    dropout, so a report's output never changes while they stay frozen).

    A report is keyed by its token ids and stored without padding. Reports met for the first time
    are computed together, each padded to the multiple of `bucket` tokens above its length with the
    padding masked, so what is stored depends on the report and on how many reports of its padded
    length were new in its batch, not on their content. Where the GEMM kernels do not depend on
    that row count, a resumed run (which meets again, in other batches, the reports met before the
    stop) reads the same bits as an uninterrupted one; where they do (measured on an AVX-512 Xeon:
    4 rows of 48 tokens round otherwise than 1, 8 or 32), its losses match to about 1e-7 after the
    resume and drift apart as any rounding change makes them; with ``cache_frozen`` off the resume
    is bit-exact there too. Memory: the summed report lengths x
    hidden size floats, on the encoder's device, which suits a corpus that fits in memory (the
    demo's 2,592 distinct training reports: 122 MB), not MIMIC-CXR at full scale. The owner clears
    it when new weights are loaded into the encoder (:meth:`watch`).
    """

    def __init__(self, bucket: int = 16) -> None:
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.bucket = bucket
        self._states: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()

    def watch(self, encoder: BertModel) -> None:
        """Clear the cache whenever a state dict is loaded into `encoder` (or a module holding it)."""
        encoder.register_load_state_dict_post_hook(lambda module, keys: self.clear())

    def states(self, encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               n: int) -> torch.Tensor:
        """(B, L, H) output of the embeddings + layers[:n] for each row of `input_ids` (B, L),
        zero at padding; rows not seen before are computed and kept."""
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu()
        keys = [ids[row, :length].numpy().tobytes() for row, length in enumerate(lengths)]
        new = {}
        for row, key in enumerate(keys):
            if key not in self._states:
                new.setdefault(key, row)
        by_padded: dict[int, list[int]] = {}
        for row in new.values():
            padded = -(-lengths[row] // self.bucket) * self.bucket
            by_padded.setdefault(padded, []).append(row)
        pad_id = encoder.config.pad_token_id or 0
        for padded, rows in by_padded.items():
            batch = torch.full((len(rows), padded), pad_id, dtype=input_ids.dtype,
                               device=input_ids.device)
            mask = torch.zeros_like(batch, dtype=attention_mask.dtype)
            for i, row in enumerate(rows):
                batch[i, : lengths[row]] = input_ids[row, : lengths[row]]
                mask[i, : lengths[row]] = 1
            hidden = _trunk_states(encoder, batch, mask, n)
            for i, row in enumerate(rows):
                self._states[keys[row]] = hidden[i, : lengths[row]].clone()
        out = torch.zeros(*input_ids.shape, encoder.config.hidden_size,
                          dtype=encoder.embeddings.word_embeddings.weight.dtype,
                          device=input_ids.device)
        for row, key in enumerate(keys):
            out[row, : lengths[row]] = self._states[key]
        return out


def text_cache(enabled: bool, encoder: BertModel) -> FrozenTrunkCache | None:
    """A :class:`FrozenTrunkCache` that `encoder`'s state-dict loads clear, when `enabled`
    (``method.text.cache_frozen``)."""
    if not enabled:
        return None
    cache = FrozenTrunkCache()
    cache.watch(encoder)
    return cache


def _shared_trunk_states(
    encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, views: int, n: int,
    grad: bool = False, cache: FrozenTrunkCache | None = None,
) -> torch.Tensor:
    """Last hidden states (views * B, L, H): embeddings + layers[:n] once in eval mode, without
    autograd unless `grad` (trainable appended word rows in the batch), read from `cache` when one
    is given and no gradient is needed; layers[n:] on the repeated states, packed
    (:func:`packed_layers`), in the encoder's own mode."""
    if cache is not None and not grad:
        _check_shared_trunk(encoder, n)
        hidden = cache.states(encoder, input_ids, attention_mask, n)
    else:
        hidden = _trunk_states(encoder, input_ids, attention_mask, n, grad)
    return packed_layers(encoder.encoder.layer[n:], hidden.repeat(views, 1, 1),
                         attention_mask.repeat(views, 1))


def check_max_length(max_length: int, text: PreTrainedModel) -> None:
    """A ConfigError when `max_length` (``data.max_length``) tokens reach past the position
    embeddings of the text encoder `text`: the first report that long would stop the run with an
    index error from inside the encoder, hours into it."""
    positions = text.config.max_position_embeddings
    if max_length > positions:
        raise ConfigError(f"data.max_length={max_length} is more tokens than the text encoder's "
                          f"{positions} positions; set data.max_length={positions} or less")
