"""Evaluation report: the paper's tables (Med-UniC Tables 1–4) from a ``metrics.json`` dict.

:func:`format_tables` lays the numbers out as plain-string tables, which the CLI prints in the
terminal and :func:`write_report` renders into one self-contained HTML file (inline CSS, figures
embedded as data URIs), so the two never disagree. Every part of the metrics may be missing: holes
are shown as "–" and empty tables are left out.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from unimed.eval.checks import (
    LANGUAGE_NAMES,
    METRIC_NAMES,
    MISSING,
    TASK_NAMES,
    ZERO_SHOT_SETS,
    Check,
    as_float,
    dict_keys,
    display_name,
    fraction_order,
    lookup,
    ordered,
    percent,
    quality_checks,
)

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
TITLE_BIAS = "Community bias: how separable languages and sites are (%, silhouette and ratio raw)"
TITLE_BIAS_CONTROL = ("Community bias where it can fail: parallel-report retrieval and language inside "
                      "the control community (%, ratio raw)")
TITLE_ABLATION = "Table 4: Ablation of the learning objectives (%)"
TITLE_TIMINGS = "Timings (seconds)"
BOLD_BEST = {TITLE_ZERO_SHOT, TITLE_LINEAR, TITLE_SEG_DET, TITLE_I2R, TITLE_R2I, TITLE_CROSS,
             TITLE_ABLATION}

LINEAR_SETS = ("chexpert", "rsna", "covidx")
RETRIEVAL_SETS = ("mimic-cxr", "padchest")
RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "P@1", "P@5", "P@10")
BIAS_SPACES = (("text", "cls"), ("text", "projected"), ("image", "pooled"), ("image", "projected"))
BIAS_METRICS = (("probe_accuracy", "probe"), ("knn_accuracy", "kNN"), ("silhouette", "silhouette"),
                ("distance_ratio", "ratio"))
RAW_BIAS_METRICS = ("silhouette", "distance_ratio")
OBJECTIVES = ("ssv", "cvl", "ctr", "mlm")
FIGURE_CAPTIONS = {"tsne_text": "t-SNE of text embeddings", "tsne_image": "t-SNE of image embeddings",
                   "gradcam": "Grad-CAM"}


def _methods(metrics: dict) -> list[tuple[str, dict]]:
    """(label, encoder entry) of every encoder, in the order of the metrics."""
    encoders = metrics.get("encoders") or {}
    return [(str(entry.get("label") or key), entry) for key, entry in encoders.items()
            if isinstance(entry, dict)]


def _task_rows(metrics: dict) -> list[Row]:
    """One row per encoder, whose getters read the encoder's ``tasks`` dict."""
    return [([label], entry.get("tasks") or {}) for label, entry in _methods(metrics)]


def _keys(rows: list[Row], *path: str) -> list[str]:
    """Union over the rows of the keys found at ``path``."""
    return dict_keys(*(lookup(data, *path) for _, data in rows))


def _number(value: object, digits: int = 2) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _table(title: str, first: list[str], rows: list[Row], columns: list[Column]) -> Table | None:
    """Generic builder: label cells then one cell per column; None when no cell holds a value."""
    body = [labels + [get(data) for _, get in columns] for labels, data in rows]
    if not columns or all(cell == MISSING for row in body for cell in row[len(first):]):
        return None
    return title, first + [header for header, _ in columns], body


def _value(path: tuple[str, ...], data: object, fmt: Callable[[object], str] = percent) -> str:
    return fmt(lookup(data, *path))


def _column(header: str, *path: str, fmt: Callable[[object], str] = percent) -> Column:
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
    return percent(lookup(tasks, *path, metric))


def _linear_table(metrics: dict) -> Table | None:
    rows = _task_rows(metrics)
    return _table(TITLE_LINEAR, ["Method"], rows, _fraction_columns(rows, "linear_probe", LINEAR_SETS))


def _seg_det_table(metrics: dict) -> Table | None:
    rows = _task_rows(metrics)
    columns = (_fraction_columns(rows, "segmentation", ("siim", "rsna"))
               + _fraction_columns(rows, "detection", ("rsna", "object-cxr")))
    return _table(TITLE_SEG_DET, ["Method"], rows, columns)


