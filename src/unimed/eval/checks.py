"""The project's quality bar, checked on an evaluation ``metrics.json`` dict.

Also holds the small vocabulary the report shares with the checks (display names of datasets,
languages and metrics, percent formatting, safe nested look-ups), so both say the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from unimed.eval.metrics import paired_difference

MISSING = "–"
DATASET_NAMES = {
    "cxp500": "CXP500", "pdc": "PDC", "chexpert": "CheXpert", "rsna": "RSNA", "covidx": "COVIDx",
    "siim": "SIIM", "object-cxr": "Object-CXR", "mimic-cxr": "MIMIC-CXR", "padchest": "PadChest",
    "cc-ccii": "CC-CCII", "bimcv-covid19": "BIMCV-COVID19+", "luna16": "LUNA16",
    "luna16-candidates": "LUNA16 candidates", "bcv": "BCV",
}
LANGUAGE_NAMES = {"en": "En", "es": "Sp"}
LANGUAGE_WORDS = {"en": "English", "es": "Spanish"}  # the languages in a sentence
METRIC_NAMES = {"auc": "AUC", "accuracy": "ACC", "dice": "Dice", "map": "mAP", "f1": "F1"}
TASK_NAMES = {
    "zero_shot": "Zero-shot", "linear_probe": "Linear probe", "segmentation": "Segmentation",
    "detection": "Detection", "retrieval": "Retrieval", "bias": "Bias audit", "gradcam": "Grad-CAM",
    "volume_probe": "3D linear probe", "volume_retrieval": "3D retrieval",
    "slice_localisation": "Slice localisation", "volume_segmentation": "3D segmentation",
    "slice_selection": "Slice selection", "modality_gap": "2D vs 3D gap",
    "volume_finetune": "3D fine-tuning",
}
ZERO_SHOT_SETS = ("cxp500", "pdc")
CHANCE = {"auc": 0.5}  # value of an uninformative score, for the metrics where it is fixed
FINETUNE_TASKS = ("linear_probe", "segmentation", "detection")
DENSE_TASKS = ("segmentation", "detection")


PASS, FAIL, TIE, NOT_MEASURED = "pass", "fail", "tie", "not measured"
Replicates = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Check:
    """One line of the quality bar.

    ``status`` is PASS, FAIL, TIE (a comparison whose 95 % interval of the paired difference holds
    zero: neither side won) or NOT_MEASURED (a metric or its replicates are missing); ``cause`` is
    a short heuristic reading of the numbers for a failed or tied check, empty otherwise.
    """

    name: str
    status: str
    detail: str
    cause: str = ""


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


def interval(ci: object) -> tuple[float, float] | None:
    """A JSON interval [lo, hi] as two floats, or None when it is missing or malformed."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = as_float(ci[0]), as_float(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def percent_ci(value: object, ci: object = None) -> str:
    """"81.2 (78.0–84.1)": the value and its 95 % interval in percent, or the value alone."""
    bounds = interval(ci)
    if as_float(value) is None or bounds is None:
        return percent(value)
    return f"{percent(value)} ({percent(bounds[0])}–{percent(bounds[1])})"


