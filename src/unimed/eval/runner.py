"""Run evaluation tasks on encoders and collect one metrics dict (what metrics.json holds).

The bootstrap replicates the tasks return under "replicates" keys are moved into
``ctx.replicates``, keyed ``"<encoder>/<task>/<path>/<metric>"`` (e.g.
``"medunic/zero_shot/cxp500/en/auc"``), so the metrics stay JSON and the checks can pair encoders.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
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
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)


def evaluate(encoders: Sequence[Encoder], ctx: TaskContext, tasks: Sequence[str]) -> dict:
    """{"encoders": {name: {"label", "seconds": {task: s}, "tasks": {task: metrics}}}}.

    Every encoder runs every task on the same cached data, splits and seeds; an encoder's cached
    features are released after its last task.
    """
    runners = {task: TASKS.get(task) for task in tasks}
    out: dict = {"encoders": {}}
    jobs = [(encoder, task) for encoder in encoders for task in runners]
    last = list(runners)[-1] if runners else None
    for encoder, task in tqdm(jobs, desc="evaluate", unit="task", disable=not ctx.progress):
        entry = out["encoders"].setdefault(
            encoder.name, {"label": encoder.label, "seconds": {}, "tasks": {}}
        )
        start = time.perf_counter()
        entry["tasks"][task] = runners[task](encoder, ctx)
        ctx.replicates.update(pop_replicates(entry["tasks"][task], f"{encoder.name}/{task}"))
        entry["seconds"][task] = round(time.perf_counter() - start, 2)
        log.info("%s: %s took %.1f s", encoder.label, task, entry["seconds"][task])
        if task == last:
            ctx.features.release(encoder.name)
    return out


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
