"""Dense features: one computation per (encoder, dataset, split), shared by segmentation and detection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unimed.eval import detection, segmentation
from unimed.eval.dense import dense_features, select_levels
from unimed.eval.encoders import Encoder
from unimed.eval.tasks import TaskContext


def test_segmentation_and_detection_share_one_feature_pass(
    tiny_encoder: Encoder, task_context: TaskContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    forward = tiny_encoder.model.forward_intermediates

    def counting(x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        seen.append(len(x))
        return forward(x, indices=indices)

    monkeypatch.setattr(tiny_encoder.model, "forward_intermediates", counting)
    seg = dataclasses.replace(task_context.cfg.segmentation, datasets=("rsna",), epochs=1, patience=1)
    det = dataclasses.replace(task_context.cfg.detection, datasets=("rsna",), epochs=1, patience=1)
    cfg = dataclasses.replace(task_context.cfg, segmentation=seg, detection=det, fractions=(1.0,))
    ctx = dataclasses.replace(task_context, cfg=cfg)
    assert seg.min_stride != det.min_stride  # the cache serves both from one pass
    segmentation.run(tiny_encoder, ctx)
    detection.run(tiny_encoder, ctx)
    segmentation.run(tiny_encoder, ctx)
    assert sum(seen) == len(ctx.data.records("rsna"))  # train + valid + test, each image once


def test_select_levels_keeps_the_strides_asked_for(tiny_encoder: Encoder) -> None:
    maps = dense_features(tiny_encoder, torch.rand(2, 1, 64, 64), batch_size=2)
    strides = [64 // m.shape[-1] for m in maps]
    assert strides == [2, 4, 8, 16, 32]  # ResNet-10t: every stage
    chosen = select_levels(maps, 64, min_stride=8)
    assert [64 // m.shape[-1] for m in chosen] == [8, 16, 32]
    torch.testing.assert_close(chosen[0], maps[2])
    with pytest.raises(ValueError, match="stride >= 64"):
        select_levels(maps, 64, min_stride=64)
