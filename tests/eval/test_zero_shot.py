"""Zero-shot classification: prompt files, scoring by hand-computed values, an end-to-end run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.data.records import Record
from unimed.eval import zero_shot
from unimed.eval.prompts import load_prompts


def test_spanish_prompts_are_stemmed_like_padchest_reports():
    es = load_prompts("es")
    assert es.display("Pleural Effusion") == "derrame pleural"
    assert es.display("pleural effusion", negative=True) == "No hay derrame pleural"
    assert es.positive("pleural effusion") == "derram pleural"
    assert es.negative("Pleural Effusion") == "no hay derram pleural"
    en = load_prompts("en")
    assert (en.positive("Edema"), en.negative("Edema")) == ("pulmonary edema", "No pulmonary edema")


def test_every_default_class_has_a_prompt_in_both_languages():
    from unimed.eval.config import ZERO_SHOT_CLASSES

    for lang in ("en", "es"):
        prompts = load_prompts(lang)
        for classes in ZERO_SHOT_CLASSES.values():
            assert all(prompts.positive(c) for c in classes)


def test_prompt_errors_name_the_file_and_class(tmp_path: Path):
    with pytest.raises(KeyError, match="no en prompt for class 'Goitre'.*en.yaml"):
        load_prompts("en").positive("Goitre")
    with pytest.raises(FileNotFoundError, match="languages with prompts there"):
        load_prompts("fr")
    (tmp_path / "de.yaml").write_text("language: de\npositive: '{x}'\nnegative: 'Kein {disease}'\n"
                                      "classes: {edema: Ödem}\n")
    with pytest.raises(ValueError, match="'positive' must contain"):
        load_prompts("de", tmp_path)


def test_scores_match_hand_computed_auc_and_f1():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = np.array([[0.3, -0.1], [-0.2, 0.4], [0.1, -0.3], [-0.4, 0.2]])
    out = zero_shot.score_language(labels, scores, ["a", "b"])
    # class a: positives score 0.3, -0.2; negatives 0.1, -0.4 -> pairs won 3 of 4 -> AUC 0.75;
    # predicted positive (score > 0): rows 0, 2 -> TP 1, FP 1, FN 1 -> F1 0.5.
    assert out["per_class"]["a"] == {"auc": 0.75, "f1": 0.5, "positives": 2}
    # class b: positives 0.4, -0.3; negatives -0.1, 0.2 -> 2 of 4 -> 0.5; predicted rows 1, 3 -> F1 0.5.
    assert out["per_class"]["b"] == {"auc": 0.5, "f1": 0.5, "positives": 2}
    assert out["auc"] == pytest.approx(0.625) and out["f1"] == pytest.approx(0.5)


def test_class_without_both_label_values_has_no_auc():
    out = zero_shot.score_language(np.array([[1], [1]]), np.array([[0.2], [-0.1]]), ["a"])
    assert out["per_class"]["a"]["auc"] is None and out["auc"] is None


class _FixedText:
    """A stand-in encoder whose prompt embeddings are given per text."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def text_features(self, texts, normalize=False):
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)


def test_prompt_score_is_positive_minus_negative_cosine():
    prompts = load_prompts("en")
    encoder = _FixedText({"cardiomegaly": [1.0, 0.0], "No cardiomegaly": [0.0, 1.0]})
    images = torch.nn.functional.normalize(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), dim=-1)
    got = zero_shot.prompt_scores(encoder, images, prompts, ["Cardiomegaly"])
    expected = [(3 - 1) / math.sqrt(10), 0.0]
    assert got[:, 0] == pytest.approx(expected, abs=1e-6)


def test_uncertain_label_is_a_clear_error(tmp_path: Path):
    record = Record("cxp500", tmp_path / "x.jpg", "p", "s", "test", labels={"Edema": -1.0})
    with pytest.raises(ValueError, match="cxp500: record .*x.jpg has label -1.0 for class 'edema'"):
        zero_shot.label_matrix([record], ["edema"], "cxp500")


def test_runs_on_the_tiny_world(tiny_encoder, task_context):
    out = zero_shot.run(tiny_encoder, task_context)
    assert set(out) == {"cxp500", "pdc"}
    n = len(task_context.data.records("pdc", "test"))
    for dataset, by_lang in out.items():
        assert set(by_lang) == {"en", "es"}
        for result in by_lang.values():
            assert result["images"] == len(task_context.data.records(dataset, "test"))
            assert 0.0 <= result["f1"] <= 1.0
            assert result["auc"] is None or 0.0 <= result["auc"] <= 1.0
    assert out["pdc"]["es"]["images"] == n
    assert len(out["pdc"]["en"]["per_class"]) == 10
