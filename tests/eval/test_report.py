"""The evaluation report (tables, HTML) and the quality checks, on hand-made metrics dicts."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unimed.eval import report
from unimed.eval.checks import (
    FAIL,
    FINETUNE_TASKS,
    NOT_MEASURED,
    PASS,
    TIE,
    Check,
    all_quality_checks,
    beats_cause,
    percent,
    quality_checks,
    tally_lines,
)
from unimed.eval.html_report import E, render_report, write_report
from unimed.eval.report import format_tables, table_notes

CLASSES = ("Atelectasis", "Edema")


def _fractions(base: float) -> dict:
    return {f: {"value": base + 0.05 * i, "train_images": n}
            for i, (f, n) in enumerate((("1%", 16), ("10%", 160), ("100%", 1600)))}


def _zero_shot(auc: float) -> dict:
    per_class = {c: {"auc": auc, "f1": auc - 0.3} for c in CLASSES}
    return {"auc": auc, "f1": auc - 0.3, "images": 100, "per_class": per_class}


def _separability(probe: float) -> dict:
    return {"probe_accuracy": probe, "knn_accuracy": probe - 0.05, "silhouette": 0.3}


def _tasks(key: str, base: float, auc: float, language_probe: float) -> dict:
    recall = {m: base for m in ("R@1", "R@5", "R@10", "P@1", "P@5", "P@10")}
    space = {"language": _separability(language_probe), "site": _separability(0.6)}
    return {
        "zero_shot": {s: {"en": _zero_shot(auc), "es": _zero_shot(auc - 0.01)} for s in ("cxp500", "pdc")},
        "linear_probe": {"chexpert": {"metric": "auc", "fractions": _fractions(base)},
                         "rsna": {"metric": "auc", "fractions": _fractions(base)},
                         "covidx": {"metric": "accuracy", "fractions": _fractions(base)}},
        "segmentation": {d: {"metric": "dice", "fractions": _fractions(base - 0.2)}
                         for d in ("siim", "rsna")},
        "detection": {d: {"metric": "map", "fractions": _fractions(base - 0.4)}
                      for d in ("rsna", "object-cxr")},
        "retrieval": {"image_to_report": {"mimic-cxr": recall, "padchest": recall},
                      "report_to_image": {"mimic-cxr": recall, "padchest": recall},
                      "cross_lingual": {"en_to_es": {"R@1": base}, "es_to_en": {"R@1": base}},
                      "queries": {"mimic-cxr": 60, "padchest": 60}},
        "bias": {"text": {"pooled": space, "projected": space}, "image": {"pooled": space, "projected": space},
                 "samples": {"en": 60, "es": 60},
                 "parallel": {"pairs": 50, "pooled": {lang: {"R@1": base - 0.3, "cross_top1": 0.5,
                                                             "translation_rank": 1.0 - base}
                                                      for lang in ("en", "es")}},
                 "figures": {"tsne_text": f"{key}_tsne_text.png", "tsne_image": f"{key}_tsne_image.png"}},
        "gradcam": {"figures": {"gradcam": f"{key}_gradcam.png"}, "classes": list(CLASSES),
                    "images_per_class": 2},
    }


def _metrics() -> dict:
    """A full run: Med-UniC clearly above the MLM-only baseline everywhere, plus an ablation."""
    medunic = _tasks("medunic", 0.7, 0.8123, 0.55)
    ablation = [{"name": name, "objectives": {"ssv": ssv, "cvl": True, "ctr": ctr, "mlm": True},
                 "metrics": {k: medunic[k] for k in ("zero_shot", "linear_probe", "segmentation")}}
                for name, ssv, ctr in (("CVL + MLM", False, False), ("All", True, True))]
    return {
        "run": "demo", "checkpoint": "runs/demo/pretrain/checkpoints/step_00000150",
        "data_root": "data/phantom", "created": "2026-11-25T16:00:00", "seconds": 312.5,
        "encoders": {
            "medunic": {"label": "Med-UniC", "seconds": {"zero_shot": 3.1, "linear_probe": 40.0},
                        "tasks": medunic},
            "init": {"label": "Random init / MLM-only", "seconds": {"zero_shot": 2.0},
                     "tasks": _tasks("init", 0.5, 0.55, 0.99)},
        },
        "ablation": {"rows": ablation},
    }


@pytest.fixture
def figure_dir(tmp_path: Path) -> Path:
    """Tiny PNGs for every figure the metrics name."""
    folder = tmp_path / "figures"
    folder.mkdir()
    for key in ("medunic", "init"):
        for name in ("tsne_text", "tsne_image", "gradcam"):
            Image.new("RGB", (4, 3), (200, 30, 30)).save(folder / f"{key}_{name}.png")
    return folder


def _table(metrics: dict, title: str) -> tuple[list[str], list[list[str]]]:
    tables = {t: (header, rows) for t, header, rows in format_tables(metrics)}
    return tables[title]


def test_percent_formatting() -> None:
    assert percent(0.8123) == "81.2"
    assert percent(None) == percent(float("nan")) == percent("0.5") == "–"


def test_zero_shot_table_layout() -> None:
    header, rows = _table(_metrics(), report.TITLE_ZERO_SHOT)
    assert header[:3] == ["Method", "CXP500 (En) / AUC", "CXP500 (En) / F1"]
    assert header[-1] == "PDC (Sp) / F1"
    assert rows[0][:3] == ["Med-UniC", "81.2", "51.2"]
    assert rows[1][0] == "Random init / MLM-only"


def test_fraction_tables_follow_the_paper() -> None:
    metrics = _metrics()
    header, rows = _table(metrics, report.TITLE_LINEAR)
    assert header[1:4] == ["CheXpert (AUC) / 1%", "CheXpert (AUC) / 10%", "CheXpert (AUC) / 100%"]
    assert header[-1] == "COVIDx (ACC) / 100%"
    assert rows[0][1:4] == ["70.0", "75.0", "80.0"]
    header, _ = _table(metrics, report.TITLE_SEG_DET)
    assert "RSNA (Dice) / 1%" in header and "Object-CXR (mAP) / 100%" in header
    header, rows = _table(metrics, report.TITLE_ABLATION)
    assert header[:5] == ["Variant", "SSV", "CVL", "CTR", "MLM"]
    assert header[-4:] == ["CXP500 (F1) / En", "CXP500 (F1) / Sp", "PDC (F1) / En", "PDC (F1) / Sp"]
    assert rows[0][1:5] == ["", "✓", "", "✓"]
    assert "Training images: CheXpert: 1% 16, 10% 160, 100% 1600" in table_notes(metrics)[report.TITLE_LINEAR]
    chexpert = metrics["encoders"]["medunic"]["tasks"]["linear_probe"]["chexpert"]["fractions"]
    for fraction in ("1%", "10%"):
        chexpert[fraction]["draws"] = 5
    assert ("Training images: CheXpert: 1% 16 (mean of 5 draws), 10% 160 (mean of 5 draws), 100% 1600"
            in table_notes(metrics)[report.TITLE_LINEAR])


def test_bias_tables_show_ratio_parallel_retrieval_and_control() -> None:
    metrics = _metrics()
    bias = metrics["encoders"]["medunic"]["tasks"]["bias"]
    bias["text"]["pooled"]["language"]["distance_ratio"] = 1.234
    bias["parallel"] = {"pairs": 50, "pooled": {"en": {"R@1": 0.42, "cross_top1": 0.9,
                                                       "ci": {"R@1": [0.3, 0.5]}},
                                             "es": {"R@1": 0.38, "cross_top1": 0.8}}}
    control = {"language": {"probe_accuracy": 0.61, "distance_ratio": 1.05}}
    bias["control"] = {"sites": ["miami"], "seen": {"image": {"pooled": control}}, "unseen": None}
    header, rows = _table(metrics, report.TITLE_BIAS)
    assert [row[1] for row in rows[:4]] == ["Text (pooled)", "Text (projected)", "Image (pooled)",
                                           "Image (projected)"]
    assert len(rows) == 8 and rows[0][header.index("Language / ratio")] == "1.23"
    header, rows = _table(metrics, report.TITLE_BIAS_CONTROL)
    assert [row[:2] for row in rows] == [["Med-UniC", "Text (pooled)"], ["Med-UniC", "Image (pooled)"],
                                         ["Random init / MLM-only", "Text (pooled)"]]
    cells = dict(zip(header, rows[0]))
    assert cells["Parallel reports / R@1 EN"] == "42.0 (30.0–50.0)"
    assert cells["Parallel reports / other-language top-1 ES"] == "80.0"
    assert cells["Parallel reports / translation rank EN"] == "–"  # not in this hand-made entry
    assert dict(zip(header, rows[2]))["Parallel reports / translation rank ES"] == "50.0"
    assert cells["Control, seen / language probe"] == "–"
    cells = dict(zip(header, rows[1]))
    assert cells["Control, seen / language probe"] == "61.0"
    assert cells["Control, seen / language ratio"] == "1.05"
    assert cells["Control, unseen / language probe"] == "–"


def test_holes_show_a_dash() -> None:
    metrics = _metrics()
    del metrics["encoders"]["init"]["tasks"]["zero_shot"]["pdc"]["es"]
    del metrics["encoders"]["init"]["tasks"]["linear_probe"]["covidx"]["fractions"]["10%"]
    _, rows = _table(metrics, report.TITLE_ZERO_SHOT)
    assert rows[1][-2:] == ["–", "–"]
    header, rows = _table(metrics, report.TITLE_LINEAR)
    assert rows[1][header.index("COVIDx (ACC) / 10%")] == "–"


def test_html_report(tmp_path: Path, figure_dir: Path) -> None:
    out = write_report(_metrics(), tmp_path / "out" / "report.html", figure_dir)
    page = out.read_text(encoding="utf-8")
    for title in (report.TITLE_ZERO_SHOT, report.TITLE_PER_CLASS, report.TITLE_LINEAR,
                  report.TITLE_SEG_DET, report.TITLE_I2R, report.TITLE_R2I, report.TITLE_CROSS,
                  report.TITLE_BIAS, report.TITLE_ABLATION, report.TITLE_TIMINGS, "Quality checks"):
        assert E(title) in page
    assert re.search(r'<td class="num best[^"]*">81\.2</td>', page)
    assert re.search(r'<td class="num( gs)?">55\.0</td>', page)  # the baseline, not bold
    assert page.count("data:image/png;base64,") == 6
    assert 'colspan="2"' in page and 'rowspan="2"' in page
    assert "<script" not in page and 'src="http' not in page and "url(" not in page
    assert "PASS" in page and "Figure missing" not in page


def test_html_escapes_strings_from_metrics(tmp_path: Path, figure_dir: Path) -> None:
    metrics = _metrics()
    metrics["encoders"]["medunic"]["label"] = "<script>alert(1)</script>"
    metrics["run"] = 'a"b<i>'
    metrics["encoders"]["init"]["tasks"]["zero_shot"]["cxp500"]["en"]["per_class"]["<b>x</b>"] = {"auc": 0.5}
    page = render_report(metrics, figure_dir)
    assert "<script" not in page and "<b>x</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("metrics", [
    {},
    {"run": "z", "encoders": {}},
    {"encoders": {"medunic": {"label": "M", "tasks": {"zero_shot": {"cxp500": {"en": {"auc": 0.9}}}}}}},
    {"encoders": {"medunic": {"tasks": {"linear_probe": {"rsna": None}, "bias": [], "retrieval": {}},
                              "seconds": None}, "init": None},
     "ablation": {"rows": None}, "seconds": "n/a"},
])
def test_sparse_metrics_render(tmp_path: Path, metrics: dict) -> None:
    page = write_report(metrics, tmp_path / "report.html", tmp_path).read_text(encoding="utf-8")
    assert "Not in this run." in page and "Quality checks" in page


def test_sparse_zero_shot_only() -> None:
    metrics = {"encoders": {"medunic": {"label": "M", "tasks": {
        "zero_shot": {"cxp500": {"en": {"auc": 0.9}}}}}}}
    tables = format_tables(metrics)
    assert [t[0] for t in tables] == [report.TITLE_ZERO_SHOT]
    assert tables[0][1:] == (["Method", "CXP500 (En) / AUC", "CXP500 (En) / F1"], [["M", "90.0", "–"]])


def test_missing_figure_is_reported(tmp_path: Path) -> None:
    page = render_report(_metrics(), tmp_path / "nowhere")
    assert "Figure missing: medunic_gradcam.png" in page and "data:image/png" not in page


def _by_state(checks: list[Check]) -> dict[str, int]:
    return {state: sum(c.status == state for c in checks) for state in (PASS, FAIL, TIE, NOT_MEASURED)}


def _replicates(metrics: dict, noise: float = 0.01) -> dict[str, np.ndarray]:
    """Replicates of every fraction row: its value plus resampling noise that every encoder shares
    (same resamples), as the tasks' paired bootstrap gives."""
    shared = np.random.default_rng(0).normal(scale=noise, size=200)
    out = {}
    for key, entry in metrics["encoders"].items():
        for task in FINETUNE_TASKS:
            for name, block in entry["tasks"][task].items():
                for fraction, row in block["fractions"].items():
                    out[f"{key}/{task}/{name}/fractions/{fraction}/value"] = row["value"] + shared
        for lang, row in entry["tasks"]["bias"]["parallel"]["pooled"].items():
            out[f"{key}/bias/parallel/pooled/{lang}/translation_rank"] = row["translation_rank"] + shared
    return out


