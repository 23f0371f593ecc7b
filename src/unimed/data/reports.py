"""Radiology report text: section extraction, cleaning, sentence splitting and token counting.

MIMIC-style reports are free text with upper-case section headers (``FINDINGS:``, ``IMPRESSION:``),
lines wrapped at ~80 characters and ``___`` de-identification gaps (``XXXX`` in Open-i / IU X-ray).
PadChest reports are already a single short, lower-case, stemmed Spanish paragraph and only need
cleaning.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import spacy
from spacy.language import Language

logger = logging.getLogger(__name__)

TRUNCATION_SAMPLE = 1000
"""Reports of a dataset tokenized to tell how many a token limit cuts (evenly spaced over it)."""
TRUNCATION_WARNING = 0.05
"""The share of a dataset's reports cut by the token limit above which a stage says so."""

# Sections that describe the request rather than the reading; never used as the report text.
PREAMBLE_SECTIONS: frozenset[str] = frozenset(
    {
        "EXAMINATION",
        "EXAM",
        "INDICATION",
        "HISTORY",
        "CLINICAL HISTORY",
        "CLINICAL INFORMATION",
        "REASON FOR EXAMINATION",
        "REASON FOR EXAM",
        "COMPARISON",
        "COMPARISONS",
        "TECHNIQUE",
        "NOTIFICATION",
        "WET READ",
    }
)
# Headers that open a section in MIMIC-CXR reports: the request sections and the reading ones. Any
# other upper-case "WORDS:" at the start of a line is also treated as a header, so an unlisted
# section never leaks into the previous one.
KNOWN_HEADERS: tuple[str, ...] = (
    *sorted(PREAMBLE_SECTIONS),
    "FINDINGS",
    "FINDING",
    "IMPRESSION",
    "IMPRESSIONS",
    "CONCLUSION",
    "RECOMMENDATION",
    "RECOMMENDATIONS",
)

_SECTION_ALIASES = {"FINDING": "FINDINGS", "IMPRESSIONS": "IMPRESSION", "CONCLUSION": "IMPRESSION"}

_KNOWN = "|".join(re.escape(h) for h in sorted(KNOWN_HEADERS, key=len, reverse=True))
_HEADER_RE = re.compile(
    rf"^[ \t]*(?:(?i:(?P<known>{_KNOWN}))|(?P<caps>[A-Z][A-Z /&()-]{{2,40}}?))[ \t]*:", re.MULTILINE
)
# De-identification gaps: runs of underscores (MIMIC's "___") and whole-word runs of three or more
# X (Open-i / IU X-ray's "XXXX", lower-case "xxxx" in lower-cased releases of it).
_DEID_RE = re.compile(r"_{2,}|\b[Xx]{3,}\b")
_SPACE_RE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")
_WORD_RE = re.compile(r"\w+")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
# Banner lines of MIMIC reports ("FINAL REPORT") that are not part of any section.
_BANNER_RE = re.compile(r"^[ \t]*(?:FINAL REPORT|ADDENDUM)[ \t]*$", re.MULTILINE)


def extract_sections(text: str) -> dict[str, str]:
    """Split a report into {HEADER: raw body}; text before the first header is under "PREAMBLE".

    Headers are matched at the start of a line, in any case for the known MIMIC headers and in upper
    case for any other. A repeated header has its bodies joined. Aliases (IMPRESSIONS, CONCLUSION,
    FINDING) map to IMPRESSION / FINDINGS.
    """
    sections: dict[str, str] = {}
    matches = list(_HEADER_RE.finditer(text))
    preamble = text[: matches[0].start()] if matches else text
    if preamble.strip():
        sections["PREAMBLE"] = preamble
    for match, nxt in zip(matches, matches[1:] + [None]):
        name = (match.group("known") or match.group("caps")).upper().strip()
        name = _SECTION_ALIASES.get(name, name)
        body = text[match.end() : nxt.start() if nxt else len(text)]
        sections[name] = f"{sections[name]}\n\n{body}" if name in sections else body
    return sections


