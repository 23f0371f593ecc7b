"""Cross-lingual MLM: embedding extension from a local BERT folder, training, saving, loading back."""

from __future__ import annotations

import csv
import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from text_corpora import ENGLISH_REPORTS, SPANISH_REPORTS
from transformers import AutoTokenizer, BertForMaskedLM, BertModel

from unimed.methods.base import StepContext
from unimed.text import mlm
from unimed.text.config import MLMConfig, VocabConfig
from unimed.text.mlm import START_ROWS_FILE, build_mlm_model, start_encoder, train_mlm
from unimed.text.vocab import build_cross_lingual_tokenizer
from unimed.train.checkpoint import CheckpointError

CORPUS = ENGLISH_REPORTS + SPANISH_REPORTS
TINY = MLMConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=8, max_length=48, log_every=1
)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT's vocabulary extended with Spanish terms, as the vocabulary stage would write it."""
    out = tmp_path_factory.mktemp("tiny_xling_tok")
    build_cross_lingual_tokenizer(
        ENGLISH_REPORTS, SPANISH_REPORTS, VocabConfig(new_terms=25), out, base_model=tiny_bert_dir, progress=False
    )
    return out


@pytest.fixture(scope="module")
def fresh_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fresh_xling_tok")
    cfg = VocabConfig(english_vocab_size=200, new_terms=40)
    build_cross_lingual_tokenizer(ENGLISH_REPORTS, SPANISH_REPORTS, cfg, out, progress=False)
    return out


def test_subword_mean_rows_start_at_the_mean_of_their_base_pieces(tiny_bert_dir, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    base_tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    old = BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).get_input_embeddings().weight.detach()
    cfg = MLMConfig(**{**TINY.__dict__, "new_rows": "subword_mean"})
    weight = build_mlm_model(tokenizer, cfg, base_model=tiny_bert_dir).get_input_embeddings().weight.detach()
    n_old = old.shape[0]
    torch.testing.assert_close(weight[:n_old], old, rtol=0, atol=0)
    vocab = tokenizer.get_vocab()
    for term, row in sorted(vocab.items(), key=lambda kv: kv[1])[n_old:]:
        pieces = base_tokenizer.tokenize(term)
        assert pieces, term
        expected = torch.stack([old[base_tokenizer.convert_tokens_to_ids(p)] for p in pieces]).sum(0) / len(pieces)
        torch.testing.assert_close(weight[row], expected, rtol=1e-5, atol=1e-6)


