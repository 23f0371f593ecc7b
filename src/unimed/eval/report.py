"""Evaluation report: the paper's tables (Med-UniC Tables 1–4, UniMedI's 3D tables) from a
``metrics.json`` dict.

:func:`format_tables` lays the numbers out as plain-string tables, which the CLI prints in the
terminal and :func:`unimed.eval.html_report.write_report` renders into one self-contained HTML file,
so the two never disagree. Every part of the metrics may be missing: holes
are shown as "–" and empty tables are left out. A value with a bootstrap interval is shown with it,
"81.2 (78.0–84.1)".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from unimed.eval.checks import (
    LANGUAGE_NAMES,
    METRIC_NAMES,
    MISSING,
    TASK_NAMES,
    ZERO_SHOT_SETS,
    as_float,
    ci_of,
    dict_keys,
    display_name,
    fraction_order,
    interval,
    lookup,
    ordered,
    percent,
    percent_ci,
)
from unimed.errors import ConfigError
from unimed.eval.config import VOLUME_TASK_NAMES

Table = tuple[str, list[str], list[list[str]]]
Row = tuple[list[str], object]  # (label cells, the object the column getters read)
Column = tuple[str, Callable[[object], str]]

SEP = " / "  # "group / sub-column" in a header: one header row in the terminal, two in HTML
TITLE_ZERO_SHOT = "Table 1: Zero-shot classification (AUC and F1, %)"
TITLE_PER_CLASS = "Zero-shot classification per class (AUC and F1, %)"
TITLE_LINEAR = "Table 2: Linear classification (%)"
TITLE_SEG_DET = "Table 3: Semantic segmentation (Dice) and object detection (mAP), %"
TITLE_I2R = "Retrieval: image → report (%)"
TITLE_R2I = "Retrieval: report → image (%)"
TITLE_CROSS = "Retrieval: cross-lingual report → report (%)"
TITLE_POOLED = "Retrieval: image → report on the pooled test sets, whole gallery vs own language (%)"
TITLE_SHORTCUT = "Language-shortcut diagnostic on the pre-training pairs"
TITLE_BIAS = "Community bias: how separable languages and sites are (%, silhouette and ratio raw)"
TITLE_BIAS_CONTROL = ("Community bias where it can fail: parallel-report retrieval and language inside "
                      "the control community (%, ratio raw)")
TITLE_ABLATION = "Ablation: the rows of the method's paper table (%, mean over seeds)"
TITLE_ORDERINGS = "Ablation orderings: difference of seed means with its Welch 95 % interval (points)"
TITLE_VOLUME_PROBE = ("UniMedI Table 2: 3D linear classification, linear probe on frozen slice-wise "
                      "features (%)")
TITLE_VOLUME_FINETUNE = "UniMedI Table 3: 3D fine-tuning (%)"
TITLE_VOLUME_SEGMENTATION = ("UniMedI Table 6: 3D semantic segmentation, UNETR decoder on the frozen "
                             "encoder's 3D maps (Dice, %)")
TITLE_VOLUME_ORGANS = "3D semantic segmentation: Dice per organ (%)"
TITLE_VOLUME_NOT_RUN = "UniMedI's 3D tables: tasks not run"
TITLE_VOLUME_RETRIEVAL = "3D: volume ↔ report retrieval (%)"
TITLE_LOCALISATION = ("3D: slice localisation, share of findings that the top-k slices hit and "
                      "share of those slices on the finding (%, random: k slices drawn at random; "
                      "prior: the k slices at the depths where training volumes hold the finding)")
TITLE_SELECTION = "Attentive slice selection vs random (hit rate, %)"
TITLE_MODALITY_GAP = "2D vs 3D embeddings (UniMedI Fig. 2)"
TITLE_TIMINGS = "Timings (seconds)"
TITLE_SPLITS = "Evaluation sets: published split files (image ids) and their SHA-256"
BOLD_BEST = {TITLE_ZERO_SHOT, TITLE_LINEAR, TITLE_SEG_DET, TITLE_I2R, TITLE_R2I, TITLE_CROSS,
             TITLE_POOLED, TITLE_ABLATION, TITLE_VOLUME_PROBE, TITLE_VOLUME_RETRIEVAL,
             TITLE_VOLUME_SEGMENTATION, TITLE_VOLUME_FINETUNE}

LINEAR_SETS = ("chexpert", "rsna", "covidx")
RETRIEVAL_SETS = ("mimic-cxr", "padchest")
RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "P@1", "P@5", "P@10")
VOLUME_PROBE_SETS = ("cc-ccii", "luna16-candidates", "luna16")
VOLUME_NOT_RUN = (
    ("Table 3", "3D fine-tuning of the whole encoder, 100 % of the labels",
     "CC-CCII (ACC), LUNA16 (AUC)", "not run: add volume_finetune to the tasks", "volume_finetune"),
    ("Table 6", "3D semantic segmentation (UNETR), 20 / 40 / 100 % of the labels", "BCV (Dice)",
     "not run: add volume_segmentation to the tasks", "volume_segmentation"),
    ("Fig. 2", "t-SNE of X-ray and CT embeddings of the same findings",
     "MIMIC-CXR, PadChest + BIMCV-COVID19+", "not run: add modality_gap to the tasks", "modality_gap"),
    ("Fig. 5", "attentive slice selection (the slices it picks hold the finding?)", "BIMCV-COVID19+",
     "not run: add slice_selection to the tasks", "slice_selection"),
)
"""The UniMedI paper's 3D tables: (table, task, datasets, why not run, the unimed task that fills
it in, or None). A table is listed here, never filled in, unless its task ran; a task that ran but
skipped every encoder (slice selection on 2D encoders only) is listed with the reason."""
FINETUNE_TRAINED = {
    "all": "the whole image encoder + a linear head (trainable=all, the paper's)",
    "last": "the encoder's last feature level + a linear head, the rest frozen (trainable=last)",
}
BIAS_SPACES = (("text", "pooled"), ("text", "projected"), ("image", "pooled"), ("image", "projected"))
BIAS_METRICS = (("probe_accuracy", "probe"), ("knn_accuracy", "kNN"), ("silhouette", "silhouette"),
                ("distance_ratio", "ratio"))
RAW_BIAS_METRICS = ("silhouette", "distance_ratio")
FIGURE_CAPTIONS = {"tsne_text": "t-SNE of text embeddings", "tsne_image": "t-SNE of image embeddings",
                   "gradcam": "Grad-CAM",
                   "modality_tsne": "t-SNE of X-ray (circles) and CT (triangles) embeddings, colour: finding"}
POOLED_GROUPS = {"all_languages": "Whole gallery", "within_language": "Own language",
                 "chance": "Chance (own language)"}
SHORTCUT_COLUMNS = (("loss_mixed", "InfoNCE / mixed batches"),
                    ("loss_single_language", "InfoNCE / single-language batches"),
                    ("chance_loss", "InfoNCE / chance (ln B)"))
TOP1_COLUMNS = (("right_study", "Top-1 report (%) / right study"),
                ("right_language_wrong_study", "Top-1 report (%) / right language, wrong study"),
                ("wrong_language", "Top-1 report (%) / wrong language"))


def read_metrics(path: Path) -> dict:
    """The metrics object an evaluation saved at `path` (its ``metrics.json``); a ConfigError
    naming the file when it is not one (truncated, not JSON, not an object)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} cannot be read ({exc})") from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path} holds a JSON {type(metrics).__name__}, not an evaluation's metrics "
                          "(an object)")
    return metrics


