import dataclasses

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from train_helpers import make_tokenizer, write_records
from unimed.data.config import DataConfig
from unimed.data.errors import DataError
from unimed.data.pretrain import (
    CommunitySampler,
    PretrainSampler,
    build_pretrain_dataset,
    build_pretrain_loader,
    sample_seed,
)
from unimed.data.records import Record
from unimed.data.transforms import cvl_transform, eval_transform, pretrain_transform
from unimed.errors import ConfigError

CFG = DataConfig(image_size=16, resize_size=20, max_length=6, num_workers=0)


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizerFast:
    return make_tokenizer(tmp_path)


def test_pretrain_transform_shape_range_and_two_different_views():
    image = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    a, b = pretrain_transform(16, 20)(image), pretrain_transform(16, 20)(image)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a[0], a[2])
    assert not torch.equal(a, b)
    e1, e2 = eval_transform(16, 20)(image), eval_transform(16, 20)(image)
    assert torch.equal(e1, e2) and e1.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="larger than resize_size"):
        eval_transform(32, 20)


def test_batch_has_canonical_keys_and_padding(tmp_path, tokenizer):
    dataset = build_pretrain_dataset(write_records(tmp_path), tokenizer, CFG)
    assert dataset.languages == ("en", "es") and dataset.sites == ("mimic", "padchest")
    batch = next(iter(build_pretrain_loader(dataset, CFG, batch_size=4)))
    assert batch["image"].shape == batch["image_aug"].shape == (4, 3, 16, 16)
    assert not torch.equal(batch["image"], batch["image_aug"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] <= CFG.max_length
    for row in range(4):
        index = int(batch["index"][row])
        english = index % 2 == 0
        assert int(batch["language"][row]) == (0 if english else 1)
        assert int(batch["site"][row]) == (0 if english else 1)
        length = int(mask[row].sum())
        assert (ids[row, length:] == tokenizer.pad_token_id).all()
        assert ids[row, 0] == tokenizer.cls_token_id and ids[row, length - 1] == tokenizer.sep_token_id
    # English reports are truncated to max_length; the short Spanish ones are padded.
    assert ids.shape[1] == CFG.max_length


def test_a_token_limit_that_cuts_a_datasets_reports_is_said_per_dataset(tmp_path, tokenizer, caplog):
    """The tokenizer drops a long report's end without a word: a CT report (median about 90 tokens
    in the phantom's BIMCV layout) at the demo's 64 lost its last findings unannounced. Each
    dataset whose reports the limit cuts is named with the share, counted here independently."""
    records = write_records(tmp_path)
    lengths = {r.dataset: len(tokenizer(r.report)["input_ids"]) for r in records}
    cut = [name for name, length in lengths.items() if length > CFG.max_length]
    assert cut == ["mimic-cxr"]  # the English reports are longer than 6 tokens, the Spanish are not
    with caplog.at_level("WARNING", logger="unimed.data.reports"):
        build_pretrain_dataset(records, tokenizer, CFG)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"data.max_length=6 cuts 100 % of mimic-cxr's reports (of 4 measured; their median "
                      f"length {lengths['mimic-cxr']} tokens): the words past the limit are not trained on"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="unimed.data.reports"):
        build_pretrain_dataset(records, tokenizer, dataclasses.replace(CFG, max_length=lengths["mimic-cxr"]))
    assert caplog.records == []

def test_same_sample_same_views_across_epoch_start_and_resume(tmp_path, tokenizer):
    dataset = build_pretrain_dataset(write_records(tmp_path), tokenizer, CFG)
    sampler = PretrainSampler(dataset, seed=1)
    sampler.set_epoch(2)
    keys = list(sampler)
    sampler.set_start(3)
    assert list(sampler) == keys[3:]
    assert list(sampler) == keys  # the start applies to one pass only
    sampler.set_epoch(3)
    assert [k[0] for k in sampler] != [k[0] for k in keys]
    first, again = dataset[keys[4]], dataset[keys[4]]
    assert torch.equal(first["image"], again["image"])
    state = torch.get_rng_state()
    dataset[keys[0]]
    assert torch.equal(state, torch.get_rng_state())  # augmenting leaves the global RNG alone


