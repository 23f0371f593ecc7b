"""Bilingual lexicons: the translation an appended second-language term starts from.

The vocabulary stage appends whole second-language terms ('neumon', 'derram') to an English
tokenizer. Their embedding rows must start somewhere: at random (the paper), at the mean of their
English-tokenizer pieces (fast vocabulary transfer), or, with a lexicon, where the English encoder
reads their translation ('neumon' -> 'pneumonia'), as cross-lingual embedding initialisations built
from bilingual dictionaries do (WECHSEL, Minixhofer et al., NAACL 2022). A lexicon is a YAML file::

    source: es          # ISO 639-1 codes
    target: en
    entries:
      neumonía: pneumonia

Words are given in their dictionary form. A term matches an entry when it equals the word or the
word's Snowball stem (PadChest reports are stemmed) after the tokenizer's normaliser (lower case,
accents stripped); where two words share a form, the first entry wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from unimed import yaml_files
from unimed.errors import ConfigError, yaml_problem
from unimed.text.stemming import SNOWBALL_BY_LANGUAGE, stem_word

LEXICON_DIR = Path(__file__).parent / "lexicons"


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Word (source language, dictionary form) -> translation (target language), in file order."""

    source: str
    target: str
    entries: dict[str, str]
    path: str

    def translations(self, terms: Sequence[str], normalize: Callable[[str], str]) -> list[str | None]:
        """The translation of each term (None where no entry matches): a term matches a word
        whose normalised form or normalised Snowball stem it equals."""
        algorithm = SNOWBALL_BY_LANGUAGE.get(self.source)
        forms: dict[str, str] = {}
        for word, translation in self.entries.items():
            forms.setdefault(normalize(word), translation)
            if algorithm is not None:
                forms.setdefault(normalize(stem_word(word.lower(), algorithm)), translation)
        return [forms.get(term) for term in terms]


def load_lexicon(name: str | Path) -> Lexicon:
    """The lexicon in file ``name``, or the packaged one of that name ("es-en")."""
    path = Path(name)
    if not path.is_file():
        path = LEXICON_DIR / f"{name}.yaml"
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in LEXICON_DIR.glob("*.yaml")))
            raise ConfigError(f"mlm.lexicon={str(name)!r} is neither a file nor a packaged lexicon "
                             f"({available})")
    try:
        data = yaml_files.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"lexicon {path} cannot be read: {yaml_problem(exc)}") from None
    if not isinstance(data, dict) or set(data) != {"source", "target", "entries"}:
        raise ConfigError(f"lexicon {path} must be a mapping with exactly the keys source, target, entries")
    entries = data["entries"]
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"lexicon {path}: entries must be a non-empty mapping of word: translation")
    for word, translation in entries.items():
        if not isinstance(word, str) or not isinstance(translation, str) or not translation.strip():
            raise ConfigError(f"lexicon {path}: entry {word!r}: {translation!r} is not word: translation text")
    return Lexicon(str(data["source"]), str(data["target"]), dict(entries), str(path))