def test_checks_all_pass() -> None:
    metrics = _metrics()
    checks = quality_checks(metrics, _replicates(metrics))
    assert _by_state(checks) == {PASS: 4 + 3 * 3 + 2 * 3 + 2 * 3 + 1 + 2, FAIL: 0, TIE: 0, NOT_MEASURED: 0}
    probe, *parallel = checks[-3:]
    assert "language" in probe.name.lower() and "55.0%" in probe.detail and "94.0%" in probe.detail
    assert [c.name for c in parallel] == [
        f"Parallel reports from {lang}: Med-UniC ranks translations nearer than Random init / MLM-only "
        "(text embeddings)" for lang in ("En", "Sp")]
    assert "translation rank Med-UniC 30.0% vs Random init / MLM-only 50.0%" in parallel[0].detail
    assert "R@1 40.0% vs 20.0%" in parallel[0].detail and "[-20.0, -20.0]" in parallel[0].detail
    assert any("Med-UniC 70.0 vs Random init / MLM-only 50.0" in c.detail for c in checks)
    assert any("difference 95% CI [+20.0, +20.0] points" in c.detail for c in checks)
    assert all(c.cause == "" for c in checks)


def test_every_trained_method_gets_its_own_checks_and_the_dense_baselines_come_once() -> None:
    metrics = _metrics()
    metrics["encoders"]["prior"] = {"label": "PRIOR", "tasks": _tasks("prior", 0.45, 0.62, 0.99)}
    metrics["encoders"]["random"] = {"label": "Random", "tasks": _tasks("random", 0.3, 0.5, 0.99)}
    metrics["methods"] = ["medunic", "prior"]
    replicates = _replicates(metrics)
    checks = all_quality_checks(metrics, replicates)
    one = quality_checks(metrics, replicates, model="prior", dense_baselines=False)
    ours = [c for c in checks if c.name.startswith("PRIOR: ")]
    assert [c.name for c in ours] == [f"PRIOR: {c.name}" for c in one]
    assert [c.status for c in ours] == [c.status for c in one]
    assert _by_state(ours)[PASS] == 0 and _by_state(ours)[FAIL] == 4 + 3 * 3 + 2 * 3 + 2 * 3 + 2
    probe = [c for c in ours if "Language-ID" in c.name]  # 99.0 % for both: the probe saturated
    assert [c.status for c in probe] == [TIE] and "saturated" in probe[0].cause
    assert _by_state([c for c in checks if c.name.startswith("Med-UniC: ")])[FAIL] == 0
    dense = [c for c in checks if not c.name.startswith(("PRIOR: ", "Med-UniC: "))]
    assert len(dense) == 2 * 3 + 2 * 3 and all("beats Random" in c.name for c in dense)
    assert all(c.status == PASS for c in dense)
    metrics["methods"] = ["medunic"]
    assert all_quality_checks(metrics, replicates) == quality_checks(metrics, replicates)


