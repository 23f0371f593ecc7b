"""Report sections, cleaning, sentence splitting and token counting."""

from __future__ import annotations

from unimed.data.reports import (
    clean_report,
    count_tokens,
    extract_sections,
    mimic_report_text,
    split_sentences,
)

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // ?pneumonia

 Findings:
 Heart size is normal.  There is a small
 right pleural effusion.

 IMPRESSIONS: Small right effusion, ___ follow-up.
"""


def test_sections_are_found_in_any_case_with_aliases() -> None:
    sections = extract_sections(REPORT)
    assert {"EXAMINATION", "INDICATION", "FINDINGS", "IMPRESSION"} <= set(sections)
    assert "cough" in sections["INDICATION"] and "effusion" not in sections["INDICATION"]


def test_report_text_is_findings_then_impression_unwrapped_without_gaps() -> None:
    assert mimic_report_text(REPORT) == (
        "Heart size is normal. There is a small right pleural effusion. "
        "Small right effusion, follow-up."
    )
    assert mimic_report_text(REPORT, lowercase=True).startswith("heart size is normal.")


def test_impression_only_and_findings_only() -> None:
    assert (
        mimic_report_text("INDICATION: x\n\nIMPRESSION: No acute process.") == "No acute process."
    )
    assert mimic_report_text("FINDINGS: Lungs clear.\n") == "Lungs clear."


def test_without_sections_the_last_reading_paragraph_is_used() -> None:
    text = "FINAL REPORT\n INDICATION: dyspnea\n\n PA view.\n\n Lungs are clear, no effusion.\n"
    assert mimic_report_text(text) == "Lungs are clear, no effusion."
    assert mimic_report_text("  FINAL REPORT\n INDICATION: dyspnea\n") == ""


def test_clean_report_collapses_space_and_deid() -> None:
    assert clean_report("  A ___ gap ,\n wrapped\tline .  ") == "A gap, wrapped line."


def test_open_i_xxxx_gaps_are_cleaned_like_mimic_gaps() -> None:
    open_i = clean_report("XXXX-year-old with XXXX. Heart size normal. No XXXX effusion.")
    mimic = clean_report("___-year-old with ___. Heart size normal. No ___ effusion.")
    assert open_i == mimic == "-year-old with. Heart size normal. No effusion."
    assert clean_report("XR chest, X-ray of XX") == "XR chest, X-ray of XX"  # not a gap


def test_lower_case_and_longer_gaps_are_cleaned_alike() -> None:
    # Lower-cased IU X-ray releases write "xxxx"; a gap may be any run of 3+ X or 2+ underscores.
    expected = "no effusion. lungs clear."
    for gap in ("___", "____", "XXXX", "xxxx", "XXX", "XXXXXX"):
        assert clean_report(f"no {gap} effusion. lungs {gap} clear.") == expected, gap
    assert clean_report("xxxx-year-old with ___.") == clean_report("XXXX-year-old with XXXX.")
    assert clean_report("max. xx extra Xx") == "max. xx extra Xx"  # words and short runs stay


def test_mimic_and_open_i_reports_give_the_same_model_text() -> None:
    mimic = "FINDINGS: No ___ effusion.\n\nIMPRESSION: ___ normal chest."
    open_i = "FINDINGS: No XXXX effusion.\n\nIMPRESSION: XXXX normal chest."
    assert mimic_report_text(mimic) == mimic_report_text(open_i) == "No effusion. normal chest."


def test_sentences_in_english_and_spanish() -> None:
    assert split_sentences("No effusion. Mild cardiomegaly.", "en") == [
        "No effusion.",
        "Mild cardiomegaly.",
    ]
    assert split_sentences("derram pleural izquierd. cardiomegali.", "es") == [
        "derram pleural izquierd.",
        "cardiomegali.",
    ]
    assert split_sentences("   ", "es") == []


def test_token_count_ignores_punctuation() -> None:
    assert count_tokens("derram pleural, izquierd.") == 3
    assert count_tokens(" . ") == 0
