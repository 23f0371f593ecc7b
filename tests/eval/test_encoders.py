"""Encoders under evaluation: finding checkpoints and their config, strict weight loading."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from eval_helpers import TINY_MODEL
from safetensors.torch import save_model
from timm.layers import FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from unimed.eval.encoders import Encoder, build_encoder
from unimed.methods import create_method
from unimed.eval.tasks import fraction_label
from unimed.train.checkpoint import checkpoint_config, find_checkpoint


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
    trained = build_encoder("a", "A", TINY_MODEL, text_encoder=str(tiny_text_dir), seed=5)
    step = _fake_run(tmp_path, trained.model)
    loaded = build_encoder("b", "B", TINY_MODEL, text_encoder=str(tiny_text_dir), weights=step, seed=0)
    images = torch.rand(3, 3, 64, 64)
    assert torch.equal(loaded.image_features(images), trained.image_features(images))
    texts = ["no pleural effusion", "derram pleural"]
    assert torch.equal(loaded.text_features(texts), trained.text_features(texts))
    again = build_encoder("c", "C", TINY_MODEL, text_encoder=str(tiny_text_dir), seed=0)
    assert torch.equal(again.image_features(images), tiny_encoder.image_features(images))
    assert not torch.equal(again.image_features(images), trained.image_features(images))


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_text_dir):
    other = dataclasses.replace(
        TINY_MODEL, projector=dataclasses.replace(TINY_MODEL.projector, embed_dim=8))
    step = _fake_run(tmp_path, build_encoder("o", "O", other, text_encoder=str(tiny_text_dir)).model)
    with pytest.raises(RuntimeError, match="cannot load weights from .*model.safetensors"):
        build_encoder("b", "B", TINY_MODEL, text_encoder=str(tiny_text_dir), weights=step)


def test_encoder_is_frozen_and_in_eval_mode(tiny_encoder):
    assert not tiny_encoder.model.training
    assert not any(p.requires_grad for p in tiny_encoder.model.parameters())


@pytest.mark.parametrize("image_encoder", ["resnet10t", "efficientnet_lite0"])
def test_frozen_batch_norms_compute_the_same_function_fused(tiny_text_dir, tiny_encoder, image_encoder):
    # resnet10t's frozen stages hold torchvision's FrozenBatchNorm2d, EfficientNet's timm's
    # FrozenBatchNormAct2d (with its activation).
    image = dataclasses.replace(TINY_MODEL.image, encoder=image_encoder, frozen_levels=2)
    model = create_method(dataclasses.replace(TINY_MODEL, image=image), text_encoder=str(tiny_text_dir),
                          vocab_size=len(tiny_encoder.tokenizer)).model.eval()
    frozen = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))]
    assert frozen
    generator = torch.Generator().manual_seed(0)
    for norm in frozen:  # statistics far from the identity, so a dropped term or epsilon shows
        for buffer in (norm.weight, norm.bias, norm.running_mean):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) / 20 + 0.01)
    reference = copy.deepcopy(model)
    encoder = Encoder("f", "F", model, tiny_encoder.tokenizer)
    assert not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
                   for m in encoder.model.modules())
    images = torch.rand(4, 3, 64, 64, generator=generator)
    with torch.no_grad():
        pairs = [(encoder.image_features(images, projected=False), reference.pooled_image(images)),
                 *zip(encoder.model.forward_intermediates(images),
                      reference.forward_intermediates(images))]
    for got, want in pairs:  # equal up to float rounding, relative to the map's scale
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert not encoder.model.training


def test_fraction_labels():
    assert [fraction_label(f) for f in (0.01, 0.1, 1.0, 0.25)] == ["1%", "10%", "100%", "25%"]
