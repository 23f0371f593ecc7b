"""The volume viewer figure on a tiny CT world: the slices it picks, the nodule circle against the
generator's own voxel, the lesion masks it regenerates (and refuses when they differ from the
file), and datasets it cannot draw."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import IMAGE_SIZE
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from unimed.commands.evaluate import phantom_volume
from unimed.data.config import DataConfig
from unimed.data.errors import DataError
from unimed.data.records import Record
from unimed.data.volumes import read_volume
from unimed.eval import volume_viewer as viewer
from unimed.eval.config import VOLUME_TASK_NAMES, EvalConfig
from unimed.eval.data import EvalData
from unimed.eval.tasks import TaskContext
from unimed.eval.volumes import read_ground_truth
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.sites import get_ct_site
from unimed.phantom.ct.world import write_ct_world
from unimed.phantom.ct.writers import Luna16Writer

WORLD = PhantomConfig(seed=5, ct=CTConfig(enabled=True, shape=(16, 32, 32), bimcv_studies=20,
                                          ccii_studies=15, luna_studies=24, bcv_studies=5))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct_world")
    write_ct_world(dataclasses.replace(WORLD, root=str(root)), root, progress=False)
    return root


def _context(root: Path, out: Path) -> TaskContext:
    data = EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, progress=False))
    return TaskContext(data, EvalConfig(tasks=VOLUME_TASK_NAMES), out)


def _truth(root: Path, dataset: str) -> dict[str, list]:
    rows: dict[str, list] = {}
    for row in read_ground_truth(root / dataset / "phantom_findings.csv"):
        rows.setdefault(row.key, []).append(row)
    return rows


def test_the_datasets_are_those_of_the_volume_tasks_that_ran():
    cfg = EvalConfig()
    assert viewer.volume_datasets(cfg, ("zero_shot", "linear_probe")) == []
    assert viewer.volume_datasets(cfg, ("slice_localisation",)) == ["bimcv-covid19"]
    assert viewer.volume_datasets(cfg, VOLUME_TASK_NAMES) == ["cc-ccii", "luna16", "bimcv-covid19"]
    candidates = dataclasses.replace(cfg, volume=dataclasses.replace(cfg.volume, probe_datasets=("luna16-candidates",)))
    assert viewer.volume_datasets(candidates, ("volume_probe",)) == ["luna16"]  # the volumes it crops


def test_slices_spread_over_the_finding_and_one_lies_outside_it():
    assert viewer.pick_slices(range(5, 13), 16) == ([5, 7, 10, 12], 3)
    assert viewer.pick_slices([14, 15], 16) == ([14, 15], 12)
    assert viewer.pick_slices([2], 16) == ([2], 0)
    assert viewer.pick_slices(range(16), 16) == ([0, 5, 10, 15], None)


def test_cases_show_every_kind_of_finding_before_repeating_one():
    def case(name: str, *findings: str) -> tuple[Record, list[viewer.Finding]]:
        record = Record(dataset="d", image_path=Path(name), patient_id=name, study_id=name, split="test")
        return record, [viewer.Finding(f, (1,)) for f in findings]

    cases = [case("a", "covid"), case("b", "covid", "nodule"), case("c", "covid"), case("d", "effusion")]
    picked = [(record.study_id, finding.name) for record, finding in viewer.pick_cases(cases, 3)]
    assert picked == [("a", "covid"), ("d", "effusion"), ("b", "nodule")]  # ties: by name
    assert [r.study_id for r, _ in viewer.pick_cases(cases, 10)] == ["a", "d", "b", "c"]


def test_the_nodule_circle_sits_on_the_voxel_where_the_generator_put_the_nodule(world):
    """LUNA16's annotation (LPS world mm, RAS after the adapter) through the volume's affine lands
    on the generator's own voxel, for sites that store the volume in RAS and in LPS order."""
    ctx = _context(world, world / "out")
    records = {Path(r.image_path).relative_to(world / "luna16").as_posix(): r
               for r in ctx.data.records("luna16")}
    truth = _truth(world, "luna16")
    writer = Luna16Writer(dataclasses.replace(WORLD, root=str(world)), world / "luna16")
    orientations = set()
    for index in range(writer.count()):
        study = generate_ct_study(WORLD.ct, WORLD.seed, "luna16", index, site=writer.site(index),
                                  enrich=writer.enrich)
        record = records[writer.key(study)]
        for lesion in (l for l in study.lesions if l.name == "nodule"):
            (finding,) = [f for f in viewer.record_findings(record, truth[writer.key(study)])
                          if f.name == "nodule"]
            row = viewer.case_row("luna16", world / "luna16", record, finding, (-1000.0, 400.0))
            k, j, i = lesion.centre_voxel
            assert row.outline == "circle"
            np.testing.assert_allclose(row.circle.centre, (i, j, k), atol=1e-3)
            spacing = read_volume(record.image_path).spacing
            np.testing.assert_allclose(row.circle.radii, (lesion.diameter_mm / 2 / spacing[0],
                                                          lesion.diameter_mm / 2 / spacing[1]))
            inside = [p.index for p in row.panels if p.inside]
            outside = [p.index for p in row.panels if not p.inside]
            assert inside and set(inside) <= set(lesion.slices) and not set(outside) & set(lesion.slices)
            orientations.add(get_ct_site(study.site).acquisition.orientation)
    assert orientations == {"RAS", "LPS"}


