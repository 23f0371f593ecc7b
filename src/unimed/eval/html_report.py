"""The evaluation report as one self-contained HTML file, from a ``metrics.json`` dict.

The tables are those of :func:`unimed.eval.report.format_tables` (what the terminal prints), so the
two never disagree; around them: run metadata, the quality checks with PASS / FAIL / TIE / N/A badges
and likely causes, the pre-training loss curves and the task figures, embedded as data URIs (inline
CSS, no script, nothing fetched).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from functools import partial
from pathlib import Path

from unimed.eval.checks import (
    FAIL,
    MISSING,
    NOT_MEASURED,
    PASS,
    TIE,
    Check,
    Replicates,
    all_quality_checks,
    as_float,
    display_name,
    lookup,
    tally,
)
from unimed.eval.report import (
    BOLD_BEST,
    FIGURE_CAPTIONS,
    SEP,
    TITLE_ABLATION,
    TITLE_ORDERINGS,
    TITLE_BIAS,
    TITLE_BIAS_CONTROL,
    TITLE_CROSS,
    TITLE_I2R,
    TITLE_LINEAR,
    TITLE_LOCALISATION,
    TITLE_MODALITY_GAP,
    TITLE_PER_CLASS,
    TITLE_POOLED,
    TITLE_R2I,
    TITLE_SEG_DET,
    TITLE_SELECTION,
    TITLE_SHORTCUT,
    TITLE_SPLITS,
    TITLE_TIMINGS,
    TITLE_VOLUME_FINETUNE,
    TITLE_VOLUME_NOT_RUN,
    TITLE_VOLUME_ORGANS,
    TITLE_VOLUME_SEGMENTATION,
    TITLE_VOLUME_PROBE,
    TITLE_VOLUME_RETRIEVAL,
    TITLE_ZERO_SHOT,
    Table,
    format_tables,
    methods,
    table_notes,
)
from unimed.machine import describe_software

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
.pass{background:#2f855a}.fail{background:#c53030}.tie{background:#b7791f}.na{background:#9aa5b1}
td.detail{white-space:normal;color:#52606d}
.figures{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #e4e7eb;padding:6px;background:#fff}
figure img{display:block;max-width:560px;height:auto}figcaption{font-size:12px;color:#52606d;
margin-top:4px}.wide figure img{max-width:100%}
"""

VIEWER_CAPTION = ("test volumes, axial slices across the finding and one outside it (last), "
                  "radiological view; red: the finding (circle: nodule, contour: lesion mask), "
                  "coloured contours: organ labels, orange frame: the finding's slices where no "
                  "outline could be drawn")
E = html.escape
GROUP_START = ' class="gs"'


def _is_number(cell: str) -> bool:
    return cell == MISSING or as_float(_parse(cell)) is not None


def _parse(cell: str) -> float | None:
    """The number a cell starts with ("81.2 (78.0–84.1)" -> 81.2), or None."""
    try:
        return float(cell.split(" ", 1)[0])
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


def _figures_html(metrics: dict, figure_dir: Path, task: str) -> str:
    """Each encoder's figures of ``task`` side by side, under the encoder's label."""
    parts = []
    for label, entry in methods(metrics):
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


def _viewer_html(metrics: dict, figure_dir: Path) -> str:
    """The volume viewer: one figure per 3D dataset of the run, and why a dataset has none."""
    viewer = metrics.get("volume_viewer")
    figures, skipped = lookup(viewer, "figures"), lookup(viewer, "skipped")
    images = "".join(
        _image_html(figure_dir / str(name), f"{display_name(str(dataset))}: {VIEWER_CAPTION}")
        for dataset, name in figures.items()) if isinstance(figures, dict) else ""
    notes = "".join(
        f'<p class="note">No viewer figure for {E(display_name(str(dataset)))}: {E(str(why))}</p>'
        for dataset, why in skipped.items()) if isinstance(skipped, dict) else ""
    if not images and not notes:
        return ""
    return f'<h3>Volume viewer</h3><div class="figures wide">{images}</div>{notes}'


BADGES = {PASS: ("pass", "PASS"), FAIL: ("fail", "FAIL"), TIE: ("tie", "TIE"),
          NOT_MEASURED: ("na", "N/A")}


