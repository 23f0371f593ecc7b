"""Configuration of the cross-lingual vocabulary and MLM stages."""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds, path_option

# How the appended rows start (`mlm.new_rows`) and what the MLM stage trains (`mlm.trainable`).
NEW_ROWS = ("random", "subword_mean", "subword_distilled", "lexicon")
TRAINABLE = ("all", "new_rows")


@dataclasses.dataclass(frozen=True)
class VocabConfig:
    """Cross-lingual vocabulary: base English WordPiece vocabulary + top-M second-language TF-IDF terms.

    ``base_model`` is a local Hugging Face folder whose tokenizer is extended (CXR-BERT in the paper);
    when unset, an English WordPiece vocabulary of ``english_vocab_size`` entries is trained on the
    English reports. ``lowercase`` only applies to that trained vocabulary: a base tokenizer keeps its
    own normalisation, and the new terms are normalised the same way so that they can match.
    """

    base_model: str | None = path_option(None)
    english_vocab_size: int = 4000
    new_terms: int = 500
    language: str = "es"
    lowercase: bool = True
    min_term_length: int = 2

    def __post_init__(self) -> None:
        check_bounds("vocab", self, non_negative=("new_terms",), at_least_one=("min_term_length",))
        if self.english_vocab_size < 5:
            raise ValueError(f"vocab.english_vocab_size must be >= 5 (the special tokens), got "
                             f"{self.english_vocab_size}")


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """Cross-lingual masked language modelling (paper: Adam 5e-4, 10% warm-up, 15 epochs, len 256).

    The model sizes are used only when no base model is given (a fresh BERT). ``lr_schedule`` is a
    name understood by ``transformers.get_scheduler``: "linear" (warm-up then linear decay, as BERT),
    "constant_with_warmup" or "cosine". ``fp16`` autocast is applied on CUDA only. ``max_steps``
    ends training early (the schedule then spans those steps), for CPU presets. ``new_rows`` is how
    the embedding rows of the appended second-language terms start: "random" (normal(0,
    initializer_range), the paper's "M random initialized vectors") or "subword_mean" (the mean of
    the base model's rows of the pieces the base tokenizer cuts the term into, fast vocabulary
    transfer: 'neumotorax' starts near 'ne ##um ##oto ##rax', cognates near their English pieces) or
    "subword_distilled" (from that mean, each row fitted so that the frozen encoder reads the term
    alone as it reads its pieces in order: :func:`unimed.text.mlm.distil_new_rows`) or "lexicon"
    (the same, from the term's translation in the bilingual lexicon ``lexicon``, a packaged name
    such as "es-en" or a YAML file: :mod:`unimed.text.lexicon`; terms it lacks start from their own
    pieces).
    ``trainable`` is what MLM updates: "all" (the paper: every parameter) or "new_rows" (only the
    appended terms' embedding rows and the MLM head; the pre-trained transformer body and every
    base-vocabulary row stay as they are, the lexical transfer of Artetxe et al., ACL 2020, "On the
    cross-lingual transferability of monolingual representations"). "new_rows" needs a base model.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    epochs: int = 15
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 5.0e-4
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.1
    max_length: int = 256
    mask_prob: float = 0.15
    weight_decay: float = 0.0
    adam_eps: float = 1.0e-8
    max_grad_norm: float = 1.0
    fp16: bool = True
    log_every: int = 10
    new_rows: str = "random"
    lexicon: str = path_option("es-en")
    trainable: str = "all"

    def __post_init__(self) -> None:
        check_bounds("mlm", self, at_least_one=("hidden_size", "num_layers", "num_heads",
                                                "intermediate_size", "epochs", "batch_size",
                                                "grad_accum_steps", "max_length", "log_every"),
                     positive=("lr", "adam_eps"), non_negative=("weight_decay", "max_grad_norm"),
                     unit_interval=("warmup_ratio",))
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"mlm.max_steps must be at least 1 (or null), got {self.max_steps}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mlm.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.new_rows not in NEW_ROWS:
            raise ValueError(f"mlm.new_rows must be one of {', '.join(NEW_ROWS)}, got {self.new_rows!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"mlm.trainable must be one of {', '.join(TRAINABLE)}, got "
                             f"{self.trainable!r}")