def test_beats_without_replicates_is_not_measured() -> None:
    checks = [c for c in quality_checks(_metrics()) if "beats" in c.name]
    assert checks and all(c.status == NOT_MEASURED for c in checks)
    assert all("no bootstrap replicates" in c.detail for c in checks)


def test_difference_within_noise_is_a_tie_and_below_zero_a_fail() -> None:
    metrics = _metrics()
    replicates = _replicates(metrics)
    noise = np.random.default_rng(1).normal(scale=0.05, size=200)
    key = "/linear_probe/rsna/fractions/10%/value"
    replicates["medunic" + key] = replicates["init" + key] + noise  # straddles zero
    model = metrics["encoders"]["medunic"]["tasks"]
    model["segmentation"]["siim"]["fractions"]["1%"]["value"] = 0.1
    replicates["medunic/segmentation/siim/fractions/1%/value"] = 0.1 + replicates[
        "init/segmentation/siim/fractions/1%/value"] - 0.3
    checks = quality_checks(metrics, replicates)
    tied = [c for c in checks if c.status == TIE]
    assert [c.name for c in tied] == ["Linear probe RSNA 10%: Med-UniC beats Random init / MLM-only"]
    assert "within noise" in tied[0].cause
    failed = [c for c in checks if c.status == FAIL]
    assert [c.name for c in failed] == ["Segmentation SIIM 1%: Med-UniC beats Random init / MLM-only"]
    assert "baseline is better" in failed[0].cause and "head's training seed" in failed[0].cause
    assert "head's training seed" not in beats_cause(FAIL, [0.6, 0.7], "auc")  # linear probe