def methods(metrics: dict) -> list[tuple[str, dict]]:
    """(label, encoder entry) of every encoder, in the order of the metrics."""
    encoders = metrics.get("encoders") or {}
    return [(str(entry.get("label") or key), entry) for key, entry in encoders.items()
            if isinstance(entry, dict)]


def _task_rows(metrics: dict) -> list[Row]:
    """One row per encoder, whose getters read the encoder's ``tasks`` dict."""
    return [([label], entry.get("tasks") or {}) for label, entry in methods(metrics)]


def _keys(rows: list[Row], *path: str) -> list[str]:
    """Union over the rows of the keys found at ``path``."""
    return dict_keys(*(lookup(data, *path) for _, data in rows))


def _metric_keys(rows: list[Row], *path: str) -> list[str]:
    """`_keys` without the "ci" entry that holds the intervals of the metrics beside it."""
    return [key for key in _keys(rows, *path) if key != "ci"]


def _number(value: object, digits: int = 2) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _table(title: str, first: list[str], rows: list[Row], columns: list[Column]) -> Table | None:
    """Generic builder: label cells then one cell per column; None when no cell holds a value."""
    body = [labels + [get(data) for _, get in columns] for labels, data in rows]
    if not columns or all(cell == MISSING for row in body for cell in row[len(first):]):
        return None
    return title, first + [header for header, _ in columns], body


def _with_ci(path: tuple[str, ...], data: object) -> str:
    """The percentage at ``path`` with the interval stored beside it, when there is one."""
    return percent_ci(lookup(data, *path), ci_of(lookup(data, *path[:-1]), path[-1]))


def _value(path: tuple[str, ...], data: object, fmt: Callable[[object], str] = percent) -> str:
    return _with_ci(path, data) if fmt is percent else fmt(lookup(data, *path))


