"""Retrieval: Recall@K / Precision@K against hand-computed tables, the parallel corpus, a tiny run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.data.errors import DataError
from unimed.eval import retrieval as retrieval_module
from unimed.eval.config import RetrievalConfig
from unimed.eval.errors import EvalError
from unimed.eval.retrieval import (
    Pairs,
    info_nce,
    mean_batch_loss,
    precision_values,
    read_parallel,
    recall_hits,
    run,
    same_value,
)
from unimed.eval.runner import pop_replicates
from unimed.eval.tasks import TASKS


def recall_at_k(scores: np.ndarray, match: np.ndarray, ks) -> dict[str, float]:
    return {name: float(hits.mean()) for name, hits in recall_hits(scores, match, ks).items()}


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, ks) -> dict[str, float]:
    return {name: float(v.mean()) for name, v in precision_values(scores, relevant, ks).items()}

# Three queries over a gallery of four; query i matches gallery item i.
SCORES = np.array([
    [0.9, 0.1, 0.3, 0.2],  # match ranked 1st
    [0.8, 0.2, 0.7, 0.1],  # match ranked 3rd
    [0.5, 0.5, 0.5, 0.5],  # all tied: the match ranks last (ties go against the query)
])
MATCH = np.eye(3, 4, dtype=bool)


def test_recall_at_k_hand_computed() -> None:
    got = recall_at_k(SCORES, MATCH, (1, 2, 3, 4))
    assert got == pytest.approx({"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 2 / 3, "R@4": 1.0})


def test_recall_counts_any_of_several_matches() -> None:
    scores = np.array([[0.2, 0.9, 0.8]])
    match = np.array([[False, False, True]])
    assert recall_at_k(scores, match, (1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    match = np.array([[True, False, True]])  # two images of one study: either one counts
    assert recall_at_k(scores, match, (1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_precision_at_k_hand_computed_with_ties() -> None:
    relevant = np.array([
        [True, False, True, False],  # top 2 by score: 0 (rel), 2 (rel) -> P@1 1, P@2 1
        [False, True, True, False],  # top 2: 0 (no), 2 (rel) -> P@1 0, P@2 0.5
        [True, True, False, False],  # all tied: the two non-relevant first -> 0, 0
    ])
    got = precision_at_k(SCORES, relevant, (1, 2, 4))
    assert got == pytest.approx({"P@1": 1 / 3, "P@2": 0.5, "P@4": 0.5})


def test_precision_k_beyond_gallery_uses_whole_gallery() -> None:
    scores = np.array([[0.3, 0.1]])
    relevant = np.array([[True, False]])
    assert precision_at_k(scores, relevant, (10,)) == {"P@10": 0.5}


def test_same_value() -> None:
    got = same_value([frozenset({"a"}), frozenset(), frozenset({"a"})])
    assert got.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_parallel(tmp_path: Path) -> None:
    corpus = read_parallel(write(tmp_path / "p.csv", 'study_id,en,es\n1,"No   effusion.",sin derram.\n'))
    assert corpus.study_ids == ["1"] and corpus.en == ["No effusion."] and corpus.es == ["sin derram."]


@pytest.mark.parametrize("text, where", [
    ("study_id,en\n1,a\n", "line 1, column 'es'"),
    ("study_id,en,es\n1,a,b\n2,,b\n", "line 3, column 'en'"),
    ("study_id,en,es\n1,a\n", "line 2"),
])
def test_read_parallel_errors_name_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path / "p.csv", text)
    with pytest.raises(DataError, match=where) as err:
        read_parallel(path)
    assert str(path) in str(err.value)


def test_phantom_writes_parallel_test_reports(tiny_world: Path, eval_data) -> None:
    corpus = read_parallel(tiny_world / "parallel-reports" / "test.csv")
    mimic_test = {r.study_id: r.report for r in eval_data.records("mimic-cxr", "test")}
    assert set(corpus.study_ids) == set(mimic_test)
    assert all(mimic_test[s] == en for s, en in zip(corpus.study_ids, corpus.en))
    assert all(es == es.lower() for es in corpus.es)


def check_scores(block: dict, ks: tuple[int, ...], prefixes: str = "RP") -> None:
    names = {f"{p}@{k}" for p in prefixes for k in ks}
    assert set(block) == names | {"ci"} and set(block["ci"]) == names
    assert all(block["ci"][n][0] <= block[n] <= block["ci"][n][1] <= 1.0 for n in names)


def test_info_nce_is_zero_for_perfect_pairs_and_ln_b_for_identical_features() -> None:
    eye = torch.eye(4)
    assert info_nce(eye, eye, temperature=0.01) == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(4, 4) / 2
    assert info_nce(same, same, temperature=0.07) == pytest.approx(math.log(4))


def test_language_only_features_win_in_mixed_batches_only() -> None:
    """Features that encode only the language: in a single-language batch every report is as
    likely (ln B); in a batch mixing two languages only half are (ln B/2)."""
    languages = np.array([0, 1] * 8)
    features = torch.nn.functional.one_hot(torch.from_numpy(languages)).float()  # (16, 2)
    pairs = Pairs([], features, features)
    single = [np.flatnonzero(languages == lang) for lang in (0, 1)]
    mixed = [np.arange(16)]
    tau = 0.01
    assert mean_batch_loss(pairs, single, 4, tau) == pytest.approx(math.log(4), abs=1e-4)
    assert mean_batch_loss(pairs, mixed, 4, tau) == pytest.approx(math.log(2), abs=1e-4)
    assert mean_batch_loss(pairs, mixed, 32, tau) is None


def test_run_on_tiny_world(tiny_encoder, task_context) -> None:
    metrics = TASKS.get("retrieval")(tiny_encoder, task_context)
    replicates = pop_replicates(metrics, "tiny/retrieval")
    json.dumps(metrics)
    assert replicates["tiny/retrieval/image_to_report/mimic-cxr/R@1"].shape == (
        task_context.cfg.bootstrap_resamples,)
    ks = task_context.cfg.retrieval.ks
    for direction in ("image_to_report", "report_to_image"):
        assert set(metrics[direction]) == {"mimic-cxr", "padchest"}
        for block in metrics[direction].values():
            check_scores(block, ks)
    for block in metrics["cross_lingual"].values():
        check_scores(block, ks, "R")
    assert metrics["queries"]["cross_lingual"]["queries"] > 0
    pooled = metrics["pooled"]
    for name in ("all_languages", "within_language"):
        check_scores(pooled[name], ks, "R")
    # Restricting the gallery to the image's language can only raise the rank of its own report.
    assert all(pooled["within_language"][f"R@{k}"] >= pooled["all_languages"][f"R@{k}"] for k in ks)
    shortcut = metrics["shortcut"]
    assert set(shortcut["pairs"]) == {"en", "es"} and shortcut["chance_loss"] == pytest.approx(
        math.log(task_context.cfg.retrieval.diagnostic_batch_size))
    shares = [shortcut["top1"][k] for k in ("right_study", "right_language_wrong_study",
                                            "wrong_language")]
    assert sum(shares) == pytest.approx(1.0)


def test_run_without_parallel_corpus_skips_cross_lingual(tiny_encoder, task_context, caplog,
                                                         monkeypatch) -> None:
    """No corpus at the default place (as in most real data): skipped with a warning."""
    monkeypatch.setattr(retrieval_module, "PARALLEL_DEFAULT", "parallel-reports/absent.csv")
    retrieval = RetrievalConfig(datasets=("padchest",), max_queries=2)
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(task_context.cfg, retrieval=retrieval))
    with caplog.at_level(logging.WARNING):
        metrics = run(tiny_encoder, ctx)
    assert "cross_lingual" not in metrics and "absent.csv" in caplog.text
    assert metrics["queries"]["padchest"]["queries"] == 2


def test_a_parallel_file_that_is_not_there_is_an_error_naming_the_key(tiny_encoder, task_context):
    retrieval = RetrievalConfig(datasets=("padchest",), max_queries=2,
                                parallel_file=str(task_context.out_dir / "missing.csv"))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(task_context.cfg, retrieval=retrieval))
    with pytest.raises(EvalError, match=r"eval.retrieval.parallel_file=.*missing.csv: no such file"):
        run(tiny_encoder, ctx)
