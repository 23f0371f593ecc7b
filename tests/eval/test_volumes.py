"""3D tasks: the slice-wise adapter (orientation, pooling) and the volume probe and retrieval, on
features whose answer is known and end to end on a tiny CT world."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import IMAGE_SIZE

from unimed.data.config import DataConfig
from unimed.data.volume_pretrain import load_volume_slices
from unimed.data.volumes import Volume, axial_slices, crop_cube, read_volume
from unimed.eval import volumes
from unimed.eval.checks import quality_checks
from unimed.eval.config import EvalConfig, LinearProbeConfig, VolumeConfig
from unimed.eval import data as data_module
from unimed.eval.data import EvalData, rgb
from unimed.eval.errors import EvalError
from unimed.eval.encoders import Encoder
from unimed.eval.features import FeatureCache
from unimed.eval.prompts import corpus_stemming, load_prompts
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext
from unimed.eval.zero_shot import prompt_scores
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.world import write_ct_world


@pytest.fixture(scope="module")
def ct_context(tmp_path_factory: pytest.TempPathFactory) -> TaskContext:
    root = tmp_path_factory.mktemp("ct_world")
    cfg = PhantomConfig(root=str(root), seed=3, ct=CTConfig(
        enabled=True, shape=(16, 32, 32), bimcv_studies=24, ccii_studies=60, luna_studies=30, bcv_studies=1))
    write_ct_world(cfg, root, progress=False)
    data = EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, progress=False))
    eval_cfg = EvalConfig(tasks=("volume_probe", "volume_retrieval", "slice_localisation"), min_train_images=4,
                          bootstrap_resamples=20, linear_probe=LinearProbeConfig(epochs=30, patience=30, lr=5e-2),
                          volume=VolumeConfig(slices=4))
    return TaskContext(data, eval_cfg, tmp_path_factory.mktemp("ct_eval"))


def test_axial_slices_are_inferior_to_superior_in_the_radiological_view():
    """A bright block at the patient's right, anterior, inferior corner of a RAS volume shows in
    the first slice, top left (rows run anterior to posterior, columns patient right to left)."""
    array = np.full((8, 8, 4), -1000.0, dtype=np.float32)  # (X towards R, Y towards A, Z towards S)
    array[6:, 6:, 0] = 400.0
    slices = axial_slices(Volume(array, np.eye(4), Path("v.nii")), size=8, slices=4)
    assert slices.shape == (4, 8, 8)
    assert torch.equal(slices[0, :2, :2], torch.ones(2, 2)) and float(slices[0, 2:, :].max()) == 0.0
    assert float(slices[1:].max()) == 0.0


def test_volume_embedding_is_the_mean_of_its_slice_embeddings(ct_context, tiny_encoder):
    pooled = ct_context.features.volumes(tiny_encoder, ct_context.data, "cc-ccii", "test", space="pooled",
                                         slices=4, window=(-1000.0, 400.0), batch_size=16)
    projected = ct_context.features.volumes(tiny_encoder, ct_context.data, "cc-ccii", "test",
                                            space="projected", slices=4, window=(-1000.0, 400.0),
                                            batch_size=16)
    stacks = ct_context.data.slice_stacks("cc-ccii", "test", 4, (-1000.0, 400.0))  # (N, 4, 1, S, S)
    expected = torch.stack([tiny_encoder.image_features(rgb(stack), projected=False).mean(0)
                            for stack in stacks])
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(projected, tiny_encoder.model.project_image(expected), rtol=1e-4, atol=1e-5)


class NativeGrid(torch.nn.Module):
    """A native 3D model that reads volumes at 8 slices of 16 x 16 pixels and keeps what it was
    given: its volume embedding is each slice's mean intensity."""

    volume_depth, volume_side = 8, 16

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def pooled_volume(self, stacks: torch.Tensor) -> torch.Tensor:  # (N, D, 1, S, S) -> (N, D)
        self.seen.append(stacks.clone())
        return stacks.mean(dim=(2, 3, 4))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled


