import math

import pytest
import torch
from torch import nn

from train_helpers import tiny_cfg
from unimed.train.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups


def test_warmup_cosine_values():
    sched = WarmupCosine(warmup_steps=4, total_steps=12, min_ratio=0.1)
    assert [sched(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sched(4) == pytest.approx(1.0)
    # Half-way through the cosine part: min + (1 - min) / 2.
    assert sched(8) == pytest.approx(0.1 + 0.9 * 0.5)
    assert sched(12) == pytest.approx(0.1)
    assert sched(50) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(3, 3)
    cfg = tiny_cfg(lr=2.0, warmup_ratio=0.2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([1.0, 2.0])
    expected_4 = 2.0 * 0.5 * (1 + math.cos(math.pi * 2 / 8))
    assert lrs[4] == pytest.approx(expected_4)
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_no_decay_on_biases_and_norms_and_frozen_params_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)
    }


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model, 0.1)


def test_schedule_needs_a_step():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    with pytest.raises(ValueError, match="at least one"):
        build_scheduler(opt, tiny_cfg(), total_steps=0)
