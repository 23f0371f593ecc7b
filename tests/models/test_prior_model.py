"""The PRIOR model on a tiny config: every stage's forward + backward, token order, stage state,
deterministic evaluation and the zero-shot scorer (spec §2-7)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import BertTokenizerFast

from unimed.eval.encoders import Encoder
from unimed.eval.prior_zero_shot import multiclass_scores
from unimed.eval.prompts import load_prompts
from unimed.eval.zero_shot import own_scores, own_scores_by_language
from unimed.losses.prior import PriorLoss
from unimed.methods import create_method
from unimed.models.config import ImageTowerConfig, TextTowerConfig
from unimed.models.prior import combine_scores
from unimed.models.prior_config import PriorConfig

TINY = PriorConfig(
    image=ImageTowerConfig(encoder="resnet10t"), image_size=64, embed_dim=32, pool_heads=4,
    prototypes=16, decoder_layers=2, decoder_heads=4, decoder_queries=4, max_sentences=4,
    text=TextTowerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         frozen_layers=0),
)
WORDS = ["no", "pleural", "effusion", "cardiomegaly", "is", "observed", "."]


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, **overrides)
    return create_method(cfg, vocab_size=len(WORDS) + 5).model


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 4, 4, -1],
                          [-1, 0, 0, 0, 1, 1, -1, -1, -1, -1],
                          [-1, 0, 1, 1, 1, 1, 1, 1, 1, -1]])
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 10])
    return {"image": torch.rand(3, 3, 64, 64, generator=gen),
            "input_ids": torch.randint(5, len(WORDS) + 5, (3, 10), generator=gen) * mask,
            "attention_mask": mask, "sentence_index": index}


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_its_parts(stage: int) -> None:
    model = _model()
    out = model(_batch(), stage=stage)
    losses = PriorLoss(model.cfg)(out, stage)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert _grad_norm(model.visual) > 0 and _grad_norm(model.text) > 0
    assert _grad_norm(model.lam) > 0 and model.logit_scale.grad is not None
    assert (_grad_norm(model.bank) > 0) is (stage >= 2)
    for decoder in (model.image_decoder, model.report_decoder):
        assert (_grad_norm(decoder) > 0) is (stage == 3)
    if stage == 3:  # the fifth sentence of report 0 is cut to max_sentences = 4
        assert out["sentence_mask"].shape[1] == 4
        assert out["image_reconstruction"].shape == (3, 1, 64, 64)


def test_patch_tokens_are_row_major_cells() -> None:
    model = _model().eval()
    image = _batch()["image"]
    fmap = model.visual.forward_features(model.preprocess(image))
    cells, _ = model._image_features(image)
    g = model.grid
    for k in range(g * g):
        torch.testing.assert_close(cells[:, k], fmap[:, :, k // g, k % g])


def test_stage_is_checkpointed_and_validated() -> None:
    model = _model()
    model.set_stage(3)
    state = model.state_dict()
    assert int(state["stage"]) == 3 and "bank.temperature" in state
    fresh = _model()
    fresh.load_state_dict(state)
    assert fresh.use_bank()
    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_stage(0)


def _encoder(model: torch.nn.Module) -> Encoder:
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    return Encoder("prior", "PRIOR", model, tokenizer, max_length=16)


def test_zero_shot_is_deterministic_and_batch_size_free() -> None:
    model = _model()
    model.set_stage(2)
    encoder = _encoder(model)
    images = _batch()["image"]
    prompts = load_prompts("en")
    classes = ["pleural effusion", "cardiomegaly"]
    one = multiclass_scores(encoder, images, prompts, classes, batch_size=1)
    all_at_once = multiclass_scores(encoder, images, prompts, classes, batch_size=3)
    torch.testing.assert_close(torch.as_tensor(one), torch.as_tensor(all_at_once))
    torch.testing.assert_close(torch.as_tensor(one).sum(-1), torch.full((3,), 2.0))
    assert prompts.observed("pleural effusion") == "pleural effusion is observed"


def test_scores_combine_softmaxes_as_the_paper() -> None:
    g = torch.tensor([[1.0, 2.0, 0.5]])
    l = torch.tensor([[0.2, 0.1, 0.9]])
    for w in (1.0, 0.5):
        got = combine_scores(g, l, w)[0].tolist()
        eg, el = [math.exp(v) for v in g[0].tolist()], [math.exp(v) for v in l[0].tolist()]
        want = [eg[c] / sum(eg) + w * el[c] / sum(el) for c in range(3)]
        assert got == pytest.approx(want, rel=1e-6)


def test_binary_scores_pair_observed_and_negative_prompts() -> None:
    model = _model(zero_shot_local_weight=0.5)
    encoder = _encoder(model)
    images = _batch()["image"]
    prompts = load_prompts("en")
    classes = ["pleural effusion", "cardiomegaly"]
    encoded = []
    encode = model.encode_prompts
    model.encode_prompts = lambda *args: encoded.append(args) or encode(*args)
    got = own_scores(encoder, images, prompts, classes, batch_size=1)
    assert len(encoded) == 1  # the prompts once, for every batch of images
    texts = [prompts.observed(c) for c in classes] + [prompts.negative(c) for c in classes]
    with torch.no_grad():
        raw = model.prompt_scores(images, encode(*encoder.tokenize(texts)))
    for c in range(2):
        pair = [c, c + 2]
        combined = combine_scores(raw["global"][:, pair], raw["local"][:, pair], 0.5)
        torch.testing.assert_close(torch.as_tensor(got[:, c]), combined[:, 0] - combined[:, 1])


def test_own_scores_of_several_languages_in_one_pass_equal_each_language_alone() -> None:
    encoder = _encoder(_model(zero_shot_local_weight=0.5))
    images = _batch()["image"]
    prompt_sets = [load_prompts("en"), load_prompts("es")]
    classes = ["pleural effusion", "cardiomegaly", "consolidation"]
    together = own_scores_by_language(encoder, images, prompt_sets, classes)
    for prompts, got in zip(prompt_sets, together):
        want = own_scores(encoder, images, prompts, classes)
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-5, atol=1e-6)


def test_prior_rejects_the_frozen_text_cache() -> None:
    """PRIOR reshuffles each report's sentences every epoch: no report's tokens repeat."""
    text = TextTowerConfig(frozen_layers=2, frozen_dropout=False, cache_frozen=True)
    with pytest.raises(ValueError, match="cache_frozen: PRIOR shuffles"):
        PriorConfig(text=text)