def _retrieval_table(metrics: dict, direction: str, title: str) -> Table | None:
    """Recall/Precision@K per dataset (or per language pair for the cross-lingual direction)."""
    rows = _task_rows(metrics)
    columns = []
    for name in ordered(RETRIEVAL_SETS, _keys(rows, "retrieval", direction)):
        group = (" → ".join(display_name(lang, LANGUAGE_NAMES) for lang in name.split("_to_"))
                 if "_to_" in name else display_name(name))
        for metric in ordered(RETRIEVAL_METRICS, _keys(rows, "retrieval", direction, name)):
            columns.append(_column(f"{group}{SEP}{metric}", "retrieval", direction, name, metric))
    return _table(title, ["Method"], rows, columns)


def _bias_table(metrics: dict) -> Table | None:
    """One row per encoder × embedding space; language and site separability columns."""
    rows: list[Row] = []
    for label, entry in _methods(metrics):
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
    """One row per encoder × space: parallel-report R@1 and other-language top-1 (text spaces),
    language probe and distance ratio inside the control community, seen and unseen in pre-training."""
    rows: list[Row] = []
    for label, entry in _methods(metrics):
        bias = lookup(entry, "tasks", "bias") or {}
        for modality, variant in BIAS_SPACES:
            data = {"parallel": lookup(bias, "parallel", variant) if modality == "text" else None,
                    **{subset: lookup(bias, "control", subset, modality, variant, "language")
                       for subset in ("seen", "unseen")}}
            if any(isinstance(v, dict) for v in data.values()):
                rows.append(([label, f"{modality.title()} ({variant})"], data))
    columns = [_column(f"Parallel reports{SEP}{name} {lang.upper()}", "parallel", lang, key)
               for key, name in (("R@1", "R@1"), ("cross_top1", "other-language top-1"))
               for lang in ("en", "es")]
    columns += [_column(f"Control, {subset}{SEP}language {name}", subset, key,
                        fmt=_number if key in RAW_BIAS_METRICS else percent)
                for subset in ("seen", "unseen")
                for key, name in (("probe_accuracy", "probe"), ("distance_ratio", "ratio"))]
    return _table(TITLE_BIAS_CONTROL, ["Method", "Space"], rows, columns)


def _ablation_table(metrics: dict) -> Table | None:
    """Paper Table 4: objective checkmarks, then COVIDx, RSNA, SIIM per fraction and zero-shot F1."""
    entries = [row for row in lookup(metrics, "ablation", "rows") or [] if isinstance(row, dict)]
    rows: list[Row] = [([str(row.get("name", ""))] + [
        "✓" if lookup(row, "objectives", key) else "" for key in OBJECTIVES], row.get("metrics") or {})
        for row in entries]
    columns = (_fraction_columns(rows, "linear_probe", ("covidx", "rsna"), extras=False)
               + _fraction_columns(rows, "segmentation", ("siim",), extras=False)
               + _zero_shot_columns(rows, ("f1",), True))
    return _table(TITLE_ABLATION, ["Variant", *(key.upper() for key in OBJECTIVES)], rows, columns)


def _timings_table(metrics: dict) -> Table | None:
    rows: list[Row] = [([label], entry.get("seconds") or {}) for label, entry in _methods(metrics)]
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
    _bias_table, _bias_control_table, _ablation_table, _timings_table,
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
             TITLE_SEG_DET: _train_note(methods, ("segmentation", "detection"))}
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


def _train_note(methods: list[Row], tasks: tuple[str, ...]) -> str:
    """"Training images: SIIM 1% 16, 10% 160 …", from the first encoder that has each count."""
    parts = []
    for task in tasks:
        for name in _keys(methods, task):
            counts = [f"{fraction} {count}"
                      for fraction in sorted(_keys(methods, task, name, "fractions"), key=fraction_order)
                      if (count := _first_found(methods, task, name, "fractions", fraction,
                                                "train_images")) is not None]
            prefix = f"{TASK_NAMES[task].lower()} " if len(tasks) > 1 else ""
            if counts:
                parts.append(f"{prefix}{display_name(name)}: " + ", ".join(counts))
    return "Training images: " + "; ".join(parts) if parts else ""