def ci_of(node: object, metric: str) -> object | None:
    """The interval of ``metric`` in a metrics node: ``node["ci"]`` beside a "value",
    ``node["ci"][metric]`` beside named metrics."""
    ci = lookup(node, "ci")
    return ci if metric == "value" else lookup(ci, metric)


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
    metrics: dict, replicates: Replicates | None = None, *, model: str | None = None,
    baseline: str = "init", random: str = "random", zero_shot_min: float = 0.80,
    dense_baselines: bool = True,
) -> list[Check]:
    """The quality bar: zero-shot AUC, model beats baseline everywhere, lower language-ID probe,
    and (when a `random` encoder was evaluated beside the baseline) the dense tasks telling the
    baseline's image weights from a random image encoder.

    ``model`` and ``baseline`` are keys of ``metrics["encoders"]`` (default model: the method
    ``metrics["method"]`` names, else the first encoder that is no baseline); ``replicates`` are the bootstrap
    replicates keyed "<encoder>/<task>/<path>/<metric>" (bootstrap.npz), from which "beats" checks
    take the paired difference. Every check whose metric is missing is returned NOT_MEASURED
    rather than skipped, so holes stay visible. ``dense_baselines`` False leaves out the checks of
    the baseline against the random encoder (they do not depend on the model).
    """
    encoders = metrics.get("encoders") or {}
    if model is None:
        model = metrics.get("method") or next(
            (name for name in encoders if name not in (baseline, random)), "")
    model_enc, base_enc = encoders.get(model) or {}, encoders.get(baseline) or {}
    labels = (str(model_enc.get("label") or model), str(base_enc.get("label") or baseline))
    model_tasks, base_tasks = model_enc.get("tasks") or {}, base_enc.get("tasks") or {}
    checks = _zero_shot_checks(model_tasks, zero_shot_min)
    pair = _Pair((model, baseline), labels, replicates or {})
    for task in FINETUNE_TASKS:
        checks += _beats_baseline_checks(task, model_tasks, base_tasks, pair)
    checks.append(_language_probe_check(model_tasks, base_tasks, labels))
    checks += _parallel_retrieval_checks(model_tasks, base_tasks, pair)
    checks += _slice_selection_checks(model_tasks)
    checks += _slice_localisation_checks(model_tasks)
    if dense_baselines:
        checks += _dense_baseline_checks(metrics, replicates or {}, baseline, random)
    return checks


def method_label(metrics: dict, method: str) -> str:
    """The label a trained method's checks are named by ("<label>: ..."): its encoder's label in
    `metrics`, else its name."""
    return str(((metrics.get("encoders") or {}).get(method) or {}).get("label") or method)


def tally(checks: Iterable[Check]) -> str:
    """How `checks` came out: "N passed, N failed, N tied (difference within noise), N not
    checked"."""
    statuses = [check.status for check in checks]
    return (f"{statuses.count(PASS)} passed, {statuses.count(FAIL)} failed, {statuses.count(TIE)} "
            f"tied (difference within noise), {statuses.count(NOT_MEASURED)} not checked")


def tally_lines(metrics: dict, checks: list[Check]) -> list[str]:
    """The end of a run's output: "Checks: <tally>" and, with several trained methods, one line
    per method (its checks are named "<label>: ...", :func:`all_quality_checks`) and one for the
    checks that compare the baselines alone."""
    lines = [f"Checks: {tally(checks)}"]
    methods = metrics.get("methods") or []
    if len(methods) < 2:
        return lines
    labels = [method_label(metrics, method) for method in methods]
    width = max(len(label) for label in [*labels, "baselines"])
    for label in labels:
        own = [check for check in checks if check.name.startswith(f"{label}: ")]
        lines.append(f"  {label:<{width}}  {tally(own)}")
    prefixes = tuple(f"{label}: " for label in labels)
    rest = [check for check in checks if not check.name.startswith(prefixes)]
    if rest:
        lines.append(f"  {'baselines':<{width}}  {tally(rest)}")
    return lines


def all_quality_checks(metrics: dict, replicates: Replicates | None = None) -> list[Check]:
    """:func:`quality_checks` for every trained method of the run (``metrics["methods"]``, else
    the one ``metrics["method"]`` names). With several, each check's name starts with the method's
    label and the baseline-against-random checks, which do not depend on the method, come once at
    the end."""
    methods = metrics.get("methods") or [None]
    if len(methods) == 1:
        return quality_checks(metrics, replicates, model=methods[0])
    checks = []
    for method in methods:
        label = method_label(metrics, method)
        checks += [dataclasses.replace(check, name=f"{label}: {check.name}")
                   for check in quality_checks(metrics, replicates, model=method,
                                               dense_baselines=False)]
    return checks + _dense_baseline_checks(metrics, replicates or {}, "init", "random")


