import subprocess
import sys

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
    assert "its stage times grow at least as their ratio (1.5-2.0x here)" in line


def test_a_faster_machine_is_not_promised_the_gemm_ratio():
    sized_on = machine.DEMO_SIZED_ON_FLOPS
    line = machine_line((sized_on * 2.25, sized_on * 2.5), 2)
    assert "a faster GEMM shortens its stages by less than their ratio (0.4-0.4x here)" in line
    assert "grow" not in line


STEPS = """
import resource, sys, torch
from unimed.machine import set_malloc_for_training
tuned = set_malloc_for_training() if sys.argv[1] == "tuned" else None


def step():  # a training step's activations in miniature: 284 MiB alive together, then freed
    live = [torch.ones(n << 20) for n in (16, 10, 25, 4, 16)]
    return sum(float(t.sum()) for t in live)


step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(), step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_malloc_reuses_a_steps_memory_without_new_page_faults():
    """Two more steps after two warm-up steps: glibc's defaults map the large blocks afresh (a minor
    fault per 4 KiB page, every step); tuned, the steps reuse the heap. A fresh process each way."""
    pages = 2 * 71 * (1 << 20) * 4 // 4096  # two steps of 284 MiB
    runs = {}
    for mode in ("tuned", "default"):
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        runs[mode] = (out[0], int(out[1]))
    assert runs["tuned"][0] == "True"
    assert runs["default"][1] > pages / 2
    assert runs["tuned"][1] < pages / 4


def test_available_memory_is_what_the_kernel_reports(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemFree:         1048576 kB\n"
                       "MemAvailable:   20971520 kB\n", encoding="ascii")
    assert machine.available_memory(str(meminfo)) == 20 * 2**30  # MemAvailable, not MemFree
    meminfo.write_text("MemTotal:       25165824 kB\n", encoding="ascii")
    assert machine.available_memory(str(meminfo)) is None
    assert machine.available_memory(str(tmp_path / "absent")) is None


def test_a_result_records_the_software_and_machine_that_made_it(monkeypatch):
    import importlib.metadata
    from pathlib import Path

    import unimed

    info = machine.software()
    assert info["unimed"] == unimed.__version__ and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] == importlib.metadata.version("torch") == torch.__version__.split("+")[0]
    assert info["threads"] == torch.get_num_threads() and info["processor"]
    source = Path(unimed.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout, as CI's clean clone is: its commit, "-dirty" when edited
        assert info["commit"].partition("-")[0] == head.stdout.strip()
    line = machine.describe_software({**info, "commit": "0123456789abcdef0123-dirty", "gpus": ["H100"]})
    assert line.startswith(f"unimed {unimed.__version__} (commit 0123456789ab-dirty), python ")
    assert f"torch {info['torch']}" in line
    assert line.endswith(f"; {info['processor']}, H100, {info['threads']} threads")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    assert machine.source_commit() is None
    assert "(commit" not in machine.describe_software(machine.software())


def test_the_record_names_gpus_without_starting_cuda(monkeypatch):
    """Naming a GPU starts the CUDA runtime, which a CPU job, or a parent about to fork workers,
    must not do just to write a log header."""
    def no_start(index):
        raise AssertionError("CUDA started")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_start)
    assert machine.software()["gpus"] == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"H100 #{index}")
    assert machine.software()["gpus"] == ["H100 #0", "H100 #1"]


def test_a_package_inside_another_projects_repository_has_no_commit(tmp_path, monkeypatch):
    """unimed installed in a virtual environment inside one's own project's repository: git answered
    for the project, whose commit was recorded as unimed's."""
    import unimed

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@x", *args],
                       check=True, capture_output=True)

    installed = tmp_path / ".venv" / "site-packages" / "unimed"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (tmp_path / "train.py").write_text("")
    git("init", "-q")
    git("add", "train.py")
    git("commit", "-q", "-m", "the user's project")
    monkeypatch.setattr(unimed, "__file__", str(installed / "__init__.py"))
    assert machine.source_commit() is None
    git("add", ".venv")  # a checkout of unimed itself tracks its package
    git("commit", "-q", "-m", "tracked")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert machine.source_commit() == head.stdout.strip()
