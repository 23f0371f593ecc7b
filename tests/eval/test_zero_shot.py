"""Zero-shot classification: prompt files, scoring by hand-computed values, an end-to-end run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from unimed.config import load_config
from unimed.data.records import Record
from unimed.errors import ConfigError
from unimed.eval import zero_shot
from unimed.eval.config import EvalConfig, ZeroShotConfig
from unimed.eval.errors import EvalError
from unimed.eval.metrics import resample_indices
from unimed.eval.prompts import load_prompts


def test_spanish_prompts_are_stemmed_like_padchest_reports_by_default():
    es = load_prompts("es")
    assert es.display("Pleural Effusion") == "derrame pleural"
    assert es.display("pleural effusion", negative=True) == "No hay derrame pleural"
    assert es.positive("pleural effusion") == "derram pleural"
    assert es.negative("Pleural Effusion") == "no hay derram pleural"
    en = load_prompts("en")
    assert (en.positive("Edema"), en.negative("Edema")) == ("pulmonary edema", "No pulmonary edema")


@pytest.mark.parametrize("stemming, corpus, positive, negative", [
    ({"es": "spanish"}, {"es": "none"}, "derram pleural", "no hay derram pleural"),  # set: wins
    ({"es": "none"}, {"es": "spanish"}, "derrame pleural", "no hay derrame pleural"),
    ({"es": "corpus"}, {"es": "none"}, "derrame pleural", "no hay derrame pleural"),  # BIMCV-style corpus
    ({}, {"es": "spanish"}, "derram pleural", "no hay derram pleural"),  # not listed: its corpus
    ({"es": "corpus"}, {}, "derram pleural", "no hay derram pleural"),  # no record: PadChest's way
])
def test_prompt_stemming_follows_the_setting_then_the_corpus(stemming, corpus, positive, negative):
    es = load_prompts("es", stemming=stemming, corpus=corpus)
    assert (es.positive("pleural effusion"), es.negative("pleural effusion")) == (positive, negative)
    assert es.display("pleural effusion") == "derrame pleural"  # what a person reads: never stemmed


def test_english_prompts_are_stemmed_when_the_english_corpus_was():
    en = load_prompts("en", stemming={"en": "english"})
    assert en.positive("pleural effusion") == "pleural effus"
    assert load_prompts("en", stemming={"es": "spanish"}).positive("pleural effusion") == (
        "pleural effusion")


def test_prompt_stemming_is_a_validated_config_key():
    assert EvalConfig().prompt_stemming == {"en": "corpus", "es": "corpus"}
    cfg = load_config(None, ["eval.prompt_stemming.es=none"])
    assert cfg.eval.prompt_stemming == {"en": "corpus", "es": "none"}
    with pytest.raises(ConfigError, match=r"eval.prompt_stemming.es must be 'corpus', 'none' or a "
                                          r"snowball algorithm \(.*spanish.*\), got 'snowbal'"):
        load_config(None, ["eval.prompt_stemming.es=snowbal"])


def test_a_prompt_file_choosing_its_own_stemmer_is_a_clear_error(tmp_path: Path):
    (tmp_path / "es.yaml").write_text("language: es\nstemmer: spanish\npositive: '{disease}'\n"
                                      "negative: 'No hay {disease}'\nclasses: {edema: edema}\n")
    with pytest.raises(ValueError, match=r"es.yaml: 'stemmer' is not read from prompt files.*"
                                         r"eval.prompt_stemming.es"):
        load_prompts("es", tmp_path)


def test_every_default_class_has_a_prompt_in_both_languages():
    from unimed.eval.config import ZERO_SHOT_CLASSES

    for lang in ("en", "es"):
        prompts = load_prompts(lang)
        for classes in ZERO_SHOT_CLASSES.values():
            assert all(prompts.positive(c) for c in classes)


def test_a_class_without_a_phrase_is_prompted_as_written_with_a_warning(caplog):
    es = load_prompts("es")
    with caplog.at_level("WARNING", logger="unimed.eval.prompts"):
        assert es.display("Goitre Nodule") == "Goitre Nodule"
        assert es.display("Goitre Nodule", negative=True) == "No hay Goitre Nodule"
    assert "no es phrase for class 'Goitre Nodule' in" in caplog.text and "es.yaml" in caplog.text


def test_prompt_errors_name_the_file(tmp_path: Path):
    with pytest.raises(EvalError, match="languages with prompts there"):
        load_prompts("fr")
    (tmp_path / "de.yaml").write_text("language: de\npositive: '{x}'\nnegative: 'Kein {disease}'\n"
                                      "classes: {edema: Ödem}\n")
    with pytest.raises(EvalError, match=r"de.yaml: 'positive' must be a text holding \{disease\} and no "):
        load_prompts("de", tmp_path)
    for text, expected in [
        ("positive: '{disease} {grade}'\nnegative: 'No {disease}'\nclasses: {edema: edema}",
         r"'positive' must be a text holding \{disease\} and no other \{field\}, got "
         r"'\{disease\} \{grade\}'"),
        ("positive: '{disease}'\nnegative: 'No {disease'\nclasses: {edema: edema}",
         r"'negative' is not a template \(expected '\}' before end of string\); write a literal brace twice"),
        ("positive: '{disease}'\nnegative: 'No {disease}'\nclasses: [edema, effusion]",
         r"'classes' maps each class name to its phrase \('pleural effusion: derrame pleural'\), got a list"),
        ("positive: '{disease}'\nnegative: 'Pas de {disease}'\n"
         "classes: {edema: œdème, effusion: , nodule: 3}",
         r"class\(es\) \['effusion', 'nodule'\] have no phrase \(a non-empty string\)"),
    ]:
        (tmp_path / "fr.yaml").write_text(f"language: fr\n{text}\n", encoding="utf-8")
        with pytest.raises(EvalError, match=rf"^prompt file {tmp_path / 'fr.yaml'}: {expected}$"):
            load_prompts("fr", tmp_path)
    (tmp_path / "it.yaml").write_text("language: it\npositive: [unclosed\n")
    with pytest.raises(EvalError, match="it.yaml: not valid YAML, line 3: expected ','"):
        load_prompts("it", tmp_path)
    (tmp_path / "it.yaml").write_text("language: it\npositive: '{disease}'\nnegative: 'Nessun {disease}'\n"
                                      "classes:\n  edema: edema\n  edema: versamento\n")
    with pytest.raises(EvalError, match="it.yaml: not valid YAML, line 6: key 'edema' appears twice"):
        load_prompts("it", tmp_path)


def test_scores_match_hand_computed_auc_and_f1():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = np.array([[0.3, -0.1], [-0.2, 0.4], [0.1, -0.3], [-0.4, 0.2]])
    resamples = resample_indices(4, 200, seed=0, dataset="toy", split="test")
    out = zero_shot.score_language(labels, scores, ["a", "b"], resamples)
    # class a: positives score 0.3, -0.2; negatives 0.1, -0.4 -> pairs won 3 of 4 -> AUC 0.75;
    # predicted positive (score > 0): rows 0, 2 -> TP 1, FP 1, FN 1 -> F1 0.5.
    assert (out["per_class"]["a"]["auc"], out["per_class"]["a"]["f1"]) == (0.75, 0.5)
    # class b: positives 0.4, -0.3; negatives -0.1, 0.2 -> 2 of 4 -> 0.5; predicted rows 1, 3 -> F1 0.5.
    assert (out["per_class"]["b"]["auc"], out["per_class"]["b"]["f1"]) == (0.5, 0.5)
    assert out["per_class"]["a"]["positives"] == 2
    assert out["auc"] == pytest.approx(0.625) and out["f1"] == pytest.approx(0.5)
    # The macro AUC's interval comes from the per-resample AUCs computed by sklearn.
    per_resample = []
    for index in resamples:
        aucs = [roc_auc_score(labels[index, c], scores[index, c]) for c in range(2)
                if len(set(labels[index, c])) == 2]
        per_resample.append(np.mean(aucs) if aucs else np.nan)
    assert np.allclose(out["replicates"]["auc"], per_resample, equal_nan=True)
    assert "replicates" not in out["per_class"]["a"]


def test_class_without_both_label_values_has_no_auc():
    resamples = resample_indices(2, 20, seed=0, dataset="toy", split="test")
    out = zero_shot.score_language(np.array([[1], [1]]), np.array([[0.2], [-0.1]]), ["a"], resamples)
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


def test_a_label_that_is_not_0_or_1_is_a_clear_error(tmp_path: Path):
    records = [Record("cxr", tmp_path / f"{i}.jpg", "p", "s", "test", labels=labels)
               for i, labels in enumerate([{"Edema": 1.0}, {"Edema": -1.0, "Mass": 0.0}, {"Mass": 1.0}])]
    with pytest.raises(ValueError, match=r"cxr: 2 of 3 records have no 0/1 label for 'edema' \(the first, "
                                         r".*1.jpg, is -1 \(uncertain\)\)"):
        zero_shot.label_matrix(records, ["edema"], "cxr")
    with pytest.raises(ValueError, match=r"1 of 3 records .* for 'Mass' \(the first, .*0.jpg, is blank\)"):
        zero_shot.label_matrix(records, ["Mass"], "cxr")
    with pytest.raises(ValueError, match=r"cxr: none of the \d+ records scored states a label 'Nodule' "
                                         r"\(the labels they state: Edema, Mass\)$"):
        zero_shot.label_matrix(records, ["Nodule"], "cxr")
    np.testing.assert_array_equal(zero_shot.label_matrix(records[:1], ["EDEMA"], "cxr"), [[1]])


def test_records_without_a_0_1_label_are_left_out_of_that_class_when_asked(tmp_path: Path):
    """``missing_labels=exclude``: a blank or uncertain label is NaN in the matrix, and the class is
    scored on its labelled records alone, its interval too; the other classes keep every record."""
    labels = [{"Edema": 1.0, "Mass": 0.0}, {"Edema": -1.0, "Mass": 1.0}, {"Mass": 0.0},
              {"Edema": 0.0, "Mass": 1.0}, {"Edema": 1.0, "Mass": 0.0}, {"Edema": 0.0, "Mass": 1.0}]
    records = [Record("cxr", tmp_path / f"{i}.jpg", "p", "s", "test", labels=row)
               for i, row in enumerate(labels)]
    matrix = zero_shot.label_matrix(records, ["Edema", "Mass"], "cxr", "exclude")
    np.testing.assert_array_equal(matrix, [[1, 0], [np.nan, 1], [np.nan, 0], [0, 1], [1, 0], [0, 1]])
    scores = np.array([[0.3, 0.1], [0.9, 0.4], [-0.8, -0.2], [0.2, 0.3], [-0.1, 0.0], [-0.3, 0.5]])
    resamples = resample_indices(6, 300, seed=0, dataset="toy", split="test")
    out = zero_shot.score_language(matrix, scores, ["Edema", "Mass"], resamples)
    edema, mass = out["per_class"]["Edema"], out["per_class"]["Mass"]
    # Edema on records 0, 3, 4, 5: positives 0.3, -0.1; negatives 0.2, -0.3 -> 3 of 4 pairs.
    assert edema["auc"] == 0.75 and (edema["labelled"], edema["positives"]) == (4, 2)
    assert edema["f1"] == 0.5  # predicted: records 0 and 3 -> TP 1, FP 1, FN 1 -> 2 / (2 + 1 + 1)
    assert mass["auc"] == 1.0 and (mass["labelled"], mass["positives"]) == (6, 3)
    per_resample = []
    for index in resamples:
        aucs = []
        for c in range(2):
            known = index[~np.isnan(matrix[index, c])]
            if len(set(matrix[known, c])) == 2:
                aucs.append(roc_auc_score(matrix[known, c].astype(int), scores[known, c]))
        per_resample.append(np.mean(aucs) if aucs else np.nan)
    np.testing.assert_allclose(out["replicates"]["auc"], per_resample, equal_nan=True)
    with pytest.raises(ValueError, match="eval.zero_shot.missing_labels must be one of error, exclude, "
                                         "got 'drop'"):
        ZeroShotConfig(missing_labels="drop")


class _OracleEncoder:
    """Prompt embeddings are orthonormal; an image's embedding is the sum of the positive prompts
    of the classes it has and the negative prompts of those it lacks (swapped when `flipped`)."""

    name = label = "oracle"
    model = None  # no zero-shot rule of its own: the generic cosine rule applies
    tokenizer = None  # no corpus stemming record: eval.prompt_stemming and its fallback decide

    def __init__(self, labels: np.ndarray, prompts, classes, flipped: bool = False) -> None:
        self.labels, self.flipped = labels, flipped
        self.texts = [prompts.positive(c) for c in classes] + [prompts.negative(c) for c in classes]

    def image_spaces(self, images, batch_size=64):
        assert len(images) == len(self.labels)
        has = torch.from_numpy(self.labels != self.flipped).float()  # (N, C)
        features = torch.nn.functional.normalize(torch.cat([has, 1 - has], dim=1), dim=-1)
        return {"pooled": features, "projected": features}

    def text_spaces(self, texts, batch_size=64):
        features = torch.eye(len(self.texts))[[self.texts.index(t) for t in texts]]
        return {"pooled": features, "projected": features}


@pytest.mark.parametrize("flipped, expected", [(False, 1.0), (True, 0.0)])
def test_images_aligned_with_their_prompts_score_auc_one(task_context, flipped, expected):
    cfg = task_context.cfg.zero_shot
    classes = cfg.classes["pdc"]
    labels = zero_shot.label_matrix(task_context.data.records("pdc", "test"), classes, "pdc")
    encoder = _OracleEncoder(labels, load_prompts("en"), classes, flipped)
    only_pdc = dataclasses.replace(cfg, datasets=("pdc",), languages=("en",))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(task_context.cfg,
                                                                    zero_shot=only_pdc))
    out = zero_shot.run(encoder, ctx)["pdc"]["en"]
    assert out["auc"] == expected and out["ci"]["auc"] == [expected, expected]
    assert out["f1"] == expected
    defined = [v["auc"] for v in out["per_class"].values() if v["auc"] is not None]
    assert len(defined) >= 5 and set(defined) == {expected}


class _OwnRule:
    """A model with its own zero-shot rule: +1 for the classes an image has, -1 for the others,
    read from the labels row by row (so image batches must arrive in order)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels, self.rows, self.prompts = labels, 0, []

    def zero_shot_prompts(self, positive, negative):
        self.prompts.append((positive[0][:, 0].tolist(), negative[0][:, 0].tolist()))
        return positive, negative

    def zero_shot_scores(self, images, prompts):
        rows = self.labels[self.rows : self.rows + len(images)]
        self.rows += len(images)
        sets = len(prompts[0][0]) // self.labels.shape[1]  # the same answer for every prompt set
        return torch.from_numpy(np.tile(2.0 * rows - 1.0, sets))