def test_a_native_3d_model_reads_volumes_as_its_pre_training_did(ct_context):
    """The slice-wise adapter's `slices` (4 here) and the 2D images' side (64) are for 2D
    encoders; a native 3D model gets each volume at the depth and side its pre-training read it
    (``volume_depth``, ``volume_side``), in one resize of the stored volume: exactly the input of
    UniMedI's pre-training loader (:func:`load_volume_slices`), not a 64-px stack resized again."""
    window = (-1000.0, 400.0)
    encoder = Encoder("native", "Native", NativeGrid(), tokenizer=None)
    assert encoder.volume_grid(4, IMAGE_SIZE) == (8, 16)
    pooled = ct_context.features.volumes(encoder, ct_context.data, "cc-ccii", "test", space="pooled",
                                         slices=4, window=window, batch_size=16)
    [seen] = encoder.model.seen
    records = ct_context.data.require("cc-ccii", "test")
    pretraining = torch.stack([torch.from_numpy(load_volume_slices(r.image_path, shape=(8, 16, 16),
                                                                   window=window)) for r in records])
    torch.testing.assert_close(seen[:, :, 0], pretraining)
    torch.testing.assert_close(pooled, pretraining.mean(dim=(2, 3)))


class NativeWithVolumeProjector(NativeGrid):
    """A native 3D model whose volume embeddings have a projector of their own (UniMedI's
    ``project_volume``: the projector's CT running statistics)."""

    def project_volume(self, pooled: torch.Tensor) -> torch.Tensor:
        return -pooled


def test_a_native_3d_models_volumes_are_projected_by_its_volume_projector():
    encoder = Encoder("native", "Native", NativeWithVolumeProjector(), tokenizer=None)
    spaces = encoder.volume_spaces(torch.rand(3, 8, 1, 16, 16))
    torch.testing.assert_close(spaces["projected"], -spaces["pooled"])
    encoder = Encoder("native", "Native", NativeGrid(), tokenizer=None)
    spaces = encoder.volume_spaces(torch.rand(3, 8, 1, 16, 16))
    torch.testing.assert_close(spaces["projected"], spaces["pooled"])


def _class_features(ctx: TaskContext, informative: bool):
    """Volume features that are the class one-hot (informative) or noise, for any split."""
    def features(encoder, context, dataset, split, space):
        records = context.data.require(dataset, split)
        g = torch.Generator().manual_seed(len(records))
        noise = torch.randn(len(records), 3, generator=g)
        if not informative:
            return noise
        onehot = torch.tensor([[float(r.target == c) for c in ("NCP", "CP", "Normal")] for r in records])
        return 4 * onehot + 0.1 * noise
    return features


def test_volume_probe_reads_the_class_when_the_features_hold_it(ct_context, tiny_encoder, monkeypatch):
    monkeypatch.setattr(volumes, "volume_features", _class_features(ct_context, informative=True))
    result = volumes.probe_volumes(tiny_encoder, ct_context, "cc-ccii")
    assert result["metric"] == "accuracy" and result["fractions"]["100%"]["value"] == 1.0
    assert result["fractions"]["100%"]["train_images"] == result["volumes"]["train"]
    monkeypatch.setattr(volumes, "volume_features", _class_features(ct_context, informative=False))
    assert volumes.probe_volumes(tiny_encoder, ct_context, "cc-ccii")["fractions"]["100%"]["value"] < 0.9