def test_distributed_shards_are_disjoint(tmp_path, tokenizer):
    dataset = build_pretrain_dataset(write_records(tmp_path), tokenizer, CFG)
    shards = [{k[0] for k in PretrainSampler(dataset, rank=r, world_size=2)} for r in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 8


def test_bad_records_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no records"):
        build_pretrain_dataset([], tokenizer, CFG)
    records = write_records(tmp_path, 2)
    records[1] = Record(dataset="padchest", image_path=records[1].image_path, patient_id="1",
                        study_id="s1", split="train", report="  ", language="es")
    with pytest.raises(DataError, match="img1.png.*no report"):
        build_pretrain_dataset(records, tokenizer, CFG)
    dataset = build_pretrain_dataset(write_records(tmp_path, 2), tokenizer, CFG)
    with pytest.raises(ConfigError, match=r"^train\.batch_size=4: of the 2 pre-training pairs, process 0 "
                                          r"of 1 gets 2, fewer than one batch; lower train\.batch_size$"):
        build_pretrain_loader(dataset, CFG, batch_size=4)
    community = dataclasses.replace(CFG, batch_composition="community")
    with pytest.raises(ConfigError, match=r"^method\.volume_batch_size=2: .* gets 0 \(data\."
                                          r"batch_composition=community: every batch holds one community, "
                                          r"and the largest has 1 pairs\), fewer than one batch"):
        build_pretrain_loader(dataset, community, batch_size=2, setting="method.volume_batch_size")
    with pytest.raises(ConfigError, match=r"^train\.batch_size=1: a pre-training batch needs at least 2 "):
        build_pretrain_loader(dataset, CFG, batch_size=1)
    (tmp_path / "img0.png").unlink()
    (error,) = dataset[0]["data_errors"]  # raised by the training loop, in the main process
    assert isinstance(error, DataError) and error.path == tmp_path / "img0.png"


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_unreadable_image_is_replaced_by_its_community_and_the_error_crosses_workers(
    tmp_path, tokenizer, on_error
):
    """A truncated PNG met by a loader worker: the batch keeps its size and its languages (the
    next English pair stands in), and the DataError reaches the main process intact, under
    "data_errors" (raise) or "skipped" (skip)."""
    records = write_records(tmp_path)
    broken = tmp_path / "img2.png"
    broken.write_bytes(broken.read_bytes()[:40])
    cfg = DataConfig(image_size=16, resize_size=20, max_length=6, num_workers=2, on_error=on_error)
    dataset = build_pretrain_dataset(records, tokenizer, cfg)
    batch = next(iter(build_pretrain_loader(dataset, cfg, batch_size=8)))
    key = "data_errors" if on_error == "raise" else "skipped"
    assert ({"data_errors", "skipped"} & set(batch)) == {key}
    (error,) = batch[key]
    assert isinstance(error, DataError) and error.path == broken and error.reason == "unreadable image"
    indices = sorted(batch["index"].tolist())
    assert indices == [0, 1, 3, 4, 4, 5, 6, 7]  # img2's place taken by img4, the next English pair
    assert batch["image"].shape[0] == 8 and int((batch["language"] == 0).sum()) == 4
    clean = build_pretrain_dataset(records[:2] + records[3:], tokenizer, CFG)
    assert "skipped" not in clean[0] and "data_errors" not in clean[0]


def test_a_replaced_pair_carries_its_own_error_not_those_of_unreadable_stand_ins(tmp_path, tokenizer):
    """Two unreadable English images in a row: img2's pair, whose first stand-in (img4) failed
    too, carried both errors, so img4 was counted twice in an epoch (once more for its own pair)."""
    records = write_records(tmp_path)
    for name in ("img2.png", "img4.png"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:40])
    cfg = DataConfig(image_size=16, resize_size=20, max_length=6, on_error="skip")
    dataset = build_pretrain_dataset(records, tokenizer, cfg)
    item = dataset[2]
    assert item["index"] == 6 and [e.path for e in item["skipped"]] == [tmp_path / "img2.png"]
    item = dataset[4]
    assert item["index"] == 6 and [e.path for e in item["skipped"]] == [tmp_path / "img4.png"]


def test_cvl_views_original_is_unaugmented_and_light_only_crops():
    image = np.random.default_rng(0).random((30, 40), dtype=np.float32)
    original = cvl_transform("original", 16, 20)
    torch.testing.assert_close(original(image), eval_transform(16, 20)(image))
    resized = eval_transform(20, 20)(image)  # the whole image at the resize size
    light = cvl_transform("light", 16, 20)
    for seed in range(6):
        torch.manual_seed(seed)
        view = light(image)
        crops = [resized[:, i : i + 16, j : j + 16] for i in range(5) for j in range(5)]
        assert any(torch.equal(view, crop) for crop in crops)  # no flip, rotation or contrast
    with pytest.raises(ValueError, match="data.cvl_view"):
        cvl_transform("heavy", 16, 20)
    with pytest.raises(ValueError, match="data.cvl_view"):
        DataConfig(cvl_view="heavy")


