"""Zero-shot classification (Med-UniC Table 1): positive vs negative prompt, per class and language.

An image is called positive for a class when its cosine similarity to the positive prompt
("{disease}") exceeds that to the negative prompt ("No {disease}" / "No hay {enfermedad}"); the
difference of the two similarities is the score the AUC ranks. A method whose model has its own rule
(``zero_shot_prompts`` / ``zero_shot_scores``, e.g. PRIOR's global + local score) is scored with it instead. Macro AUC and macro F1 average over
the classes (a class with a single label value in the test set has no AUC and is left out). Every
value carries a bootstrap 95 % interval over resamples of the test images, shared by all encoders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unimed.data.records import Record
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.metrics import batched_auc, batched_f1, bootstrap, mean_estimate
from unimed.eval.prompts import PromptSet, corpus_stemming, load_prompts
from unimed.eval.tasks import TASKS, TaskContext, with_intervals

log = logging.getLogger(__name__)

SPLIT = "test"


def label_matrix(records: Sequence[Record], classes: Sequence[str], dataset: str,
                 missing: str = "error") -> np.ndarray:
    """(N, C) 0/1 labels of `classes` (case-insensitive). A class no record states is an error
    counting the records and listing the labels they state (a column of the table left blank in
    every record of the split). A record whose label for a class is blank or uncertain (-1)
    is, with `missing` "error", an error counting such records and naming the first (zero-shot sets
    are fully labelled); with "exclude" it is NaN there, left out of that class's scores (the
    matrix is then float)."""
    out = np.zeros((len(records), len(classes)), dtype=np.int64 if missing == "error" else np.float64)
    rows = [{name.lower(): value for name, value in record.labels.items()} for record in records]
    for c, name in enumerate(classes):
        values = [row.get(name.lower(), float("nan")) for row in rows]
        if all(math.isnan(v) for v in values):
            stated = sorted({label for record in records for label, value in record.labels.items()
                             if not math.isnan(value)})
            raise EvalError(f"{dataset}: none of the {len(records)} records scored states a label "
                            f"'{name}' (the labels they state: {', '.join(stated) or 'none'})")
        unusable = [i for i, v in enumerate(values) if v not in (0.0, 1.0)]
        if unusable and missing == "error":
            first = values[unusable[0]]
            what = "blank" if math.isnan(first) else f"{first:g}" + (" (uncertain)" if first == -1 else "")
            raise EvalError(
                f"{dataset}: {len(unusable)} of {len(records)} records have no 0/1 label for '{name}' "
                f"(the first, {records[unusable[0]].image_path}, is {what}); zero-shot sets need 0/1 "
                "labels for every scored class (eval.zero_shot.missing_labels=exclude leaves such "
                "records out of the class's scores)"
            )
        out[:, c] = [v if v in (0.0, 1.0) else float("nan") for v in values]
    return out


def prompt_texts(prompts: PromptSet, classes: Sequence[str]) -> list[str]:
    """The positive prompts of `classes`, then their negative prompts (2C texts)."""
    return [prompts.positive(c) for c in classes] + [prompts.negative(c) for c in classes]


def prompt_differences(image_features: torch.Tensor, text_features: torch.Tensor) -> np.ndarray:
    """(N, C) cosine(image, positive prompt) - cosine(image, negative prompt) from normalised
    (N, E) image features and the (2C, E) features of :func:`prompt_texts`."""
    sims = image_features @ text_features.T  # (N, 2C)
    classes = len(text_features) // 2
    return (sims[:, :classes] - sims[:, classes:]).numpy()


def prompt_scores(
    encoder: Encoder, image_features: torch.Tensor, prompts: PromptSet, classes: Sequence[str]
) -> np.ndarray:
    """(N, C) cosine(image, positive prompt) - cosine(image, negative prompt)."""
    text = encoder.text_features(prompt_texts(prompts, classes), normalize=True)  # (2C, E)
    return prompt_differences(image_features, text)


def own_scores(
    encoder: Encoder, images: torch.Tensor, prompts: PromptSet, classes: Sequence[str],
    batch_size: int = 64,
) -> np.ndarray:
    """(N, C) scores of the model's own zero-shot rule with one prompt set
    (:func:`own_scores_by_language`)."""
    return own_scores_by_language(encoder, images, [prompts], classes, batch_size)[0]


def own_scores_by_language(
    encoder: Encoder, images: torch.Tensor, prompt_sets: Sequence[PromptSet], classes: Sequence[str],
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Per prompt set, (N, C) scores of the model's own zero-shot rule (:func:`own_prompts`,
    :func:`scores_with_own_prompts`)."""
    prompts = own_prompts(encoder, prompt_sets, classes)
    return scores_with_own_prompts(encoder, images, prompts, len(prompt_sets), batch_size)