def test_tie_between_two_decoders_that_predict_nothing_says_so() -> None:
    """Both SIIM 1% decoders call every test image empty: the same per-image Dice, a zero
    difference, a tie whose cause says why (not "enlarge the test set"); one that predicts some
    masks is an ordinary tie."""
    metrics = _metrics()
    replicates = _replicates(metrics)
    key = "segmentation/siim/fractions/1%"
    rows = [metrics["encoders"][enc]["tasks"]["segmentation"]["siim"]["fractions"]["1%"]
            for enc in ("medunic", "init")]
    for row in rows:
        row.update(value=0.7, predicted_empty=1.0)
    replicates[f"medunic/{key}/value"] = replicates[f"init/{key}/value"]

    def siim_1() -> str:
        (check,) = [c for c in quality_checks(metrics, replicates) if "SIIM 1%" in c.name]
        assert check.status == TIE
        return check.cause

    assert "call every test image empty" in siim_1()
    rows[0]["predicted_empty"] = 0.8
    assert "within noise" in siim_1()


def test_tie_between_two_chance_level_aucs_says_so() -> None:
    assert "near chance" in beats_cause(TIE, [0.51, 0.49], "auc")
    assert "within noise" in beats_cause(TIE, [0.71, 0.69], "auc")


def test_chance_level_tie_says_when_more_labels_were_learned_from() -> None:
    """Both probes at chance on 16 images, but the model's 10% row is above chance beyond its
    interval: the cause names the row, not "neither encoder's features carry this label"."""
    metrics = _metrics()
    replicates = _replicates(metrics)
    rows = {enc: metrics["encoders"][enc]["tasks"]["linear_probe"]["chexpert"]["fractions"]
            for enc in ("medunic", "init")}
    for enc in rows:
        rows[enc]["1%"].update(value=0.51 if enc == "medunic" else 0.49, ci=[0.45, 0.56])
        replicates[f"{enc}/linear_probe/chexpert/fractions/1%/value"] = np.full(200, 0.5)
    rows["medunic"]["10%"].update(value=0.702, ci=[0.655, 0.747])
    rows["medunic"]["100%"]["ci"] = [0.75, 0.85]

    def chexpert_1() -> str:
        (check,) = [c for c in quality_checks(metrics, replicates)
                    if c.name.startswith("Linear probe CheXpert 1%")]
        assert check.status == TIE
        return check.cause

    assert chexpert_1() == ("both near chance on 16 training images, too few to learn from; with more "
                            "labels the model's features carry it (10% (160 images): 70.2 (65.5–74.7))")
    rows["medunic"]["10%"]["ci"] = [0.48, 0.9]  # not beyond chance: the next row, 100%
    assert "(100% (1600 images): " in chexpert_1()
    for fraction in ("10%", "100%"):
        rows["medunic"][fraction]["ci"] = [0.45, 0.9]
    assert chexpert_1() == "both near chance: neither encoder's features carry this label"


