"""Reports from language packs: consistency with labels, both languages from one truth, new packs."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.reports import LANG_DIR, load_pack
from unimed.text.stemming import stem_text

CFG = PhantomConfig(image_size=32)
# An independent reading of the English text: which words signal which CheXpert label.
KEYWORDS = {
    "Cardiomegaly": r"cardiomegaly|cardiac silhouette|heart size",
    "Pleural Effusion": r"effusion",
    "Pneumothorax": r"pneumothorax",
    "Edema": r"edema",
    "Fracture": r"fracture",
    "Atelectasis": r"atelectasis",
    "Lung Lesion": r"nodule|mass",
    "Support Devices": r"tube|catheter|pacemaker",
    "Pleural Other": r"pleural thickening",
    "Pneumonia": r"pneumonia",
    "Consolidation": r"consolidation",
}
HEDGE = re.compile(r"^(cannot exclude|possible|findings may represent)|is not excluded")
NEGATION = re.compile(r"^(no |there is no |heart size is normal)")
# (English, Spanish) words of findings, to check both reports say the same thing.
PAIRS = {"pleural_effusion": ("effusion", "derrame"), "pneumothorax": ("pneumothorax", "neumotórax"),
         "edema": ("edema", "edema"), "fracture": ("fracture", "fractura"), "covid": ("covid", "covid")}


def _sentences(report: str) -> list[str]:
    body = report[report.index("FINDINGS:"):].replace("FINDINGS:", " ").replace("IMPRESSION:", " ")
    return [s.strip().lower() for s in re.split(r"\.\s+", body) if s.strip()]


def _studies(n: int, cfg: PhantomConfig = CFG, site: str = "boston"):
    return [generate_study(cfg, "reports", i, site=site) for i in range(n)]


def test_english_report_is_mimic_style():
    report = _studies(1)[0].reports["en"]
    for section in ("EXAMINATION:", "INDICATION:", "COMPARISON:", "FINDINGS:", "IMPRESSION:"):
        assert section in report
    assert any("___" in s.reports["en"] for s in _studies(10))


def test_chexpert_labels_agree_with_the_english_report():
    seen = set()
    for study in _studies(150) + _studies(100, site="alicante"):
        sentences = _sentences(study.reports["en"])
        for label, pattern in KEYWORDS.items():
            value = study.chexpert[label]
            hits = [s for s in sentences if re.search(pattern, s)]
            if math.isnan(value):
                assert not hits, (label, study.reports["en"])
                continue
            seen.add(value)
            assert hits, (label, value, study.reports["en"])
            if value == 0.0:
                assert all(NEGATION.search(s) for s in hits), (label, hits)
            elif value == -1.0:
                assert any(HEDGE.search(s) for s in hits) and not any(
                    not HEDGE.search(s) and not NEGATION.search(s) for s in hits), (label, hits)
            else:
                assert any(not HEDGE.search(s) and not NEGATION.search(s) for s in hits), (label, hits)
    assert seen == {-1.0, 0.0, 1.0}  # the sample exercised positive, negated and hedged labels


def test_omitted_findings_are_absent_from_every_report():
    omitted = [(s, f) for s in _studies(150) for f in s.findings if not f.mentioned]
    assert omitted
    for study, finding in omitted:
        if finding.name in PAIRS and not any(g.name == finding.name and g.mentioned for g in study.findings):
            en, es = PAIRS[finding.name]
            assert en not in study.reports["en"].lower() and es not in study.reports["es_plain"]


def test_both_languages_render_the_same_findings():
    for study in _studies(120, site="alicante"):
        for name, (en, es) in PAIRS.items():
            assert (en in study.reports["en"].lower()) == (es in study.reports["es_plain"]), (name, study.reports)
        assert study.reports["es"] == stem_text(study.reports["es_plain"], "spanish")
        assert study.reports["es_plain"] == study.reports["es_plain"].lower()


def test_spanish_report_is_stemmed_padchest_style():
    study = generate_study(CFG, "reports", 0, site="alicante", enrich={"pleural_effusion": 1.0})
    assert "derrame pleural" in study.reports["es_plain"] and "derram pleural" in study.reports["es"]
    assert "FINDINGS" not in study.reports["es"]


def _copy_packs(tmp_path: Path) -> Path:
    for path in LANG_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_rates_come_from_the_pack(tmp_path):
    lang_dir = _copy_packs(tmp_path)
    pack = yaml.safe_load((lang_dir / "en.yaml").read_text(encoding="utf-8"))
    pack["rates"].update(hedge=1.0, omit=0.0)
    (lang_dir / "en.yaml").write_text(yaml.safe_dump(pack, allow_unicode=True), encoding="utf-8")
    cfg = PhantomConfig(image_size=32, lang_dir=str(lang_dir))
    studies = _studies(30, cfg)
    assert all(f.hedged and f.mentioned for s in studies for f in s.findings)
    assert all(v != 1.0 for s in studies for k, v in s.chexpert.items() if k != "No Finding")


def test_third_language_pack_needs_no_code(tmp_path):
    lang_dir = _copy_packs(tmp_path)
    pack = yaml.safe_load((lang_dir / "es.yaml").read_text(encoding="utf-8"))
    pack.update(language="pt", stemmer="portuguese")
    pack["findings"]["pleural_effusion"]["noun"] = ["derrame pleural {side}"]
    (lang_dir / "pt.yaml").write_text(yaml.safe_dump(pack, allow_unicode=True), encoding="utf-8")
    cfg = PhantomConfig(image_size=32, lang_dir=str(lang_dir), languages=("en", "es", "pt"))
    study = generate_study(cfg, "reports", 3, site="boston", enrich={"pleural_effusion": 1.0})
    assert {"en", "es", "es_plain", "pt", "pt_plain"} <= set(study.reports)
    assert "derrame pleural" in study.reports["pt_plain"]


def test_broken_pack_errors_name_file_and_key(tmp_path):
    lang_dir = _copy_packs(tmp_path)
    pack = yaml.safe_load((lang_dir / "en.yaml").read_text(encoding="utf-8"))
    del pack["findings"]["pneumothorax"]["negative"]
    (lang_dir / "xx.yaml").write_text(yaml.safe_dump(pack), encoding="utf-8")
    with pytest.raises(ValueError, match=r"xx\.yaml.*pneumothorax.*negative"):
        load_pack("xx", lang_dir)
    with pytest.raises(ValueError, match="available"):
        load_pack("zz", lang_dir)
