"""benchmarks/dense_lr.py: a dense head's learning rate is chosen on train -> valid, never on test,
and the value it prints is the task's own validation metric."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from benchmark_scripts import benchmark_script

from unimed.eval.data import EvalData
from unimed.eval.detection import dataset_targets, fit_detector
from unimed.eval.encoders import Encoder
from unimed.eval.segmentation import dataset_masks, fit_decoder
from unimed.eval.tasks import TaskContext


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_fit_reads_no_test_split_and_gives_the_tasks_validation_metric(
    task: str, tiny_encoder: Encoder, task_context: TaskContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = dataclasses.replace(getattr(task_context.cfg, task), epochs=2, patience=2, lr=2e-3)
    read: list[str | None] = []
    for name in ("records", "images"):
        original = getattr(EvalData, name)

        def recording(self, dataset, split=None, *rest, _original=original, **kwargs):
            read.append(split)
            return _original(self, dataset, split, *rest, **kwargs)

        monkeypatch.setattr(EvalData, name, recording)
    with benchmark_script("dense_lr") as module:
        n_train, fit = module.fitter(task, tiny_encoder, task_context, "rsna")
        index = np.arange(0, n_train, 2)
        value = fit(index, section, 3)
    assert set(read) == {"train", "valid"}

    size = task_context.data.image_size
    maps = {s: task_context.dense_maps(tiny_encoder, "rsna", s, section) for s in ("train", "valid")}
    if task == "detection":
        boxes = {s: dataset_targets(task_context.data.require("rsna", s), size) for s in maps}
        _, expected = fit_detector(
            ([m[index] for m in maps["train"]], [boxes["train"][i] for i in index]),
            (maps["valid"], boxes["valid"]), section, strides=[size // m.shape[-1] for m in maps["train"]],
            image_size=size, seed=3, device=tiny_encoder.device)
    else:
        masks = {s: dataset_masks(task_context.data, "rsna", s) for s in maps}
        expected = fit_decoder(([m[index] for m in maps["train"]], masks["train"][index]),
                               (maps["valid"], masks["valid"]), section, seed=3,
                               device=tiny_encoder.device).dice
    assert value == pytest.approx(expected, abs=1e-9)