def test_checks_fail() -> None:
    metrics = _metrics()
    model = metrics["encoders"]["medunic"]["tasks"]
    model["zero_shot"]["pdc"]["es"]["auc"] = 0.79
    model["segmentation"]["siim"]["fractions"]["10%"]["value"] = 0.1
    model["bias"]["text"]["pooled"]["language"]["probe_accuracy"] = 0.995
    failed = [c.name for c in quality_checks(metrics, _replicates(metrics)) if c.status == FAIL]
    assert len(failed) == 3
    assert "PDC (Sp)" in failed[0] and "SIIM 10%" in failed[1] and "Language-ID" in failed[2]
    assert quality_checks(metrics, zero_shot_min=0.5)[3].status == PASS


@pytest.mark.parametrize("auc, pooled, shortcut, expected", [
    ((0.52, [0.45, 0.6]),
     {"within_language": {"R@1": 0.02, "ci": {"R@1": [0.0, 0.05]}}, "chance": {"R@1": 0.02}}, {},
     "did not learn the findings"),
    ((0.67, [0.64, 0.7]),
     {"within_language": {"R@1": 0.02, "ci": {"R@1": [0.0, 0.05]}}, "chance": {"R@1": 0.02}}, {},
     "partly learned"),
    ((0.52, [0.45, 0.6]),
     {"within_language": {"R@1": 0.3, "ci": {"R@1": [0.2, 0.4]}}, "chance": {"R@1": 0.02}},
     {"loss_mixed": 2.0, "loss_single_language": 3.0}, "leans on the language"),
    ((0.52, [0.45, 0.6]),
     {"within_language": {"R@1": 0.3, "ci": {"R@1": [0.2, 0.4]}}, "chance": {"R@1": 0.02}},
     {"loss_mixed": 2.0, "loss_single_language": 2.0}, "prompts"),
    ((0.52, [0.45, 0.6]), None, None, "retrieval was not measured"),  # evaluate --tasks zero_shot
])
def test_zero_shot_failure_cause_reads_the_retrieval_diagnostics(auc, pooled, shortcut, expected
                                                                 ) -> None:
    metrics = _metrics()
    model = metrics["encoders"]["medunic"]["tasks"]
    value, bounds = auc
    model["zero_shot"]["cxp500"]["en"].update(auc=value, ci={"auc": bounds})
    if pooled is None:
        del model["retrieval"]
    else:
        model["retrieval"].update(pooled=pooled, shortcut=shortcut)
    check = quality_checks(metrics)[0]
    low, high = (f"{100 * b:.1f}" for b in bounds)
    assert check.status == FAIL and check.detail == f"macro AUC {100 * value:.1f} ({low}–{high})%"
    assert expected in check.cause
    assert ("did not learn" in check.cause) == (expected == "did not learn the findings")
    assert ("retrieval is above chance" in check.cause) == (expected == "prompts")


