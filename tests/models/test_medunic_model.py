"""The Med-UniC model: outputs, view batching, loss switches, freezing and a training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unimed.losses import MedUniCLoss
from unimed.methods import METHODS, create_method
from unimed.models import MedUniC
from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCLossConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)

VOCAB = 40
B, L = 4, 7


def tiny_cfg(*, image: dict | None = None, text: dict | None = None,
             loss: dict | None = None) -> MedUniCConfig:
    """The tiny Med-UniC section, with overrides per sub-section."""
    return MedUniCConfig(
        image=ImageTowerConfig(**{"encoder": "resnet10t", **(image or {})}),
        text=TextTowerConfig(**{"hidden_size": 16, "num_layers": 3, "num_heads": 2,
                                "intermediate_size": 32, "frozen_layers": 1, **(text or {})}),
        projector=MedUniCProjectorConfig(embed_dim=8, ctr_dim=12, hidden_dim=24),
        loss=MedUniCLossConfig(**(loss or {})),
    )


def tiny_batch(seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {
        "image": torch.randn(B, 3, size, size, generator=gen),
        "image_aug": torch.randn(B, 3, size, size, generator=gen),
        "input_ids": torch.randint(0, VOCAB, (B, L), generator=gen),
        "attention_mask": mask,
    }


def _model(cfg: MedUniCConfig) -> MedUniC:
    torch.manual_seed(0)
    return create_method(cfg, vocab_size=VOCAB).model


def _record_batch_sizes(module: torch.nn.Module) -> list[int]:
    sizes: list[int] = []

    def hook(_module, args, kwargs):
        first = args[0] if args else kwargs["input_ids"]
        sizes.append(first.shape[0])

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return sizes


def test_registered_and_unknown_name_lists_valid() -> None:
    assert "medunic" in METHODS
    with pytest.raises(KeyError, match="medunic"):
        create_method(dataclasses.replace(tiny_cfg(), name="nope"), vocab_size=VOCAB)


def test_forward_keys_shapes_and_single_concatenated_passes() -> None:
    model = _model(tiny_cfg())
    image_calls, text_calls = _record_batch_sizes(model.visual), _record_batch_sizes(model.text.embeddings)
    out = model(tiny_batch())
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"image_features": (B, 8), "image_aug_features": (B, 8),
                      "text_features": (B, 8), "ctr_a": (B, 12), "ctr_b": (B, 12)}
    assert image_calls == [2 * B] and text_calls == [2 * B]
    assert not torch.allclose(out["ctr_a"], out["ctr_b"])  # different dropout masks


def test_concatenated_views_match_separate_encoding_in_eval() -> None:
    model = _model(tiny_cfg()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch)
        torch.testing.assert_close(out["image_features"], model.encode_image(batch["image"]))
        aug = model.encode_image(batch["image_aug"])
        torch.testing.assert_close(out["image_aug_features"], aug)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out["text_features"], text)
    torch.testing.assert_close(out["ctr_a"], out["ctr_b"])  # no dropout in eval


def test_projector_batchnorm_sees_one_view_at_a_time() -> None:
    # A LayerNorm backbone isolates the projector: in train mode image_features must be exactly
    # P_v(F_v(view 1)) with batch statistics of view 1 alone.
    model = _model(tiny_cfg(image={"encoder": "vit_tiny_patch8_64"})).train()
    batch = tiny_batch(size=64)
    with torch.no_grad():
        out = model(batch)
        alone = model.image_proj(model.pooled_image(batch["image"]))
    torch.testing.assert_close(out["image_features"], alone)


def test_only_the_original_view_moves_the_projectors_running_statistics() -> None:
    """The augmented SSV view trains through the image projector but is never evaluated: a
    training step leaves its running statistics where the original view alone would have."""
    model = _model(tiny_cfg(image={"encoder": "vit_tiny_patch8_64"})).train()
    batch = tiny_batch(size=64)
    original_only = [model.image_proj.mlp[1], model.image_proj.norm]
    start = {k: v.clone() for k, v in model.image_proj.state_dict().items()}
    with torch.no_grad():
        model(batch)
        after_step = [(n.running_mean.clone(), n.running_var.clone()) for n in original_only]
        model.image_proj.load_state_dict(start)
        model.image_proj(model.pooled_image(batch["image"]))
    for (mean, var), norm in zip(after_step, original_only):
        assert torch.equal(mean, norm.running_mean) and torch.equal(var, norm.running_var)
    assert not torch.equal(after_step[0][0], start["mlp.1.running_mean"])


def test_zero_weights_skip_work() -> None:
    model = _model(tiny_cfg(loss={"ssv_weight": 0.0, "ctr_weight": 0.0}))
    assert model.ctr_proj is None
    image_calls, text_calls = _record_batch_sizes(model.visual), _record_batch_sizes(model.text.embeddings)
    batch = tiny_batch()
    del batch["image_aug"]
    out = model(batch)
    assert set(out) == {"image_features", "text_features"}
    assert image_calls == [B] and text_calls == [B]
    ctr_only = _model(tiny_cfg(loss={"cvl_weight": 0.0, "ssv_weight": 0.0}))
    assert set(ctr_only(tiny_batch())) == {"ctr_a", "ctr_b"}
    no_cvl = _model(tiny_cfg(loss={"cvl_weight": 0.0}))
    assert set(no_cvl(tiny_batch())) == {"image_features", "image_aug_features", "ctr_a", "ctr_b"}


def test_missing_batch_key_is_named() -> None:
    batch = tiny_batch()
    del batch["image_aug"]
    with pytest.raises(KeyError, match="image_aug"):
        _model(tiny_cfg())(batch)


def test_encode_normalize_and_dense_features() -> None:
    model = _model(tiny_cfg()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=True)
        maps = model.forward_intermediates(batch["image"])
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(B))
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.visual.feature_info]
    assert all(m.shape[0] == B for m in maps)


def test_trainable_parameters_follow_frozen_text_layers() -> None:
    model = _model(tiny_cfg(text={"frozen_layers": 2}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n for n, _ in model.named_parameters()
        if not n.startswith("text.") or n.startswith("text.encoder.layer.2.")
    }
    assert trainable == expected
    with pytest.raises(ValueError, match="frozen_layers=4"):
        _model(tiny_cfg(text={"frozen_layers": 4}))


def test_lock_helpers_freeze_one_tower() -> None:
    model = _model(tiny_cfg(text={"frozen_layers": 0}))
    model.lock_image()
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.image_proj.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    model.lock_text()
    assert not any(p.requires_grad for p in model.text_proj.parameters())


@pytest.mark.parametrize("frozen_dropout", [True, False])
def test_training_step_reaches_every_trainable_parameter(frozen_dropout) -> None:
    cfg = tiny_cfg(text={"frozen_dropout": frozen_dropout})
    model = _model(cfg)
    losses = MedUniCLoss(cfg.loss)(**model(tiny_batch()))
    losses["loss"].backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name


def test_shared_frozen_trunk_gives_the_same_features_in_eval_and_fewer_text_rows() -> None:
    full, shared = (_model(tiny_cfg(text={"frozen_dropout": flag})) for flag in (True, False))
    shared.load_state_dict(full.state_dict())
    batch = tiny_batch()
    with torch.no_grad():
        for key, value in full.eval()(batch).items():
            torch.testing.assert_close(shared.eval()(batch)[key], value, msg=key)
    shared.train()
    first_trainable = shared.text.encoder.layer[1]
    rows = _record_batch_sizes(shared.text.embeddings)
    above = _record_batch_sizes(first_trainable.attention.self.query)
    out = shared(batch)
    # The trunk runs once per report, the trainable layers once per view on the real tokens only.
    assert rows == [B] and above == [2 * int(batch["attention_mask"].sum())]
    assert not torch.allclose(out["ctr_a"], out["ctr_b"])  # their dropout still makes two views


def test_compiled_image_encoder_keeps_state_dict_keys() -> None:
    eager = _model(tiny_cfg())
    compiled = _model(tiny_cfg(image={"compile": True}))
    assert compiled.visual._compiled_call_impl is not None
    assert eager.visual._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())


APPENDED = 30  # the tiny encoder's base vocabulary: ids 30..39 are "appended" terms


def _grown_encoder_dir(tmp_path, record: bool = True):
    """A tiny BERT folder of VOCAB rows whose config says (or not) where the appended rows start."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32)
    if record:
        config.unimed_base_vocab_size = APPENDED
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("frozen_dropout", [True, False])
def test_appended_rows_train_while_base_rows_and_frozen_layers_stay_exact(tmp_path, frozen_dropout) -> None:
    """method.text.train_appended_rows: after steps at a large lr with weight decay, every base
    word row, the position embeddings and the frozen layer are bit-identical, and every appended row
    the batch used has moved (also through the shared trunk, which otherwise runs without autograd)."""
    from unimed.methods.base import Stage
    from unimed.train.config import TrainConfig

    cfg = tiny_cfg(text={"train_appended_rows": True, "frozen_dropout": frozen_dropout})
    method = create_method(cfg, vocab_size=VOCAB, text_encoder=_grown_encoder_dir(tmp_path))
    start = {k: v.clone() for k, v in method.model.text.state_dict().items()}
    optimizer, _ = method.configure_optimizer(Stage("pretrain", 1),
                                              TrainConfig(lr=1e-2, weight_decay=0.1), 3)
    batch = tiny_batch()
    batch["input_ids"][:, 1] = torch.arange(APPENDED, APPENDED + B)  # one appended term per report
    for _ in range(3):
        optimizer.zero_grad()
        method(batch, _ctx())["loss"].backward()
        optimizer.step()
    after = method.model.text.state_dict()
    rows = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(after[rows][:APPENDED], start[rows][:APPENDED], rtol=0, atol=0)
    moved = (after[rows][APPENDED:APPENDED + B] - start[rows][APPENDED:APPENDED + B]).abs().amax(dim=1)
    assert moved.min() > 0, "an appended row the batch used never moved"
    for name in [k for k in start if k.startswith(("embeddings.position", "encoder.layer.0."))]:
        torch.testing.assert_close(after[name], start[name], rtol=0, atol=0, msg=name)