def _dense_baseline_checks(metrics: dict, replicates: Replicates, baseline: str,
                           random: str) -> list[Check]:
    """The dense tasks telling the baseline's image weights from a random image encoder (none
    when no random encoder was evaluated beside the baseline)."""
    encoders = metrics.get("encoders") or {}
    base_enc, random_enc = encoders.get(baseline) or {}, encoders.get(random) or {}
    if not random_enc or random == baseline:
        return []
    dense = _Pair((baseline, random), (str(base_enc.get("label") or baseline),
                                       str(random_enc.get("label") or random)), replicates)
    checks = []
    for task in DENSE_TASKS:
        checks += _beats_baseline_checks(task, base_enc.get("tasks") or {},
                                         random_enc.get("tasks") or {}, dense)
    return checks


@dataclass(frozen=True)
class _Pair:
    """The two encoders a "beats" check compares: keys, display labels, shared replicates."""

    keys: tuple[str, str]
    labels: tuple[str, str]
    replicates: Replicates

    def difference(self, *path: str) -> tuple[float, float] | None:
        """95 % interval of model minus baseline at ``path``, None without both replicates."""
        found = [self.replicates.get("/".join((key, *path))) for key in self.keys]
        if any(r is None for r in found) or found[0].shape != found[1].shape:
            return None
        return paired_difference(found[0], found[1])


def compare(difference: tuple[float, float] | None) -> str:
    """PASS when the interval of the paired difference lies above zero, FAIL below, else TIE."""
    if difference is None:
        return NOT_MEASURED
    lo, hi = difference
    return PASS if lo > 0 else FAIL if hi < 0 else TIE


def _zero_shot_checks(tasks: dict, minimum: float) -> list[Check]:
    """One check per zero-shot set and prompt language: macro AUC at least ``minimum``."""
    checks = []
    for name in ordered(ZERO_SHOT_SETS, dict_keys(lookup(tasks, "zero_shot"))):
        for lang in ("en", "es"):
            node = lookup(tasks, "zero_shot", name, lang)
            auc = as_float(lookup(node, "auc"))
            title = (f"Zero-shot {display_name(name)} ({display_name(lang, LANGUAGE_NAMES)}) "
                     f"macro AUC ≥ {percent(minimum)}%")
            if auc is None:
                checks.append(Check(title, NOT_MEASURED, "not evaluated"))
                continue
            status = PASS if auc >= minimum else FAIL
            detail = f"macro AUC {percent_ci(auc, ci_of(node, 'auc'))}%"
            others = {other: lookup(tasks, "zero_shot", name, other) for other in ("en", "es")
                      if other != lang}
            cause = (zero_shot_cause(auc, ci_of(node, "auc"), lookup(tasks, "retrieval"),
                                     weak_classes(lang, node, others, minimum))
                     if status == FAIL else "")
            checks.append(Check(title, status, detail, cause))
    return checks


def class_aucs(node: object) -> dict[str, tuple[float, tuple[float, float] | None]]:
    """Class -> (AUC, its 95 % interval or None) of a zero-shot node's ``per_class``."""
    per_class = lookup(node, "per_class")
    found = {}
    for name, stats in per_class.items() if isinstance(per_class, dict) else ():
        auc = as_float(lookup(stats, "auc"))
        if auc is not None:
            found[str(name)] = (auc, interval(ci_of(stats, "auc")))
    return found


WEAKEST_SHOWN = 2