def _classes(aucs: dict[str, tuple[float, float]]) -> dict:
    """per_class entries of (AUC, half width of its interval)."""
    return {name: {"auc": auc, "ci": {"auc": [auc - half, auc + half]}}
            for name, (auc, half) in aucs.items()}


def test_a_zero_shot_failure_names_the_classes_that_hold_it_down() -> None:
    """A cell below the bar that retrieval does not explain: the classes whose prompts in the other
    language score higher beyond both intervals (the text side of this language), then the weakest
    of the rest; a class whose two intervals overlap is not blamed on the language."""
    metrics = _metrics()
    pdc = metrics["encoders"]["medunic"]["tasks"]["zero_shot"]["pdc"]
    pdc["en"].update(auc=0.79, per_class=_classes({
        "atelectasis": (0.72, 0.06), "consolidation": (0.81, 0.04), "pneumonia": (0.70, 0.06),
        "hilar enlargement": (0.64, 0.07), "edema": (0.88, 0.03)}))
    pdc["es"].update(auc=0.75, per_class=_classes({
        "atelectasis": (0.58, 0.07), "consolidation": (0.68, 0.05), "pneumonia": (0.66, 0.06),
        "hilar enlargement": (0.63, 0.06), "edema": (0.82, 0.04)}))
    checks = {c.name: c for c in quality_checks(metrics)}
    spanish = checks["Zero-shot PDC (Sp) macro AUC ≥ 80.0%"]
    assert spanish.status == FAIL
    assert spanish.cause == (
        "above chance but below the bar; with Spanish prompts atelectasis 58.0, consolidation 68.0 "
        "score below the English prompts on the same images (72.0, 81.0, intervals apart): the "
        "Spanish prompts or text side of those classes; weakest otherwise: hilar enlargement 63.0, "
        "pneumonia 66.0")
    english = checks["Zero-shot PDC (En) macro AUC ≥ 80.0%"]
    assert english.cause == ("above chance but below the bar; weakest classes: hilar enlargement "
                             "64.0, pneumonia 70.0")
    pdc["es"]["per_class"]["consolidation"]["ci"]["auc"] = [0.60, 0.78]  # overlaps English 0.77-0.85
    alone = "with Spanish prompts atelectasis 58.0 scores below the English prompts on the same images (72.0,"
    assert alone in quality_checks(metrics)[3].cause
    del pdc["es"]["per_class"], pdc["en"]["per_class"]
    generic = "above chance but below the bar: pre-train longer or on more pairs"
    assert quality_checks(metrics)[3].cause == generic