class _OwnRuleEncoder(_OracleEncoder):
    """Tokenises a prompt as its index among the prompts; the generic rule must not run."""

    device = torch.device("cpu")

    def __init__(self, labels, prompts, classes, *more_prompts) -> None:
        super().__init__(labels, prompts, classes)
        for other in more_prompts:
            self.texts += [other.positive(c) for c in classes] + [other.negative(c) for c in classes]
        self.model = _OwnRule(labels)

    def tokenize(self, texts):
        ids = torch.tensor([[self.texts.index(t)] for t in texts])
        return ids, torch.ones_like(ids)

    def image_spaces(self, *args, **kwargs):
        raise AssertionError("the method's own zero-shot rule replaces the cosine rule")


@pytest.mark.parametrize("algorithm", ["spanish", "none"])
def test_zero_shot_prompts_follow_eval_prompt_stemming(task_context, algorithm):
    # The oracle knows only the prompts stemmed as configured: any other text is a lookup error.
    cfg = task_context.cfg.zero_shot
    classes = cfg.classes["pdc"]
    labels = zero_shot.label_matrix(task_context.data.records("pdc", "test"), classes, "pdc")
    stemming = {"es": algorithm}
    encoder = _OracleEncoder(labels, load_prompts("es", stemming=stemming), classes)
    assert ("derram pleural" in encoder.texts) == (algorithm == "spanish")
    only_pdc = dataclasses.replace(cfg, datasets=("pdc",), languages=("es",))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(
        task_context.cfg, zero_shot=only_pdc, prompt_stemming=stemming))
    assert zero_shot.run(encoder, ctx)["pdc"]["es"]["auc"] == 1.0