def _column(header: str, *path: str, fmt: Callable[[object], str] = percent) -> Column:
    """A column reading ``path``; percentages come with their interval when it is stored."""
    return header, partial(_value, path, fmt=fmt)


def _zero_shot_columns(rows: list[Row], metrics: Iterable[str], by_metric: bool) -> list[Column]:
    """Columns per set × prompt language × metric; grouped by set+language (Table 1) or by metric."""
    columns = []
    for name in ordered(ZERO_SHOT_SETS, _keys(rows, "zero_shot")):
        for lang in ordered(LANGUAGE_NAMES, _keys(rows, "zero_shot", name)):
            for metric in metrics:
                set_name, lang_name = display_name(name), display_name(lang, LANGUAGE_NAMES)
                header = (f"{set_name} ({METRIC_NAMES[metric]}){SEP}{lang_name}" if by_metric
                          else f"{set_name} ({lang_name}){SEP}{METRIC_NAMES[metric]}")
                columns.append(_column(header, "zero_shot", name, lang, metric))
    return columns


def _fraction_columns(rows: list[Row], task: str, datasets: Iterable[str], extras: bool = True
                      ) -> list[Column]:
    """Columns per dataset × label fraction of a fine-tuning task, e.g. "RSNA (AUC) / 10%"."""
    found = _keys(rows, task)
    names = ordered(datasets, found) if extras else [name for name in datasets if name in found]
    columns = []
    for name in names:
        metric = next((m for _, d in rows if (m := lookup(d, task, name, "metric"))), "")
        group = display_name(name) + (f" ({display_name(str(metric), METRIC_NAMES)})" if metric else "")
        for fraction in sorted(_keys(rows, task, name, "fractions"), key=fraction_order):
            columns.append(_column(f"{group}{SEP}{fraction}", task, name, "fractions", fraction, "value"))
    return columns


def _zero_shot_table(metrics: dict) -> Table | None:
    rows = _task_rows(metrics)
    return _table(TITLE_ZERO_SHOT, ["Method"], rows, _zero_shot_columns(rows, ("auc", "f1"), False))


def _per_class_table(metrics: dict) -> Table | None:
    """Rows per set × language × class, one AUC and one F1 column per encoder."""
    methods = _task_rows(metrics)
    rows: list[Row] = []
    for name in ordered(ZERO_SHOT_SETS, _keys(methods, "zero_shot")):
        for lang in ordered(LANGUAGE_NAMES, _keys(methods, "zero_shot", name)):
            for cls in _keys(methods, "zero_shot", name, lang, "per_class"):
                labels = [display_name(name), display_name(lang, LANGUAGE_NAMES), cls]
                rows.append((labels, ("zero_shot", name, lang, "per_class", cls)))
    columns = [(f"{label[0]}{SEP}{METRIC_NAMES[metric]}", partial(_per_class_cell, tasks, metric))
               for label, tasks in methods for metric in ("auc", "f1")]
    return _table(TITLE_PER_CLASS, ["Set", "Prompts", "Class"], rows, columns)


def _per_class_cell(tasks: object, metric: str, path: object) -> str:
    return _with_ci((*path, metric), tasks)


def _linear_table(metrics: dict) -> Table | None:
    rows = _task_rows(metrics)
    return _table(TITLE_LINEAR, ["Method"], rows, _fraction_columns(rows, "linear_probe", LINEAR_SETS))


def _seg_det_table(metrics: dict) -> Table | None:
    rows = _task_rows(metrics)
    columns = (_fraction_columns(rows, "segmentation", ("siim", "rsna"))
               + _fraction_columns(rows, "detection", ("rsna", "object-cxr")))
    return _table(TITLE_SEG_DET, ["Method"], rows, columns)


def _volume_probe_table(metrics: dict) -> Table | None:
    """UniMedI Table 2's layout: one row per encoder, a column group per dataset (CC-CCII accuracy,
    LUNA16 AUC, then any other probed set), a column per label fraction."""
    rows = _task_rows(metrics)
    return _table(TITLE_VOLUME_PROBE, ["Method"], rows,
                  _fraction_columns(rows, "volume_probe", VOLUME_PROBE_SETS))