def test_checks_missing_metrics_are_not_measured() -> None:
    metrics = copy.deepcopy(_metrics())
    del metrics["encoders"]["init"]
    del metrics["encoders"]["medunic"]["tasks"]["detection"]
    del metrics["encoders"]["medunic"]["tasks"]["zero_shot"]["cxp500"]["es"]
    checks = quality_checks(metrics)
    states = _by_state(checks)
    assert states[FAIL] == states[TIE] == 0 and states[PASS] == 3
    detection = [c for c in checks if c.name.startswith("Detection")]
    assert len(detection) == 1 and detection[0].status == NOT_MEASURED
    assert detection[0].detail == "not evaluated"
    assert quality_checks({}) and all(c.status == NOT_MEASURED for c in quality_checks({}))


def test_values_show_their_interval_and_ties_show_in_the_report(tmp_path: Path, figure_dir: Path
                                                                ) -> None:
    metrics = _metrics()
    metrics["encoders"]["medunic"]["tasks"]["zero_shot"]["cxp500"]["en"]["ci"] = {
        "auc": [0.78, 0.8412]}
    metrics["encoders"]["medunic"]["tasks"]["linear_probe"]["rsna"]["fractions"]["1%"]["ci"] = [
        0.6, 0.8]
    header, rows = _table(metrics, report.TITLE_ZERO_SHOT)
    assert rows[0][1] == "81.2 (78.0–84.1)"
    header, rows = _table(metrics, report.TITLE_LINEAR)
    assert rows[0][header.index("RSNA (AUC) / 1%")] == "70.0 (60.0–80.0)"
    replicates = _replicates(metrics)
    key = "/linear_probe/rsna/fractions/10%/value"
    replicates["medunic" + key] = replicates["init" + key] + np.linspace(-0.1, 0.1, 200)
    page = render_report(metrics, figure_dir, replicates=replicates)
    assert re.search(r'<td class="num best[^"]*">81\.2 \(78\.0–84\.1\)</td>', page)
    assert '<span class="badge tie">TIE</span>' in page and "within noise" in page
    assert "1 tied" in page


