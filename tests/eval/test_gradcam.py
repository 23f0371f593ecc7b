"""Grad-CAM of image-prompt similarity: map shape and range, a frozen encoder left as it was, the figure."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from unimed.eval import gradcam
from unimed.eval.config import GradCAMConfig
from unimed.eval.encoders import build_encoder
from unimed.eval.gradcam import pick_images, similarity_cams, token_grid
from unimed.eval.tasks import TASKS
from eval_helpers import TINY_MODEL
from unimed.models.config import ImageTowerConfig, TextTowerConfig
from unimed.models.unimedi_config import UniMedIConfig

TINY_VIT = dataclasses.replace(TINY_MODEL, image=ImageTowerConfig(encoder="vit_tiny_patch8_64"))
TINY_UNIMEDI = UniMedIConfig(
    image=ImageTowerConfig(encoder="vit_tiny_patch8_64", mean=(0.5,) * 3, std=(0.5,) * 3),
    text=TextTowerConfig(frozen_layers=0), volume_shape=(4, 16, 16), volume_patch=(2, 8, 8),
    selected_slices=1, projector_hidden=16, embed_dim=16, head_out=16, head_hidden=16,
    head_bottleneck=8,
)


def grad_flags(encoder) -> list[bool]:
    return [p.requires_grad for p in encoder.model.parameters()]


def test_similarity_cams_shape_range_and_frozen_encoder(tiny_encoder, eval_data) -> None:
    before = grad_flags(tiny_encoder)
    size = eval_data.image_size
    images = torch.rand(3, 3, size, size)
    prompt = tiny_encoder.text_features(["pleural effusion"])  # (1, E)
    # Opposite prompts give opposite weighted maps, so for each image one of the two is non-zero.
    cams = similarity_cams(tiny_encoder, images, torch.cat([prompt, -prompt]))
    assert cams.shape == (2, 3, size, size)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert cams.reshape(2, 3, -1).max(axis=2).max(axis=0) == pytest.approx(np.ones(3), abs=1e-3)
    assert grad_flags(tiny_encoder) == before
    assert all(p.grad is None for p in tiny_encoder.model.parameters())
    assert not tiny_encoder.model.training


def test_similarity_cams_on_a_vit(tiny_text_dir) -> None:
    encoder = build_encoder("vit", "ViT", TINY_VIT, text_encoder=str(tiny_text_dir), max_length=48)
    prompt = encoder.text_features(["cardiomegaly"])  # (1, E)
    cams = similarity_cams(encoder, torch.rand(2, 3, 64, 64), torch.cat([prompt, -prompt]))
    assert cams.shape == (2, 2, 64, 64) and np.isfinite(cams).all()
    assert cams.reshape(2, 2, -1).max(axis=2).max(axis=0) == pytest.approx(np.ones(2), abs=1e-3)
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_similarity_cams_on_unimedi_drop_its_cls_token(tiny_text_dir) -> None:
    # UniMedI's vision encoder wraps its ViT: the [CLS] it prepends must leave the token grid.
    encoder = build_encoder("uni", "UniMedI", TINY_UNIMEDI, text_encoder=str(tiny_text_dir),
                            max_length=48)
    assert encoder.visual.num_prefix_tokens == 1
    prompt = encoder.text_features(["cardiomegaly"])  # (1, E)
    cams = similarity_cams(encoder, torch.rand(2, 3, 64, 64), torch.cat([prompt, -prompt]))
    assert cams.shape == (2, 2, 64, 64) and np.isfinite(cams).all()
    assert cams.reshape(2, 2, -1).max(axis=2).max(axis=0) == pytest.approx(np.ones(2), abs=1e-3)


def test_token_grid_reshapes_vit_tokens() -> None:
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # 1 prefix + 4x4
    grid = token_grid(1)(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 2])
    maps = torch.zeros(2, 3, 4, 4)
    assert token_grid(1)(maps) is maps
    with pytest.raises(ValueError, match="17 tokens are not 0 prefix"):
        token_grid(0)(tokens)


def test_pick_images_errors_and_skips(eval_data) -> None:
    records = eval_data.records("pdc", "test")
    with pytest.raises(ValueError, match="dataset 'pdc' has no label 'flying saucer'"):
        pick_images(records, ["flying saucer"], "pdc", 2, 0)
    picked = pick_images(records, ["pleural effusion", "cardiomegaly"], "pdc", 2, 0)
    for name, index in picked.items():
        assert 1 <= len(index) <= 2
        assert all(records[i].labels[name] == 1.0 for i in index)


def test_run_on_tiny_world(tiny_encoder, task_context) -> None:
    before = grad_flags(tiny_encoder)
    metrics = TASKS.get("gradcam")(tiny_encoder, task_context)
    json.dumps(metrics)
    assert metrics["classes"] and set(metrics["classes"]) <= set(GradCAMConfig().classes)
    assert (task_context.out_dir / metrics["figures"]["gradcam"]).stat().st_size > 0
    assert set(metrics["cam_correlation"]) == {"en-es"}
    assert grad_flags(tiny_encoder) == before


def test_run_with_stub_prompts(tiny_encoder, task_context, tmp_path) -> None:
    (tmp_path / "xx.yaml").write_text(
        "language: xx\npositive: '{disease}'\nnegative: 'not {disease}'\n"
        "classes:\n  pleural effusion: water\n  cardiomegaly: big heart\n", encoding="utf-8")
    gradcam = GradCAMConfig(classes=("pleural effusion", "cardiomegaly"), languages=("xx",),
                            images_per_class=1, prompt_dir=str(tmp_path))
    ctx = dataclasses.replace(task_context, cfg=dataclasses.replace(task_context.cfg, gradcam=gradcam))
    metrics = TASKS.get("gradcam")(tiny_encoder, ctx)
    assert metrics["images"] == len(metrics["classes"]) and "cam_correlation" not in metrics


def test_every_cam_overlay_shares_the_one_colour_bar_of_its_scale(tmp_path, monkeypatch) -> None:
    drawn = []
    monkeypatch.setattr(gradcam.Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    row = {"image": np.zeros((8, 8)), "class": "edema", "study": "s1",
           "cams": [np.zeros((8, 8)), np.ones((8, 8))], "prompts": ["edema", "edema"]}
    gradcam.plot_grid([row, row], ["en", "es"], str(tmp_path / "grid.png"))
    bars = [ax for ax in drawn[0].axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    bar = bars[0]
    assert bar.get_ylim() == (0.0, 1.0) and "Grad-CAM" in bar.get_ylabel()
    scale = next(c for c in bar.collections if c.get_array() is not None)  # the colour ramp
    overlays = [image for ax in drawn[0].axes for image in ax.get_images() if image.get_alpha()]
    assert len(overlays) == 4  # 2 rows x 2 languages
    assert all(image.get_clim() == scale.get_clim() == (0.0, 1.0) for image in overlays)
    assert all(image.get_cmap().name == scale.get_cmap().name == "jet" for image in overlays)