def weak_classes(lang: str, node: object, others: Mapping[str, object], minimum: float) -> str:
    """Which classes hold a zero-shot cell under the bar, read from its per-class AUCs: those the
    other language's prompts score higher on the same images with the two 95 % intervals apart (this
    language's prompts, or its text side, miss them), then the weakest of the rest under the bar
    (weak whatever the prompt language: the image features or the finding itself). "" when the
    node has no per-class AUCs."""
    mine = class_aucs(node)
    other_aucs = {other: class_aucs(other_node) for other, other_node in others.items()}
    behind = []
    for name, (auc, ci) in mine.items():
        for other, aucs in other_aucs.items():
            theirs = aucs.get(name)
            if ci is not None and theirs is not None and theirs[1] is not None and theirs[1][0] > ci[1]:
                behind.append((name, auc, other, theirs[0]))
                break
    parts = []
    if behind:
        language, other = display_name(lang, LANGUAGE_WORDS), display_name(behind[0][2], LANGUAGE_WORDS)
        named = ", ".join(f"{name} {percent(auc)}" for name, auc, _, _ in behind)
        theirs = ", ".join(percent(auc) for *_, auc in behind)
        verb = "scores" if len(behind) == 1 else "score"
        parts.append(f"with {language} prompts {named} {verb} below the {other} prompts on the same "
                     f"images ({theirs}, intervals apart): the {language} prompts or text side of "
                     "those classes")
    lagging = {name for name, *_ in behind}
    weakest = sorted((auc, name) for name, (auc, _) in mine.items()
                     if auc < minimum and name not in lagging)
    if weakest:
        parts.append(("weakest otherwise: " if behind else "weakest classes: ")
                     + ", ".join(f"{name} {percent(auc)}" for auc, name in weakest[:WEAKEST_SHOWN]))
    return "; ".join(parts)


def zero_shot_cause(auc: float, auc_ci: object, retrieval: object, classes: str = "") -> str:
    """A likely reason for a zero-shot AUC under the bar, read from its interval (`auc_ci`), the
    retrieval diagnostics and, where neither explains it, the per-class reading `classes`
    (:func:`weak_classes`)."""
    within = lookup(retrieval, "pooled", "within_language")
    recall, chance = as_float(lookup(within, "R@1")), as_float(lookup(retrieval, "pooled", "chance", "R@1"))
    bounds = interval(ci_of(within, "R@1"))
    mixed = as_float(lookup(retrieval, "shortcut", "loss_mixed"))
    single = as_float(lookup(retrieval, "shortcut", "loss_single_language"))
    if recall is not None and chance is not None and bounds is not None and bounds[0] <= chance:
        retrieval_text = (f"within-language retrieval R@1 {percent_ci(recall, list(bounds))}% is "
                          f"at chance ({percent(chance)}%)")
        auc_bounds = interval(auc_ci)
        if auc_bounds is not None and auc_bounds[0] > 0.5:
            return (f"the findings are partly learned (the AUC's interval is above 50%) but not "
                    f"the studies: {retrieval_text}; pre-train longer")
        return f"image–text alignment did not learn the findings: {retrieval_text}"
    if mixed is not None and single is not None and single - mixed > 0.1:
        return (f"alignment leans on the language: InfoNCE {mixed:.2f} in mixed-language batches vs "
                f"{single:.2f} in single-language ones (other-language negatives are easy)")
    if auc < 0.6 and recall is None:
        return ("near chance, and within-language retrieval was not measured to tell a model that "
                "learned nothing from prompts that miss the reports' wording: add the retrieval task")
    if auc < 0.6:
        return ("retrieval is above chance but the prompts are not: the short class prompts do "
                "not match how the reports word the findings (check the prompt files)")
    if classes:
        return f"above chance but below the bar; {classes}"
    return "above chance but below the bar: pre-train longer or on more pairs"


