"""Whether a corpus was Snowball-stemmed, recorded by the vocabulary stage and read by the prompts."""

from __future__ import annotations

import json

import pytest
from text_corpora import ENGLISH_REPORTS

from unimed.eval.prompts import corpus_stemming, load_prompts
from unimed.text.stemming import (
    STEMMING_FILE,
    copy_corpus_stemming,
    detect_stemming,
    read_corpus_stemming,
    stem_text,
    write_corpus_stemming,
)

PLAIN_SPANISH = [
    "Derrame pleural izquierdo pequeño. Sin neumotórax.",
    "Opacidades en vidrio deslustrado de distribución periférica y bilateral, compatibles con neumonía.",
    "Cardiomegalia moderada. Redistribución vascular. Consolidación en el lóbulo inferior derecho.",
]


def test_a_stemmed_corpus_is_told_from_a_plain_one():
    stemmed = [stem_text(text, "spanish") for text in PLAIN_SPANISH]
    assert detect_stemming(stemmed, "es")["stemming"] == "spanish"
    plain = detect_stemming(PLAIN_SPANISH, "es")
    assert plain["stemming"] == "none" and plain["unchanged_share"] < 0.5 and plain["words"] > 10
    assert detect_stemming(ENGLISH_REPORTS, "en")["stemming"] == "none"
    assert detect_stemming(PLAIN_SPANISH, "xx") == {"stemming": "none", "unchanged_share": None, "words": 0}


def test_plain_english_that_stemming_leaves_half_unchanged_is_not_called_stemmed():
    """English words of five letters or more are often their own stem (small, pleural, clear,
    right, basal, pneumonia): this plain corpus keeps 7 of its 13 (0.54), which the earlier
    threshold of 0.5 called stemmed, and its English prompts were then stemmed unlike its reports.
    Stemmed, the same corpus keeps far more."""
    plain = ["Small left pleural effusion. No pneumothorax.", "Moderate cardiomegaly. Lungs are clear.",
             "Right basal opacity suggesting pneumonia."]
    found = detect_stemming(plain, "en")
    assert found["unchanged_share"] == pytest.approx(7 / 13, abs=1e-4) and found["stemming"] == "none"
    stemmed = detect_stemming([stem_text(text.lower(), "english") for text in plain], "en")
    assert stemmed["stemming"] == "english" and stemmed["unchanged_share"] > 0.85


def test_a_corpus_mixing_stemmed_and_plain_reports_is_said_to_be(tmp_path, caplog):
    """PadChest's stemmed Spanish beside another dataset's plain Spanish is one corpus to the
    vocabulary stage: its share of unchanged words falls between the two, and which way it is
    classed decides the Spanish prompts. Each report judged alone tells the mix; it is said."""
    stemmed = [stem_text(text.lower(), "spanish") for text in PLAIN_SPANISH]
    with caplog.at_level("WARNING", logger="unimed.text.stemming"):
        record = write_corpus_stemming(tmp_path, {"es": stemmed * 2 + PLAIN_SPANISH, "en": ENGLISH_REPORTS})
    assert (record["es"]["stemmed_reports"], record["es"]["reports_judged"]) == (6, 9)
    assert record["en"]["stemmed_reports"] / record["en"]["reports_judged"] < 0.1
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("the es reports mix stemmed (6 of 9 judged alone) and plain ones")
    assert f"recorded as {'stemmed' if record['es']['stemming'] == 'spanish' else 'plain'}" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="unimed.text.stemming"):
        write_corpus_stemming(tmp_path, {"es": stemmed, "en": ENGLISH_REPORTS})
    assert caplog.records == []

def test_record_is_written_read_and_carried(tmp_path):
    stemmed = [stem_text(text, "spanish") for text in PLAIN_SPANISH]
    record = write_corpus_stemming(tmp_path, {"en": ENGLISH_REPORTS, "es": stemmed, "fr": []})
    assert set(record) == {"en", "es"}
    assert read_corpus_stemming(tmp_path) == {"en": "none", "es": "spanish"}
    (tmp_path / "copy").mkdir()
    copy_corpus_stemming(tmp_path, tmp_path / "copy")
    assert read_corpus_stemming(tmp_path / "copy") == {"en": "none", "es": "spanish"}
    assert read_corpus_stemming(tmp_path / "nothing") == {}
    (tmp_path / STEMMING_FILE).write_text(json.dumps({"es": "spanish"}), encoding="utf-8")
    with pytest.raises(ValueError, match="is not a corpus stemming record"):
        read_corpus_stemming(tmp_path)


def test_vocab_and_mlm_record_the_corpus_and_prompts_follow_it(tmp_path):
    """Plain Spanish reports through `unimed vocab` and `unimed mlm`: the tokenizer folders say
    "none" for Spanish, and the prompts of an encoder with that tokenizer are not stemmed."""
    from transformers import AutoTokenizer

    from unimed.text.config import MLMConfig, VocabConfig
    from unimed.text.mlm import train_mlm
    from unimed.text.vocab import build_cross_lingual_tokenizer

    corpus = PLAIN_SPANISH * 4
    build_cross_lingual_tokenizer(ENGLISH_REPORTS, corpus, VocabConfig(english_vocab_size=200, new_terms=10),
                                  tmp_path / "vocab", progress=False)
    assert read_corpus_stemming(tmp_path / "vocab") == {"en": "none", "es": "none"}
    cfg = MLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, epochs=1,
                    batch_size=8, max_length=32, max_steps=1)
    train_mlm(ENGLISH_REPORTS + corpus, tmp_path / "vocab", cfg, tmp_path / "mlm", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "mlm"))
    assert corpus_stemming(tokenizer) == {"en": "none", "es": "none"}
    prompts = load_prompts("es", corpus=corpus_stemming(tokenizer))
    assert prompts.positive("pleural effusion") == "derrame pleural"