def test_terminal_ends_with_one_line_per_failed_or_tied_check(tmp_path: Path, figure_dir: Path,
                                                              capsys) -> None:
    from unimed.commands.evaluate import print_summary, read_replicates, write_outputs

    metrics = _metrics()
    replicates = _replicates(metrics)
    key = "/linear_probe/rsna/fractions/10%/value"
    replicates["medunic" + key] = replicates["init" + key] + np.linspace(-0.1, 0.1, 200)
    write_outputs(metrics, tmp_path, figure_dir, replicates)
    assert read_replicates(tmp_path).keys() == replicates.keys()
    print_summary(metrics, tmp_path)
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(("FAIL: ", "TIE: "))]
    assert lines == ["TIE: Linear probe RSNA 10%: Med-UniC beats Random init / MLM-only -- "
                     "difference within noise: enlarge the test set (or pre-train longer)"]
    statuses = [check.status for check in all_quality_checks(metrics, replicates)]
    passed = statuses.count(PASS)
    assert passed > 0 and statuses.count(FAIL) == 0 and statuses.count(TIE) == 1
    tally = [line for line in out if line.startswith("Checks: ")]
    assert tally == [f"Checks: {passed} passed, 0 failed, 1 tied (difference within noise), "
                     f"{statuses.count(NOT_MEASURED)} not checked"]
    assert out.index(tally[0]) > out.index(lines[0])  # after the causes, before the file paths


def test_the_tally_counts_each_methods_checks_and_the_baselines_apart() -> None:
    metrics = {"methods": ["medunic", "prior"],
               "encoders": {"medunic": {"label": "Med-UniC"}, "prior": {"label": "PRIOR"}}}
    checks = [Check("Med-UniC: zero-shot", PASS, ""), Check("Med-UniC: probe", TIE, ""),
              Check("Med-UniC: retrieval", PASS, ""), Check("PRIOR: zero-shot", FAIL, ""),
              Check("PRIOR: probe", NOT_MEASURED, ""),
              Check("Segmentation SIIM 1%: ImageNet init beats Random init", PASS, "")]
    assert tally_lines(metrics, checks) == [
        "Checks: 3 passed, 1 failed, 1 tied (difference within noise), 1 not checked",
        "  Med-UniC   2 passed, 0 failed, 1 tied (difference within noise), 0 not checked",
        "  PRIOR      0 passed, 1 failed, 0 tied (difference within noise), 1 not checked",
        "  baselines  1 passed, 0 failed, 0 tied (difference within noise), 0 not checked",
    ]
    assert tally_lines({"methods": ["medunic"]}, checks[:3]) == [
        "Checks: 2 passed, 0 failed, 1 tied (difference within noise), 0 not checked"]