def _beats_baseline_checks(task: str, model: dict, base: dict, pair: _Pair) -> list[Check]:
    """One check per dataset and label fraction of ``task``: the model's value above the baseline's,
    by a paired-bootstrap interval of the difference that excludes zero."""
    task_name = display_name(task, TASK_NAMES)
    labels = pair.labels
    checks = []
    for name in dict_keys(lookup(model, task), lookup(base, task)):
        fractions = dict_keys(lookup(model, task, name, "fractions"), lookup(base, task, name, "fractions"))
        metric = lookup(model, task, name, "metric") or lookup(base, task, name, "metric") or ""
        for fraction in sorted(fractions, key=fraction_order):
            rows = [lookup(side, task, name, "fractions", fraction) for side in (model, base)]
            values = [as_float(lookup(row, "value")) for row in rows]
            difference = pair.difference(task, name, "fractions", fraction, "value")
            status = NOT_MEASURED if None in values else compare(difference)
            detail = (f"{labels[0]} {percent_ci(values[0], ci_of(rows[0], 'value'))} vs {labels[1]} "
                      f"{percent_ci(values[1], ci_of(rows[1], 'value'))} "
                      f"({display_name(str(metric), METRIC_NAMES)}, %)")
            detail += _difference_note(difference, values)
            title = f"{task_name} {display_name(name)} {fraction}: {labels[0]} beats {labels[1]}"
            blank = all(as_float(lookup(row, "predicted_empty")) == 1.0 for row in rows)
            more = _learned_with_more_labels(lookup(model, task, name, "fractions"), fraction, str(metric))
            cause = beats_cause(status, values, str(metric), dense=task in DENSE_TASKS, blank=blank,
                                train_images=lookup(rows[0], "train_images"), more_labels=more)
            checks.append(Check(title, status, detail, cause))
    if checks:
        return checks
    return [Check(f"{task_name}: {labels[0]} beats {labels[1]}", NOT_MEASURED, "not evaluated")]


def _learned_with_more_labels(fractions: object, fraction: str, metric: str) -> str:
    """"10% (68 images): 70.2 (65.5–74.7)": the first label fraction above `fraction` whose row
    (of `fractions`, one encoder's) lies above chance beyond its interval, or "" (none, or a metric
    without a fixed chance level)."""
    chance = CHANCE.get(metric)
    if chance is None or not isinstance(fractions, dict):
        return ""
    for larger in sorted(fractions, key=fraction_order):
        row = fractions[larger]
        bounds = interval(ci_of(row, "value"))
        if fraction_order(larger) > fraction_order(fraction) and bounds is not None and bounds[0] > chance:
            images = lookup(row, "train_images")
            count = f" ({images} images)" if images is not None else ""
            return f"{larger}{count}: {percent_ci(as_float(lookup(row, 'value')), list(bounds))}"
    return ""


def beats_cause(status: str, values: list[float | None], metric: str, *, dense: bool = False,
                blank: bool = False, train_images: object = None, more_labels: str = "") -> str:
    """A likely reason for a lost or tied comparison. For a `dense` task the interval covers the
    test images but not the head's own training (its seed moved a detection row by 18 points at
    the demo's 3-epoch heads), which a failed check says. `blank`: both segmentation decoders
    call every test image empty. Two rows near chance read differently when the model's row at a
    larger label fraction is above chance (`more_labels`, :func:`_learned_with_more_labels`): its
    features carry the label, and the `train_images` of this row were too few to learn it from."""
    if status == FAIL and dense:
        return ("the baseline is better beyond test-set noise, but the interval does not cover the "
                "head's training seed: rerun with another eval.seed before reading it as the encoder")
    if status == FAIL:
        return ("the baseline is better beyond noise: the pre-trained features fit this task worse "
                "(check the loss curves and the learning rate)")
    if status != TIE:
        return ""
    if blank:
        return ("both decoders call every test image empty (Dice = the share of empty images): at "
                "this label fraction neither found the finding well enough on validation to predict it")
    chance = CHANCE.get(metric)
    if chance is not None and all(v is not None and abs(v - chance) < 0.05 for v in values):
        if more_labels:
            images = f"{train_images} training images" if train_images is not None else "these labels"
            return (f"both near chance on {images}, too few to learn from; with more labels "
                    f"the model's features carry it ({more_labels})")
        return "both near chance: neither encoder's features carry this label"
    return "difference within noise: enlarge the test set (or pre-train longer)"