def test_candidate_probe_reads_the_nodule_label_when_the_features_hold_it(ct_context, tiny_encoder, monkeypatch):
    def features(encoder, context, dataset, split, space, informative=True):
        records = context.data.require(dataset, split)
        noise = torch.randn(len(records), 2, generator=torch.Generator().manual_seed(len(records)))
        nodule = torch.tensor([[r.labels["nodule"], 1.0 - r.labels["nodule"]] for r in records])
        return 4 * nodule + 0.1 * noise if informative else noise

    monkeypatch.setattr(volumes, "volume_features", features)
    result = volumes.probe_volumes(tiny_encoder, ct_context, "luna16-candidates")
    assert result["metric"] == "auc" and result["fractions"]["100%"]["value"] == 1.0
    monkeypatch.setattr(volumes, "volume_features", lambda *args: features(*args, informative=False))
    assert volumes.probe_volumes(tiny_encoder, ct_context, "luna16-candidates")["fractions"]["100%"]["value"] < 0.9


def test_volume_retrieval_finds_each_study_when_volume_and_report_agree(ct_context, tiny_encoder,
                                                                       monkeypatch):
    records = [r for r in ct_context.data.require("bimcv-covid19", "test") if r.report]
    codes = torch.eye(len(records)) + 0.01
    monkeypatch.setattr(volumes, "volume_features", lambda *args: codes)
    monkeypatch.setattr(ct_context, "text_features", lambda encoder, texts, space: codes)
    result = volumes.retrieve_volumes(tiny_encoder, ct_context, "bimcv-covid19")
    assert result["queries"] == len(records) >= 2
    assert result["volume_to_report"]["R@1"] == result["report_to_volume"]["R@1"] == 1.0
    monkeypatch.setattr(ct_context, "text_features", lambda encoder, texts, space: codes.roll(1, 0))
    shifted = volumes.retrieve_volumes(tiny_encoder, ct_context, "bimcv-covid19")
    assert shifted["volume_to_report"]["R@1"] == 0.0


def test_3d_tasks_run_end_to_end_through_the_runner(ct_context, tiny_encoder):
    out = evaluate([tiny_encoder], ct_context, ct_context.cfg.tasks)["encoders"]["tiny"]["tasks"]
    probe = out["volume_probe"]["cc-ccii"]
    assert sum(probe["volumes"].values()) == len(ct_context.data.records("cc-ccii")) == 60
    for row in probe["fractions"].values():
        assert 0.0 <= row["value"] <= 1.0 and row["ci"][0] <= row["value"] <= row["ci"][1]
    nodules = out["volume_probe"]["luna16"]
    assert nodules["metric"] == "auc" and sum(nodules["volumes"].values()) == 30
    candidates = out["volume_probe"]["luna16-candidates"]
    rows = (Path(ct_context.data.cfg.root) / "luna16" / "candidates.csv").read_text().count("\n") - 1
    assert candidates["metric"] == "auc" and sum(candidates["volumes"].values()) == rows > 30
    retrieval = out["volume_retrieval"]["bimcv-covid19"]
    ks = {f"R@{k}" for k in ct_context.cfg.retrieval.ks if k <= retrieval["queries"]}
    assert set(retrieval["volume_to_report"]) == set(retrieval["report_to_volume"]) == {*ks, "ci"}
    localisation = out["slice_localisation"]["bimcv-covid19"]
    assert 0.0 <= localisation["en"]["hit_rate"] <= 1.0 and localisation["pairs"] >= 1
    published = ct_context.data.publish(ct_context.out_dir)
    assert {"cc-ccii/train", "cc-ccii/valid", "cc-ccii/test", "bimcv-covid19/test"} <= set(published)


