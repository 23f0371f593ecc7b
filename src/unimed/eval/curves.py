"""Loss curves of a pre-training run, one panel per loss term, from its JSONL log.

The log (``<run>/pretrain/train_log.jsonl``, written by :class:`unimed.train.logs.RunLogger`) holds
one JSON object per logged step; every key named ``loss`` or ``*_loss`` is a loss term. A resumed
or restarted run appends to the same file: a row whose step is not after the previous row's starts
a newer history, which replaces every earlier row from that step on (a run restarted from step 1
leaves nothing of the old one; a resumed run keeps the old rows up to its checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from unimed.eval.errors import EvalError

LOG_FILE = "train_log.jsonl"


def read_loss_log(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{term: (steps, values)} of every loss term in the newest history of the log (the total
    "loss" first), in step order; a line that is not a JSON object with a "step" is an error naming
    the file and line."""
    rows: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalError(f"{path}, line {number}: not a log row with a 'step' ({exc})") from None
        if rows and step <= max(rows):
            rows = {s: r for s, r in rows.items() if s < step}
        rows[step] = row
    found = dict.fromkeys(k for row in rows.values() for k in row if k.endswith("_loss"))
    terms = (["loss"] if any("loss" in row for row in rows.values()) else []) + list(found)
    curves = {}
    for term in terms:
        steps = sorted(step for step, row in rows.items() if isinstance(row.get(term), int | float))
        curves[term] = (steps, [float(rows[step][term]) for step in steps])
    return curves


def plot_loss_curves(log_path: Path, out_path: Path) -> dict[str, object] | None:
    """Plot one panel per loss term of `log_path` into `out_path` (PNG); {"log", "steps", "terms",
    "figure" (the PNG's file name)}, or None when the log holds no loss."""
    curves = read_loss_log(log_path)
    if not curves:
        return None
    fig = Figure(figsize=(3.2 * len(curves), 2.6))
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (term, (steps, values)) in zip(axes[0], curves.items()):
        ax.plot(steps, values, lw=1.2)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    steps = max(len(steps) for steps, _ in curves.values())
    return {"log": str(log_path), "steps": steps, "terms": list(curves), "figure": out_path.name}