# ---- HTML -----------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2933;margin:0;
background:#f5f7fa;font-size:14px}
main{max-width:1240px;margin:0 auto;padding:24px 32px 48px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 12px}h2{font-size:18px;margin:32px 0 8px;padding-bottom:4px;
border-bottom:2px solid #3b6ea5;color:#24466b}h3{font-size:14px;margin:16px 0 6px;color:#334e68}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}
dl.meta dt{font-weight:600;color:#52606d}dl.meta dd{margin:0;font-family:monospace}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:4px 0;font-variant-numeric:tabular-nums}
th,td{padding:4px 9px;border-bottom:1px solid #e4e7eb;white-space:nowrap}
th{background:#e8eef5;font-weight:600;text-align:center}
thead tr:first-child th{border-bottom:1px solid #bcccdc}
tbody tr:nth-child(even){background:#f7f9fb}
td.num{text-align:right}.gs{border-left:1px solid #bcccdc}td.text{text-align:left}td.best{font-weight:700}
.note,.muted{color:#7b8794;font-size:12px;margin:2px 0 0}
.badge{display:inline-block;min-width:40px;text-align:center;border-radius:10px;padding:1px 8px;
font-size:11px;font-weight:700;color:#fff}
.pass{background:#2f855a}.fail{background:#c53030}.na{background:#9aa5b1}
td.detail{white-space:normal;color:#52606d}
.figures{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #e4e7eb;padding:6px;background:#fff}
figure img{display:block;max-width:560px;height:auto}figcaption{font-size:12px;color:#52606d;
margin-top:4px}
"""

SECTIONS = (
    ("Zero-shot classification", (TITLE_ZERO_SHOT, TITLE_PER_CLASS), None),
    ("Linear classification", (TITLE_LINEAR,), None),
    ("Segmentation and detection", (TITLE_SEG_DET,), None),
    ("Retrieval", (TITLE_I2R, TITLE_R2I, TITLE_CROSS), None),
    ("Community bias", (TITLE_BIAS, TITLE_BIAS_CONTROL), "bias"),
    ("Grad-CAM", (), "gradcam"),
    ("Ablation", (TITLE_ABLATION,), None),
    ("Timings", (TITLE_TIMINGS,), None),
)
E = html.escape
GROUP_START = ' class="gs"'


def _is_number(cell: str) -> bool:
    return cell == MISSING or as_float(_parse(cell)) is not None


def _parse(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _best_cells(rows: list[list[str]]) -> set[tuple[int, int]]:
    """(row, column) of the highest value of each numeric column holding at least two values."""
    best = set()
    for col in range(1, max((len(row) for row in rows), default=0)):
        values = [(i, v) for i, row in enumerate(rows) if (v := _parse(row[col])) is not None]
        if len(values) >= 2:
            top = max(v for _, v in values)
            best |= {(i, col) for i, v in values if v == top}
    return best


def _split_header(cell: str) -> list[str]:
    """["group", "column"] of a grouped header (split at the last separator), else [cell]."""
    return cell.rsplit(SEP, 1) if SEP in cell else [cell]


def _group_starts(header: list[str]) -> set[int]:
    """Columns that open a new header group, drawn with a rule on their left."""
    split = [_split_header(cell) for cell in header]
    return {j for j in range(1, len(split)) if len(split[j]) == 2 and split[j][0] != split[j - 1][0]}


def _header_html(header: list[str]) -> str:
    """One header row, or two when some columns are grouped as "group / column"."""
    split = [_split_header(cell) for cell in header]
    if all(len(parts) == 1 for parts in split):
        return "<tr>" + "".join(f"<th>{E(cell)}</th>" for cell in header) + "</tr>"
    top, bottom = [], []
    i = 0
    while i < len(split):
        if len(split[i]) == 1:
            top.append(f'<th rowspan="2">{E(split[i][0])}</th>')
            i += 1
            continue
        j = i
        while j < len(split) and len(split[j]) == 2 and split[j][0] == split[i][0]:
            bottom.append(f"<th{GROUP_START if j == i else ''}>{E(split[j][1])}</th>")
            j += 1
        top.append(f'<th colspan="{j - i}" class="gs">{E(split[i][0])}</th>')
        i = j
    return f"<tr>{''.join(top)}</tr><tr>{''.join(bottom)}</tr>"


def _table_html(table: Table, note: str = "") -> str:
    """A table with its title, two-level header, best values in bold when the table ranks methods."""
    title, header, rows = table
    best = _best_cells(rows) if title in BOLD_BEST else set()
    starts = _group_starts(header)
    body = []
    for i, row in enumerate(rows):
        cells = [f'<td class="{"num" if _is_number(c) else "text"}{" best" if (i, j) in best else ""}'
                 f'{" gs" if j in starts else ""}">{E(c)}</td>' for j, c in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    note_html = f'<p class="note">{E(note)}</p>' if note else ""
    return (f"<h3>{E(title)}</h3><div class=\"scroll\"><table><thead>{_header_html(header)}</thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>{note_html}")


def _image_html(path: Path, caption: str) -> str:
    """A figure with the PNG embedded as a data URI, or a muted line when the file is missing."""
    if not path.is_file():
        return f'<p class="muted">Figure missing: {E(path.name)}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{E(caption)}">'
            f"<figcaption>{E(caption)}</figcaption></figure>")


def _figures_html(metrics: dict, task: str, figure_dir: Path) -> str:
    """Each encoder's figures of ``task`` side by side, under the encoder's label."""
    parts = []
    for label, entry in _methods(metrics):
        figures = lookup(entry, "tasks", task, "figures")
        if not isinstance(figures, dict) or not figures:
            continue
        images = "".join(_image_html(figure_dir / str(name), f"{label}: {FIGURE_CAPTIONS.get(k, k)}")
                         for k, name in figures.items())
        classes = lookup(entry, "tasks", task, "classes")
        note = (f'<p class="note">Classes: {E(", ".join(map(str, classes)))}; '
                f'{E(str(lookup(entry, "tasks", task, "images_per_class") or MISSING))} images each</p>'
                if isinstance(classes, list) else "")
        parts.append(f'<h3>{E(label)}</h3><div class="figures">{images}</div>{note}')
    return "".join(parts)


def _checks_html(checks: list[Check]) -> str:
    """Summary line and one row per check with a PASS / FAIL / N/A badge."""
    if not checks:
        return '<p class="muted">No checks.</p>'
    counts = [sum(c.passed is state for c in checks) for state in (True, False, None)]
    summary = f"{counts[0]} passed, {counts[1]} failed, {counts[2]} not checked"
    badges = {True: ("pass", "PASS"), False: ("fail", "FAIL"), None: ("na", "N/A")}
    rows = "".join(
        f'<tr><td><span class="badge {badges[c.passed][0]}">{badges[c.passed][1]}</span></td>'
        f'<td class="text">{E(c.name)}</td><td class="detail">{E(c.detail)}</td></tr>' for c in checks)
    return (f"<p>{E(summary)}</p><table><thead><tr><th>Status</th><th>Check</th><th>Detail</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _duration(seconds: object) -> str:
    value = as_float(seconds)
    if value is None:
        return MISSING
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest} s" if minutes else f"{value:.1f} s"


def _meta_html(metrics: dict) -> str:
    """Title and run metadata."""
    fields = [("Run", metrics.get("run")), ("Checkpoint", metrics.get("checkpoint")),
              ("Data root", metrics.get("data_root")), ("Created", metrics.get("created")),
              ("Duration", _duration(metrics.get("seconds"))),
              ("Encoders", ", ".join(label for label, _ in _methods(metrics)) or None)]
    items = "".join(f"<dt>{E(name)}</dt><dd>{E(str(MISSING if value is None else value))}</dd>"
                    for name, value in fields)
    run = str(metrics.get("run") or "")
    return f"<h1>Evaluation report{E(': ' + run) if run else ''}</h1><dl class=\"meta\">{items}</dl>"


def render_report(metrics: dict, figure_dir: Path, checks: list[Check] | None = None) -> str:
    """The report as one self-contained HTML string (see :func:`write_report`)."""
    checks = quality_checks(metrics) if checks is None else checks
    tables = {table[0]: table for table in format_tables(metrics)}
    notes = table_notes(metrics)
    parts = [_meta_html(metrics), "<h2>Quality checks</h2>", _checks_html(checks)]
    for heading, titles, figure_task in SECTIONS:
        content = "".join(_table_html(tables[t], notes.get(t, "")) for t in titles if t in tables)
        if figure_task:
            content += _figures_html(metrics, figure_task, Path(figure_dir))
        parts.append(f"<h2>{E(heading)}</h2>" + (content or '<p class="muted">Not in this run.</p>'))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Evaluation report</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(metrics: dict, out_path: Path, figure_dir: Path,
                 checks: list[Check] | None = None) -> Path:
    """Write the HTML report of ``metrics`` to ``out_path`` and return it.

    The file is self-contained: inline CSS, every figure (paths relative to ``figure_dir``) embedded
    as a base64 PNG data URI, no script. ``checks`` defaults to :func:`quality_checks` of the metrics.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_report(metrics, figure_dir, checks), encoding="utf-8")
    return out_path
