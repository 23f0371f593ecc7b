"""Downstream labels of a study, derived from its latent findings and report decisions."""

from __future__ import annotations

import math

from unimed.data.labels import CHEXPERT_LABELS, COVIDX_CLASSES, PDC_LABELS
from unimed.phantom.catalogue import CHEXPERT_OF, NOT_PATHOLOGY, PADCHEST_NAME, PDC_OF
from unimed.phantom.study import Finding


def chexpert_labels(findings: list[Finding], negated: tuple[str, ...]) -> dict[str, float]:
    """The 14 CheXpert labels as a labeler would read them from the report.

    Positive mention 1.0 beats hedged -1.0, which beats negated 0.0; unmentioned labels are NaN.
    "No Finding" is 1.0 only when no pathology is present (support devices do not count).
    """
    out = {name: math.nan for name in CHEXPERT_LABELS}
    for name in negated:
        for label in CHEXPERT_OF[name]:
            out[label] = 0.0
    for f in findings:
        if not f.mentioned:
            continue
        for label in CHEXPERT_OF[f.name]:
            if f.hedged:
                out[label] = 1.0 if out[label] == 1.0 else -1.0
            else:
                out[label] = 1.0
    if not any(f.name not in NOT_PATHOLOGY for f in findings):
        out["No Finding"] = 1.0
    return out


def pdc_labels(findings: list[Finding]) -> dict[str, int]:
    """Ground-truth 0/1 for the ten PDC classes (physician labels: independent of the report)."""
    present = {f.name for f in findings}
    return {name: int(bool(present & set(PDC_OF[name]))) for name in PDC_LABELS}


def covid_class(findings: list[Finding]) -> str:
    """COVIDx class: COVID-19, pneumonia, or normal for everything else."""
    present = {f.name for f in findings}
    if "covid" in present:
        return COVIDX_CLASSES[2]
    return COVIDX_CLASSES[1] if "pneumonia" in present else COVIDX_CLASSES[0]


def padchest_labels(findings: list[Finding]) -> list[str]:
    """PadChest `Labels` names of the findings the report mentions; ["normal"] for a normal study."""
    names = [PADCHEST_NAME[f.name] for f in findings if f.mentioned]
    return names or ["normal"]