def test_ssv_jitter_varies_brightness_contrast_and_sharpness_of_the_ssv_view_only(tmp_path, tokenizer):
    flat = np.full((30, 40), 0.5, dtype=np.float32)
    paper = pretrain_transform(16, 20, rotation=0.0, flip_p=0.0, autocontrast_p=0.0)
    jittered = pretrain_transform(16, 20, rotation=0.0, flip_p=0.0, autocontrast_p=0.0, jitter=0.4)
    means = []
    for seed in range(20):
        torch.manual_seed(seed)
        assert torch.allclose(paper(flat), torch.full((3, 16, 16), 0.5))
        torch.manual_seed(seed)
        means.append(float(jittered(flat).mean()))
    assert min(means) < 0.45 and max(means) > 0.55  # brightness factors span [0.6, 1.4]
    assert all(0.3 - 1e-6 <= m <= 0.7 + 1e-6 for m in means)
    edge = np.zeros((30, 40), dtype=np.float32)
    edge[:, 20:] = 1.0
    blur_only = pretrain_transform(16, 20, rotation=0.0, flip_p=0.0, autocontrast_p=0.0, jitter=1e-6)
    sharp = eval_transform(16, 20)(edge)
    steps = []
    for seed in range(20):
        torch.manual_seed(seed)
        steps.append(float(blur_only(edge).diff(dim=-1).abs().max()))
    assert min(steps) < 0.5 * float(sharp.diff(dim=-1).abs().max())  # blurred in some draws
    assert max(steps) > 0.9 * float(sharp.diff(dim=-1).abs().max())  # and not in others
    with pytest.raises(ValueError, match="data.ssv_jitter"):
        DataConfig(ssv_jitter=1.0)

    records = write_records(tmp_path)
    plain = build_pretrain_dataset(records, tokenizer, CFG)
    jitter = build_pretrain_dataset(records, tokenizer, dataclasses.replace(CFG, ssv_jitter=0.4))
    key = (3, sample_seed(0, 0, 3))
    a, b = plain[key], jitter[key]
    assert torch.equal(a["image"], b["image"])  # the view paired with the report is untouched
    assert not torch.equal(a["image_aug"], b["image_aug"])


def _communities(n: int) -> list[int]:
    return [i % 3 for i in range(n)]  # three communities of n / 3


def test_community_batches_hold_one_community_on_every_rank():
    data = list(range(60))
    communities = _communities(60)
    ranks = [list(CommunitySampler(data, communities, batch_size=4, rank=r, world_size=2, seed=3))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 24  # 20 per community -> 2 global batches of 8 each
    for step in range(6):
        batch = [k[0] for rank in ranks for k in rank[4 * step : 4 * step + 4]]
        assert len({communities[i] for i in batch}) == 1
    seen = [k[0] for rank in ranks for k in rank]
    assert len(seen) == len(set(seen)) == 48
    assert {communities[i] for i in seen} == {0, 1, 2}


def test_community_sampler_is_seeded_per_epoch_and_resumes_mid_epoch():
    sampler = CommunitySampler(list(range(60)), _communities(60), batch_size=4, seed=1)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert list(CommunitySampler(list(range(60)), _communities(60), batch_size=4, seed=1)) != keys
    sampler.set_start(8)
    assert list(sampler) == keys[8:]
    assert all(seed == sample_seed(1, 2, index) for index, seed in keys)


def test_loader_uses_the_community_sampler(tmp_path, tokenizer):
    cfg = DataConfig(image_size=16, resize_size=20, max_length=6, batch_composition="community")
    dataset = build_pretrain_dataset(write_records(tmp_path), tokenizer, cfg)
    for batch in build_pretrain_loader(dataset, cfg, batch_size=2):
        assert len(set(batch["language"].tolist())) == 1 and len(set(batch["site"].tolist())) == 1
    with pytest.raises(ValueError, match="data.batch_composition"):
        DataConfig(batch_composition="sorted")


def test_sentence_keep_pairs_the_image_with_a_seeded_ordered_subset_of_its_sentences(tmp_path, tokenizer):
    report = "No cardiomegaly. Small left pleural effusion. No pneumothorax. Mild pulmonary edema."
    sentences = ["No cardiomegaly.", "Small left pleural effusion.", "No pneumothorax.",
                 "Mild pulmonary edema."]
    records = [dataclasses.replace(r, report=report, language="en")
               for r in write_records(tmp_path, n=2)]
    whole = build_pretrain_dataset(records, tokenizer, CFG)
    assert {whole.report_text(0, seed) for seed in range(20)} == {report}
    subset = build_pretrain_dataset(records, tokenizer, dataclasses.replace(CFG, sentence_keep=0.5))
    texts = [subset.report_text(0, seed) for seed in range(200)]
    assert texts == [subset.report_text(0, seed) for seed in range(200)]  # the seed decides
    kept = [[s for s in sentences if s in text] for text in texts]
    assert all(kept_ and " ".join(kept_) == text for kept_, text in zip(kept, texts))  # order kept
    assert 1.6 < np.mean([len(k) for k in kept]) < 2.4  # about half of the four, at least one
    assert len(set(texts)) > 8 and report in texts
    item = subset[(0, 7)]
    assert tokenizer.decode(item["input_ids"], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(subset.report_text(0, 7), truncation=True, max_length=CFG.max_length)["input_ids"],
        skip_special_tokens=True)


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_sentence_keep_outside_its_range_is_a_config_error(keep):
    with pytest.raises(ValueError, match=r"data.sentence_keep must be in \(0, 1\]"):
        DataConfig(sentence_keep=keep)