def _slice_selection_checks(model: dict) -> list[Check]:
    """Attentive slice selection beats k random slices (UniMedI's claim), per dataset it ran on:
    the 95 % interval of the per-volume gain over the random hit rate, and, where the task
    measured them, of the gains in the share of the selected slices that hold a finding over random
    slices' share and over the position prior's (the hit rate saturates where findings span most
    slices, and central slices beat random ones without looking); none for a model
    without attentive selection (the task skipped it) or when the task did not run."""
    checks = []
    for dataset, result in (lookup(model, "slice_selection") or {}).items():
        if not isinstance(result, dict) or "hit_rate" not in result:
            continue
        title = f"Slice selection {display_name(dataset)}: attentive beats random slices"
        status = compare(interval(lookup(result, "ci", "gain")))
        detail = (f"hit rate {percent_ci(result['hit_rate'], lookup(result, 'ci', 'hit_rate'))}% "
                  f"vs random {percent(result.get('random'))}%, position prior "
                  f"{percent(result.get('prior'))}% (k = {result.get('k')}, "
                  f"{result.get('volumes')} volumes)")
        picks = _picks(result)
        facts = _bracketed(picks, _precision(result))
        cause = {FAIL: "the selected slices miss a volume's findings more often than random ones: "
                       f"the [CLS] attention is not drawn to lesions{facts}; {_prior_note(result)}"
                       f"pre-train longer{SELECTION_DIAGNOSIS}",
                 TIE: f"within noise of random slices{_below(result)}{facts}; {_prior_note(result)}"
                      "more test volumes or more pre-training"
                 }.get(status, "")
        checks.append(Check(title, status, detail, cause))
        shares = (
            _share_check(dataset, result, "precision_gain", "random ones",
                         f"{percent(result.get('random_precision'))}% of random ones",
                         fail=f"the [CLS] attention is drawn to slices without findings{_bracketed(picks)}; "
                              f"pre-train longer{SELECTION_DIAGNOSIS}",
                         tie=f"within noise of random slices{_bracketed(picks)}; more test volumes or more "
                             "pre-training"),
            _share_check(dataset, result, "prior_precision_gain", "the position prior's",
                         f"{percent(result.get('prior_precision'))}% of {_prior_slices(result)}",
                         fail="the attention picks slices that hold findings less often than where "
                              f"findings usually lie{_bracketed(picks)}; pre-train longer"
                              f"{SELECTION_DIAGNOSIS}",
                         tie=f"within noise of the position prior{_bracketed(picks)}: the selection adds "
                             "nothing measurable to where findings usually lie; more test volumes or "
                             "more pre-training"))
        checks += [check for check in shares if check is not None]
    return checks


def _share_check(dataset: str, result: dict, gain_key: str, reference: str, reference_share: str, *,
                 fail: str, tie: str) -> Check | None:
    """"Slice selection <dataset>: attentive slices hold findings more often than `reference`",
    read from the interval of the per-volume difference in the share of slices on a finding at
    ``ci[gain_key]``; None where the task did not measure it (metrics written before it)."""
    gain = interval(lookup(result, "ci", gain_key))
    if gain is None:
        return None
    status = compare(gain)
    return Check(
        f"Slice selection {display_name(dataset)}: attentive slices hold findings more often than "
        f"{reference}",
        status,
        f"{percent_ci(result.get('precision'), lookup(result, 'ci', 'precision'))}% of the selected "
        f"slices on a finding vs {reference_share}; difference {_signed_ci(gain)}",
        {FAIL: fail, TIE: tie}.get(status, ""))


