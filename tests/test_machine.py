import pytest
import torch

from unimed import machine
from unimed.commands.demo import machine_line


def test_gemm_peak_is_the_best_of_the_timed_matmuls(monkeypatch):
    ticks = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # three timed matmuls: 2 s, 1 s, 4 s
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
    assert machine.gemm_peak(torch.device("cpu"), sizes=(10,), reps=3) == pytest.approx(2 * 10**3)


def test_the_demo_relates_its_times_to_the_machine_it_was_sized_on():
    sized_on = machine.DEMO_SIZED_ON_FLOPS
    line = machine_line((sized_on / 2, sized_on / 1.5), 2)
    assert f"{sized_on / 2e9:.0f} GFLOP/s before the first stage" in line
    assert f"{sized_on / 1.5e9:.0f} after the last, on 2 CPU thread(s)" in line
    assert "(1.5-2.0x here)" in line
