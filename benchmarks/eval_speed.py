"""Evaluation speed: seconds per task for ONE encoder through the library's evaluation runner.

    python benchmarks/eval_speed.py runs/demo --threads 2

The run folder's checkpoint is evaluated on every task of its config's ``eval.tasks`` (or
``--tasks``) on the same data, splits and seeds as ``unimed evaluate``; figures go to a temporary
folder, nothing is written in the run folder. The table has one row per task and a total; the first
task of a dataset pays for decoding its images and for the encoder's frozen features, later tasks
reuse them (see :mod:`unimed.eval.features`). Target: wall time < 60 s on 2 cores for the demo
preset, which evaluates in two worker processes (``eval.workers``; ``eval.workers=1`` for one
process on every thread). With workers the tasks' seconds overlap, so the shares are of their sum, and the table
adds that sum over the workers: the wall time of an even split, the most any schedule can give.
The CPU time of the process and its workers is printed too: on a shared machine wall time grows
with the load.
``--profile N`` prints the N functions with the most cumulative time (cProfile, this process only:
profile with ``eval.workers=1``); ``--passes`` prints every frozen pass the feature cache computed
(an encoder's images, maps, volumes or texts of one split) with its seconds, longest first, and
their share of the tasks' seconds (with ``eval.workers=1``: a worker's cache is its own);
``--metrics FILE``
writes the tasks' metrics as JSON, to compare two code versions (run the script with each version's
``src`` on PYTHONPATH, back to back). Overrides follow the run folder, e.g.
``runs/demo data.root=data/phantom``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from unimed.commands.evaluate import build_encoders, parse_tasks
from unimed.commands.tables import print_table
from unimed.config import load_run_config
from unimed.eval.data import EvalData
from unimed.eval.features import FeaturePass
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext
from unimed.machine import set_malloc_for_training
from unimed.train.checkpoint import checkpoint_config, find_checkpoint

TARGET_S = 60.0


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the evaluation's workers, joined by the
    time it returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def passes_rows(passes: Sequence[FeaturePass], task_seconds: float) -> list[list[str]]:
    """One row per pass (kind, what it read, seconds, share of the tasks' seconds), longest
    first, then their sum."""
    rows = [[p.kind, p.what, f"{p.seconds:.1f}", f"{100 * p.seconds / task_seconds:.0f}%"]
            for p in sorted(passes, key=lambda p: -p.seconds)]
    total = sum(p.seconds for p in passes)
    return rows + [["all passes", f"{len(passes)}", f"{total:.1f}", f"{100 * total / task_seconds:.0f}%"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (or checkpoint) to evaluate, e.g. runs/demo")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: eval.tasks)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most cumulative time")
    parser.add_argument("--passes", action="store_true",
                        help="print the frozen passes the feature cache computed (eval.workers=1)")
    parser.add_argument("--metrics", default=None, metavar="JSON",
                        help="also write the tasks' metrics there (to compare two code versions)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings (unimed's command line sets "
                             "unimed.machine.set_malloc_for_training)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=...")
    args = parser.parse_args()
    if not args.system_malloc:
        set_malloc_for_training()  # as `unimed evaluate` does
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = find_checkpoint(args.run)
    cfg = load_run_config(checkpoint_config(checkpoint), args.overrides)
    if args.passes and cfg.eval.workers > 1:
        parser.error("--passes reads this process's feature cache: add the override eval.workers=1")
    tasks = parse_tasks(args.tasks, cfg)
    encoders = build_encoders(cfg, checkpoint, ())
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TaskContext(EvalData(cfg.data), cfg.eval, Path(tmp))
        profiler = cProfile.Profile() if args.profile else None
        start, cpu_start = time.perf_counter(), time.process_time() + _children_cpu()
        if profiler is not None:
            profiler.enable()
        metrics = evaluate(encoders, ctx, tasks)
        if profiler is not None:
            profiler.disable()
        total = time.perf_counter() - start
        cpu = time.process_time() + _children_cpu() - cpu_start
    seconds = metrics["encoders"][encoders[0].name]["seconds"]
    if args.metrics:
        tasks_out = metrics["encoders"][encoders[0].name]["tasks"]
        Path(args.metrics).write_text(json.dumps(tasks_out, indent=1, sort_keys=True), encoding="utf-8")
    task_total = sum(seconds.values())
    rows = [[task, f"{s:.1f}", f"{100 * s / task_total:.0f}%"] for task, s in seconds.items()]
    rows.append(["sum of the tasks' seconds", f"{task_total:.1f}", ""])
    workers = max(1, cfg.eval.workers)
    if workers > 1:  # the wall time no schedule of these jobs can beat
        rows.append([f"that sum / {workers} workers (an even split)", f"{task_total / workers:.1f}", ""])
    rows.append(["wall time (one encoder)", f"{total:.1f}", f"target < {TARGET_S:.0f} s"])
    rows.append(["CPU time, all threads and workers", f"{cpu:.1f}", ""])
    malloc = "glibc defaults" if args.system_malloc else "set_malloc_for_training"
    print_table(f"Evaluation of {encoders[0].label} ({checkpoint}), {torch.get_num_threads()} threads "
                f"in {cfg.eval.workers} worker process(es), malloc: {malloc}",
                ["task", "seconds", "share"], rows)
    if args.passes:
        print_table("Frozen passes of the feature cache", ["pass", "what", "seconds", "share of the tasks'"],
                    passes_rows(ctx.features.passes, task_total))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(text.getvalue())


if __name__ == "__main__":
    main()