def _checks_html(checks: list[Check]) -> str:
    """Summary line and one row per check with a PASS / FAIL / TIE / N/A badge and, for failed
    and tied checks, the likely cause."""
    if not checks:
        return '<p class="muted">No checks.</p>'
    summary = tally(checks)
    rows = "".join(
        f'<tr><td><span class="badge {BADGES[c.status][0]}">{BADGES[c.status][1]}</span></td>'
        f'<td class="text">{E(c.name)}</td><td class="detail">{E(c.detail)}</td>'
        f'<td class="detail">{E(c.cause)}</td></tr>' for c in checks)
    return (f"<p>{E(summary)}</p><table><thead><tr><th>Status</th><th>Check</th><th>Detail</th>"
            f"<th>Likely cause</th></tr></thead><tbody>{rows}</tbody></table>")


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
              ("Software", describe_software(metrics["software"]) if isinstance(metrics.get("software"), dict)
               else None),
              ("Encoders", ", ".join(label for label, _ in methods(metrics)) or None)]
    weights = metrics.get("weights") if isinstance(metrics.get("weights"), dict) else {}
    fields += [(f"Weights of {name}", f"{entry.get('path')} (SHA-256 {str(entry.get('sha256'))[:16]}…)")
               for name, entry in weights.items() if isinstance(entry, dict)]
    fields += [("Unfinished training", line) for line in metrics.get("unfinished") or []]
    items = "".join(f"<dt>{E(name)}</dt><dd>{E(str(MISSING if value is None else value))}</dd>"
                    for name, value in fields)
    run = str(metrics.get("run") or "")
    return f"<h1>Evaluation report{E(': ' + run) if run else ''}</h1><dl class=\"meta\">{items}</dl>"


def _pretraining_html(metrics: dict, figure_dir: Path) -> str:
    """The loss curves of every trained method's pre-training log, one panel per loss term."""
    curves = {metrics.get("method"): metrics.get("pretraining"),
              **(metrics.get("pretraining_methods") or {})}
    encoders = metrics.get("encoders") or {}
    parts = []
    for name, entry in curves.items():
        figure = lookup(entry, "figure")
        if not isinstance(figure, str):
            continue
        label = str(lookup(encoders, name, "label") or name or "")
        terms = lookup(entry, "terms")
        caption = (f"Pre-training loss per term ({label}): "
                   + (", ".join(map(str, terms)) if isinstance(terms, list) else MISSING))
        note = f'<p class="note">Log: {E(str(lookup(entry, "log")))}</p>'
        parts.append(f'<div class="figures">{_image_html(figure_dir / figure, caption)}</div>{note}')
    return "".join(parts) or '<p class="muted">No pre-training log in this run.</p>'


Section = tuple[str, tuple[str, ...], Callable[[dict, Path], str] | None]
SECTIONS: tuple[Section, ...] = (
    ("Zero-shot classification", (TITLE_ZERO_SHOT, TITLE_PER_CLASS), None),
    ("Linear classification", (TITLE_LINEAR,), None),
    ("Segmentation and detection", (TITLE_SEG_DET,), None),
    ("Retrieval", (TITLE_I2R, TITLE_R2I, TITLE_CROSS, TITLE_POOLED, TITLE_SHORTCUT), None),
    ("Community bias", (TITLE_BIAS, TITLE_BIAS_CONTROL), partial(_figures_html, task="bias")),
    ("Grad-CAM", (), partial(_figures_html, task="gradcam")),
    ("3D volumes", (TITLE_VOLUME_PROBE, TITLE_VOLUME_FINETUNE, TITLE_VOLUME_SEGMENTATION,
                    TITLE_VOLUME_ORGANS, TITLE_VOLUME_RETRIEVAL, TITLE_LOCALISATION, TITLE_SELECTION,
                    TITLE_VOLUME_NOT_RUN),
     _viewer_html),
    ("2D vs 3D embeddings", (TITLE_MODALITY_GAP,), partial(_figures_html, task="modality_gap")),
    ("Ablation", (TITLE_ABLATION, TITLE_ORDERINGS), None),
    ("Timings", (TITLE_TIMINGS,), None),
    ("Evaluation sets", (TITLE_SPLITS,), None),
)
"""(heading, the tables under it, what draws its figures from the metrics and the figure folder)."""


def render_report(metrics: dict, figure_dir: Path, checks: list[Check] | None = None,
                  replicates: Replicates | None = None) -> str:
    """The report as one self-contained HTML string (see :func:`write_report`)."""
    checks = all_quality_checks(metrics, replicates) if checks is None else checks
    tables = {table[0]: table for table in format_tables(metrics)}
    notes = table_notes(metrics)
    parts = [_meta_html(metrics), "<h2>Quality checks</h2>", _checks_html(checks),
             "<h2>Pre-training</h2>", _pretraining_html(metrics, Path(figure_dir))]
    for heading, titles, figures in SECTIONS:
        content = "".join(_table_html(tables[t], notes.get(t, "")) for t in titles if t in tables)
        if figures is not None:
            content += figures(metrics, Path(figure_dir))
        parts.append(f"<h2>{E(heading)}</h2>" + (content or '<p class="muted">Not in this run.</p>'))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Evaluation report</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(metrics: dict, out_path: Path, figure_dir: Path,
                 checks: list[Check] | None = None, replicates: Replicates | None = None) -> Path:
    """Write the HTML report of ``metrics`` to ``out_path`` and return it.

    The file is self-contained: inline CSS, every figure (paths relative to ``figure_dir``) embedded
    as a base64 PNG data URI, no script. ``checks`` defaults to :func:`all_quality_checks` of the metrics
    and the bootstrap ``replicates``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_report(metrics, figure_dir, checks, replicates), encoding="utf-8")
    return out_path
