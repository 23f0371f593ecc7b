"""The evaluation runner: jobs, worker processes, and the same metrics whichever runs them."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import signal

import pytest
import torch

from eval_helpers import numbers, short_config

from unimed.eval.config import EvalConfig, SegmentationConfig
from unimed.eval.data import EvalData
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.features import FeatureCache
from unimed.eval.runner import TASK_SECONDS, evaluate, longest_first, task_groups
from unimed.eval.tasks import TASKS as REGISTERED, TaskContext

TASKS = ("zero_shot", "retrieval", "linear_probe", "segmentation", "bias")


def test_tasks_that_share_features_form_one_job_in_task_order() -> None:
    tasks = ["zero_shot", "bias", "linear_probe", "retrieval", "volume_probe", "gradcam",
             "modality_gap", "volume_finetune", "slice_localisation"]
    assert task_groups(tasks) == [
        ("zero_shot",), ("bias", "retrieval"), ("linear_probe",), ("volume_probe", "volume_finetune"),
        ("gradcam",), ("modality_gap", "slice_localisation"),
    ]
    assert task_groups([]) == []


def test_workers_take_the_jobs_longest_first_whatever_the_encoder() -> None:
    jobs = [(0, ("zero_shot",)), (0, ("segmentation",)), (0, ("retrieval", "bias")),
            (1, ("zero_shot",)), (1, ("segmentation",)), (1, ("retrieval", "bias")),
            (1, ("a_task_not_listed",))]
    assert TASK_SECONDS["segmentation"] > TASK_SECONDS["retrieval"] + TASK_SECONDS["bias"]
    assert TASK_SECONDS["retrieval"] + TASK_SECONDS["bias"] > TASK_SECONDS["zero_shot"]
    # Equal estimates keep their order (encoder 0 before encoder 1); an unknown task goes last.
    assert longest_first(jobs) == [
        (0, ("segmentation",)), (1, ("segmentation",)), (0, ("retrieval", "bias")),
        (1, ("retrieval", "bias")), (0, ("zero_shot",)), (1, ("zero_shot",)),
        (1, ("a_task_not_listed",)),
    ]


def test_every_registered_task_has_a_time_estimate() -> None:
    assert set(TASK_SECONDS) == set(REGISTERED.names())


def fresh_context(ctx: TaskContext, cfg: EvalConfig) -> TaskContext:
    """`ctx` with `cfg`, nothing decoded, cached or collected yet."""
    return dataclasses.replace(ctx, cfg=cfg, data=EvalData(ctx.data.cfg), features=FeatureCache(),
                               replicates={})


def test_worker_processes_give_the_metrics_of_one_process(
    tiny_encoder: Encoder, task_context: TaskContext
) -> None:
    model = copy.deepcopy(tiny_encoder.model)
    with torch.no_grad():
        for parameter in model.visual.parameters():
            parameter.mul_(1.5)  # a second encoder whose every image metric differs
    twin = dataclasses.replace(tiny_encoder, name="twin", label="Twin", model=model)
    cfg = short_config(task_context)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two workers computes on
    try:
        here = fresh_context(task_context, cfg)
        one = evaluate([tiny_encoder, twin], here, TASKS)
    finally:
        torch.set_num_threads(threads)
    forked = fresh_context(task_context, dataclasses.replace(cfg, workers=2))
    two = evaluate([tiny_encoder, twin], forked, TASKS)

    # The same encoders and tasks, in the same order, with a time for each task.
    assert list(two["encoders"]) == ["tiny", "twin"]
    for name, entry in two["encoders"].items():
        assert list(entry["tasks"]) == list(entry["seconds"]) == list(TASKS)
        assert entry["label"] == one["encoders"][name]["label"]
        assert all(s > 0 for s in entry["seconds"].values())
    # Every number and every bootstrap replicate as one process computes them, though the workers
    # took the jobs in another order and each recomputed the features its jobs read.
    got, want = ({name: e["tasks"] for name, e in out["encoders"].items()} for out in (two, one))
    got, want = numbers(got), numbers(want)
    assert got.keys() == want.keys() and len(want) > 200
    mismatched = [k for k in want if not got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6, nan_ok=True)]
    assert not mismatched, mismatched[:5]
    assert two["encoders"]["tiny"]["tasks"]["linear_probe"] != two["encoders"]["twin"]["tasks"]["linear_probe"]
    assert forked.replicates.keys() == here.replicates.keys() and forked.replicates
    for key, value in here.replicates.items():
        torch.testing.assert_close(torch.as_tensor(forked.replicates[key]), torch.as_tensor(value),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    # The workers decoded the images, not this process; it still publishes every split they read.
    assert not forked.data._images and not forked.data._samples
    assert set(forked.data.splits_read()) == set(here.data.splits_read()) != set()


def test_an_error_in_a_worker_reaches_the_caller_as_itself_and_stops_the_workers(
    tiny_encoder: Encoder, task_context: TaskContext
) -> None:
    cfg = dataclasses.replace(short_config(task_context), workers=2,
                              segmentation=SegmentationConfig(datasets=("covidx",)))
    ctx = fresh_context(task_context, cfg)
    before = set(multiprocessing.active_children())
    with pytest.raises(EvalError, match="dataset 'covidx' has no mask or box in its 'train' split"):
        evaluate([tiny_encoder], ctx, ("zero_shot", "segmentation"))
    # The failure stopped the workers rather than leaving them to finish their jobs.
    assert set(multiprocessing.active_children()) == before


def test_a_worker_the_system_kills_is_one_clear_error(tiny_encoder: Encoder, task_context: TaskContext,
                                                     monkeypatch) -> None:
    """A worker killed from outside (the kernel's out-of-memory killer sends SIGKILL) ends the
    evaluation with an EvalError saying how it ended and what to lower, not the pool's traceback."""
    parent = os.getpid()

    def killed_in_a_worker(encoder, ctx):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    monkeypatch.setitem(REGISTERED._items, "zero_shot", killed_in_a_worker)
    ctx = fresh_context(task_context, dataclasses.replace(short_config(task_context), workers=2))
    before = set(multiprocessing.active_children())
    with pytest.raises(EvalError, match=r"^an evaluation worker process was killed by SIGKILL, as the "
                                        r"system ends a process when memory runs out: evaluate in fewer "
                                        r"processes \(eval.workers=1\) or smaller batches"):
        evaluate([tiny_encoder], ctx, ("zero_shot", "retrieval"))
    assert set(multiprocessing.active_children()) == before


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="eval.workers must be >= 1, got 0"):
        EvalConfig(workers=0)
