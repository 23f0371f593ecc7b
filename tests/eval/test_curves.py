"""Loss curves from the pre-training JSONL log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from unimed.eval.curves import plot_loss_curves, read_loss_log
from unimed.eval.errors import EvalError


def _log(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_every_loss_term_in_step_order_and_a_resumed_run_replaces_the_rows_it_redoes(tmp_path: Path):
    path = _log(tmp_path / "train_log.jsonl", [
        {"cvl_loss": 2.0, "loss": 3.0, "lr": 0.1, "step": 1},
        {"step": 2, "loss": 2.5, "cvl_loss": 1.5, "lr": 0.1},
        {"step": 3, "loss": 2.2, "cvl_loss": 1.2, "lr": 0.1},
        {"step": 2, "loss": 2.4, "cvl_loss": 1.4, "lr": 0.1},  # resumed from a step-1 checkpoint
        {"step": 3, "loss": 2.0, "cvl_loss": 1.0, "ssv_loss": 0.5},
    ])
    curves = read_loss_log(path)
    assert curves == {"loss": ([1, 2, 3], [3.0, 2.4, 2.0]), "cvl_loss": ([1, 2, 3], [2.0, 1.4, 1.0]),
                      "ssv_loss": ([3], [0.5])}
    out = plot_loss_curves(path, tmp_path / "fig" / "loss.png")
    assert out == {"log": str(path), "steps": 3, "terms": ["loss", "cvl_loss", "ssv_loss"],
                   "figure": "loss.png"}
    width, height = Image.open(tmp_path / "fig" / "loss.png").size
    assert width > 2 * height  # three panels side by side


def test_a_log_without_losses_draws_nothing(tmp_path: Path):
    path = _log(tmp_path / "log.jsonl", [{"step": 1, "lr": 0.1}])
    assert plot_loss_curves(path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_a_bad_line_names_the_file_and_line(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"log\.jsonl, line 2: not a log row with a 'step'"):
        read_loss_log(path)


def test_a_run_restarted_from_step_one_leaves_nothing_of_the_old_one(tmp_path: Path):
    path = _log(tmp_path / "log.jsonl", [{"step": s, "loss": 9.0} for s in (5, 10, 15)]
                + [{"step": 5, "loss": 1.0}])
    assert read_loss_log(path) == {"loss": ([5], [1.0])}