def _volume_finetune_table(metrics: dict) -> Table | None:
    """UniMedI Table 3's layout: one row per encoder, CC-CCII accuracy and LUNA16 AUC (then any
    other fine-tuned set) per label fraction, and the accuracy of a binary set beside its AUC."""
    rows = _task_rows(metrics)
    columns = []
    for name in ordered(VOLUME_PROBE_SETS, _keys(rows, "volume_finetune")):
        columns += _fraction_columns(rows, "volume_finetune", (name,), extras=False)
        path = ("volume_finetune", name, "fractions")
        columns += [(f"{display_name(name)} (ACC){SEP}{fraction}",
                     partial(_accuracy_cell, (*path, fraction)))
                    for fraction in sorted(_keys(rows, *path), key=fraction_order)
                    if any(lookup(d, *path, fraction, "accuracy") is not None for _, d in rows)]
    return _table(TITLE_VOLUME_FINETUNE, ["Method"], rows, columns)


def _accuracy_cell(path: tuple[str, ...], data: object) -> str:
    """The "accuracy" of the row at ``path`` with its "accuracy_ci"."""
    return percent_ci(lookup(data, *path, "accuracy"), lookup(data, *path, "accuracy_ci"))


def _volume_segmentation_table(metrics: dict) -> Table | None:
    """UniMedI Table 6's layout: one row per encoder, mean Dice over organs at 20 / 40 / 100 %."""
    rows = _task_rows(metrics)
    return _table(TITLE_VOLUME_SEGMENTATION, ["Method"], rows,
                  _fraction_columns(rows, "volume_segmentation", ("bcv",)))


def _volume_organs_table(metrics: dict) -> Table | None:
    """One row per encoder x dataset x label fraction, a column per organ."""
    rows: list[Row] = []
    for labels, tasks in _task_rows(metrics):
        for name in _keys([([], tasks)], "volume_segmentation"):
            for fraction in sorted(_keys([([], tasks)], "volume_segmentation", name, "fractions"),
                                   key=fraction_order):
                row = lookup(tasks, "volume_segmentation", name, "fractions", fraction) or {}
                rows.append(([*labels, display_name(name), fraction], row))
    organs = list(dict.fromkeys(organ for _, row in rows for organ in dict_keys(row.get("per_organ"))))
    columns = [(organ.replace("_", " "), partial(_organ_cell, organ)) for organ in organs]
    return _table(TITLE_VOLUME_ORGANS, ["Method", "Set", "Labels"], rows, columns)


def _organ_cell(organ: str, row: object) -> str:
    return percent_ci(lookup(row, "per_organ", organ), lookup(row, "per_organ_ci", organ))


def _volume_not_run_table(metrics: dict) -> Table | None:
    """Beside the 3D results, the paper's 3D tables whose task did not run here, and why."""
    rows = _task_rows(metrics)
    if not any(_keys(rows, task) for task in VOLUME_TASK_NAMES):
        return None
    body = []
    for table, task, datasets, status, ours in VOLUME_NOT_RUN:
        if ours is not None and _ran_rows(rows, ours):
            continue
        if ours is not None and _keys(rows, ours):  # ran, but skipped for every encoder
            status = f"ran, not applicable to any encoder here ({_first_found(rows, ours, 'skipped')})"
        body.append([table, task, datasets, status])
    return (TITLE_VOLUME_NOT_RUN, ["UniMedI", "Task", "Datasets", "Status"], body) if body else None


def _ran(tasks: object, task: str) -> bool:
    """Whether `task` ran for an encoder and was not skipped as not applicable to it."""
    result = lookup(tasks, task)
    return isinstance(result, dict) and "skipped" not in result


def _ran_rows(rows: list[Row], task: str) -> list[Row]:
    """The rows (encoders) for which `task` ran and was not skipped."""
    return [row for row in rows if _ran(row[1], task)]


def _selection_table(metrics: dict) -> Table | None:
    """Per encoder with attentive slice selection and per dataset: its k, the hit rate of its k
    slices, that of k random slices and the gain over them, that of the position prior (the k
    slices most often on a finding in training) and the gain over it (points), the share of its
    slices on a finding beside random's and the prior's and the gains over them, and per finding
    both hit rates."""
    rows = _ran_rows(_task_rows(metrics), "slice_selection")
    columns = []
    for name in _keys(rows, "slice_selection"):
        slices = _first_found(rows, "slice_selection", name, "slices")
        group = f"{display_name(name)} ({slices} slices)"
        path = ("slice_selection", name)
        columns += [_column(f"{group}{SEP}k", *path, "k", fmt=partial(_number, digits=0)),
                    _column(f"{group}{SEP}attentive", *path, "hit_rate"),
                    _column(f"{group}{SEP}random", *path, "random", fmt=percent),
                    _column(f"{group}{SEP}gain (points)", *path, "gain"),
                    _column(f"{group}{SEP}position prior", *path, "prior", fmt=percent),
                    _column(f"{group}{SEP}gain over prior (points)", *path, "prior_gain"),
                    _column(f"{group}{SEP}slices on a finding: attentive", *path, "precision"),
                    _column(f"{group}{SEP}slices on a finding: random", *path, "random_precision",
                            fmt=percent),
                    _column(f"{group}{SEP}slices on a finding: gain (points)", *path,
                            "precision_gain"),
                    _column(f"{group}{SEP}slices on a finding: position prior", *path, "prior_precision",
                            fmt=percent),
                    _column(f"{group}{SEP}slices on a finding: gain over prior (points)", *path,
                            "prior_precision_gain")]
        columns += [(f"{group}{SEP}{finding.replace('_', ' ')} (attentive / random)",
                     partial(_selection_cell, (*path, "per_finding", finding)))
                    for finding in _keys(rows, *path, "per_finding")]
    return _table(TITLE_SELECTION, ["Method"], rows, columns)


