"""The report's 3D part on a hand-made metrics dict: UniMedI Table 2's layout with intervals, the
paper's 3D tables that did not run, retrieval and localisation, and the volume viewer in HTML."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from unimed.commands.evaluate import print_summary
from unimed.eval import report
from unimed.eval.html_report import E, render_report
from unimed.eval.report import format_tables, table_notes

FRACTIONS = (("1%", 16), ("10%", 16), ("100%", 42))


def _probe(metric: str, values: tuple[float, float, float]) -> dict:
    """One dataset's probe: each fraction's value with the interval value ± 0.05."""
    return {"metric": metric, "volumes": {"train": 42, "valid": 6, "test": 12}, "fractions": {
        fraction: {"value": v, "ci": [v - 0.05, v + 0.05], "train_images": n}
        for (fraction, n), v in zip(FRACTIONS, values)}}


def _metrics() -> dict:
    """A trained encoder and the two baselines; LUNA16 listed before CC-CCII, the random baseline
    without LUNA16."""
    def tasks(ccii: tuple[float, float, float], luna: tuple[float, float, float] | None, r1: float) -> dict:
        probe = {"cc-ccii": _probe("accuracy", ccii)}
        if luna is not None:
            probe = {"luna16": _probe("auc", luna), **probe}
        recall = {"R@1": r1, "R@5": 0.5, "ci": {"R@1": [r1 - 0.1, r1 + 0.1], "R@5": [0.4, 0.6]}}
        return {"volume_probe": probe,
                "volume_retrieval": {"bimcv-covid19": {"queries": 14, "volume_to_report": recall,
                                                       "report_to_volume": recall}},
                "slice_localisation": {"bimcv-covid19": {
                    "k": 3, "pairs": 20, "random": 0.3125, "random_precision": 0.125, "prior": 0.9,
                    "prior_precision": 0.625,
                    "en": {"hit_rate": 0.55, "precision": 0.4,
                           "ci": {"hit_rate": [0.35, 0.75], "precision": [0.25, 0.55]}},
                    "es": {"hit_rate": 0.5, "ci": {"hit_rate": [0.3, 0.7]}}}}}

    return {"encoders": {
        "medunic": {"label": "Med-UniC", "tasks": tasks((0.642, 0.751, 0.849), (0.7, 0.8, 0.9), 0.3)},
        "init": {"label": "ImageNet init / MLM-only",
                 "tasks": tasks((0.5, 0.6, 0.7), (0.55, 0.65, 0.75), 0.2)},
        "random": {"label": "Random init / MLM-only", "tasks": tasks((0.434, 0.697, 0.748), None, 0.1)},
    }}


def _table(metrics: dict, title: str) -> tuple[list[str], list[list[str]]]:
    tables = {t: (header, rows) for t, header, rows in format_tables(metrics)}
    return tables[title]


def test_volume_classification_has_unimedi_table_2_layout_with_intervals():
    header, rows = _table(_metrics(), report.TITLE_VOLUME_PROBE)
    assert header == ["Method", "CC-CCII (ACC) / 1%", "CC-CCII (ACC) / 10%", "CC-CCII (ACC) / 100%",
                      "LUNA16 (AUC) / 1%", "LUNA16 (AUC) / 10%", "LUNA16 (AUC) / 100%"]
    assert rows == [
        ["Med-UniC", "64.2 (59.2–69.2)", "75.1 (70.1–80.1)", "84.9 (79.9–89.9)",
         "70.0 (65.0–75.0)", "80.0 (75.0–85.0)", "90.0 (85.0–95.0)"],
        ["ImageNet init / MLM-only", "50.0 (45.0–55.0)", "60.0 (55.0–65.0)", "70.0 (65.0–75.0)",
         "55.0 (50.0–60.0)", "65.0 (60.0–70.0)", "75.0 (70.0–80.0)"],
        ["Random init / MLM-only", "43.4 (38.4–48.4)", "69.7 (64.7–74.7)", "74.8 (69.8–79.8)",
         "–", "–", "–"],
    ]
    assert table_notes(_metrics())[report.TITLE_VOLUME_PROBE] == (
        "Training volumes: CC-CCII: 1% 16, 10% 16, 100% 42; LUNA16: 1% 16, 10% 16, 100% 42")


def test_the_papers_3d_tables_without_a_task_here_are_listed_as_not_run():
    header, rows = _table(_metrics(), report.TITLE_VOLUME_NOT_RUN)
    assert header == ["UniMedI", "Task", "Datasets", "Status"]
    assert [row[0] for row in rows] == ["Table 3", "Table 6", "Fig. 2", "Fig. 5"]
    assert rows[0][2] == "CC-CCII (ACC), LUNA16 (AUC)" and rows[1][2] == "BCV (Dice)"
    assert all(row[3].startswith("not run: ") for row in rows)
    two_d = {"encoders": {"m": {"label": "M", "tasks": {"zero_shot": {"cxp500": {"en": {"auc": 0.9}}}}}}}
    assert report.TITLE_VOLUME_NOT_RUN not in [title for title, _, _ in format_tables(two_d)]


def test_volume_retrieval_and_localisation_group_columns_by_dataset():
    metrics = _metrics()
    header, rows = _table(metrics, report.TITLE_VOLUME_RETRIEVAL)
    assert header == ["Method", "BIMCV-COVID19+ volume → report / R@1",
                      "BIMCV-COVID19+ volume → report / R@5",
                      "BIMCV-COVID19+ report → volume / R@1", "BIMCV-COVID19+ report → volume / R@5"]
    assert rows[0] == ["Med-UniC", "30.0 (20.0–40.0)", "50.0 (40.0–60.0)", "30.0 (20.0–40.0)",
                       "50.0 (40.0–60.0)"]
    header, rows = _table(metrics, report.TITLE_LOCALISATION)
    # Spanish has no precision here (metrics written before it, say): no column for it.
    assert header == ["Method", "BIMCV-COVID19+ (top 3) / hit, En", "BIMCV-COVID19+ (top 3) / hit, Sp",
                      "BIMCV-COVID19+ (top 3) / hit, random", "BIMCV-COVID19+ (top 3) / hit, prior",
                      "BIMCV-COVID19+ (top 3) / precision, En", "BIMCV-COVID19+ (top 3) / precision, random",
                      "BIMCV-COVID19+ (top 3) / precision, prior"]
    assert rows[2] == ["Random init / MLM-only", "55.0 (35.0–75.0)", "50.0 (30.0–70.0)", "31.2", "90.0",
                       "40.0 (25.0–55.0)", "12.5", "62.5"]
    # Metrics written before the position prior: no column for it.
    for encoder in metrics["encoders"].values():
        for key in ("prior", "prior_precision"):
            del encoder["tasks"]["slice_localisation"]["bimcv-covid19"][key]
    header, rows = _table(metrics, report.TITLE_LOCALISATION)
    assert [h for h in header if h.endswith("prior")] == [] and len(header) == 6
    metrics = _metrics()
    notes = table_notes(metrics)
    assert notes[report.TITLE_VOLUME_RETRIEVAL] == "Queries: BIMCV-COVID19+ 14"
    assert notes[report.TITLE_LOCALISATION] == "Findings: BIMCV-COVID19+ 20"


def test_the_3d_tables_and_the_volume_viewer_are_in_the_html_report_and_the_terminal(tmp_path: Path, capsys):
    metrics = _metrics()
    Image.new("RGB", (8, 4), (20, 200, 20)).save(tmp_path / "volume_viewer_cc-ccii.png")
    metrics["volume_viewer"] = {"figures": {"cc-ccii": "volume_viewer_cc-ccii.png"}, "cases": {},
                                "skipped": {"bcv": "no folder data/bcv"}}
    page = render_report(metrics, tmp_path)
    section = page[page.index("<h2>3D volumes</h2>"):]
    for title in (report.TITLE_VOLUME_PROBE, report.TITLE_VOLUME_NOT_RUN, report.TITLE_VOLUME_RETRIEVAL,
                  report.TITLE_LOCALISATION, "Volume viewer"):
        assert E(title) in section
    assert '<th colspan="3" class="gs">CC-CCII (ACC)</th>' in section
    assert re.search(r'<td class="num best[^"]*">64\.2 \(59\.2–69\.2\)</td>', section)  # best: bold
    assert section.count("data:image/png;base64,") == 1 and "CC-CCII: test volumes" in section
    assert "No viewer figure for BCV: no folder data/bcv" in section
    print_summary(metrics, tmp_path, with_checks=False)
    printed = capsys.readouterr().out
    assert report.TITLE_VOLUME_PROBE in printed and "Table 6" in printed