def test_the_viewer_draws_one_png_per_dataset_each_finding_outlined_its_own_way(world, tmp_path):
    ctx = _context(world, tmp_path / "eval")
    out = viewer.write_volume_viewers(ctx, ["cc-ccii", "luna16", "bimcv-covid19", "bcv"], phantom_volume)
    assert out["skipped"] == {} and set(out["figures"]) == {"cc-ccii", "luna16", "bimcv-covid19", "bcv"}
    for dataset, name in out["figures"].items():
        with Image.open(ctx.out_dir / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
        cases = out["cases"][dataset]
        assert 1 <= len(cases) <= viewer.CASES and len({c["volume"] for c in cases}) == len(cases)
        truth = _truth(world, dataset)
        for case in cases:
            if case["finding"] == viewer.ORGANS:
                continue
            (held,) = [row.slices for row in truth[case["volume"]] if row.finding == case["finding"]]
            assert set(case["slices"]) <= set(held) and case["outside"] not in held
    outlines = {dataset: {c["outline"] for c in cases} for dataset, cases in out["cases"].items()}
    assert outlines["bcv"] == {"labels"} and "circle" in outlines["luna16"]
    assert outlines["cc-ccii"] <= {"mask", "circle"} and "mask" in outlines["cc-ccii"]


def _ccii_case(ctx: TaskContext, world: Path, finding: str) -> tuple[Record, viewer.Finding]:
    truth = _truth(world, "cc-ccii")
    for record in ctx.data.records("cc-ccii"):
        for candidate in viewer.record_findings(
                record, truth.get(Path(record.image_path).relative_to(world / "cc-ccii").as_posix(), [])):
            if candidate.name == finding:
                return record, candidate
    raise AssertionError(f"no CC-CCII volume with {finding} in the tiny world")


def test_a_lesion_mask_is_outlined_only_when_the_regenerated_volume_equals_the_file(world, tmp_path):
    ctx = _context(world, tmp_path)
    record, finding = _ccii_case(ctx, world, "covid")
    row = viewer.case_row("cc-ccii", world / "cc-ccii", record, finding, (-1000.0, 400.0), phantom_volume)
    assert row.outline == "mask"
    assert [p.contour.any() for p in row.panels] == [p.inside for p in row.panels]  # the mask's slices

    def altered(folder: Path, key: str) -> viewer.Regenerated:
        again = phantom_volume(folder, key)
        return dataclasses.replace(again, hu=again.hu + np.int16(40))

    assert viewer.case_row("cc-ccii", world / "cc-ccii", record, finding, (-1000.0, 400.0)).outline == "frame"
    row = viewer.case_row("cc-ccii", world / "cc-ccii", record, finding, (-1000.0, 400.0), altered)
    assert row.outline == "frame" and "differs from the file" in row.note
    assert all(p.contour is None for p in row.panels)
    ax = Figure().subplots()
    viewer._draw_panel(ax, row, row.panels[0])
    assert to_hex(ax.spines["top"].get_edgecolor()) == viewer.FRAME_COLOUR
    assert ax.xaxis_inverted()  # radiological view: the patient's right on the viewer's left


def test_an_absent_dataset_gives_no_figure_and_no_error(tmp_path):
    ctx = _context(tmp_path / "empty_root", tmp_path / "eval")
    out = viewer.write_volume_viewers(ctx, ["luna16", "bcv"])
    assert out["figures"] == {} and set(out["skipped"]) == {"luna16", "bcv"}
    assert "no folder" in out["skipped"]["luna16"]
    assert not list(tmp_path.glob("eval/*.png"))


def test_a_malformed_ground_truth_is_one_line_naming_the_file(world, tmp_path, monkeypatch):
    bad = world / "cc-ccii" / "bad_findings.csv"
    bad.write_text("key,finding,slices,x_mm,y_mm,z_mm,diameter_mm\nCP/1/2,covid,3 x,,,,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_findings\.csv, line 2, column 'slices'"):
        read_ground_truth(bad)
    monkeypatch.setattr(viewer, "GROUND_TRUTH_FILE", bad.name)
    out = viewer.write_volume_viewers(_context(world, tmp_path), ["cc-ccii"])
    assert out["figures"] == {}
    assert "bad_findings.csv, line 2" in out["skipped"]["cc-ccii"]
    assert "\n" not in out["skipped"]["cc-ccii"]