def _slice_localisation_checks(model: dict) -> list[Check]:
    """Per dataset and prompt language where slice localisation measured the position prior: the
    top slices of a finding's prompt hold the finding more often than the k slices at the depths
    where the training volumes most often hold it (the 95 % interval of the per-finding difference
    in precision excludes zero); a prompt score that follows the slices' anatomy can beat k random
    slices without looking at the finding, not the prior."""
    checks = []
    for dataset, result in (lookup(model, "slice_localisation") or {}).items():
        for lang in ordered(LANGUAGE_NAMES, dict_keys(result)):
            node = lookup(result, lang)
            gain = interval(lookup(node, "ci", "prior_precision_gain"))
            if gain is None:  # no prior measured (metrics written before it, no training volumes)
                continue
            status = compare(gain)
            depths = (f"; the top slices sit at mean relative depth {node['depth']:.2f} (0 the lowest "
                      f"slice, 1 the highest), the findings at {result['finding_depth']:.2f}"
                      if as_float(node.get("depth")) is not None
                      and as_float(result.get("finding_depth")) is not None else "")
            checks.append(Check(
                f"Slice localisation {display_name(dataset)} ({display_name(lang, LANGUAGE_NAMES)}): "
                "the prompts' top slices hold the finding more often than the position prior's",
                status,
                f"{percent_ci(node.get('precision'), lookup(node, 'ci', 'precision'))}% of the top "
                f"{result.get('k')} slices on the finding vs {percent(result.get('prior_precision'))}% "
                f"for the prior, {percent(result.get('random_precision'))}% for random slices; "
                f"difference {_signed_ci(gain)} ({result.get('pairs')} findings)",
                {FAIL: f"the prompt scores pick slices by where they lie more than by the finding{depths}",
                 TIE: f"within noise of the position prior{depths}; more test volumes"
                 }.get(status, "")))
    return checks


def _bracketed(*parts: str) -> str:
    """" (a; b)" of the parts that are not empty, or "" when all are."""
    text = "; ".join(part for part in parts if part)
    return f" ({text})" if text else ""


def _below(result: dict) -> str:
    """", below them" when a slice-selection result's hit rate is under the random rate."""
    hit, chance = as_float(result.get("hit_rate")), as_float(result.get("random"))
    return ", below them" if hit is not None and chance is not None and hit < chance else ""


def _precision(result: dict) -> str:
    """"40.0% of its slices hold a finding against 59.1% of random ones" from a slice-selection
    result, or "" when it has no precision."""
    if as_float(result.get("precision")) is None:
        return ""
    return (f"{percent(result['precision'])}% of its slices hold a finding against "
            f"{percent(result.get('random_precision'))}% of random ones")


SELECTION_DIAGNOSIS = (" (benchmarks/slice_attention.py: how flat the attention is, and whether it "
                       "follows the volume or the input position)")


def _prior_note(result: dict) -> str:
    """When the position prior (the training volumes' most frequent finding slices, never looking
    at the volume) hits at least as often as both the selection and random slices, a clause saying
    that the hit rate there tells little; else ""."""
    prior = as_float(result.get("prior"))
    others = [as_float(result.get(key)) for key in ("hit_rate", "random")]
    if prior is None or None in others or prior < max(others):
        return ""
    return (f"{_prior_slices(result)} hit {percent(prior)}% without looking at the volume: where "
            "findings lie varies little here, so the hit rate tells little; ")


def _prior_slices(result: dict) -> str:
    """"the training volumes' most frequent finding slices (7, 8)": a slice-selection result's
    position prior, its slices in brackets where recorded."""
    slices = ", ".join(str(s) for s in result.get("prior_slices") or [])
    return f"the training volumes' most frequent finding slices{f' ({slices})' if slices else ''}"


def _picks(result: dict) -> str:
    """"it picks slice 3 in 90% and 7 in 85% of the volumes (of 32)" from a slice-selection
    result's most selected slices, or "" when it has none."""
    picks = result.get("most_selected") or []
    if not picks:
        return ""
    shares = " and ".join(f"{int(s)} in {percent(share)}%" for s, share in picks)
    return f"it picks slice {shares} of the volumes (of {result.get('slices')})"


def _signed_ci(bounds: tuple[float, float]) -> str:
    return f"95% CI [{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}] points"


def _difference_note(difference: tuple[float, float] | None, values: list[float | None]) -> str:
    """The tail of a comparison's detail: the interval of the paired difference, or why there is
    none although both values exist."""
    if difference is not None:
        return f"; difference {_signed_ci(difference)}"
    return "" if None in values else "; no bootstrap replicates to compare them"