def test_a_methods_own_zero_shot_rule_replaces_the_cosine_rule(task_context):
    cfg = task_context.cfg.zero_shot
    classes = cfg.classes["pdc"]
    labels = zero_shot.label_matrix(task_context.data.records("pdc", "test"), classes, "pdc")
    encoder = _OwnRuleEncoder(labels, load_prompts("en"), classes)
    only_pdc = dataclasses.replace(cfg, datasets=("pdc",), languages=("en",))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(
        task_context.cfg, zero_shot=only_pdc, batch_size=5))
    out = zero_shot.run(encoder, ctx)["pdc"]["en"]
    assert out["auc"] == 1.0 and out["f1"] == 1.0
    assert encoder.model.rows == len(labels)
    c = len(classes)  # the prompts encoded once for all the batches of 5 images
    assert encoder.model.prompts == [(list(range(c)), list(range(c, 2 * c)))]


def test_an_own_rule_scores_every_language_in_one_pass_over_the_images(task_context):
    cfg = task_context.cfg.zero_shot
    classes = cfg.classes["pdc"]
    labels = zero_shot.label_matrix(task_context.data.records("pdc", "test"), classes, "pdc")
    english, spanish = load_prompts("en"), load_prompts("es")
    encoder = _OwnRuleEncoder(labels, english, classes, spanish)
    both = dataclasses.replace(cfg, datasets=("pdc",), languages=("en", "es"))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(
        task_context.cfg, zero_shot=both, batch_size=5))
    out = zero_shot.run(encoder, ctx)["pdc"]
    assert out["en"]["auc"] == out["es"]["auc"] == 1.0
    assert encoder.model.rows == len(labels)  # each image scored once for both languages
    c = len(classes)  # English pairs, then Spanish pairs (token id = index in encoder.texts)
    assert encoder.model.prompts == [(list(range(c)) + list(range(2 * c, 3 * c)),
                                      list(range(c, 2 * c)) + list(range(3 * c, 4 * c)))]


def test_runs_on_the_tiny_world(tiny_encoder, task_context):
    out = zero_shot.run(tiny_encoder, task_context)
    assert set(out) == {"cxp500", "pdc"}
    n = len(task_context.data.records("pdc", "test"))
    for dataset, by_lang in out.items():
        assert set(by_lang) == {"en", "es"}
        for result in by_lang.values():
            assert result["images"] == len(task_context.data.records(dataset, "test"))
            lo, hi = result["ci"]["f1"]
            assert 0.0 <= lo <= result["f1"] <= hi <= 1.0
            assert result["auc"] is None or 0.0 <= result["auc"] <= 1.0
            assert result["replicates"]["auc"].shape == (task_context.cfg.bootstrap_resamples,)
    assert out["pdc"]["es"]["images"] == n
    assert len(out["pdc"]["en"]["per_class"]) == 10