def clean_report(text: str, lowercase: bool = False) -> str:
    """Remove de-identification gaps, unwrap lines, collapse whitespace; optionally lower-case.

    Every adapter's report text goes through here, so pre-training, `unimed vocab`, `unimed mlm`
    and evaluation see the same text whichever dataset's gap token a report used.
    """
    text = _DEID_RE.sub(" ", text)
    text = _SPACE_RE.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    return text.lower() if lowercase else text


def mimic_report_text(text: str, lowercase: bool = False) -> str:
    """The text a model sees for a MIMIC-style report: FINDINGS then IMPRESSION, cleaned.

    When neither section exists (a minority of MIMIC-CXR reports, mostly short ones), the last
    paragraph outside the request sections (EXAMINATION, INDICATION, COMPARISON, ...) is used,
    because these reports put the reading last. Returns "" when nothing is left.
    """
    sections = extract_sections(_BANNER_RE.sub("", text))
    parts = [sections[name] for name in ("FINDINGS", "IMPRESSION") if name in sections]
    if not parts:
        parts = _last_reading_paragraph(sections)
    return clean_report(" ".join(parts), lowercase=lowercase)


def _last_reading_paragraph(sections: dict[str, str]) -> list[str]:
    # A request section's first paragraph is its own content; paragraphs after a blank line are
    # free text that merely follows it.
    paragraphs = []
    for name, body in sections.items():
        parts = [p for p in _PARAGRAPH_RE.split(body) if clean_report(p)]
        paragraphs += parts[1:] if name in PREAMBLE_SECTIONS else parts
    return paragraphs[-1:]


def count_tokens(text: str) -> int:
    """Number of word tokens (runs of letters/digits), punctuation not counted.

    A regular expression rather than a spaCy pipeline: the filter runs over hundreds of thousands of
    reports and only needs a language-independent word count.
    """
    return len(_WORD_RE.findall(text))


@functools.lru_cache(maxsize=8)
def _sentencizer(language: str) -> Language:
    nlp = spacy.blank(language)
    nlp.add_pipe("sentencizer")
    return nlp


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Split cleaned report text into sentences with spaCy's rule-based sentencizer."""
    if not text.strip():
        return []
    doc = _sentencizer(language)(text)
    return [s.text.strip() for s in doc.sents if s.text.strip()]


def truncated_share(reports: Sequence[str], tokenizer: Any, max_length: int) -> tuple[float, float, int]:
    """(share of `reports` longer than `max_length` tokens, [CLS] and [SEP] included; their median
    length; how many were tokenized): over at most `TRUNCATION_SAMPLE` of them, evenly spaced."""
    step = max(1, -(-len(reports) // TRUNCATION_SAMPLE))
    sample = [text for text in reports[::step] if text]
    if not sample:
        return 0.0, 0.0, 0
    lengths = np.array([len(ids) for ids in tokenizer(sample, truncation=False, verbose=False)["input_ids"]])
    return float((lengths > max_length).mean()), float(np.median(lengths)), len(sample)


def warn_truncated(reports: Mapping[str, Sequence[str]], tokenizer: Any, max_length: int,
                   setting: str) -> None:
    """A warning per corpus of `reports` (a name -> its reports) of which the token limit
    `setting`=`max_length` cuts more than `TRUNCATION_WARNING`: the tokenizer drops a long report's
    end without a word, and a CT report (a median of about 90 tokens in the phantom's BIMCV layout)
    or a long MIMIC one loses the findings written there."""
    for name, texts in reports.items():
        share, median, measured = truncated_share(texts, tokenizer, max_length)
        if share > TRUNCATION_WARNING:
            logger.warning("%s=%d cuts %.0f %% of %s's reports (of %d measured; their median length %d "
                           "tokens): the words past the limit are not trained on", setting, max_length,
                           100 * share, name, measured, median)