def _selection_cell(path: tuple[str, ...], tasks: object) -> str:
    """"66.7 / 25.0": one finding's hit rate of the attentive and of the random selection."""
    node = lookup(tasks, *path)
    if node is None:
        return MISSING
    return f"{percent(lookup(node, 'hit_rate'))} / {percent(lookup(node, 'random'))}"


def _modality_gap_table(metrics: dict) -> Table | None:
    """Per encoder: the X-ray/CT gap (raw, lower is a more shared space) beside its chance level,
    the cross-modal nearest-class-centroid accuracy both ways beside chance, and the gap per finding."""
    rows = _ran_rows(_task_rows(metrics), "modality_gap")
    path = ("modality_gap",)
    columns = [("Gap" + SEP + "X-ray vs CT", partial(_raw_ci, (*path, "gap"))),
               _column("Gap" + SEP + "chance", *path, "chance_gap", fmt=_number),
               _column("Nearest class centroid (%)" + SEP + "CT → X-ray", *path, "ct_to_xray"),
               _column("Nearest class centroid (%)" + SEP + "X-ray → CT", *path, "xray_to_ct"),
               _column("Nearest class centroid (%)" + SEP + "chance", *path, "chance_accuracy", fmt=percent)]
    columns += [_column(f"Gap per finding{SEP}{finding}", *path, "per_finding", finding, fmt=_number)
                for finding in _keys(rows, *path, "per_finding")]
    return _table(TITLE_MODALITY_GAP, ["Method"], rows, columns)


def _raw_ci(path: tuple[str, ...], data: object) -> str:
    """"1.23 (1.10–1.41)": the raw value at ``path`` with the interval stored beside it, if any."""
    bounds = interval(ci_of(lookup(data, *path[:-1]), path[-1]))
    value = _number(lookup(data, *path))
    return value if bounds is None or value == MISSING else f"{value} ({bounds[0]:.2f}–{bounds[1]:.2f})"


def _volume_retrieval_table(metrics: dict) -> Table | None:
    """Recall@K per 3D dataset, volume -> report then report -> volume."""
    rows = _task_rows(metrics)
    columns = []
    for name in _keys(rows, "volume_retrieval"):
        for direction, arrow in (("volume_to_report", "volume → report"),
                                 ("report_to_volume", "report → volume")):
            for metric in ordered(RETRIEVAL_METRICS,
                                  _metric_keys(rows, "volume_retrieval", name, direction)):
                columns.append(_column(f"{display_name(name)} {arrow}{SEP}{metric}",
                                       "volume_retrieval", name, direction, metric))
    return _table(TITLE_VOLUME_RETRIEVAL, ["Method"], rows, columns)


def _localisation_table(metrics: dict) -> Table | None:
    """Hit rate and precision per 3D dataset and prompt language, the random selection's and the
    position prior's beside each (a metric no encoder has, as in metrics written before precision
    or the prior, gets no columns)."""
    rows = _task_rows(metrics)
    columns = []
    for name in _keys(rows, "slice_localisation"):
        k = _first_found(rows, "slice_localisation", name, "k")
        group = f"{display_name(name)} (top {k})"
        for metric, label in (("hit_rate", "hit"), ("precision", "precision")):
            languages = [key for key in _keys(rows, "slice_localisation", name)
                         if any(lookup(d, "slice_localisation", name, key, metric) is not None
                                for _, d in rows)]
            for language in ordered(LANGUAGE_NAMES, languages):
                columns.append(_column(f"{group}{SEP}{label}, {display_name(language, LANGUAGE_NAMES)}",
                                       "slice_localisation", name, language, metric))
            if not languages:
                continue
            for reference in ("random", "prior"):
                key = reference if metric == "hit_rate" else f"{reference}_precision"
                if _first_found(rows, "slice_localisation", name, key) is not None:
                    columns.append(_column(f"{group}{SEP}{label}, {reference}", "slice_localisation",
                                           name, key))
    return _table(TITLE_LOCALISATION, ["Method"], rows, columns)


