"""The project's quality bar, checked on an evaluation ``metrics.json`` dict.

Also holds the small vocabulary the report shares with the checks (display names of datasets,
languages and metrics, percent formatting, safe nested look-ups), so both say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

MISSING = "–"
DATASET_NAMES = {
    "cxp500": "CXP500", "pdc": "PDC", "chexpert": "CheXpert", "rsna": "RSNA", "covidx": "COVIDx",
    "siim": "SIIM", "object-cxr": "Object-CXR", "mimic-cxr": "MIMIC-CXR", "padchest": "PadChest",
}
LANGUAGE_NAMES = {"en": "En", "es": "Sp"}
METRIC_NAMES = {"auc": "AUC", "accuracy": "ACC", "dice": "Dice", "map": "mAP", "f1": "F1"}
TASK_NAMES = {
    "zero_shot": "Zero-shot", "linear_probe": "Linear probe", "segmentation": "Segmentation",
    "detection": "Detection", "retrieval": "Retrieval", "bias": "Bias audit", "gradcam": "Grad-CAM",
}
ZERO_SHOT_SETS = ("cxp500", "pdc")
FINETUNE_TASKS = ("linear_probe", "segmentation", "detection")


@dataclass(frozen=True)
class Check:
    """One line of the quality bar; ``passed`` is None when the metric needed is missing."""

    name: str
    passed: bool | None
    detail: str


def lookup(tree: object, *keys: str) -> object | None:
    """``tree[k1][k2]...``, or None as soon as a level is missing or not a dict."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def as_float(value: object) -> float | None:
    """The value as a finite float, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def percent(value: object) -> str:
    """A fraction as a percentage with one decimal like the paper (0.8123 -> "81.2"), or "–"."""
    number = as_float(value)
    return MISSING if number is None else f"{100 * number:.1f}"


def display_name(key: str, names: dict[str, str] = DATASET_NAMES) -> str:
    """The paper's spelling of a dataset (or language/metric with ``names``); unknown keys unchanged."""
    return names.get(key, key)


def ordered(preferred: Iterable[str], found: Iterable[str]) -> list[str]:
    """Keys of ``found`` in the ``preferred`` order first, then the others in the order seen."""
    found = list(dict.fromkeys(found))
    first = [key for key in preferred if key in found]
    return first + [key for key in found if key not in first]


def dict_keys(*trees: object) -> list[str]:
    """Union of the keys of those of ``trees`` that are dicts, in the order seen."""
    return list(dict.fromkeys(key for tree in trees if isinstance(tree, dict) for key in tree))


def fraction_order(fraction: str) -> float:
    """Sort key of "1%" / "10%" / "100%" labels; unparsable labels go last."""
    try:
        return float(fraction.rstrip("%"))
    except ValueError:
        return math.inf


def quality_checks(
    metrics: dict, *, model: str = "medunic", baseline: str = "init", zero_shot_min: float = 0.80
) -> list[Check]:
    """The quality bar: zero-shot AUC, model beats baseline everywhere, lower language-ID probe.

    ``model`` and ``baseline`` are keys of ``metrics["encoders"]``; every check whose metric is
    missing is returned with ``passed=None`` rather than skipped, so holes stay visible.
    """
    encoders = metrics.get("encoders") or {}
    model_enc, base_enc = encoders.get(model) or {}, encoders.get(baseline) or {}
    labels = (str(model_enc.get("label") or model), str(base_enc.get("label") or baseline))
    model_tasks, base_tasks = model_enc.get("tasks") or {}, base_enc.get("tasks") or {}
    checks = _zero_shot_checks(model_tasks, zero_shot_min)
    for task in FINETUNE_TASKS:
        checks += _beats_baseline_checks(task, model_tasks, base_tasks, labels)
    checks.append(_language_probe_check(model_tasks, base_tasks, labels))
    return checks


def _zero_shot_checks(tasks: dict, minimum: float) -> list[Check]:
    """One check per zero-shot set and prompt language: macro AUC at least ``minimum``."""
    checks = []
    for name in ordered(ZERO_SHOT_SETS, dict_keys(lookup(tasks, "zero_shot"))):
        for lang in ("en", "es"):
            auc = as_float(lookup(tasks, "zero_shot", name, lang, "auc"))
            title = (f"Zero-shot {display_name(name)} ({display_name(lang, LANGUAGE_NAMES)}) "
                     f"macro AUC ≥ {percent(minimum)}%")
            if auc is None:
                checks.append(Check(title, None, "not evaluated"))
            else:
                checks.append(Check(title, auc >= minimum, f"macro AUC {percent(auc)}%"))
    return checks


def _beats_baseline_checks(
    task: str, model: dict, base: dict, labels: tuple[str, str]
) -> list[Check]:
    """One check per dataset and label fraction of ``task``: the model's value above the baseline's."""
    task_name = display_name(task, TASK_NAMES)
    checks = []
    for name in dict_keys(lookup(model, task), lookup(base, task)):
        fractions = dict_keys(lookup(model, task, name, "fractions"), lookup(base, task, name, "fractions"))
        metric = lookup(model, task, name, "metric") or lookup(base, task, name, "metric") or ""
        for fraction in sorted(fractions, key=fraction_order):
            ours = as_float(lookup(model, task, name, "fractions", fraction, "value"))
            theirs = as_float(lookup(base, task, name, "fractions", fraction, "value"))
            passed = None if ours is None or theirs is None else ours > theirs
            detail = (f"{labels[0]} {percent(ours)} vs {labels[1]} {percent(theirs)} "
                      f"({display_name(str(metric), METRIC_NAMES)}, %)")
            title = f"{task_name} {display_name(name)} {fraction}: {labels[0]} beats {labels[1]}"
            checks.append(Check(title, passed, detail))
    return checks or [Check(f"{task_name}: {labels[0]} beats {labels[1]}", None, "not evaluated")]


def _language_probe_check(model: dict, base: dict, labels: tuple[str, str]) -> Check:
    """Language-ID probe accuracy on the text [CLS] embeddings lower than the baseline's."""
    path = ("bias", "text", "cls", "language")
    ours, theirs = lookup(model, *path) or {}, lookup(base, *path) or {}
    probe = as_float(lookup(ours, "probe_accuracy")), as_float(lookup(theirs, "probe_accuracy"))
    passed = None if None in probe else probe[0] < probe[1]
    silhouette = as_float(lookup(ours, "silhouette")), as_float(lookup(theirs, "silhouette"))
    detail = (f"probe accuracy {percent(probe[0])}% vs {percent(probe[1])}%; kNN accuracy "
              f"{percent(lookup(ours, 'knn_accuracy'))}% vs {percent(lookup(theirs, 'knn_accuracy'))}%; "
              f"silhouette {_raw(silhouette[0])} vs {_raw(silhouette[1])}")
    return Check(f"Language-ID probe on text embeddings: {labels[0]} below {labels[1]}", passed, detail)


def _raw(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"
