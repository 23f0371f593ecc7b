"""Evaluation memory: one encoder's evaluation with its splits held, then with every split on disk.

    python benchmarks/eval_memory.py --tasks volume_probe,volume_finetune runs/demo/unimedi

The run folder's checkpoint is evaluated as ``benchmarks/eval_speed.py`` evaluates it (no baselines,
figures to a temporary folder), twice, each in a fresh process: once as the demo's splits are,
held in memory, once with the memory available read as ``--memory`` bytes (default 4 MB), so that
every split's images, slice stacks and feature maps larger than half of it go to the spill folder
and are memory-mapped back (README "Splits larger than memory"). The table gives each run's wall
time, peak anonymous resident memory (RssAnon, sampled every 50 ms: what the process itself holds,
not the file pages the kernel may drop), peak resident set (ru_maxrss, file pages included), the
files and bytes that went to disk, and whether every task's metrics are equal to the digit.
Overrides follow the run folder, as in ``eval_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from unimed.commands.evaluate import build_encoders, parse_tasks
from unimed.commands.tables import print_table
from unimed.config import load_run_config
from unimed.eval import data as data_module
from unimed.eval.data import EvalData
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext
from unimed.machine import set_malloc_for_training
from unimed.train.checkpoint import checkpoint_config, find_checkpoint

SPILL_MEMORY = 4 * 2**20
SAMPLE_S = 0.05


class PeakAnon:
    """The largest RssAnon of this process (/proc/self/status) while running, in bytes."""

    def __init__(self) -> None:
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(SAMPLE_S)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def measure(encoders: list, cfg, tasks: tuple[str, ...], memory: int | None) -> dict:
    """Evaluate `encoders` on `tasks`, the memory available read as `memory` bytes (None: as it
    is): wall seconds, peak RssAnon and ru_maxrss (bytes), files and bytes spilled, the metrics."""
    if memory is not None:
        data_module.available_memory = lambda: memory
    watch = PeakAnon()
    with tempfile.TemporaryDirectory() as tmp:
        spill = Path(tmp) / "spill"
        ctx = TaskContext(EvalData(cfg.data, spill_dir=spill), cfg.eval, Path(tmp))
        start = time.perf_counter()
        metrics = evaluate(encoders, ctx, tasks)
        wall = time.perf_counter() - start
        files = list(spill.glob("*.npy")) if spill.is_dir() else []
        spilled = sum(f.stat().st_size for f in files)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"wall": wall, "anon": watch.stop(), "maxrss": maxrss, "files": len(files), "spilled": spilled,
            "tasks": {e: metrics["encoders"][e]["tasks"] for e in metrics["encoders"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (or checkpoint) to evaluate, e.g. runs/demo")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: eval.tasks)")
    parser.add_argument("--memory", type=int, default=SPILL_MEMORY,
                        help=f"the memory available the spilled run reads, bytes (default {SPILL_MEMORY})")
    parser.add_argument("--child", choices=("held", "spilled"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=...")
    args = parser.parse_args()
    if args.child is None:
        rows, results = [], {}
        for mode in ("held", "spilled"):
            command = [sys.executable, __file__, "--child", mode, "--memory", str(args.memory),
                       *(["--tasks", args.tasks] if args.tasks else []), args.run, *args.overrides]
            results[mode] = json.loads(subprocess.run(command, check=True, capture_output=True,
                                                      text=True).stdout.splitlines()[-1])
        same = (json.dumps(results["held"]["tasks"], sort_keys=True)
                == json.dumps(results["spilled"]["tasks"], sort_keys=True))
        for mode, r in results.items():
            verdict = "" if mode == "held" else "equal" if same else "DIFFERENT"
            rows.append([mode, f"{r['wall']:.1f}", f"{r['anon'] / 2**20:,.0f}", f"{r['maxrss'] / 2**20:,.0f}",
                         str(r["files"]), f"{r['spilled'] / 2**20:,.1f}", verdict])
        print_table(f"Evaluation memory of {args.run}, splits held vs on disk (memory read as "
                    f"{args.memory:,} bytes)", ["run", "wall s", "peak RssAnon MB", "peak RSS MB",
                                                "files on disk", "MB on disk", "metrics"], rows)
        sys.exit(0 if same else 1)
    set_malloc_for_training()  # as `unimed evaluate` does
    checkpoint = find_checkpoint(args.run)
    cfg = load_run_config(checkpoint_config(checkpoint), args.overrides)
    tasks = parse_tasks(args.tasks, cfg)
    encoders = build_encoders(cfg, checkpoint, ())
    result = measure(encoders, cfg, tasks, args.memory if args.child == "spilled" else None)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