def _retrieval_table(metrics: dict, direction: str, title: str) -> Table | None:
    """Recall/Precision@K per dataset (or per language pair for the cross-lingual direction)."""
    rows = _task_rows(metrics)
    columns = []
    for name in ordered(RETRIEVAL_SETS, _keys(rows, "retrieval", direction)):
        group = (" → ".join(display_name(lang, LANGUAGE_NAMES) for lang in name.split("_to_"))
                 if "_to_" in name else display_name(name))
        for metric in ordered(RETRIEVAL_METRICS, _metric_keys(rows, "retrieval", direction, name)):
            columns.append(_column(f"{group}{SEP}{metric}", "retrieval", direction, name, metric))
    return _table(title, ["Method"], rows, columns)


def _pooled_table(metrics: dict) -> Table | None:
    """Recall@K over the pooled test gallery and over the image's own language, beside chance."""
    rows = _task_rows(metrics)
    columns = [_column(f"{POOLED_GROUPS[group]}{SEP}{metric}", "retrieval", "pooled", group, metric)
               for group in POOLED_GROUPS
               for metric in ordered(RETRIEVAL_METRICS, _metric_keys(rows, "retrieval", "pooled", group))]
    return _table(TITLE_POOLED, ["Method"], rows, columns)


def _shortcut_table(metrics: dict) -> Table | None:
    """InfoNCE in mixed vs single-language batches and where the top-1 report lands."""
    rows = _task_rows(metrics)
    path = ("retrieval", "shortcut")
    columns = [_column(header, *path, key, fmt=_number) for key, header in SHORTCUT_COLUMNS]
    columns += [_column(header, *path, "top1", key) for key, header in TOP1_COLUMNS]
    return _table(TITLE_SHORTCUT, ["Method"], rows, columns)


def _bias_table(metrics: dict) -> Table | None:
    """One row per encoder × embedding space; language and site separability columns."""
    rows: list[Row] = []
    for label, entry in methods(metrics):
        bias = lookup(entry, "tasks", "bias") or {}
        found = [(m, v) for m in dict_keys(bias) for v in dict_keys(bias.get(m))]
        for modality, variant in ordered(BIAS_SPACES, found):
            space = lookup(bias, modality, variant)
            if modality in ("text", "image") and isinstance(space, dict) and any(
                    isinstance(v, dict) for v in space.values()):
                rows.append(([label, f"{modality.title()} ({variant})"], space))
    columns = [_column(f"{attribute.title()}{SEP}{name}", attribute, key,
                       fmt=_number if key in RAW_BIAS_METRICS else percent)
               for attribute in ("language", "site") for key, name in BIAS_METRICS]
    return _table(TITLE_BIAS, ["Method", "Space"], rows, columns)


def _bias_control_table(metrics: dict) -> Table | None:
    """One row per encoder × space: parallel-report R@1, other-language top-1 and translation rank
    (text spaces), language probe and distance ratio inside the control community, seen and unseen
    in pre-training."""
    rows: list[Row] = []
    for label, entry in methods(metrics):
        bias = lookup(entry, "tasks", "bias") or {}
        for modality, variant in BIAS_SPACES:
            data = {"parallel": lookup(bias, "parallel", variant) if modality == "text" else None,
                    **{subset: lookup(bias, "control", subset, modality, variant, "language")
                       for subset in ("seen", "unseen")}}
            if any(isinstance(v, dict) for v in data.values()):
                rows.append(([label, f"{modality.title()} ({variant})"], data))
    columns = [_column(f"Parallel reports{SEP}{name} {lang.upper()}", "parallel", lang, key)
               for key, name in (("R@1", "R@1"), ("cross_top1", "other-language top-1"),
                                 ("translation_rank", "translation rank"))
               for lang in ("en", "es")]
    columns += [_column(f"Control, {subset}{SEP}language {name}", subset, key,
                        fmt=_number if key in RAW_BIAS_METRICS else percent)
                for subset in ("seen", "unseen")
                for key, name in (("probe_accuracy", "probe"), ("distance_ratio", "ratio"))]
    return _table(TITLE_BIAS_CONTROL, ["Method", "Space"], rows, columns)


