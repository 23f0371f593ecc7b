"""Run evaluation tasks on encoders and collect one metrics dict (what metrics.json holds).

The bootstrap replicates the tasks return under "replicates" keys are moved into
``ctx.replicates``, keyed ``"<encoder>/<task>/<path>/<metric>"`` (e.g.
``"medunic/zero_shot/cxp500/en/auc"``), so the metrics stay JSON and the checks can pair encoders.

The work is a list of jobs: one encoder's task, or the tasks that read the same cached features
(`SHARED_FEATURES`), so a job computes them once. With ``eval.workers`` > 1 on the CPU the jobs run
in that many forked worker processes, each on the machine's torch threads divided among them, taken
longest first (`TASK_SECONDS`) as workers free up, so the evaluation does not end on one long job
while the other workers idle; each job starts from the same global random state (the evaluation
seed), so no result depends on which worker ran it or what it ran before. A worker
decodes the data its jobs read itself (the parent's decoded splits are inherited, copy-on-write)
and releases an encoder's features after each job. Given a :class:`~unimed.eval.jobs.JobStore`,
each finished job is kept there as it ends, and the jobs it holds are taken from it instead of run,
so an evaluation that stopped goes on where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from unimed.eval import (  # noqa: F401  (each task module registers itself in TASKS)
    bias,
    detection,
    gradcam,
    linear_probe,
    modality,
    retrieval,
    segmentation,
    volume_finetune,
    volume_segmentation,
    volumes,
    zero_shot,
)
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.jobs import JobStore, encoder_identity
from unimed.eval.tasks import TASKS, TaskContext
from unimed.train.stop import forked_pool, leave_interrupts_to_parent

log = logging.getLogger(__name__)

# Tasks that read the same cached features run in one job: retrieval and the bias audit embed the
# same test images and reports; the 3D probe and the 3D fine-tuning read the same CC-CCII volumes;
# the 3D tasks on BIMCV-COVID19+ the same test volumes and their reports.
SHARED_FEATURES: tuple[frozenset[str], ...] = (
    frozenset({"retrieval", "bias"}),
    frozenset({"volume_probe", "volume_finetune"}),
    frozenset({"volume_retrieval", "slice_localisation", "slice_selection", "modality_gap"}),
)

# About how many seconds each task takes one single-threaded worker for one encoder on the demo
# preset (UniMedI's, the slowest, from `benchmarks/eval_speed.py runs/demo/unimedi`); BCV
# segmentation from docs/EVALUATION.md ("The 3D tasks, measured"). Only the order in which the
# workers take the jobs reads them (longest first); a task not listed goes last.
TASK_SECONDS: dict[str, float] = {
    "volume_segmentation": 280.0, "volume_probe": 26.0, "segmentation": 24.0, "detection": 19.0,
    "linear_probe": 17.0, "volume_finetune": 15.0, "retrieval": 9.0, "bias": 7.0, "zero_shot": 6.0,
    "slice_localisation": 4.5, "volume_retrieval": 3.5, "slice_selection": 2.5, "gradcam": 2.5,
    "modality_gap": 1.5,
}

Job = tuple[int, tuple[str, ...]]  # (index of the encoder, its tasks in run order)
JobResult = tuple[dict, dict[str, float], dict[str, np.ndarray]]  # metrics, seconds, replicates
Splits = list[tuple[str, str | None]]  # (dataset, split) pairs read
# Called in this process as each job ends: the job, its result, the splits its process has read so
# far and the fingerprints of the datasets the job read (EvalData.fingerprint).
Finished = Callable[[Job, JobResult, Splits, dict[str, str]], None]


def task_groups(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """`tasks` in order, those of one `SHARED_FEATURES` set gathered into the group of the first."""
    groups: list[list[str]] = []
    for task in tasks:
        shared = next((s for s in SHARED_FEATURES if task in s), frozenset())
        group = next((g for g in groups if g[0] in shared), None)
        if group is None:
            groups.append([task])
        else:
            group.append(task)
    return [tuple(g) for g in groups]


def longest_first(jobs: Sequence[Job]) -> list[Job]:
    """`jobs` by their tasks' `TASK_SECONDS` summed, longest first; equal ones in their order."""
    return sorted(jobs, key=lambda job: -sum(TASK_SECONDS.get(task, 0.0) for task in job[1]))


