"""Reports from language packs: one YAML per language (`lang/<code>.yaml`), no code per language.

A pack gives, per finding, noun phrases with attribute slots, positive and negative sentences, hedge
templates, normal-study sentences, a document template and an optional snowball stemmer. Every
language renders the same latent findings with the same mention / hedge / negation decisions, so the
reports agree with each other and with the labels.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import snowballstemmer

from unimed.errors import ConfigError
from unimed.phantom.catalogue import FINDING_NAMES, NEGATABLE
from unimed.phantom.sites import load_yaml, require
from unimed.phantom.study import Finding
from unimed.text.stemming import stem_text

LANG_DIR = Path(__file__).with_name("lang")
_RATES = ("omit", "hedge", "negate", "negate_normal")


@dataclasses.dataclass(frozen=True)
class LanguagePack:
    """One language's report grammar, as read from `<lang_dir>/<code>.yaml`."""

    code: str
    path: Path
    stemmer: str | None
    lowercase: bool
    rates: dict[str, float]
    template: str
    slots: dict[str, Any]
    sex: dict[str, str]
    normal: list[str]
    impression_normal: list[str]
    hedges: list[str]
    attrs: dict[str, dict[str, str]]
    findings: dict[str, dict[str, Any]]


def _check_findings(
    findings: Any, where: str, names: tuple[str, ...], negatable: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    if not isinstance(findings, dict):
        raise ConfigError(f"{where}: 'findings' must be a mapping")
    for name in names:
        entry = require(findings, name, f"{where}: findings")
        for key in ("noun", "positive") + (("negative",) if name in negatable else ()):
            phrases = require(entry, key, f"{where}: findings.{name}")
            if not isinstance(phrases, list) or not phrases:
                raise ConfigError(f"{where}: findings.{name}.{key} must be a non-empty list")
    return findings


@functools.lru_cache(maxsize=16)
def load_pack(
    code: str, lang_dir: Path = LANG_DIR, names: tuple[str, ...] = FINDING_NAMES,
    negatable: tuple[str, ...] = NEGATABLE,
) -> LanguagePack:
    """Read and validate `<lang_dir>/<code>.yaml`; errors name the file and the missing key.

    `names` are the findings the pack must phrase (the 3D world's packs phrase the CT findings
    only), `negatable` those it must also be able to state as absent."""
    path = Path(lang_dir) / f"{code}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(lang_dir).glob("*.yaml"))
        raise ConfigError(f"no language pack '{code}' in {lang_dir}; available: {available}")
    data = load_yaml(path)
    where = str(path)
    rates = require(data, "rates", where)
    for key in _RATES:
        require(rates, key, f"{where}: rates")
    stemmer = data.get("stemmer")
    if stemmer is not None and stemmer not in snowballstemmer.algorithms():
        raise ConfigError(f"{where}: unknown stemmer '{stemmer}'; valid: {snowballstemmer.algorithms()}")
    return LanguagePack(
        code=code,
        path=path,
        stemmer=stemmer,
        lowercase=bool(data.get("lowercase", False)),
        rates={k: float(rates[k]) for k in _RATES},
        template=str(require(data, "template", where)),
        slots=dict(data.get("slots") or {}),
        sex=dict(data.get("sex") or {}),
        normal=list(require(data, "normal", where)),
        impression_normal=list(require(data, "impression_normal", where)),
        hedges=list(require(data, "hedges", where)),
        attrs=dict(data.get("attrs") or {}),
        findings=_check_findings(require(data, "findings", where), where, names, negatable),
    )


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _fill(pack: LanguagePack, name: str, phrase: str, attrs: dict[str, str], **extra: str) -> str:
    local = pack.findings[name].get("attrs") or {}
    values = {
        key: (local.get(key) or {}).get(value) or (pack.attrs.get(key) or {}).get(value) or value
        for key, value in attrs.items()
    }
    try:
        return phrase.format(**values, **extra)
    except KeyError as exc:
        raise ConfigError(f"{pack.path}: findings.{name}: slot {exc} is not an attribute of '{name}' "
                         f"(attributes: {sorted(attrs)})") from None


def _sentence(pack: LanguagePack, text: str) -> str:
    text = " ".join(text.split())
    text = text.lower() if pack.lowercase else text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _statement(pack: LanguagePack, finding: Finding, rng: np.random.Generator) -> str:
    entry = pack.findings[finding.name]
    noun = _fill(pack, finding.name, _pick(rng, entry["noun"]), finding.attrs)
    if finding.hedged:
        return _sentence(pack, _pick(rng, pack.hedges).format(noun=noun))
    return _sentence(pack, _fill(pack, finding.name, _pick(rng, entry["positive"]), finding.attrs, noun=noun))


def _slot(pack: LanguagePack, key: str, view: str, sex: str, rng: np.random.Generator) -> str:
    options = pack.slots.get(key) or [""]
    if isinstance(options, dict):
        options = options.get(view) or [""]
    return _pick(rng, options).format(sex=pack.sex.get(sex, sex))


def render_report(
    pack: LanguagePack, findings: list[Finding], negated: tuple[str, ...], *, view: str, sex: str, seed: int
) -> str:
    """The un-stemmed report of one study in `pack`'s language (stemming is `stem_text`'s job)."""
    rng = np.random.default_rng([seed, zlib.crc32(pack.code.encode("utf-8"))])
    positives = [_statement(pack, f, rng) for f in findings if f.mentioned]
    negatives = [_sentence(pack, _pick(rng, pack.findings[n]["negative"])) for n in negated]
    normal = [_sentence(pack, _pick(rng, pack.normal))] if not findings else []
    impression = positives[:3] or [_sentence(pack, _pick(rng, pack.impression_normal))]
    text = pack.template.format(
        findings=" ".join(positives + negatives + normal),
        impression=" ".join(impression),
        examination=_slot(pack, "examination", view, sex, rng),
        indication=_slot(pack, "indication", view, sex, rng),
        comparison=_slot(pack, "comparison", view, sex, rng),
    )
    return text.lower() if pack.lowercase else text


def render_reports(
    codes: tuple[str, ...], findings: list[Finding], negated: tuple[str, ...], *, view: str, sex: str,
    seed: int, lang_dir: Path = LANG_DIR, names: tuple[str, ...] = FINDING_NAMES,
    negatable: tuple[str, ...] = NEGATABLE,
) -> dict[str, str]:
    """Reports keyed by language code; a pack with a stemmer also gives `<code>_plain` (un-stemmed)."""
    out = {}
    for code in codes:
        pack = load_pack(code, Path(lang_dir), names, negatable)
        text = render_report(pack, findings, negated, view=view, sex=sex, seed=seed)
        if pack.stemmer:
            out[code] = stem_text(text, pack.stemmer)
            out[f"{code}_plain"] = text
        else:
            out[code] = text
    return out