def _ablation_table(metrics: dict) -> Table | None:
    """The method's paper ablation (Med-UniC Table 4, PRIOR's stages): a checkmark per switch
    (objective, stage, MLM), then COVIDx, RSNA, SIIM per fraction and zero-shot F1."""
    entries = [row for row in lookup(metrics, "ablation", "rows") or [] if isinstance(row, dict)]
    switches = list(dict.fromkeys(key for row in entries for key in row.get("objectives") or {}))
    rows: list[Row] = [([str(row.get("name", ""))] + [
        "✓" if lookup(row, "objectives", key) else "" for key in switches], row.get("metrics") or {})
        for row in entries]
    columns = (_fraction_columns(rows, "linear_probe", ("covidx", "rsna"), extras=False)
               + _fraction_columns(rows, "segmentation", ("siim",), extras=False)
               + _zero_shot_columns(rows, ("f1",), True))
    return _table(TITLE_ABLATION, ["Variant", *(key.upper() for key in switches)], rows, columns)


def _orderings_table(metrics: dict) -> Table | None:
    """One row per claimed ordering and headline metric: difference, interval, verdict."""
    entries = [o for o in lookup(metrics, "ablation", "orderings") or [] if isinstance(o, dict)]
    if not entries:
        return None
    body = [[f"{o.get('better')} > {o.get('worse')}", str(o.get("metric", "")),
             percent(o.get("difference")), " – ".join(percent(v) for v in o.get("ci") or []),
             str(o.get("verdict", ""))] for o in entries]
    return TITLE_ORDERINGS, ["Ordering", "Metric", "Difference", "95 % interval", "Verdict"], body


def _splits_table(metrics: dict) -> Table | None:
    """One row per evaluated dataset split: images, split file and its hash."""
    splits = metrics.get("splits")
    if not isinstance(splits, dict) or not splits:
        return None
    rows = [[name, str(lookup(entry, "images") or MISSING), str(lookup(entry, "file") or MISSING),
             str(lookup(entry, "sha256") or MISSING)] for name, entry in splits.items()]
    return TITLE_SPLITS, ["Set", "Images", "File", "SHA-256"], rows


def _timings_table(metrics: dict) -> Table | None:
    rows: list[Row] = [([label], entry.get("seconds") or {}) for label, entry in methods(metrics)]
    tasks = ordered(TASK_NAMES, _keys(rows))
    columns = [_column(display_name(task, TASK_NAMES), task, fmt=partial(_number, digits=1))
               for task in tasks]
    if columns:
        columns.append(("Total", _total_seconds))
    return _table(TITLE_TIMINGS, ["Method"], rows, columns)


def _total_seconds(seconds: object) -> str:
    values = [as_float(v) for v in seconds.values()] if isinstance(seconds, dict) else []
    return _number(sum(v for v in values if v is not None), 1)


TABLE_BUILDERS: tuple[Callable[[dict], Table | None], ...] = (
    _zero_shot_table, _per_class_table, _linear_table, _seg_det_table,
    partial(_retrieval_table, direction="image_to_report", title=TITLE_I2R),
    partial(_retrieval_table, direction="report_to_image", title=TITLE_R2I),
    partial(_retrieval_table, direction="cross_lingual", title=TITLE_CROSS),
    _pooled_table, _shortcut_table, _bias_table, _bias_control_table, _volume_probe_table,
    _volume_finetune_table, _volume_segmentation_table, _volume_organs_table,
    _volume_retrieval_table, _localisation_table, _selection_table, _modality_gap_table,
    _volume_not_run_table, _ablation_table,
    _orderings_table, _timings_table, _splits_table,
)


def format_tables(metrics: dict) -> list[Table]:
    """The report's tables as (title, header, rows) of plain strings; tables without data left out.

    Numbers are percentages with one decimal like the paper ("81.2"), holes are "–", and a header
    "group / column" (see :data:`SEP`) is drawn as a two-level header in HTML.
    """
    return [table for build in TABLE_BUILDERS if (table := build(metrics)) is not None]


def table_notes(metrics: dict) -> dict[str, str]:
    """Small print under some tables: training-set sizes per fraction, retrieval queries, samples."""
    methods = _task_rows(metrics)
    notes = {TITLE_LINEAR: _train_note(methods, ("linear_probe",)),
             TITLE_SEG_DET: _train_note(methods, ("segmentation", "detection")),
             TITLE_VOLUME_PROBE: _train_note(methods, ("volume_probe",), "volumes",
                                             VOLUME_PROBE_SETS),
             TITLE_VOLUME_FINETUNE: _finetune_note(methods),
             TITLE_VOLUME_SEGMENTATION: _train_note(methods, ("volume_segmentation",), "volumes"),
             TITLE_VOLUME_RETRIEVAL: _count_note(methods, "volume_retrieval", "queries", "Queries"),
             TITLE_LOCALISATION: _count_note(methods, "slice_localisation", "pairs", "Findings"),
             TITLE_SELECTION: _selection_note(methods),
             TITLE_MODALITY_GAP: _modality_gap_note(methods)}
    queries = _first_found(methods, "retrieval", "queries")
    if isinstance(queries, dict) and queries:
        notes[TITLE_I2R] = "Queries: " + ", ".join(f"{display_name(k)} {v}" for k, v in queries.items())
    samples = _first_found(methods, "bias", "samples")
    if isinstance(samples, dict) and samples:
        notes[TITLE_BIAS] = "Samples: " + ", ".join(
            f"{display_name(k, LANGUAGE_NAMES)} {v}" for k, v in samples.items())
    return {title: note for title, note in notes.items() if note}