def evaluate(encoders: Sequence[Encoder], ctx: TaskContext, tasks: Sequence[str],
             store: JobStore | None = None) -> dict:
    """{"encoders": {name: {"label", "seconds": {task: s}, "tasks": {task: metrics}}}}.

    Every encoder runs every task on the same cached data, splits and seeds (see the module doc for
    the jobs, ``eval.workers`` and the `store` of finished jobs).
    """
    for task in tasks:
        TASKS.get(task)  # an unknown task fails before any work
    if "zero_shot" in tasks:
        zero_shot.check_labels(ctx)  # so do a zero-shot set's unusable labels
    groups = task_groups(tasks)
    jobs: list[Job] = [(i, group) for i in range(len(encoders)) for group in groups]
    results, finished = _kept_jobs(encoders, ctx, jobs, store)
    todo = [job for job in jobs if job not in results]
    workers = min(ctx.cfg.workers, len(todo))
    on_cpu = all(encoder.device.type == "cpu" for encoder in encoders)
    if workers > 1 and not on_cpu:
        log.info("eval.workers=%d applies to a CPU evaluation; these encoders run in this process",
                 workers)
    if todo:
        results.update(_run_in_workers(encoders, ctx, todo, workers, finished) if workers > 1 and on_cpu
                       else _run_here(encoders, ctx, todo, finished))
    for job in jobs:  # in job order, whatever order the workers finished them in
        ctx.replicates.update(results[job][2])
    out: dict = {"encoders": {}}
    for index, encoder in enumerate(encoders):
        entry = out["encoders"][encoder.name] = {"label": encoder.label, "seconds": {}, "tasks": {}}
        ran = {task: results[(index, group)] for group in groups for task in group}
        for task in tasks:
            metrics, seconds, _ = ran[task]
            entry["tasks"][task] = metrics[task]
            entry["seconds"][task] = seconds[task]
    return out


def _kept_jobs(encoders: Sequence[Encoder], ctx: TaskContext, jobs: list[Job], store: JobStore | None
               ) -> tuple[dict[Job, JobResult], Finished | None]:
    """The results of the `jobs` that `store` holds (their splits noted as read in ``ctx.data``),
    and what keeps each job that ends from now on there (None without a store)."""
    if store is None:
        return {}, None
    identities = [encoder_identity(encoder) for encoder in encoders]
    keys = {job: store.key(identities[job[0]], job[1]) for job in jobs}
    kept = {}
    for job in jobs:
        found = store.load(keys[job], ctx.data, ctx.out_dir)
        if found is not None:
            kept[job] = found[0]
            ctx.data.note_read(found[1])
    if kept:
        log.info("evaluation: %d of %d jobs were finished by an earlier run of this evaluation (kept "
                 "in %s); the other %d run now", len(kept), len(jobs), store.folder, len(jobs) - len(kept))

    def finished(job: Job, result: JobResult, splits: Splits, datasets: dict[str, str]) -> None:
        store.save(keys[job], result, splits, datasets, ctx.out_dir)

    return kept, finished


def _run_here(encoders: Sequence[Encoder], ctx: TaskContext, jobs: list[Job], finished: Finished | None
              ) -> dict[Job, JobResult]:
    """Every job in this process, in order; an encoder's features are released after its last job,
    so all its tasks share them."""
    results = {}
    for position, job in enumerate(tqdm(jobs, desc="evaluate", unit="job", disable=not ctx.progress)):
        results[job], datasets = _run_job(encoders[job[0]], ctx, job[1], finished is not None)
        if finished is not None:
            finished(job, results[job], ctx.data.splits_read(), datasets)
        if position + 1 == len(jobs) or jobs[position + 1][0] != job[0]:
            ctx.features.release(encoders[job[0]].name)
    return results


