"""Snowball stemming of report text, word by word, keeping punctuation and spacing."""

from __future__ import annotations

import functools
import re
from typing import Any

import snowballstemmer

_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=8)
def _stemmer(name: str) -> Any:
    return snowballstemmer.stemmer(name)


def stem_text(text: str, algorithm: str) -> str:
    """Stem every word of `text` with the named snowball algorithm, keeping punctuation."""
    stemmer = _stemmer(algorithm)
    return _WORD.sub(lambda m: stemmer.stemWord(m.group()), text)
