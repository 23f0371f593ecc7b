"""benchmarks/pretrain_throughput.py counts a grouped convolution's backward as twice its forward."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import benchmark_script
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("pretrain_throughput") as module:
        yield module


def _counts(conv: torch.nn.Conv2d, custom: dict) -> dict:
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        conv(x).sum().backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize(("groups", "stride"), [(1, 1), (1, 2), (8, 1), (8, 2), (2, 1)])
def test_convolution_backward_costs_two_forwards(bench, groups: int, stride: int) -> None:
    conv = torch.nn.Conv2d(8, 16, 3, stride=stride, padding=1, groups=groups)
    mapping = {torch.ops.aten.convolution_backward: bench.conv_backward_flop}
    ours = _counts(conv, mapping)
    # Forward: 2 x batch x (16 x 8/groups x 3 x 3) weights x output positions.
    positions = (10 // stride) ** 2
    forward = 2 * 2 * 16 * (8 // groups) * 9 * positions
    assert ours["aten.convolution"] == forward
    assert ours["aten.convolution_backward"] == 2 * forward  # input and weight gradients
    if groups == 1:  # torch's own formula is right for dense convolutions
        assert _counts(conv, {})["aten.convolution_backward"] == 2 * forward