def test_a_candidate_is_seen_as_the_cube_around_it(ct_context):
    """The slice-wise adapter's view of a LUNA16 candidate is its cube's slices, a nodule bright at
    the centre slice's centre."""
    records = ct_context.data.require("luna16-candidates", "train")
    stacks = ct_context.data.slice_stacks("luna16-candidates", "train", 4, (-1000.0, 400.0))
    for record, stack in zip(records, stacks):
        cube = crop_cube(read_volume(record.image_path), (record.crop.x, record.crop.y, record.crop.z), 48.0)
        torch.testing.assert_close(stack[:, 0], axial_slices(cube, size=IMAGE_SIZE, slices=4))
    nodule = next(i for i, r in enumerate(records) if r.labels["nodule"] == 1.0)
    centre = stacks[nodule, :, 0, IMAGE_SIZE // 2 - 1:IMAGE_SIZE // 2 + 1, IMAGE_SIZE // 2 - 1:IMAGE_SIZE // 2 + 1]
    assert float(centre.max()) > 0.3  # brighter than lung (-860 HU: 0.1 in the lung window)


def test_slice_stacks_larger_than_the_available_memory_are_one_error_before_any_reading(
        ct_context, monkeypatch):
    records = len(ct_context.data.require("luna16-candidates", "valid"))
    need = records * 5 * IMAGE_SIZE**2 * 4  # float32 stacks of 5 slices
    read = []
    monkeypatch.setattr(data_module, "read_volume", lambda path: read.append(path))
    monkeypatch.setattr(data_module, "available_memory", lambda: need - 1)
    with pytest.raises(EvalError, match=rf"luna16-candidates/valid: {records} volumes x 5 slices of "
                                        rf"{IMAGE_SIZE} px take 0.0 GB in memory, more than the 0.0 GB "
                                        "available; evaluate on a subset of the records "
                                        r"\(data.candidate_negatives for a candidates table"):
        ct_context.data.slice_stacks("luna16-candidates", "valid", 5, (-1000.0, 400.0))
    assert read == []
    monkeypatch.setattr(data_module, "available_memory", lambda: need)  # exactly enough
    monkeypatch.setattr(data_module, "read_volume", read_volume)
    assert ct_context.data.slice_stacks("luna16-candidates", "valid", 5, (-1000.0, 400.0)).shape[0] == records


def test_a_split_larger_than_half_the_memory_streams_into_its_volume_embeddings(
        ct_context, tiny_encoder, monkeypatch):
    """The volume embeddings of a split that cannot be held come from pieces read one after another
    (each within the piece budget unless it is one series' candidates), equal to the held split's
    and in record order, here of a table whose rows of one series lie apart."""
    window = (-1000.0, 400.0)
    expected = {space: ct_context.features.volumes(tiny_encoder, ct_context.data, "luna16-candidates", "train",
                                                    space=space, slices=4, window=window, batch_size=16)
                for space in ("pooled", "projected")}
    held = ct_context.data.slice_stacks("luna16-candidates", "train", 4, window)
    depths = ct_context.data.native_depths("luna16-candidates", "train")
    data = EvalData(ct_context.data.cfg)
    table = data.records("luna16-candidates")
    data._records["luna16-candidates"] = table[::2] + table[1::2]
    records = data.require("luna16-candidates", "train")
    before = ct_context.data.require("luna16-candidates", "train")
    order = [before.index(r) for r in records]
    assert order != sorted(order)
    per_record = 4 * IMAGE_SIZE**2 * 4
    monkeypatch.setattr(data_module, "available_memory", lambda: len(records) * per_record - 1)
    monkeypatch.setattr(data_module, "STREAM_PIECE_BYTES", 5 * per_record)
    pieces = list(data.stack_pieces("luna16-candidates", "train", 4, window))
    assert len(pieces) > 2 and sorted(i for indices, _ in pieces for i in indices) == list(range(len(records)))
    for indices, stacks in pieces:
        series = {records[i].image_path for i in indices}
        assert len(indices) <= 5 or len(series) == 1
        assert [i for i, r in enumerate(records) if r.image_path in series] == indices  # whole series
        torch.testing.assert_close(stacks, held[[order[i] for i in indices]])
    assert data.native_depths("luna16-candidates", "train") == [depths[i] for i in order]
    with pytest.raises(EvalError, match="more than the"):  # the split itself cannot be held ...
        data.slice_stacks("luna16-candidates", "train", 4, window)
    streamed = FeatureCache()  # ... yet its embeddings are computed
    for space, values in expected.items():
        torch.testing.assert_close(streamed.volumes(tiny_encoder, data, "luna16-candidates", "train", space=space,
                                                    slices=4, window=window, batch_size=16),
                                   values[order], rtol=1e-4, atol=1e-5)


def test_candidate_negatives_sample_what_the_evaluation_reads_and_publishes(ct_context, tmp_path):
    full = ct_context.data.require("luna16-candidates", "test")
    data = EvalData(dataclasses.replace(ct_context.data.cfg, candidate_negatives=1))
    records = data.require("luna16-candidates", "test")
    assert [r for r in records if r.labels["nodule"] == 1.0] == [r for r in full if r.labels["nodule"] == 1.0]
    negatives = [r.image_path for r in records if r.labels["nodule"] == 0.0]
    series = {r.image_path for r in full if r.labels["nodule"] == 0.0}
    assert len(negatives) == len(set(negatives)) == len(series) < len(full)  # one per series
    assert data.slice_stacks("luna16-candidates", "test", 2, (-1000.0, 400.0)).shape[0] == len(records)
    published = data.publish(tmp_path)["luna16-candidates/test"]
    lines = (tmp_path / published["file"]).read_text(encoding="utf-8").splitlines()
    assert lines == [data.image_id(r) for r in records] and published["images"] == len(records)


def test_images_larger_than_the_available_memory_are_one_error(eval_data, monkeypatch):
    records = eval_data.records("rsna", "valid")
    monkeypatch.setattr(data_module, "available_memory", lambda: 1024)
    with pytest.raises(EvalError, match=rf"rsna/valid: {len(records)} images of {IMAGE_SIZE} px take"):
        eval_data.load(records, "crop", "rsna/valid")
    monkeypatch.setattr(data_module, "available_memory", lambda: None)  # unknown: no check
    assert eval_data.load(records, "crop", "rsna/valid").shape == (len(records), 1, IMAGE_SIZE, IMAGE_SIZE)


def test_a_2d_dataset_is_refused_by_the_3d_tasks(eval_data):
    with pytest.raises(ValueError, match="rsna: .* is not a volume"):
        eval_data.slice_stacks("rsna", "test", 4, (-1000.0, 400.0))


@pytest.mark.parametrize(("n", "m", "k"), [(32, 3, 3), (10, 1, 1), (8, 5, 4), (4, 1, 6)])
def test_random_hit_rate_is_the_exact_chance(n, m, k):
    draws = list(itertools.combinations(range(n), min(k, n)))
    expected = sum(any(i < m for i in draw) for draw in draws) / len(draws)
    assert volumes.random_hit_rate(n, m, k) == pytest.approx(expected)


def _oracle_scores(ctx: TaskContext, sign: float):
    """Slice scores that put each class's ground-truth slices first (sign 1) or last (sign -1)."""
    truth = volumes.finding_slices(ctx, "bimcv-covid19", "slice_localisation")
    root = Path(ctx.data.cfg.root) / "bimcv-covid19"
    keys = [Path(r.image_path).relative_to(root).as_posix() for r in ctx.data.require("bimcv-covid19", "test")]

    def scores(encoder, context, stacks, prompt_sets, classes):
        per_volume = []
        for key, stack in zip(keys, stacks):
            out = np.zeros((len(stack), len(classes)))
            for finding, held in truth.get(key, []):
                out[sorted(held), classes.index(volumes.FINDING_CLASSES[finding])] = sign
            per_volume.append(out)
        return [per_volume for _ in prompt_sets]
    return scores


def test_slice_localisation_scores_hits_against_the_phantom_ground_truth(ct_context, tiny_encoder,
                                                                         monkeypatch):
    monkeypatch.setattr(volumes, "slice_prompt_scores", _oracle_scores(ct_context, 1.0))
    best = volumes.localise(tiny_encoder, ct_context, "bimcv-covid19")
    assert best["pairs"] >= 2 and best["k"] == 3 and 0.0 < best["random"] < 1.0
    assert best["en"]["hit_rate"] == best["es"]["hit_rate"] == 1.0
    # Precision: the share of the k slices on the finding, all k where it spans k slices or more;
    # random slices expect the share of the volume's slices it spans.
    truth = volumes.finding_slices(ct_context, "bimcv-covid19", "slice_localisation")
    stacks = ct_context.data.native_slices("bimcv-covid19", "test", ct_context.cfg.volume.window)
    keys = volumes.truth_keys(ct_context, "bimcv-covid19", "test")
    spans = [(len(stacks[i]), len(held)) for i, key in enumerate(keys) for _, held in truth.get(key, [])]
    assert len(spans) == best["pairs"]
    assert best["en"]["precision"] == pytest.approx(np.mean([min(m, 3) / 3 for _, m in spans]))
    assert best["random_precision"] == pytest.approx(np.mean([m / n for n, m in spans]))
    assert best["en"]["ci"]["precision"][0] <= best["en"]["precision"] <= best["en"]["ci"]["precision"][1]
    # The position prior, counted by hand: where every volume has the same depth, the k slices
    # that hold the finding in the most training volumes (ties: the lower slice; any finding for
    # one no training volume holds), the same for every test volume.
    depths = {len(stack) for stack in stacks} | set(ct_context.data.native_depths("bimcv-covid19", "train"))
    assert len(depths) == 1
    [depth] = depths
    counts: dict[str, np.ndarray] = {}
    for key in volumes.truth_keys(ct_context, "bimcv-covid19", "train"):
        for finding, held in truth.get(key, []):
            for name in (finding, "any"):
                counts.setdefault(name, np.zeros(depth))[sorted(held)] += 1
    tested = [(finding, held) for key in keys for finding, held in truth.get(key, [])]
    assert {finding for finding, _ in tested} - set(counts)  # the fallback is exercised
    prior = [set(np.argsort(-counts.get(finding, counts["any"]), kind="stable")[:3].tolist())
             for finding, _ in tested]
    assert best["prior"] == pytest.approx(
        np.mean([bool(top & held) for top, (_, held) in zip(prior, tested)]))
    assert best["prior_precision"] == pytest.approx(
        np.mean([len(top & held) / 3 for top, (_, held) in zip(prior, tested)]))
    assert best["en"]["prior_precision_gain"] == pytest.approx(
        best["en"]["precision"] - best["prior_precision"])
    # Where the top slices and the findings sit in depth.
    assert best["finding_depth"] == pytest.approx(
        np.mean([np.mean([(k + 0.5) / depth for k in held]) for _, held in tested]))
    monkeypatch.setattr(volumes, "slice_prompt_scores", _oracle_scores(ct_context, -1.0))
    worst = volumes.localise(tiny_encoder, ct_context, "bimcv-covid19")
    assert worst["en"]["hit_rate"] == 0.0  # the k slices scored highest hold no finding
    assert worst["en"]["precision"] == 0.0
    assert worst["en"]["prior_precision_gain"] == pytest.approx(-best["prior_precision"])
    monkeypatch.undo()
    monkeypatch.setattr(volumes, "GROUND_TRUTH_FILE", "absent.csv")
    with pytest.raises(ValueError, match="needs the slice ground truth .*absent.csv"):
        volumes.localise(tiny_encoder, ct_context, "bimcv-covid19")


@pytest.mark.parametrize("gain_ci, status", [((0.05, 0.2), "pass"), ((-0.6, -0.4), "fail"),
                                             ((-0.1, 0.1), "tie")])
def test_the_quality_bar_reads_localisation_against_the_position_prior(gain_ci, status):
    result = {"k": 3, "pairs": 41, "random": 0.8, "random_precision": 0.468, "prior": 0.95,
              "prior_precision": 0.821, "finding_depth": 0.49,
              "en": {"hit_rate": 0.44, "precision": 0.244, "depth": 0.23,
                     "ci": {"precision": [0.138, 0.341], "prior_precision_gain": list(gain_ci)}},
              "es": {"hit_rate": 0.8, "precision": 0.455, "ci": {"precision": [0.341, 0.569]}}}
    metrics = {"method": "medunic", "encoders": {
        "medunic": {"label": "Med-UniC", "tasks": {"slice_localisation": {"bimcv-covid19": result}}}}}
    # One check per prompt language with the prior's difference measured (Spanish has none here).
    [found] = [c for c in quality_checks(metrics) if c.name.startswith("Slice localisation")]
    assert (found.name, found.status) == (
        "Slice localisation BIMCV-COVID19+ (En): the prompts' top slices hold the finding more often "
        "than the position prior's", status)
    assert found.detail.startswith("24.4 (13.8–34.1)% of the top 3 slices on the finding vs 82.1% for "
                                   "the prior, 46.8% for random slices; difference 95% CI [")
    assert found.detail.endswith("(41 findings)")
    where = ("; the top slices sit at mean relative depth 0.23 (0 the lowest slice, 1 the highest), "
             "the findings at 0.49")
    assert found.cause == {
        "pass": "",
        "fail": "the prompt scores pick slices by where they lie more than by the finding" + where,
        "tie": "within noise of the position prior" + where + "; more test volumes"}[status]
    skipped = {"method": "medunic", "encoders": {"medunic": {"tasks": {"slice_localisation": {
        "bimcv-covid19": {"skipped": "no test volume has a finding"}}}}}}
    assert not [c for c in quality_checks(skipped) if c.name.startswith("Slice localisation")]


def test_the_position_prior_counts_volumes_of_any_depth_by_relative_depth():
    # Two training volumes hold the finding in their upper half, at 4 and at 8 slices: each counts
    # once wherever its slices lie, and a 6-slice volume's upper three slices score both.
    profile = volumes.depth_profile([(4, {2, 3}), (8, {4, 5, 6, 7})])
    np.testing.assert_allclose(volumes.profile_scores(profile, 6), [0, 0, 0, 2, 2, 2])
    # The lowest quarter of one volume: half of a 2-slice volume's lower slice, all of an
    # 8-slice volume's lowest two.
    profile = volumes.depth_profile([(4, {0})])
    np.testing.assert_allclose(volumes.profile_scores(profile, 2), [0.5, 0])
    np.testing.assert_allclose(volumes.profile_scores(profile, 8), [1, 1, 0, 0, 0, 0, 0, 0])
    assert volumes.relative_depth({0, 3}, 4) == pytest.approx(0.5)
    assert volumes.relative_depth({0}, 4) == pytest.approx(0.125)


def test_slice_prompt_scores_equal_each_volume_scored_on_its_own(ct_context, tiny_encoder, monkeypatch):
    """Each volume's slices go through the image tower once for every prompt language, the prompts
    once for all volumes; the scores equal each volume scored on its own, language by language."""
    stacks = ct_context.data.native_slices("bimcv-covid19", "test", ct_context.cfg.volume.window)
    corpus = corpus_stemming(tiny_encoder.tokenizer)
    prompt_sets = [load_prompts(lang, ct_context.cfg.zero_shot.prompt_dir, ct_context.cfg.prompt_stemming,
                                corpus) for lang in ("en", "es")]
    classes = ["consolidation", "ground-glass opacity"]
    expected = [[prompt_scores(tiny_encoder, tiny_encoder.image_features(rgb(stack), normalize=True),
                               prompts, classes) for stack in stacks] for prompts in prompt_sets]
    passes, texts = [], []
    encode_images, encode_texts = tiny_encoder.image_features, tiny_encoder.text_spaces

    def counted_images(images, **kw):
        passes.append(len(images))
        return encode_images(images, **kw)

    def counted_texts(batch, **kw):
        texts.extend(batch)
        return encode_texts(batch, **kw)

    monkeypatch.setattr(tiny_encoder, "image_features", counted_images)
    monkeypatch.setattr(tiny_encoder, "text_spaces", counted_texts)
    fresh = TaskContext(ct_context.data, ct_context.cfg, ct_context.out_dir)  # an empty text cache
    got = volumes.slice_prompt_scores(tiny_encoder, fresh, stacks, prompt_sets, classes)
    assert passes == [len(stack) for stack in stacks]
    assert len(texts) == len(set(texts)) == 2 * len(classes) * len(prompt_sets)
    assert len(got) == 2 and [len(per_volume) for per_volume in got] == [len(stacks)] * 2
    for got_set, expected_set in zip(got, expected):
        for g, e in zip(got_set, expected_set):
            np.testing.assert_allclose(g, e, atol=1e-5)


class _OwnRuleModel(torch.nn.Module):
    """A model with its own zero-shot rule: every prompt pair scores an image by its mean pixel
    (times the pair's position, so the sets' columns differ); counts how often prompts are encoded."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def zero_shot_prompts(self, positive, negative):
        self.encoded += 1
        return torch.arange(1, len(positive[0]) + 1, dtype=torch.float32)

    def zero_shot_scores(self, images, prompts):
        return images.mean(dim=(1, 2, 3))[:, None] * prompts


def test_slice_prompt_scores_encode_a_models_own_prompts_once_for_all_volumes(ct_context, tiny_encoder):
    stacks = ct_context.data.native_slices("bimcv-covid19", "test", ct_context.cfg.volume.window)
    prompt_sets = [load_prompts("en"), load_prompts("es")]
    classes = ["consolidation", "ground-glass opacity"]
    model = _OwnRuleModel()
    encoder = dataclasses.replace(tiny_encoder, model=model)
    got = volumes.slice_prompt_scores(encoder, ct_context, stacks, prompt_sets, classes)
    assert model.encoded == 1 and len(stacks) > 1
    for k, per_volume in enumerate(got):
        for stack, scores in zip(stacks, per_volume):
            columns = torch.arange(1, 3, dtype=torch.float32) + 2 * k
            want = rgb(stack).mean(dim=(1, 2, 3))[:, None] * columns
            np.testing.assert_allclose(scores, want.numpy(), rtol=1e-6)


def test_slice_selection_reads_the_phantom_volumes_at_their_own_depth(ct_context):
    """A stub 3D model that always selects the lowest k slices, on the CT world's 16-slice volumes
    read at 16 slices (the ground truth maps slice for slice): a hit exactly where a finding
    reaches below slice k."""
    class Lowest(torch.nn.Module):
        selection_k = 3

        def slice_attention(self, stacks: torch.Tensor) -> torch.Tensor:  # (N, D, 1, S, S) -> (N, D)
            return -torch.arange(stacks.shape[1], dtype=torch.float32).expand(len(stacks), -1)

    cfg = dataclasses.replace(ct_context.cfg, volume=dataclasses.replace(ct_context.cfg.volume, selection_slices=16))
    ctx = TaskContext(ct_context.data, cfg, ct_context.out_dir)
    result = volumes.run_selection(Encoder("uni", "UniMedI", Lowest(), None), ctx)["bimcv-covid19"]
    truth = volumes.finding_slices(ctx, "bimcv-covid19", "slice_selection")
    keys = [key for key in volumes.truth_keys(ctx, "bimcv-covid19", "test") if key in truth]
    expected = [any(min(held) < 3 for _, held in truth[key]) for key in keys]
    assert result["volumes"] == len(keys) >= 2 and result["hit_rate"] == pytest.approx(np.mean(expected))
    assert len(result["prior_slices"]) == 3 and 0.0 <= result["prior"] <= 1.0  # from the training volumes
    assert set(ctx.data.native_depths("bimcv-covid19", "test")) == {16}
