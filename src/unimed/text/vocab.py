"""Cross-lingual vocabulary: an English WordPiece vocabulary extended with top-M second-language terms.

Med-UniC (section "Cross-lingual Medical LM") tokenises the Spanish PadChest reports with spaCy,
ranks the terms with scikit-learn's TfidfVectorizer and appends the M most important terms that the
English (CXR-BERT) vocabulary lacks, so that a stemmed report such as "derram pleural" tokenises into
whole words instead of English fragments ('der', '##ram', ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import spacy
from sklearn.feature_extraction.text import TfidfVectorizer
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import WordPiece
from tqdm.auto import tqdm
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from unimed.models.text import load_tokenizer
from unimed.text.config import VocabConfig
from unimed.text.corpus import require_texts
from unimed.text.stemming import write_corpus_stemming

logger = logging.getLogger(__name__)

ENGLISH = "en"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class VocabResult:
    """The extended tokenizer and what the extension did.

    ``added_terms`` holds (term, summed TF-IDF score) in rank order; the term with rank i has token id
    ``base_vocab_size + i``. ``tokens_per_word_before`` / ``_after`` map a language code ("en" and the
    second language) to the mean number of WordPiece tokens per alphabetic word of its reports.
    """

    tokenizer: PreTrainedTokenizerBase
    added_terms: list[tuple[str, float]]
    base_vocab_size: int
    vocab_size: int
    tokens_per_word_before: dict[str, float]
    tokens_per_word_after: dict[str, float]


def build_cross_lingual_tokenizer(
    english_reports: Sequence[str],
    second_reports: Sequence[str],
    cfg: VocabConfig,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    progress: bool = True,
) -> VocabResult:
    """Extend an English WordPiece vocabulary with the top ``cfg.new_terms`` second-language terms.

    The English vocabulary is the tokenizer of ``base_model`` (default ``cfg.base_model``), a local
    Hugging Face folder (``english_reports`` may then be empty), or else a WordPiece vocabulary
    trained on ``english_reports``. Writes the tokenizer (``save_pretrained`` plus ``vocab.txt``),
    ``added_terms.txt`` (term<TAB>score), ``vocab_stats.json`` and the corpora's stemming record
    (``corpus_stemming.json``, see :mod:`unimed.text.stemming`) into ``out_dir``.
    """
    base_model = base_model if base_model is not None else cfg.base_model
    english = list(english_reports)
    if base_model is None or english:  # a base tokenizer supplies English: reports then optional
        english = require_texts(english, "english_reports")
    second = require_texts(second_reports, "second_reports")
    base = _load_base(base_model) if base_model is not None else _train_wordpiece(english, cfg)
    base_vocab = _wordpiece_vocab(base, base_model)
    analyzer = SpacyTermAnalyzer(cfg.language, normalizer_of(base), cfg.min_term_length)
    ranked = rank_terms(tqdm(second, desc="tf-idf", disable=not progress), analyzer)
    added = [(term, score) for term, score in ranked if term not in base_vocab][: cfg.new_terms]
    if len(added) < cfg.new_terms:
        logger.warning("only %d new %s terms found (vocab.new_terms=%d)", len(added), cfg.language, cfg.new_terms)
    tokenizer = _extend(base, base_vocab, [term for term, _ in added])
    corpora = {ENGLISH: english, cfg.language: second} if english else {cfg.language: second}
    result = VocabResult(
        tokenizer=tokenizer,
        added_terms=added,
        base_vocab_size=len(base_vocab),
        vocab_size=len(tokenizer),
        tokens_per_word_before={lang: tokens_per_word(base, texts) for lang, texts in corpora.items()},
        tokens_per_word_after={lang: tokens_per_word(tokenizer, texts) for lang, texts in corpora.items()},
    )
    _save(result, Path(out_dir))
    stemming = write_corpus_stemming(out_dir, corpora)
    logger.info("training reports stemmed: %s",
                ", ".join(f"{lang} {entry['stemming']}" for lang, entry in stemming.items()))
    logger.info(
        "vocabulary %d -> %d; %s tokens/word %.2f -> %.2f",
        result.base_vocab_size,
        result.vocab_size,
        cfg.language,
        result.tokens_per_word_before[cfg.language],
        result.tokens_per_word_after[cfg.language],
    )
    return result


class SpacyTermAnalyzer:
    """TfidfVectorizer analyzer: spaCy's rule-based tokenizer, alphabetic tokens only, normalised.

    ``spacy.blank(language)`` gives the language's tokenizer without downloading a pipeline. Tokens are
    normalised with the base tokenizer's own normaliser (lower-casing, accent stripping) so that a
    ranked term is exactly the string WordPiece will see. Punctuation, numbers, dates and mixed
    tokens are dropped by the alphabetic test.
    """

    def __init__(self, language: str, normalize: Callable[[str], str], min_length: int = 2) -> None:
        try:
            self._nlp = spacy.blank(language)
        except (ImportError, KeyError) as exc:
            raise ValueError(f"vocab.language={language!r} is not a language spaCy knows: {exc}") from exc
        self._normalize = normalize
        self._min_length = min_length

    def __call__(self, text: str) -> list[str]:
        terms = (self._normalize(tok.text) for tok in self._nlp.tokenizer(text) if tok.is_alpha)
        return [t for t in terms if len(t) >= self._min_length and t.isalpha()]


def rank_terms(reports: Iterable[str], analyzer: Callable[[str], list[str]]) -> list[tuple[str, float]]:
    """Terms ranked by TF-IDF summed over reports (ties broken alphabetically, so output is stable).

    The sum (rather than the max) over reports rewards terms that matter in many reports, which is
    what a vocabulary should cover; the max would favour one-off words in short reports.
    """
    vectorizer = TfidfVectorizer(analyzer=analyzer)
    try:
        tfidf = vectorizer.fit_transform(reports)  # (R, V), rows l2-normalised
    except ValueError as exc:
        raise ValueError(f"no alphabetic terms in the second-language reports: {exc}") from exc
    scores = tfidf.sum(axis=0).A1  # (V,)
    names = vectorizer.get_feature_names_out()
    return sorted(((str(t), float(s)) for t, s in zip(names, scores)), key=lambda ts: (-ts[1], ts[0]))


def tokens_per_word(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """Mean number of tokens per word, over words (pre-tokenizer pieces) containing a letter."""
    n_words = n_tokens = 0
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        pieces: dict[int, list[str]] = {}
        for word_id, token in zip(enc.word_ids, enc.tokens):
            if word_id is not None:
                pieces.setdefault(word_id, []).append(token)
        for tokens in pieces.values():
            if any(ch.isalpha() for tok in tokens for ch in tok):
                n_words += 1
                n_tokens += len(tokens)
    return n_tokens / n_words if n_words else float("nan")


def _load_base(base_model: str | Path) -> PreTrainedTokenizerBase:
    path = Path(base_model)
    if not path.is_dir():
        raise ValueError(f"base model folder {path} does not exist (vocab.base_model); models are never downloaded")
    return load_tokenizer(path)


def _train_wordpiece(english: list[str], cfg: VocabConfig) -> PreTrainedTokenizerBase:
    """A BERT-style English WordPiece vocabulary trained on the reports (when no base model is given)."""
    trainer = BertWordPieceTokenizer(lowercase=cfg.lowercase)
    # The trainer creates '##c' continuation tokens lazily in hash-map order, and their ids break ties
    # between equally frequent merges, so two runs can learn different vocabularies (huggingface/
    # tokenizers#1794). Declaring every '##c' up front, sorted, fixes their ids and makes training
    # deterministic; they are ordinary vocabulary entries of the final tokenizer.
    chars = sorted({ch for text in english for ch in trainer.normalizer.normalize_str(text) if not ch.isspace()})
    trainer.train_from_iterator(
        english,
        vocab_size=cfg.english_vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{ch}" for ch in chars)],
        show_progress=False,
    )
    return BertTokenizerFast(vocab=trainer.get_vocab(), do_lower_case=cfg.lowercase)


def _wordpiece_vocab(tokenizer: PreTrainedTokenizerBase, source: str | Path | None) -> dict[str, int]:
    """The WordPiece vocabulary (token -> id, ids 0..N-1) of a tokenizer, or a clear error."""
    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.model, WordPiece):
        raise ValueError(f"tokenizer of {source} is {type(backend.model).__name__}, expected a WordPiece (BERT) one")
    vocab = backend.get_vocab(with_added_tokens=False)
    if sorted(vocab.values()) != list(range(len(vocab))) or len(tokenizer) != len(vocab):
        raise ValueError(
            f"tokenizer of {source} has {len(tokenizer)} tokens but a WordPiece vocabulary of {len(vocab)} "
            "with non-contiguous ids; extra added tokens are not supported"
        )
    return vocab


def normalizer_of(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], str]:
    """The tokenizer's own text normaliser (lower-casing, accent stripping for uncased BERT)."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    return normalizer.normalize_str if normalizer is not None else str