def _language_probe_check(model: dict, base: dict, labels: tuple[str, str]) -> Check:
    """Language-ID probe accuracy on the pooled text embeddings (before projection) lower than the
    baseline's. Equal accuracies are a tie: two languages with disjoint vocabularies are linearly
    separable whatever the encoder, so both probes sit at 100 % and the probe cannot tell them
    apart (the parallel-report checks can)."""
    path = ("bias", "text", "pooled", "language")
    ours, theirs = lookup(model, *path) or {}, lookup(base, *path) or {}
    probe = as_float(lookup(ours, "probe_accuracy")), as_float(lookup(theirs, "probe_accuracy"))
    status = (NOT_MEASURED if None in probe else PASS if probe[0] < probe[1]
              else TIE if probe[0] == probe[1] else FAIL)
    silhouette = as_float(lookup(ours, "silhouette")), as_float(lookup(theirs, "silhouette"))
    detail = (f"probe accuracy {percent(probe[0])}% vs {percent(probe[1])}%; kNN accuracy "
              f"{percent(lookup(ours, 'knn_accuracy'))}% vs {percent(lookup(theirs, 'knn_accuracy'))}%; "
              f"silhouette {_raw(silhouette[0])} vs {_raw(silhouette[1])}")
    cause = {FAIL: "the text embeddings tell the languages apart better than the baseline's: the "
                   "cross-lingual objectives did not remove the community bias",
             TIE: "both probes tell the languages apart equally (at 100 % the probe is saturated: "
                  "disjoint vocabularies are always separable); see the parallel-report checks"
             }.get(status, "")
    return Check(f"Language-ID probe on text embeddings: {labels[0]} below {labels[1]}", status,
                 detail, cause)


def _parallel_retrieval_checks(model: dict, base: dict, pair: _Pair) -> list[Check]:
    """Per query language: a parallel test report's own translation ranked nearer the front among
    the reports of both languages (``translation_rank`` of the pooled text embeddings, lower is
    better) than in the baseline's space, by the paired-bootstrap interval over the queries.
    Unlike the probe it does not saturate, and unlike R@1 it does not sit at 0 for every encoder
    whose neighbourhoods are monolingual: Med-UniC's claim that CTR pulls the languages together
    (Fig. 1 and 4) as a number that can fail."""
    path = ("bias", "parallel", "pooled")
    checks = []
    for lang in ordered(LANGUAGE_NAMES, dict_keys(lookup(model, *path), lookup(base, *path))):
        rows = [lookup(side, *path, lang) for side in (model, base)]
        values = [as_float(lookup(row, "translation_rank")) for row in rows]
        difference = pair.difference(*path, lang, "translation_rank")
        status = NOT_MEASURED if None in values else compare(
            None if difference is None else (-difference[1], -difference[0]))
        detail = (f"translation rank {pair.labels[0]} "
                  f"{percent_ci(values[0], ci_of(rows[0], 'translation_rank'))}% vs {pair.labels[1]} "
                  f"{percent_ci(values[1], ci_of(rows[1], 'translation_rank'))}% of the other "
                  f"reports (lower: nearer the front); R@1 {percent(lookup(rows[0], 'R@1'))}% vs "
                  f"{percent(lookup(rows[1], 'R@1'))}%")
        detail += _difference_note(difference, values)
        cause = {FAIL: "a report's translation is farther away than in the baseline's space: "
                       "pre-training pulled the languages apart (community bias grew)",
                 TIE: "within noise of the baseline: the cross-lingual objectives did not bring "
                      "the languages measurably closer"}.get(status, "")
        title = (f"Parallel reports from {display_name(lang, LANGUAGE_NAMES)}: {pair.labels[0]} ranks "
                 f"translations nearer than {pair.labels[1]} (text embeddings)")
        checks.append(Check(title, status, detail, cause))
    if checks:
        return checks
    return [Check(f"Parallel reports: {pair.labels[0]} ranks translations nearer than "
                  f"{pair.labels[1]} (text embeddings)", NOT_MEASURED, "not evaluated")]


def _raw(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"