def test_a_batch_without_appended_terms_skips_autograd_through_the_shared_trunk(tmp_path) -> None:
    cfg = tiny_cfg(text={"train_appended_rows": True, "frozen_dropout": False})
    method = create_method(cfg, vocab_size=VOCAB, text_encoder=_grown_encoder_dir(tmp_path))
    batch = tiny_batch()
    batch["input_ids"] = batch["input_ids"] % APPENDED
    method(batch, _ctx())["loss"].backward()
    assert method.model.text.embeddings.word_embeddings.weight.grad is None
    batch["input_ids"][0, 1] = APPENDED
    method(batch, _ctx())["loss"].backward()
    assert method.model.text.embeddings.word_embeddings.weight.grad[APPENDED].abs().sum() > 0


def test_appended_rows_need_the_growth_record_and_frozen_embeddings(tmp_path) -> None:
    cfg = tiny_cfg(text={"train_appended_rows": True})
    with pytest.raises(ValueError, match="does not record which embedding rows were appended"):
        create_method(cfg, vocab_size=VOCAB, text_encoder=_grown_encoder_dir(tmp_path, record=False))
    with pytest.raises(ValueError, match="train_appended_rows needs method.text.frozen_layers > 0"):
        tiny_cfg(text={"train_appended_rows": True, "frozen_layers": 0})
    from unimed.models.prior_config import PriorConfig
    from unimed.models.unimedi_config import UniMedIConfig

    for other in (PriorConfig, UniMedIConfig):
        with pytest.raises(ValueError, match="train_appended_rows is a Med-UniC setting"):
            other(text=TextTowerConfig(train_appended_rows=True))


def _ctx():
    from unimed.methods.base import StepContext

    return StepContext(step=0, epoch=0, stage="pretrain", stage_step=0)


def test_word_embeddings_keep_weight_decay_unless_only_appended_rows_train(tmp_path) -> None:
    from unimed.methods.base import Stage
    from unimed.train.config import TrainConfig

    def decayed(method) -> bool:
        optimizer, _ = method.configure_optimizer(Stage("pretrain", 1), TrainConfig(weight_decay=0.1), 3)
        words = method.model.text.embeddings.word_embeddings.weight
        return any(p is words for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])

    assert decayed(create_method(tiny_cfg(text={"frozen_layers": 0}), vocab_size=VOCAB))
    appended = tiny_cfg(text={"train_appended_rows": True})
    assert not decayed(create_method(appended, vocab_size=VOCAB, text_encoder=_grown_encoder_dir(tmp_path)))
