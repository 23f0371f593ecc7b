"""A contact sheet of phantom studies: images from both sites with their findings and reports."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.study import Box, Study

logger = logging.getLogger(__name__)
_SITES = ("boston", "alicante")
_COLS = 4


def _caption(study: Study) -> str:
    names = ", ".join(f.name + ("?" if f.hedged else "") + ("" if f.mentioned else " (omitted)") for f in study.findings)
    english = study.reports.get("en", "")
    english = english[english.find("FINDINGS:"):] if "FINDINGS:" in english else english
    parts = [f"{study.site} {study.view} | {names or 'no finding'}", "EN: " + " ".join(english.split())]
    parts += [f"{code.upper()}: {text}" for code, text in study.reports.items() if code != "en"]
    return "\n".join(textwrap.fill(p, 58) for p in parts)


def write_preview(cfg: PhantomConfig, path: Path, n: int = 8) -> Path:
    """Render `n` studies (alternating sites) with their reports into a PNG at `path`."""
    studies = [generate_study(cfg, "preview", i, site=_SITES[i % 2]) for i in range(n)]
    rows = -(-n // _COLS)
    fig = Figure(figsize=(4.2 * _COLS, 5.6 * rows), dpi=90)
    FigureCanvasAgg(fig)
    for i, study in enumerate(studies):
        ax = fig.add_axes((i % _COLS / _COLS + 0.005, 1 - (i // _COLS + 0.6) / rows, 0.99 / _COLS, 0.59 / rows))
        ax.imshow(study.image, cmap="gray", vmin=0.0, vmax=1.0)
        if study.pneumothorax_mask is not None:
            ax.contour(study.pneumothorax_mask, levels=[0.5], colors="red", linewidths=0.6)
        for box in study.boxes:
            ax.add_patch(_rectangle(box, "yellow" if box.label == "pneumonia" else "cyan"))
        ax.set_axis_off()
        fig.text(i % _COLS / _COLS + 0.01, 1 - (i // _COLS + 0.61) / rows, _caption(study),
                 va="top", ha="left", fontsize=7, family="monospace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.info("wrote phantom preview with %d studies to %s", n, path)
    return path


def _rectangle(box: Box, color: str) -> Rectangle:
    return Rectangle((box.x0, box.y0), box.x1 - box.x0, box.y1 - box.y0, fill=False, edgecolor=color, linewidth=0.8)