# What a forked worker inherits from the process that starts it: the encoders, the context and
# whether its jobs are kept (their datasets' fingerprints then go with their results).
_WORKER: dict[str, object] = {}


def _start_worker(encoders: Sequence[Encoder], ctx: TaskContext, threads: int, keep: bool) -> None:
    leave_interrupts_to_parent()
    torch.set_num_threads(threads)
    ctx.progress = ctx.data.progress = False  # one progress bar: the parent's
    _WORKER.update(encoders=encoders, ctx=ctx, keep=keep)


def _worker_job(job: Job) -> tuple[JobResult, Splits, dict[str, str]]:
    """The job's result, the splits this worker has read so far and the fingerprints of the
    datasets the job read (where jobs are kept)."""
    encoders, ctx = _WORKER["encoders"], _WORKER["ctx"]
    encoder = encoders[job[0]]
    try:
        result, datasets = _run_job(encoder, ctx, job[1], bool(_WORKER["keep"]))
        return result, ctx.data.splits_read(), datasets
    finally:
        ctx.features.release(encoder.name)


def _run_in_workers(encoders: Sequence[Encoder], ctx: TaskContext, jobs: list[Job], workers: int,
                    finished: Finished | None) -> dict[Job, JobResult]:
    """Every job in `workers` forked processes, dispatched longest first (:func:`longest_first`) as
    they free up; the splits the workers read are noted in ``ctx.data`` (what it publishes)."""
    threads = max(1, torch.get_num_threads() // workers)
    log.info("evaluation: %d jobs in %d worker processes of %d thread(s) each", len(jobs), workers,
             threads)
    with forked_pool(workers, _worker_killed, _start_worker,
                     (encoders, ctx, threads, finished is not None)) as pool:
        futures = {pool.submit(_worker_job, job): job for job in longest_first(jobs)}
        results, read = {}, {}
        done = concurrent.futures.as_completed(futures)
        for future in tqdm(done, total=len(jobs), desc="evaluate", unit="job", disable=not ctx.progress):
            job = futures[future]
            results[job], read[job], datasets = future.result()
            if finished is not None:
                finished(job, results[job], read[job], datasets)
    for job in jobs:
        ctx.data.note_read(read[job])
    return results


def _worker_killed(how: str) -> EvalError:
    return EvalError(f"an evaluation worker process {how}, as the system ends a process when memory "
                     "runs out: evaluate in fewer processes (eval.workers=1) or smaller batches "
                     "(eval.batch_size)")


def _run_job(encoder: Encoder, ctx: TaskContext, tasks: tuple[str, ...], fingerprints: bool = False
             ) -> tuple[JobResult, dict[str, str]]:
    """(({task: metrics}, {task: seconds}, replicates), {dataset: fingerprint} of the datasets
    read, when asked for the `fingerprints`, else {}) of `encoder` on `tasks`; each task starts
    from the global random state of the evaluation seed."""
    metrics, seconds, replicates = {}, {}, {}
    with ctx.data.asking() as datasets:
        for task in tasks:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.cfg.seed)
                metrics[task] = TASKS.get(task)(encoder, ctx)
            replicates.update(pop_replicates(metrics[task], f"{encoder.name}/{task}"))
            seconds[task] = round(time.perf_counter() - start, 2)
            log.info("%s: %s took %.1f s", encoder.label, task, seconds[task])
    read = sorted(datasets) if fingerprints else []
    return (metrics, seconds, replicates), {name: ctx.data.fingerprint(name) for name in read}


def pop_replicates(tree: object, prefix: str) -> dict[str, np.ndarray]:
    """Remove every "replicates" dict from the nested `tree`; {"<prefix>/<path>/<metric>": array}."""
    found: dict[str, np.ndarray] = {}
    if not isinstance(tree, dict):
        return found
    for metric, values in (tree.pop("replicates", None) or {}).items():
        found[f"{prefix}/{metric}"] = np.asarray(values)
    for key, child in tree.items():
        found.update(pop_replicates(child, f"{prefix}/{key}"))
    return found
