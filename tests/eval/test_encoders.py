"""Encoders under evaluation: finding checkpoints and their config, strict weight loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from eval_helpers import TINY_MODEL
from safetensors.torch import save_model
from timm.layers import Conv2dSame, FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from unimed.errors import ConfigError
from unimed.eval.encoders import BATCH_NORMS, build_encoder, fold_batch_norms
from unimed.eval.tasks import fraction_label
from unimed.methods import create_method
from unimed.models.config import ImageTowerConfig
from unimed.train.checkpoint import checkpoint_config, find_checkpoint


def _build(name: str, model, text_dir, **kwargs):
    """`build_encoder` of the tiny text encoder, at the sequence length it has positions for."""
    return build_encoder(name, name.upper(), model, text_encoder=str(text_dir), max_length=48, **kwargs)


def _fake_run(tmp_path: Path, model: torch.nn.Module) -> Path:
    """runs/x/pretrain/{config.yaml, checkpoints/{latest, step_00000007/...}} as training writes it
    (the weights of the whole method, whose model sits under "model.")."""
    pretrain = tmp_path / "runs" / "x" / "pretrain"
    step = pretrain / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    save_model(torch.nn.ModuleDict({"model": model}), str(step / "model.safetensors"))
    (step / "state.pt").write_bytes(b"")
    (pretrain / "checkpoints" / "latest").write_text("step_00000007\n")
    (pretrain / "config.yaml").write_text("run: {name: x}\n")
    return step


def test_checkpoint_is_found_from_any_level_with_its_config(tmp_path, tiny_encoder):
    step = _fake_run(tmp_path, tiny_encoder.model)
    for path in (step, step.parent, step.parents[1], step.parents[2]):
        assert find_checkpoint(path) == step
    assert checkpoint_config(step) == (step.parents[1] / "config.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        find_checkpoint(tmp_path / "elsewhere")


def test_weights_load_exactly_and_baseline_is_seeded(tmp_path, tiny_text_dir, tiny_encoder):
    trained = _build("a", TINY_MODEL, tiny_text_dir, seed=5)
    step = _fake_run(tmp_path, trained.model)
    loaded = _build("b", TINY_MODEL, tiny_text_dir, weights=step, seed=0)
    images = torch.rand(3, 3, 64, 64)
    assert torch.equal(loaded.image_features(images), trained.image_features(images))
    texts = ["no pleural effusion", "derram pleural"]
    assert torch.equal(loaded.text_features(texts), trained.text_features(texts))
    again = _build("c", TINY_MODEL, tiny_text_dir, seed=0)
    assert torch.equal(again.image_features(images), tiny_encoder.image_features(images))
    assert not torch.equal(again.image_features(images), trained.image_features(images))


def test_a_sequence_length_past_the_text_positions_is_a_config_error(tiny_text_dir):
    with pytest.raises(ConfigError, match=r"^data\.max_length=97 is more tokens than the text encoder's 96 "
                                          r"positions; set data\.max_length=96 or less$"):
        build_encoder("a", "A", TINY_MODEL, text_encoder=str(tiny_text_dir), max_length=97)
    assert _build("a", TINY_MODEL, tiny_text_dir).max_length == 48
    assert build_encoder("a", "A", TINY_MODEL, text_encoder=str(tiny_text_dir), max_length=96)


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_text_dir):
    other = dataclasses.replace(
        TINY_MODEL, projector=dataclasses.replace(TINY_MODEL.projector, embed_dim=8))
    step = _fake_run(tmp_path, _build("o", other, tiny_text_dir).model)
    with pytest.raises(RuntimeError, match=r"the weights in .*model\.safetensors do not fit the model "
                                           r"\(\d+ tensors of another shape, 0 missing, 0 unexpected; "):
        _build("b", TINY_MODEL, tiny_text_dir, weights=step)


def test_encoder_is_frozen_and_in_eval_mode(tiny_encoder):
    assert not tiny_encoder.model.training
    assert not any(p.requires_grad for p in tiny_encoder.model.parameters())


def _randomise_norms(module: torch.nn.Module) -> None:
    """Batch-norm statistics and affine terms far from the identity, so a dropped term shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, BATCH_NORMS):
                shape = norm.running_var.shape
                norm.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(shape, generator=generator) / 2)
                norm.running_mean.copy_(torch.randn(shape, generator=generator) / 2)
                norm.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)


@pytest.mark.parametrize("image_encoder", ["resnet10t", "efficientnet_lite0"])
def test_batch_norms_fold_into_their_convolutions(tiny_text_dir, tiny_encoder, image_encoder):
    # Trainable and frozen norms (frozen_levels): torchvision's FrozenBatchNorm2d in resnet10t,
    # timm's BatchNormAct2d and FrozenBatchNormAct2d (with their activation) in EfficientNet.
    image = dataclasses.replace(TINY_MODEL.image, encoder=image_encoder, frozen_levels=2)
    visual = create_method(dataclasses.replace(TINY_MODEL, image=image), text_encoder=str(tiny_text_dir),
                           vocab_size=len(tiny_encoder.tokenizer)).model.visual.eval()
    assert any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in visual.modules())
    _randomise_norms(visual)
    folded = fold_batch_norms(visual)
    assert not any(isinstance(m, BATCH_NORMS) for m in folded.modules())
    images = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pairs = [(folded(images), visual(images)),
                 *zip(folded.forward_intermediates(images, intermediates_only=True),
                      visual.forward_intermediates(images, intermediates_only=True))]
    for got, want in pairs:  # equal up to float rounding, relative to the map's scale
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # The evaluation's encoders are built folded; without for_inference, build_encoder keeps the
    # method's own modules (what an export writes).
    encoder = _build("f", TINY_MODEL, tiny_text_dir, for_inference=True)
    assert not any(isinstance(m, BATCH_NORMS) for m in encoder.visual.modules())
    assert any(isinstance(m, BATCH_NORMS) for m in tiny_encoder.visual.modules())


def test_inference_encoders_of_same_padded_backbones_pad_no_input(tiny_text_dir):
    lite0 = dataclasses.replace(TINY_MODEL, image=ImageTowerConfig(encoder="efficientnet_lite0"))
    trained = _build("t", lite0, tiny_text_dir)
    encoder = _build("i", lite0, tiny_text_dir, for_inference=True)
    assert any(type(m) is Conv2dSame for m in trained.visual.modules())
    assert not any(type(m) is Conv2dSame for m in encoder.visual.modules())
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(encoder.image_features(images), trained.image_features(images),
                               rtol=1e-4, atol=1e-4)


class _ConvReadTwice(torch.nn.Module):
    """A convolution whose output feeds its batch norm and, beside it, the sum after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward_intermediates(self, x, intermediates_only=True):
        y = self.conv(x)
        return [self.norm(y) + y]

    def forward(self, x):
        return self.forward_intermediates(x)[0].mean((2, 3))


def test_a_convolution_read_beside_its_norm_is_not_folded(caplog):
    visual = _ConvReadTwice().eval()
    _randomise_norms(visual)
    with caplog.at_level("WARNING"):
        assert fold_batch_norms(visual) is visual
    assert "not folded" in caplog.text
    assert isinstance(visual.norm, torch.nn.BatchNorm2d)


def test_fraction_labels():
    assert [fraction_label(f) for f in (0.01, 0.1, 1.0, 0.25)] == ["1%", "10%", "100%", "25%"]