def _extend(base: PreTrainedTokenizerBase, vocab: dict[str, int], terms: list[str]) -> BertTokenizerFast:
    """A BERT tokenizer whose WordPiece vocabulary is ``vocab`` followed by ``terms``.

    The terms go into the WordPiece vocabulary itself rather than through ``add_tokens``: added
    tokens are matched as literal strings before WordPiece runs, so 'derram' would also be cut out of
    the middle of other words, and they sit outside the vocabulary file. As vocabulary entries, a term
    is a whole-word token, the greedy longest-match still continues with '##' pieces ('derrame' ->
    'derram', '##e'), and English words already in the vocabulary tokenise exactly as before.
    """
    extended = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    extended.update({term: len(vocab) + i for i, term in enumerate(terms)})
    tokenizer = BertTokenizerFast(
        vocab=extended,
        do_lower_case=getattr(base, "do_lower_case", True),
        strip_accents=getattr(base, "strip_accents", None),
        tokenize_chinese_chars=getattr(base, "tokenize_chinese_chars", True),
        unk_token=base.unk_token,
        sep_token=base.sep_token,
        pad_token=base.pad_token,
        cls_token=base.cls_token,
        mask_token=base.mask_token,
        model_max_length=base.model_max_length,
    )
    _check_same_preprocessing(base, tokenizer)
    return tokenizer


