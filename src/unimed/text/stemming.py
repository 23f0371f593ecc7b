"""Snowball stemming of report text, and whether a corpus was Snowball-stemmed.

PadChest distributes its Spanish reports Snowball-stemmed ("derram pleural"); BIMCV and translated
Spanish are plain. Zero-shot prompts must read like the reports the model was trained on, so the
vocabulary stage records, per language of its corpus, whether the reports look stemmed
(:func:`detect_stemming`) in ``corpus_stemming.json`` beside the tokenizer, and the evaluation's
default (``eval.prompt_stemming: corpus``) stems the prompts of a language only if its reports were.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import snowballstemmer

_WORD = re.compile(r"\w+")
_LONG_WORD = re.compile(r"[^\W\d_]{5,}")

NO_STEMMING = "none"
STEMMING_FILE = "corpus_stemming.json"
SNOWBALL_BY_LANGUAGE = {
    "ca": "catalan", "da": "danish", "de": "german", "en": "english", "es": "spanish", "fr": "french",
    "it": "italian", "nl": "dutch", "pt": "portuguese", "ro": "romanian", "ru": "russian",
    "sv": "swedish", "tr": "turkish",
}
"""The snowball algorithm of each ISO 639-1 language code it covers."""
STEMMED_SHARE = 0.75
"""A corpus counts as stemmed when at least this share of its words of five or more letters are
left unchanged by the language's stemmer: 0.93 on the phantom's PadChest-style Spanish, 0.08 on its
BIMCV-style narrative Spanish. Plain English keeps many words as they are (pleural, pneumothorax,
clear, right): 0.48 on the phantom's MIMIC-style reports, 0.46 on MIMIC-like sentences written
for the test and 0.52 on a short corpus of them, which 0.5 called stemmed (its English prompts
then stemmed, "effus" where every report says "effusion"); stemmed text re-stemmed keeps 0.88-1.0
(Spanish, English, French, German)."""

MIXED_SHARE = 0.1
"""A corpus is mixed when at least this share of its reports look stemmed and at least this share
look plain, each report judged alone (those with three or more words of five letters or more): 2.9 %
of the phantom's MIMIC-style reports look stemmed alone, 97.2 % of its PadChest-style ones."""
MIN_REPORT_WORDS = 3

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _stemmer(name: str) -> Any:
    return snowballstemmer.stemmer(name)


@functools.lru_cache(maxsize=1 << 16)
def stem_word(word: str, algorithm: str) -> str:
    """`word` stemmed by the named snowball algorithm. Cached: a corpus of reports repeats a few
    thousand words, and the pure-Python stemmers cost tens of microseconds a word."""
    return _stemmer(algorithm).stemWord(word)


def stem_text(text: str, algorithm: str) -> str:
    """Stem every word of `text` with the named snowball algorithm, keeping punctuation."""
    return _WORD.sub(lambda m: stem_word(m.group(), algorithm), text)


def unchanged_words(text: str, algorithm: str) -> tuple[int, int]:
    """(words of five or more letters in `text` that stemming leaves as they are, their count)."""
    words = [word.lower() for word in _LONG_WORD.findall(text)]
    return sum(stem_word(word, algorithm) == word for word in words), len(words)


def detect_stemming(texts: Sequence[str], language: str) -> dict[str, Any]:
    """{"stemming": the snowball algorithm when `texts` look stemmed by it, else "none";
    "unchanged_share", "words" over the whole corpus; "stemmed_reports" of "reports_judged", the
    reports with `MIN_REPORT_WORDS` long words that look stemmed alone} for reports in `language`
    (an ISO 639-1 code)."""
    algorithm = SNOWBALL_BY_LANGUAGE.get(language)
    if algorithm is None:
        return {"stemming": NO_STEMMING, "unchanged_share": None, "words": 0}
    counts = [unchanged_words(text, algorithm) for text in texts]
    words = sum(count for _, count in counts)
    share = sum(unchanged for unchanged, _ in counts) / words if words else 0.0
    judged = [unchanged / count >= STEMMED_SHARE for unchanged, count in counts if count >= MIN_REPORT_WORDS]
    return {"stemming": algorithm if words and share >= STEMMED_SHARE else NO_STEMMING,
            "unchanged_share": round(share, 4), "words": words, "stemmed_reports": sum(judged),
            "reports_judged": len(judged)}


def write_corpus_stemming(folder: str | Path, corpora: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Detect the stemming of each non-empty corpus (language -> reports) and record it in
    `folder`/corpus_stemming.json; returns the record."""
    record = {language: detect_stemming(texts, language) for language, texts in corpora.items() if texts}
    (Path(folder) / STEMMING_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    for language, entry in record.items():
        stemmed, judged = entry.get("stemmed_reports", 0), entry.get("reports_judged", 0)
        if judged and MIXED_SHARE <= stemmed / judged <= 1 - MIXED_SHARE:
            logger.warning("the %s reports mix stemmed (%d of %d judged alone) and plain ones, as PadChest's "
                           "with another dataset's would: recorded as %s (%.2f of their words left "
                           "unchanged by the stemmer), which the %s prompts follow; "
                           "eval.prompt_stemming.%s sets it", language, stemmed, judged,
                           "stemmed" if entry["stemming"] != NO_STEMMING else "plain",
                           entry["unchanged_share"], language, language)
    return record


def read_corpus_stemming(folder: str | Path | None) -> dict[str, str]:
    """Language -> stemming recorded in `folder` by the vocabulary stage ({} when there is none)."""
    path = Path(folder) / STEMMING_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {language: str(entry["stemming"]) for language, entry in record.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a corpus stemming record; delete it or run `unimed vocab` "
                         "again") from None


def copy_corpus_stemming(source: str | Path, target: str | Path) -> None:
    """Carry the record of a tokenizer folder along with a copy of the tokenizer."""
    path = Path(source) / STEMMING_FILE
    if path.is_file():
        shutil.copyfile(path, Path(target) / STEMMING_FILE)