def own_prompts(encoder: Encoder, prompt_sets: Sequence[PromptSet], classes: Sequence[str]) -> Any:
    """The model's own encoding of every prompt set's (positive, negative) prompt pairs,
    ``model.zero_shot_prompts(positive, negative)`` of the tokenised prompts ((ids, mask) of shape
    (K, L) each, K pairs), computed once for any number of images. A model's
    ``zero_shot_prompt`` names the :class:`PromptSet` template of its positive prompts (PRIOR:
    "observed")."""
    template = getattr(encoder.model, "zero_shot_prompt", "positive")
    positive = encoder.tokenize([getattr(p, template)(c) for p in prompt_sets for c in classes])
    negative = encoder.tokenize([p.negative(c) for p in prompt_sets for c in classes])
    with torch.no_grad():
        return encoder.model.zero_shot_prompts(positive, negative)


def scores_with_own_prompts(encoder: Encoder, images: torch.Tensor, prompts: Any, sets: int,
                            batch_size: int = 64) -> list[np.ndarray]:
    """Per prompt set, (N, C) scores ``model.zero_shot_scores(images, prompts)`` of pixels in
    [0, 1] against the `sets` prompt sets encoded by :func:`own_prompts`; a score > 0 calls the
    class present. The rule scores every (positive, negative) pair on its own, so the pairs of all
    prompt sets go in together and each image passes through the image tower once, whatever the
    number of languages."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(encoder.device)
            out.append(encoder.model.zero_shot_scores(x, prompts).float().cpu())
    scores = torch.cat(out).numpy()  # (N, sets * C)
    return np.split(scores, sets, axis=1)


def _positive_f1(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return batched_f1(labels, scores > 0)


def score_language(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str],
                   resamples: np.ndarray) -> dict:
    """Macro AUC / F1 and the per-class values for one prompt language, each with its interval
    over the (R, N) `resamples` of the images."""
    per_class, estimates = {}, {"auc": [], "f1": []}
    for c, name in enumerate(classes):
        pair = [labels[:, c], scores[:, c]]
        auc, f1 = bootstrap(batched_auc, pair, resamples), bootstrap(_positive_f1, pair, resamples)
        estimates["auc"].append(auc)
        estimates["f1"].append(f1)
        row = with_intervals({"auc": auc, "f1": f1}, replicates=False)
        labelled = ~np.isnan(labels[:, c]) if labels.dtype.kind == "f" else np.ones(len(labels), bool)
        per_class[name] = {**row, "positives": int((labels[labelled, c] == 1).sum()),
                           "labelled": int(labelled.sum())}
    macros = {metric: mean_estimate(values) for metric, values in estimates.items()}
    return {**with_intervals(macros), "images": int(len(labels)), "per_class": per_class}


def dataset_labels(ctx: TaskContext, dataset: str) -> tuple[list[str], list[Record], np.ndarray]:
    """The classes ``eval.zero_shot.classes`` names for `dataset`, its test records and their
    (N, C) 0/1 labels (:func:`label_matrix`, NaN where ``eval.zero_shot.missing_labels=exclude``
    leaves a record out); an EvalError when it names none or a label is unusable."""
    classes = ctx.cfg.zero_shot.classes
    if dataset not in classes:
        raise EvalError(
            f"eval.zero_shot.classes has no class list for '{dataset}'; it has {sorted(classes)}"
        )
    records = ctx.data.require(dataset, SPLIT)
    return list(classes[dataset]), records, label_matrix(
        records, classes[dataset], f"{dataset} ({SPLIT})", ctx.cfg.zero_shot.missing_labels)


def check_labels(ctx: TaskContext) -> None:
    """Every zero-shot set's classes and labels (:func:`dataset_labels`), before any task runs: a
    user's table with a blank label fails at once, not after the tasks before zero-shot."""
    for dataset in ctx.cfg.zero_shot.datasets:
        dataset_labels(ctx, dataset)


@TASKS.register("zero_shot")
def run(encoder: Encoder, ctx: TaskContext) -> dict:
    """{dataset: {language: {"auc", "f1", "images", "per_class"}}} for every configured set."""
    cfg = ctx.cfg.zero_shot
    corpus = corpus_stemming(encoder.tokenizer)
    prompts = {lang: load_prompts(lang, cfg.prompt_dir, ctx.cfg.prompt_stemming, corpus)
               for lang in cfg.languages}
    out: dict = {}
    for dataset in cfg.datasets:
        classes, records, labels = dataset_labels(ctx, dataset)
        resamples = ctx.resamples(dataset, SPLIT, len(records))
        if hasattr(encoder.model, "zero_shot_scores"):
            images = rgb(ctx.data.images(dataset, SPLIT))
            scores = dict(zip(prompts, own_scores_by_language(
                encoder, images, list(prompts.values()), classes, ctx.cfg.batch_size)))
        else:
            features = ctx.image_features(encoder, dataset, SPLIT, "projected", normalize=True)
            # The prompts through the context's text cache: the sets share classes.
            scores = {lang: prompt_differences(features, ctx.text_features(
                encoder, prompt_texts(p, classes), "projected", normalize=True))
                for lang, p in prompts.items()}
        out[dataset] = {
            lang: score_language(labels, scores[lang], classes, resamples) for lang in prompts
        }
        log.info("%s zero-shot on %s: %s", encoder.label, dataset,
                 {lang: round(v["auc"] or float("nan"), 4) for lang, v in out[dataset].items()})
    return out
