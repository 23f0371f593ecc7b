"""Zero-shot prompts per language: class names and templates are data (`<language>.yaml`), not code.

A prompt file holds the positive and negative templates, the class phrases keyed by the lower-cased
class name the datasets use, and whether prompts are lower-cased. Stemming is not the prompt file's
choice but the training corpus's: by default (`eval.prompt_stemming: corpus`) the prompts of a
language are Snowball-stemmed exactly when the vocabulary stage found that language's training
reports stemmed (PadChest) rather than plain (BIMCV-style Spanish), as recorded beside the tokenizer
(:mod:`unimed.text.stemming`); `eval.prompt_stemming.<language>` set to "none" or an algorithm
overrides it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from unimed import yaml_files
from unimed.errors import yaml_problem
from unimed.eval.config import CORPUS_STEMMING, FALLBACK_STEMMING, PROMPT_STEMMING
from unimed.eval.errors import EvalError
from unimed.text.stemming import NO_STEMMING, read_corpus_stemming, stem_text

log = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).parent
_KEYS = ("language", "positive", "negative", "classes")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The prompts of one language; class lookups ignore case."""

    language: str
    positive_template: str
    negative_template: str
    classes: dict[str, str]
    stemmer: str | None = None
    lowercase: bool = False
    source: str = ""
    observed_template: str = "{disease}"

    def phrase(self, class_name: str) -> str:
        """How this language says `class_name`: the prompt file's phrase, else the class name as
        written (a user's own label column), with a warning naming the file."""
        phrase = self.classes.get(class_name.lower())
        if phrase is None:
            _warn_unknown_class(self.language, class_name, self.source)
            return class_name
        return phrase

    def display(self, class_name: str, negative: bool = False) -> str:
        """The prompt as a person reads it (not preprocessed)."""
        template = self.negative_template if negative else self.positive_template
        return template.format(disease=self.phrase(class_name))

    def prepare(self, text: str) -> str:
        """`text` preprocessed like this language's training reports."""
        text = text.lower() if self.lowercase else text
        return stem_text(text, self.stemmer) if self.stemmer else text

    def positive(self, class_name: str) -> str:
        """The positive prompt of `class_name`, ready for the tokenizer."""
        return self.prepare(self.display(class_name))

    def observed(self, class_name: str) -> str:
        """PRIOR's one-sentence prompt of `class_name` ("{disease} is observed"), ready for the
        tokenizer."""
        return self.prepare(self.observed_template.format(disease=self.phrase(class_name)))

    def negative(self, class_name: str) -> str:
        """The negative prompt of `class_name`, ready for the tokenizer."""
        return self.prepare(self.display(class_name, negative=True))


def _check_template(path: Path, key: str, template: Any) -> None:
    """A prompt template is a string holding ``{disease}`` and no other field (a literal brace is
    written twice, as str.format reads it)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(str(template)) if name is not None}
    except ValueError as exc:
        raise EvalError(f"prompt file {path}: '{key}' is not a template ({exc}); write a literal brace "
                        "twice") from None
    if not isinstance(template, str) or fields != {"disease"}:
        raise EvalError(f"prompt file {path}: '{key}' must be a text holding {{disease}} and no other "
                        f"{{field}}, got {template!r}")


@functools.lru_cache(maxsize=None)
def _warn_unknown_class(language: str, class_name: str, source: str) -> None:
    log.warning("no %s phrase for class '%s' in %s: prompting with the class name as written "
                "(add it to a prompt file in eval.zero_shot.prompt_dir to translate it)",
                language, class_name, source)


def corpus_stemming(tokenizer: Any) -> dict[str, str]:
    """Language -> stemming of the training reports, as recorded in the folder `tokenizer` was
    loaded from ({} for a tokenizer without a record)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    return read_corpus_stemming(folder) if str(folder) and folder.is_dir() else {}


def resolve_stemming(language: str, stemming: Mapping[str, str], corpus: Mapping[str, str]) -> str:
    """The algorithm (or "none") for the prompts of `language`: `stemming[language]` unless it is
    "corpus" (or not listed), then the corpus record, then FALLBACK_STEMMING."""
    algorithm = stemming.get(language, CORPUS_STEMMING)
    if algorithm != CORPUS_STEMMING:
        return algorithm
    return corpus.get(language) or FALLBACK_STEMMING.get(language, NO_STEMMING)


def load_prompts(language: str, prompt_dir: str | Path = "",
                 stemming: Mapping[str, str] = PROMPT_STEMMING,
                 corpus: Mapping[str, str] | None = None) -> PromptSet:
    """The prompts of `language` from `<prompt_dir>/<language>.yaml` (default: the packaged ones),
    stemmed as :func:`resolve_stemming` says for `stemming` (`eval.prompt_stemming`) and the
    training corpus's record `corpus` (:func:`corpus_stemming` of the encoder's tokenizer)."""
    folder = Path(prompt_dir) if prompt_dir else PROMPT_DIR
    path = folder / f"{language}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise EvalError(f"no prompt file {path}; languages with prompts there: {known}")
    try:
        data: Any = yaml_files.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvalError(f"prompt file {path}: not valid YAML, {yaml_problem(exc)}") from None
    missing = [k for k in _KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise EvalError(f"prompt file {path}: missing key(s) {missing}")
    if "stemmer" in data:
        raise EvalError(f"prompt file {path}: 'stemmer' is not read from prompt files; prompts are "
                         f"stemmed like the training reports, set eval.prompt_stemming.{language}")
    algorithm = resolve_stemming(language, stemming, corpus or {})
    for key in ("positive", "negative", "observed"):
        if key in data:
            _check_template(path, key, data[key])
    classes = data["classes"]
    if not isinstance(classes, dict):
        raise EvalError(f"prompt file {path}: 'classes' maps each class name to its phrase "
                        f"('pleural effusion: derrame pleural'), got a {type(classes).__name__}")
    blank = [str(k) for k, v in classes.items() if not isinstance(v, str) or not v.strip()]
    if blank:
        raise EvalError(f"prompt file {path}: class(es) {blank} have no phrase (a non-empty string)")
    return PromptSet(
        language=str(data["language"]),
        positive_template=str(data["positive"]),
        negative_template=str(data["negative"]),
        classes={str(k).lower(): v for k, v in classes.items()},
        stemmer=None if algorithm == NO_STEMMING else algorithm,
        lowercase=bool(data.get("lowercase", False)),
        source=str(path),
        observed_template=str(data.get("observed", "{disease}")),
    )