def _first_found(rows: list[Row], *path: str) -> object | None:
    """The value at ``path`` of the first row that has one."""
    return next((v for _, data in rows if (v := lookup(data, *path)) is not None), None)


def _fraction_count(methods: list[Row], task: str, dataset: str, fraction: str) -> str | None:
    """"1% 16": a label fraction's training images ("1% 16 (mean of 5 draws)" when its row averages
    several subsets), or None when no encoder has the count."""
    count = _first_found(methods, task, dataset, "fractions", fraction, "train_images")
    if count is None:
        return None
    draws = _first_found(methods, task, dataset, "fractions", fraction, "draws")
    return f"{fraction} {count}" + (f" (mean of {draws} draws)" if draws else "")


def _count_note(methods: list[Row], task: str, key: str, label: str) -> str:
    """"Queries: BIMCV-COVID19+ 14": the count `key` of each dataset of `task`."""
    counts = [f"{display_name(name)} {count}" for name in _keys(methods, task)
              if (count := _first_found(methods, task, name, key)) is not None]
    return f"{label}: " + ", ".join(counts) if counts else ""


def _finetune_note(methods: list[Row]) -> str:
    """Training volumes per fraction and what was trained (eval.volume_finetune.trainable)."""
    note = _train_note(methods, ("volume_finetune",), "volumes", VOLUME_PROBE_SETS)
    trainable = {str(v) for _, tasks in methods for name in _keys([([], tasks)], "volume_finetune")
                 if (v := lookup(tasks, "volume_finetune", name, "trainable")) is not None}
    if not note or not trainable:
        return note
    what = " / ".join(FINETUNE_TRAINED.get(t, t) for t in sorted(trainable))
    return (f"{note}. Trained: {what}; the state of best validation metric (validation loss where "
            "it is undefined) is scored on the test split")


def _selection_note(methods: list[Row]) -> str:
    """Test volumes with a finding per dataset, and the encoders the task does not apply to."""
    ran = _ran_rows(methods, "slice_selection")
    note = _count_note(ran, "slice_selection", "volumes", "Test volumes with a finding")
    if note:
        note += (". Position prior: the k slices that most often hold a finding in the training "
                 "volumes, the same for every volume")
    skipped = [labels[0] for labels, tasks in methods if lookup(tasks, "slice_selection", "skipped")]
    if ran and skipped:
        note += f". Not applicable (no attentive slice selection): {', '.join(skipped)}"
    return note


def _modality_gap_note(methods: list[Row]) -> str:
    """The samples per finding and modality, and how the gap is defined."""
    samples = _first_found(_ran_rows(methods, "modality_gap"), "modality_gap", "samples")
    if not isinstance(samples, dict):
        return ""
    xray, ct = samples.get("xray") or {}, samples.get("ct") or {}
    counts = ", ".join(f"{name} {xray.get(name, 0)} / {ct.get(name, 0)}" for name in dict_keys(xray, ct))
    return (f"Test samples (X-ray / CT): {counts}. Gap: distance between the X-ray and the CT centroid "
            "of the L2-normalised projected embeddings over the mean RMS spread of each modality around "
            "its own (class-balanced); chance: the modality labels shuffled within each finding; lower "
            "is a more shared space. Nearest class centroid: a sample's nearest class centroid of the "
            "other modality is of its own finding")


def _train_note(methods: list[Row], tasks: tuple[str, ...], unit: str = "images",
                order: Iterable[str] = ()) -> str:
    """"Training images: SIIM 1% 16, 10% 160 …", from the first encoder that has each count
    ("1% 16 (mean of 5 draws)" where a row averages several training subsets); datasets in `order`
    first, as their table's columns."""
    parts = []
    for task in tasks:
        for name in ordered(order, _keys(methods, task)):
            counts = [text for fraction in sorted(_keys(methods, task, name, "fractions"), key=fraction_order)
                      if (text := _fraction_count(methods, task, name, fraction)) is not None]
            prefix = f"{TASK_NAMES[task].lower()} " if len(tasks) > 1 else ""
            if counts:
                parts.append(f"{prefix}{display_name(name)}: " + ", ".join(counts))
    return f"Training {unit}: " + "; ".join(parts) if parts else ""
