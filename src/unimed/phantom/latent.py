"""Drawing the latent truth of a study: who the patient is, which findings are present, and how the
report will treat each finding (mentioned, hedged, negated)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from unimed.phantom.catalogue import (
    CHEXPERT_OF,
    DEVICES,
    FINDING_NAMES,
    FOREIGN_OBJECTS,
    HEART_INSUFFICIENCY_PARTS,
    INFECTIONS,
    LOBES,
    NEGATABLE,
)
from unimed.phantom.study import Finding

# Studies are grouped in blocks of 6 consecutive indices; each block is split into patients by one
# of these patterns, so patients have 1-3 studies and the id is a pure function of the index.
_BLOCK = 6
_PATTERNS: tuple[tuple[int, ...], ...] = (
    (1, 2, 3),
    (3, 3),
    (2, 2, 2),
    (1, 1, 2, 2),
    (1, 2, 1, 2),
    (3, 1, 2),
)


def seed_sequence(seed: int, dataset: str, *key: int) -> np.random.SeedSequence:
    """A SeedSequence keyed by (seed, dataset, *key); stable across processes (no hash())."""
    return np.random.SeedSequence([seed, zlib.crc32(dataset.encode("utf-8")), *key])


def patient_of(seed: int, dataset: str, index: int) -> tuple[int, int]:
    """(patient number, visit number) of study `index`; patient numbers are unique per dataset."""
    block, offset = divmod(index, _BLOCK)
    rng = np.random.default_rng(seed_sequence(seed, dataset, 1, block))
    pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    start = 0
    for size in pattern:
        if offset < start + size:
            return block * _BLOCK + start, offset - start
        start += size
    raise AssertionError("block patterns must cover every offset")


def resolve_prevalence(prevalence: Mapping[str, float], enrich: Mapping[str, float] | None) -> dict[str, float]:
    """Site prevalence with `enrich` overrides; unknown names or probabilities outside [0, 1] fail."""
    out = dict(prevalence)
    for name, p in (enrich or {}).items():
        if name not in FINDING_NAMES:
            raise ValueError(f"unknown finding '{name}' in enrich; valid findings: {list(FINDING_NAMES)}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"enrich['{name}'] = {p} is not a probability in [0, 1]")
        out[name] = float(p)
    covid, pneumonia = INFECTIONS
    if out[covid] + out[pneumonia] > 1.0:
        enriched = [n for n in INFECTIONS if n in (enrich or {})]
        if len(enriched) != 1:
            raise ValueError("enrich: covid + pneumonia exceed 1; they are mutually exclusive")
        other = pneumonia if enriched[0] == covid else covid
        out[other] = 1.0 - out[enriched[0]]  # the enriched pattern wins; the other shrinks to fit
    return out


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def finding_attrs(name: str, rng: np.random.Generator) -> dict[str, str]:
    """Attributes of one finding, as the report words they become (language packs translate them)."""
    sides, sizes = ("left", "right"), ("small", "moderate", "large")
    zones = ("upper", "middle", "lower")
    severities = ("mild", "moderate", "severe")
    if name == "pleural_effusion":
        return {"side": _pick(rng, sides + ("bilateral",)), "size": _pick(rng, sizes)}
    if name == "pneumothorax":
        return {"side": _pick(rng, sides), "size": _pick(rng, sizes)}
    if name in ("pneumonia", "consolidation"):
        return {"lobe": _pick(rng, list(LOBES))}
    if name == "atelectasis":
        return {"side": _pick(rng, sides), "zone": _pick(rng, ("middle", "lower"))}
    if name in ("cardiomegaly", "edema"):
        return {"severity": _pick(rng, severities)}
    if name == "nodule":
        return {"side": _pick(rng, sides), "zone": _pick(rng, zones), "size_mm": str(int(rng.integers(8, 26)))}
    if name == "mass":
        return {"side": _pick(rng, sides), "zone": _pick(rng, zones), "size_mm": str(int(rng.integers(35, 70)))}
    if name in ("hilar_enlargement",):
        return {"side": _pick(rng, sides + ("bilateral",))}
    if name in ("pleural_thickening", "fracture"):
        extra = {"rib": str(int(rng.integers(4, 10)))} if name == "fracture" else {}
        return {"side": _pick(rng, sides), **extra}
    if name == "support_devices":
        return {"device": _pick(rng, DEVICES)}
    if name == "foreign_object":
        return {"object": _pick(rng, FOREIGN_OBJECTS), "count": str(int(rng.integers(1, 4)))}
    return {}


def sample_findings(rng: np.random.Generator, prevalence: Mapping[str, float], view: str) -> dict[str, dict[str, str]]:
    """Present findings -> attributes, in catalogue order. Portable AP films carry more devices."""
    present: set[str] = set()
    draws = rng.random(len(FINDING_NAMES))
    for name, u in zip(FINDING_NAMES, draws):
        p = prevalence[name] * (1.6 if view == "AP" and name == "support_devices" else 1.0)
        if name not in INFECTIONS and u < min(p, 1.0):
            present.add(name)
    u = rng.random()
    if u < prevalence["covid"]:
        present.add("covid")
    elif u < prevalence["covid"] + prevalence["pneumonia"]:
        present.add("pneumonia")
    if "heart_insufficiency" in present:
        present.update(HEART_INSUFFICIENCY_PARTS)
    return {name: finding_attrs(name, rng) for name in FINDING_NAMES if name in present}


def report_flags(
    rng: np.random.Generator, present: Mapping[str, dict[str, str]], rates: Mapping[str, float],
    negatable: tuple[str, ...] = NEGATABLE,
) -> tuple[list[Finding], tuple[str, ...]]:
    """Decide once, for every language, which findings the reports mention, hedge or negate.

    At least one present finding is always mentioned, so a report never reads normal for an
    abnormal study. Absent findings are negated only when no present finding shares a CheXpert label.
    """
    names = list(present)
    omit = rng.random(len(names)) < rates["omit"]
    hedge = rng.random(len(names)) < rates["hedge"]
    if names and omit.all():
        omit[int(rng.integers(len(names)))] = False
    findings = [
        Finding(name=n, attrs=dict(present[n]), hedged=bool(h and not o), mentioned=bool(not o))
        for n, o, h in zip(names, omit, hedge)
    ]
    taken = {label for n in names for label in CHEXPERT_OF[n]}
    negate_p = rates["negate_normal"] if not names else rates["negate"]
    draws = rng.random(len(negatable))
    negated = tuple(
        n for n, u in zip(negatable, draws)
        if n not in present and not taken & set(CHEXPERT_OF[n]) and u < negate_p
    )
    return findings, negated