def _term_and_pieces_states(model: BertModel, term_ids: list[int], cls: int, sep: int,
                            pieces: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last-layer states of "[CLS] term [SEP]" (one row per term) and of the terms'
    base-tokenizer pieces (padded)."""
    def pooled(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1)

    alone = torch.tensor([[cls, t, sep] for t in term_ids])
    return pooled(alone, torch.ones_like(alone)), pooled(pieces["input_ids"], pieces["attention_mask"])


def test_distilled_rows_read_like_their_pieces_and_change_nothing_else(tiny_bert_dir, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    base_tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    models = {rule: build_mlm_model(tokenizer, MLMConfig(**{**TINY.__dict__, "new_rows": rule}),
                                    base_model=tiny_bert_dir) for rule in ("subword_mean", "subword_distilled")}
    mean, distilled = models["subword_mean"], models["subword_distilled"]
    n_old = BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).get_input_embeddings().num_embeddings
    for (name, a), (_, b) in zip(mean.named_parameters(), distilled.named_parameters()):
        assert a.requires_grad == b.requires_grad, name
        if name != "bert.embeddings.word_embeddings.weight":
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows_mean, rows_distilled = mean.get_input_embeddings().weight, distilled.get_input_embeddings().weight
    torch.testing.assert_close(rows_distilled[:n_old], rows_mean[:n_old], rtol=0, atol=0)
    assert not torch.equal(rows_distilled[n_old:], rows_mean[n_old:])
    assert mean.training == distilled.training
    term_ids = list(range(n_old, len(tokenizer)))
    pieces = base_tokenizer(tokenizer.convert_ids_to_tokens(term_ids), padding=True, return_tensors="pt")
    errors = {}
    for rule, model in models.items():
        model.eval()
        alone, target = _term_and_pieces_states(model.bert, term_ids, tokenizer.cls_token_id,
                                                tokenizer.sep_token_id, pieces)
        errors[rule] = float(((alone - target) ** 2).mean())
    assert errors["subword_distilled"] < 0.25 * errors["subword_mean"], errors


def test_lexicon_rows_read_like_their_translation_and_untranslated_terms_like_their_pieces(
    tiny_bert_dir, tiny_tokenizer_dir, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    base_tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    n_old = BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).get_input_embeddings().num_embeddings
    terms = tokenizer.convert_ids_to_tokens(list(range(n_old, len(tokenizer))))
    translated = {terms[0]: "pleural effusion", terms[1]: "heart"}
    lexicon = tmp_path / "lexicon.yaml"
    entries = "".join(f"  {term}: {english}\n" for term, english in translated.items())
    lexicon.write_text(f"source: es\ntarget: en\nentries:\n{entries}", encoding="utf-8")
    configs = {rule: MLMConfig(**{**TINY.__dict__, "new_rows": rule, "lexicon": str(lexicon)})
               for rule in ("subword_distilled", "lexicon")}
    models = {rule: build_mlm_model(tokenizer, cfg, base_model=tiny_bert_dir) for rule, cfg in configs.items()}
    rows = {rule: model.get_input_embeddings().weight.detach() for rule, model in models.items()}
    torch.testing.assert_close(rows["lexicon"][:n_old], rows["subword_distilled"][:n_old], rtol=0, atol=0)
    torch.testing.assert_close(rows["lexicon"][n_old + 2:], rows["subword_distilled"][n_old + 2:])
    sources = [translated.get(t, t) for t in terms]
    pieces = base_tokenizer(sources[:2], padding=True, return_tensors="pt")
    errors = {}
    for rule, model in models.items():
        alone, target = _term_and_pieces_states(model.bert.eval(), [n_old, n_old + 1],
                                                tokenizer.cls_token_id, tokenizer.sep_token_id, pieces)
        errors[rule] = float(((alone - target) ** 2).mean())
    assert errors["lexicon"] < 0.25 * errors["subword_distilled"], errors


def test_a_missing_lexicon_stops_mlm_before_training(tiny_bert_dir, tiny_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "new_rows": "lexicon", "lexicon": str(tmp_path / "nowhere.yaml")})
    with pytest.raises(ValueError, match="nowhere.yaml' is neither a file nor a packaged lexicon"):
        train_mlm(CORPUS, tiny_tokenizer_dir, cfg, tmp_path / "out", base_model=tiny_bert_dir, progress=False)
    assert not (tmp_path / "out").exists()


def test_extended_embeddings_keep_old_rows_and_draw_new_rows(tiny_bert_dir, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    base = BertForMaskedLM.from_pretrained(str(tiny_bert_dir))
    old = base.get_input_embeddings().weight.detach().clone()  # (V0, D)
    model = build_mlm_model(tokenizer, TINY, base_model=tiny_bert_dir, seed=3)
    weight = model.get_input_embeddings().weight.detach()  # (V0 + M, D)
    n_old = old.shape[0]
    assert weight.shape == (len(tokenizer), old.shape[1]) and len(tokenizer) == n_old + 25
    torch.testing.assert_close(weight[:n_old], old, rtol=0, atol=0)
    new = weight[n_old:]  # (M, D)
    assert not torch.allclose(new, old.mean(dim=0).expand_as(new), atol=1e-3)
    assert (new - new.mean(dim=0)).norm(dim=1).min() > 0  # rows differ from each other, unlike mean init
    std = model.config.initializer_range
    assert 0.7 * std < new.std().item() < 1.3 * std
    # The output layer is tied to the embeddings, so the new terms can also be predicted.
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tokenizer("derram cardiomegali", return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_rows_mode_updates_only_the_new_rows_and_the_head(tiny_bert_dir, tiny_tokenizer_dir, tmp_path):
    """mlm.trainable=new_rows: after training, the transformer body and every base-vocabulary row
    are bit-identical to the start (even with weight decay asked for), the new rows and the head
    have moved."""
    cfg = MLMConfig(**{**TINY.__dict__, "trainable": "new_rows", "new_rows": "subword_mean",
                       "batch_size": 12, "max_steps": 3, "lr": 1e-2, "weight_decay": 0.1})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    start = build_mlm_model(tokenizer, cfg, base_model=tiny_bert_dir, seed=0, corpus=CORPUS).state_dict()
    train_mlm(CORPUS, tiny_tokenizer_dir, cfg, tmp_path, base_model=tiny_bert_dir, progress=False)
    after = BertForMaskedLM.from_pretrained(str(tmp_path)).state_dict()
    n_old = BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).get_input_embeddings().num_embeddings
    rows = "bert.embeddings.word_embeddings.weight"
    for name, value in start.items():
        if name == rows:
            torch.testing.assert_close(after[name][:n_old], value[:n_old], rtol=0, atol=0)
            assert (after[name][n_old:] - value[n_old:]).abs().amax(dim=1).min() > 0, "a new row never moved"
        elif name.startswith("bert."):
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(after["cls.predictions.bias"], start["cls.predictions.bias"])
    # The saved config says where the appended rows start (pre-training's train_appended_rows).
    assert BertForMaskedLM.from_pretrained(str(tmp_path)).config.unimed_base_vocab_size == n_old
    # The start of the appended rows is saved beside the model (the MLM check's "before").
    saved = load_file(str(tmp_path / START_ROWS_FILE))["rows"]
    torch.testing.assert_close(saved, start[rows][n_old:], rtol=0, atol=0)
    assert _mode(tmp_path / START_ROWS_FILE) == _mode(tmp_path / "config.json")  # not safetensors' 0o600


def test_start_encoder_names_a_missing_or_mismatched_start(tiny_bert_dir, tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    with pytest.raises(ValueError, match=f"{START_ROWS_FILE}: cannot read the appended rows"):
        start_encoder(tokenizer, tiny_bert_dir, tmp_path)
    (tmp_path / START_ROWS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{START_ROWS_FILE}: cannot read the appended rows"):
        start_encoder(tokenizer, tiny_bert_dir, tmp_path)
    save_file({"rows": torch.zeros(2, 3)}, str(tmp_path / START_ROWS_FILE))
    with pytest.raises(ValueError, match=r"\(2, 3\) rows, but the vocabulary appends"):
        start_encoder(tokenizer, tiny_bert_dir, tmp_path)


def test_training_only_the_new_rows_needs_a_base_model(fresh_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "trainable": "new_rows"})
    with pytest.raises(ValueError, match="mlm.trainable=new_rows needs a base model"):
        train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path, base_model=None, progress=False)


def test_train_from_local_bert_folder_saves_a_loadable_model(tiny_bert_dir, tiny_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 1, "batch_size": 12})
    result = train_mlm(CORPUS, tiny_tokenizer_dir, cfg, tmp_path, base_model=tiny_bert_dir, progress=False)
    assert result.steps == 2 and len(result.loss_history) == 1 and result.out_dir == tmp_path
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    encoder = BertModel.from_pretrained(str(tmp_path))
    assert encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert encoder(**tokenizer("derram pleural", return_tensors="pt")).last_hidden_state.shape[-1] == 32
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["masked_tokens"] > 0 for r in rows)
    assert result.loss_history == [pytest.approx((rows[0]["loss"] + rows[1]["loss"]) / 2)]
    assert (tmp_path / "checkpoints" / "latest").is_file()
    # safetensors creates its files 0o600 (safetensors#782); the encoder is readable like its config.
    assert _mode(tmp_path / "model.safetensors") == _mode(tmp_path / "config.json")


def test_a_full_disk_when_the_encoder_is_saved_is_one_checkpoint_error(tiny_bert_dir, tiny_tokenizer_dir,
                                                                       tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):  # what safetensors raises, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(BertForMaskedLM, "save_pretrained", disk_full)
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 1, "batch_size": 12})
    with pytest.raises(CheckpointError) as err:
        train_mlm(CORPUS, tiny_tokenizer_dir, cfg, tmp_path, base_model=tiny_bert_dir, progress=False)
    assert str(err.value) == (f"cannot save the MLM encoder to {tmp_path} (Error while serializing: I/O "
                              "error: No space left on device (os error 28)); its training checkpoints "
                              f"are in {tmp_path / 'checkpoints'}")
    assert (tmp_path / "checkpoints" / "latest").is_file()  # the trained state is kept there


def test_mlm_runs_on_the_training_loop_and_resumes_on_the_same_curve(fresh_tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    """A run killed after 4 of 6 steps and resumed (same config, so the same data order) logs the
    same losses as an uninterrupted one: the resumed process starts from a fresh seed state, so
    masks and dropout must come from the checkpoint's RNG states, weights and Adam state from its
    files."""
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 2})  # 24 reports in batches of 8: 6 steps
    full = train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path / "full", seed=1, progress=False)
    assert full.steps == 6
    whole_loop = mlm.loop_config
    monkeypatch.setattr(mlm, "loop_config", lambda c: dataclasses.replace(whole_loop(c), max_steps=4))
    assert train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path / "cut", seed=1, progress=False).steps == 4
    monkeypatch.undo()
    rest = train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path / "cut", seed=1, progress=False,
                     resume=True)
    assert rest.steps == 6

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6, rel=0)
    saved = [BertForMaskedLM.from_pretrained(str(tmp_path / run)).state_dict() for run in ("full", "cut")]
    for key, value in saved[0].items():
        torch.testing.assert_close(saved[1][key], value, atol=1e-6, rtol=0, msg=key)


def test_a_batch_without_masked_tokens_gives_zero_loss_not_nan(fresh_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(fresh_tokenizer_dir))
    model = build_mlm_model(tokenizer, TINY).eval()
    ids = tokenizer(["derram pleural", "no pleural effusion"], padding=True, return_tensors="pt")
    labels = torch.full_like(ids["input_ids"], -100)
    out = mlm.MaskedLM(model, TINY)({**ids, "labels": labels}, StepContext(step=0, epoch=0, stage="mlm"))
    assert out["loss"].item() == 0.0 and out["masked_tokens"].item() == 0
    labels[0, 1] = ids["input_ids"][0, 1]
    out = mlm.MaskedLM(model, TINY)({**ids, "labels": labels}, StepContext(step=0, epoch=0, stage="mlm"))
    logits = model(**ids).logits[0, 1]  # the one masked position, (V,)
    expected = -torch.log_softmax(logits, dim=-1)[ids["input_ids"][0, 1]]
    torch.testing.assert_close(out["loss"], expected)


def test_loss_is_the_mean_cross_entropy_of_the_full_model_over_the_masked_positions(
        fresh_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(fresh_tokenizer_dir))
    model = build_mlm_model(tokenizer, TINY).eval()
    ids = tokenizer(["derram pleural izquierd", "no pleural effusion seen"], padding=True,
                    return_tensors="pt")
    labels = torch.full_like(ids["input_ids"], -100)
    positions = [(0, 1), (0, 2), (1, 1), (1, 3)]
    for row, col in positions:
        labels[row, col] = (ids["input_ids"][row, col] + 7) % len(tokenizer)  # any target works
    out = mlm.MaskedLM(model, TINY)({**ids, "labels": labels}, StepContext(step=0, epoch=0, stage="mlm"))
    log_probs = torch.log_softmax(model(**ids).logits, dim=-1)  # (B, L, V), every position scored
    expected = -torch.stack([log_probs[r, c, labels[r, c]] for r, c in positions]).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert out["masked_tokens"].item() == len(positions)


def test_mlm_loss_goes_down_on_a_bilingual_corpus(fresh_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 20, "lr": 3e-3, "warmup_ratio": 0.1})
    result = train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path, seed=0, progress=False)
    first, last = result.loss_history[0], sum(result.loss_history[-3:]) / 3
    assert last < first - 0.5, result.loss_history


def test_same_seed_same_losses(fresh_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 2})
    runs = [train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path / str(i), seed=7, progress=False) for i in (0, 1)]
    assert runs[0].loss_history == runs[1].loss_history
    other = train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path / "other", seed=8, progress=False)
    assert other.loss_history != runs[0].loss_history


def test_an_mlm_length_that_cuts_the_corpus_is_said(fresh_tokenizer_dir, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(str(fresh_tokenizer_dir))
    lengths = sorted(len(tokenizer(text)["input_ids"]) for text in CORPUS)
    limit = lengths[len(lengths) // 2]  # cuts the longer half of the reports
    share = sum(length > limit for length in lengths) / len(lengths)
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 1, "max_length": limit})
    with caplog.at_level("WARNING", logger="unimed.data.reports"):
        train_mlm(CORPUS, fresh_tokenizer_dir, cfg, tmp_path, seed=0, progress=False)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"mlm.max_length={limit} cuts {100 * share:.0f} % of the MLM corpus's reports "
                              f"(of {len(CORPUS)} measured")

def test_tokenizer_not_built_on_the_base_model_is_rejected(tiny_bert_dir, fresh_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(fresh_tokenizer_dir))
    with pytest.raises(ValueError, match="changed id|must extend"):
        build_mlm_model(tokenizer, TINY, base_model=tiny_bert_dir)


@pytest.mark.parametrize(
    ("corpus", "cfg", "message"),
    [
        ([], TINY, "corpus is empty"),
        (["derram pleural", 3], TINY, r"corpus\[1\] is a int"),
    ],
)
def test_bad_input_gives_a_clear_error(fresh_tokenizer_dir, tmp_path, corpus, cfg, message):
    with pytest.raises(ValueError, match=message):
        train_mlm(corpus, fresh_tokenizer_dir, cfg, tmp_path, progress=False)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", 0, "mlm.epochs must be >= 1, got 0"),
    ("mask_prob", 0.0, r"mlm.mask_prob must be in \(0, 1\), got 0.0"),
    ("max_grad_norm", -1.0, "mlm.max_grad_norm must be >= 0, got -1.0"),
    ("lr", 0.0, "mlm.lr must be > 0, got 0.0"),
    ("max_steps", 0, r"mlm.max_steps must be at least 1 \(or null\), got 0"),
    ("new_rows", "zeros", "mlm.new_rows must be one of random, subword_mean, subword_distilled, lexicon"),
    ("trainable", "head", "mlm.trainable must be one of all, new_rows"),
])
def test_a_bad_mlm_value_is_an_error_of_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        MLMConfig(**{**TINY.__dict__, key: value})


def test_missing_folders_are_reported(fresh_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer folder .* does not exist"):
        train_mlm(CORPUS, tmp_path / "nope", TINY, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="base model folder .* does not exist"):
        train_mlm(CORPUS, fresh_tokenizer_dir, TINY, tmp_path / "out", base_model=tmp_path / "cxr", progress=False)


def test_max_steps_ends_training_early(tiny_bert_dir, tiny_tokenizer_dir, tmp_path):
    cfg = MLMConfig(**{**TINY.__dict__, "epochs": 3, "batch_size": 12, "max_steps": 3})
    result = train_mlm(CORPUS, tiny_tokenizer_dir, cfg, tmp_path, base_model=tiny_bert_dir, progress=False)
    assert result.steps == 3 and len(result.loss_history) == 2  # two steps in epoch 1, one in epoch 2


def test_missing_mlm_head_starts_tied_with_identity_transform_and_frequency_bias(
        tiny_bert_dir, tiny_tokenizer_dir):
    import torch
    from transformers import BertModel as Encoder

    from unimed.text.mlm import build_mlm_model

    headless = tiny_bert_dir.parent / "headless"
    Encoder.from_pretrained(str(tiny_bert_dir)).save_pretrained(str(headless))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert_dir / name).exists():
            (headless / name).write_bytes((tiny_bert_dir / name).read_bytes())
    corpus = ["derram pleural derram", "no pleural effusion"]
    model = build_mlm_model(tokenizer, MLMConfig(**TINY.__dict__), base_model=headless, corpus=corpus)
    head = model.cls.predictions
    torch.testing.assert_close(head.transform.dense.weight, torch.eye(head.transform.dense.weight.shape[0]))
    counts = torch.zeros(len(tokenizer))
    for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        for i in ids:
            counts[i] += 1
    prior = torch.log((counts + 1) / (counts.sum() + len(counts)))
    torch.testing.assert_close(head.bias, prior - prior.mean())
    with_head = build_mlm_model(tokenizer, MLMConfig(**TINY.__dict__), base_model=tiny_bert_dir, corpus=corpus)
    assert not torch.allclose(with_head.cls.predictions.bias, head.bias)  # a saved head is kept


@pytest.mark.parametrize("new_rows", ["random", "subword_mean", "subword_distilled", "lexicon"])
def test_retrieval_check_compares_with_the_encoder_mlm_starts_from(
    tiny_bert_dir, tiny_tokenizer_dir, tmp_path, new_rows, monkeypatch
):
    """Saved untrained, the MLM start must score exactly as the check's "before": the reference is
    the encoder MLM starts from, with its new rows as ``mlm.new_rows`` draws them (not a resized
    base model whose new rows start elsewhere), read from the saved start, not distilled again."""
    from unimed.commands.train import MLM_CHECK_FILE, mlm_retrieval_check
    from unimed.config import load_config

    parallel = tmp_path / "data" / "parallel-reports"
    parallel.mkdir(parents=True)
    rows = [[str(i), en, es] for i, (en, es) in enumerate(zip(ENGLISH_REPORTS, SPANISH_REPORTS))]
    with (parallel / "test.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["study_id", "en", "es"], *rows])
    cfg = load_config(None, [f"vocab.base_model={tiny_bert_dir}", f"data.root={tmp_path / 'data'}",
                             f"mlm.new_rows={new_rows}", "mlm.max_length=48", "run.seed=3"])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    start = build_mlm_model(tokenizer, cfg.mlm, base_model=tiny_bert_dir, seed=3)
    mlm_dir = tmp_path / "mlm"
    mlm.save_start_rows(start, mlm_dir)
    start.save_pretrained(str(mlm_dir))
    tokenizer.save_pretrained(str(mlm_dir))
    monkeypatch.setattr(mlm, "distil_new_rows", lambda *args, **kwargs: pytest.fail("distilled again"))
    result = mlm_retrieval_check(cfg, mlm_dir)
    assert result["pairs"] == len(rows) and result["before"] == result["after"] and result["passed"]
    assert json.loads((mlm_dir / MLM_CHECK_FILE).read_text())["before"] == result["before"]