def _check_same_preprocessing(base: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase) -> None:
    """The extended tokenizer must normalise and split text exactly as the base did."""
    for part in ("normalizer", "pre_tokenizer"):
        before = json.loads(base.backend_tokenizer.to_str())[part]
        after = json.loads(new.backend_tokenizer.to_str())[part]
        if before != after:
            raise ValueError(f"base tokenizer {part} {before} is not BERT's; cannot rebuild it as {after}")


def _save(result: VocabResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.tokenizer.save_pretrained(str(out_dir))
    # vocab.txt as well: readers of the classic BERT folder layout (and older transformers) need it.
    vocab = result.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    (out_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)), "utf-8")
    (out_dir / "added_terms.txt").write_text("".join(f"{t}\t{s:.6f}\n" for t, s in result.added_terms), "utf-8")
    stats = {
        "base_vocab_size": result.base_vocab_size,
        "vocab_size": result.vocab_size,
        "added_terms": len(result.added_terms),
        "ranking": "sum over reports of l2-normalised TF-IDF",
        "tokens_per_word_before": result.tokens_per_word_before,
        "tokens_per_word_after": result.tokens_per_word_after,
    }
    (out_dir / "vocab_stats.json").write_text(json.dumps(stats, indent=2) + "\n", "utf-8")
