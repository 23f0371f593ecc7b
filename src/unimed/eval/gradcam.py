"""Grad-CAM of image-prompt similarity for prompts in each language (Med-UniC Fig. 5).

For a few seeded positive test images of each class, the explained score is the cosine similarity
``cos(P_v(F_v(x)), P_l(prompt))`` between the image and the class's positive prompt in one
language; the CAM is taken at the last feature map of the image backbone (timm's last
``feature_info`` entry; for a ViT the last block's input norm, its tokens reshaped to the patch
grid). A language-agnostic model
highlights the same region whichever language the prompt is in.

The encoder stays frozen: the gradient reaches the feature map through the input image, which is
the only tensor that requires grad, so no parameter flag is touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm.auto import tqdm

from unimed.data.records import Record
from unimed.eval.data import rgb
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.prompts import PromptSet, corpus_stemming, load_prompts
from unimed.eval.tasks import TASKS, TaskContext

log = logging.getLogger(__name__)

SPLIT = "test"


class PromptSimilarity(nn.Module):
    """x (B, 3, H, W) -> (B, T): cosine similarity of the projected image to T fixed prompts.

    The input is made a leaf that requires grad, so that the frozen encoder's feature maps carry a
    gradient (Grad-CAM hooks them) while every parameter stays frozen.
    """

    def __init__(self, model: nn.Module, prompts: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("prompts", F.normalize(prompts, dim=-1))  # (T, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        return F.normalize(self.model.encode_image(x), dim=-1) @ self.prompts.T  # (B, T)


def target_layer(visual: nn.Module) -> nn.Module:
    """The module that outputs the backbone's last feature map (timm ``feature_info``).

    For a transformer block it is the block's first norm instead: with [CLS] pooling, the patch
    tokens leaving the last block no longer reach the output, so their gradient is zero; the last
    attention's input is the deepest token map that still does (the usual ViT Grad-CAM recipe).
    """
    last = visual.get_submodule(visual.feature_info[-1]["module"])
    return getattr(last, "norm1", last)


def token_grid(prefix_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """reshape_transform: (B, prefix + h*w, C) tokens of a square grid -> (B, C, h, w); 4-D maps
    pass unchanged. Tokens that do not make a square after the prefix are an error (a wrong prefix
    count would otherwise fold the [CLS] into the grid without one)."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            return x
        tokens = x[:, prefix_tokens:]  # (B, h*w, C)
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"Grad-CAM: {x.shape[1]} tokens are not {prefix_tokens} prefix "
                             "token(s) and a square grid")
        return tokens.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)

    return transform


def similarity_cams(encoder: Encoder, images: torch.Tensor, prompts: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) images, (T, E) projected prompt features -> (T, B, H, W) Grad-CAM maps in [0, 1]
    (all zero where no location raises the similarity)."""
    wrapper = PromptSimilarity(encoder.model, prompts).to(encoder.device)
    visual = encoder.visual
    transform = token_grid(int(getattr(visual, "num_prefix_tokens", 0)))
    x = images.to(encoder.device).contiguous()
    out = []
    with torch.enable_grad(), GradCAM(wrapper, [target_layer(visual)], transform) as cam:
        for t in range(len(prompts)):
            out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(t)] * len(x)))
    return np.stack(out).astype(np.float32)  # (T, B, H, W)


def positive_indices(records: Sequence[Record], class_name: str, dataset: str) -> np.ndarray:
    """Indices of the records labelled 1 for `class_name`; an error naming the dataset when no
    record states the class at all."""
    values = [
        {name.lower(): value for name, value in r.labels.items()}.get(class_name.lower())
        for r in records
    ]
    if all(v is None for v in values):
        known = sorted({name for r in records for name in r.labels})
        raise EvalError(f"gradcam: dataset '{dataset}' has no label '{class_name}'; labels: {known}")
    return np.flatnonzero([v == 1.0 for v in values])


def pick_images(records: Sequence[Record], classes: Sequence[str], dataset: str, per_class: int,
                seed: int) -> dict[str, np.ndarray]:
    """Up to `per_class` seeded positive image indices per class; classes without a positive image
    are left out with a warning."""
    rng = np.random.default_rng(seed)
    picked = {}
    for name in classes:
        positives = positive_indices(records, name, dataset)
        if not len(positives):
            log.warning("gradcam: no positive test image of '%s' in %s; class skipped", name, dataset)
            continue
        picked[name] = np.sort(rng.permutation(positives)[:per_class])
    if not picked:
        raise EvalError(f"gradcam: no positive test image of any of {list(classes)} in '{dataset}'")
    return picked


COLOUR_BAR_WIDTH = 0.1  # share of the figure's width kept for the colour bar


def plot_grid(rows: list[dict[str, Any]], languages: Sequence[str], path: str) -> None:
    """Rows of image | one CAM overlay per language, titled with the prompt as a person reads it.
    CAMs are normalised to [0, 1] per map, so every overlay shares one colour scale, drawn once as a
    bar beside the grid (a bar per overlay drew the same scale 2-3 times per row, and took half the
    figure's drawing time)."""
    fig = Figure(figsize=(2.6 * (1 + len(languages)) + 0.8, 2.8 * len(rows)))
    axes = fig.subplots(len(rows), 1 + len(languages), squeeze=False)
    overlay = None
    for row, ax_row in zip(rows, axes):
        ax_row[0].imshow(row["image"], cmap="gray")
        ax_row[0].set_title(f"{row['class']}\n{row['study']}", fontsize=8)
        for ax, language, cam, prompt in zip(ax_row[1:], languages, row["cams"], row["prompts"]):
            ax.imshow(row["image"], cmap="gray")
            overlay = ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_title(f"{language.upper()}: \"{prompt}\"", fontsize=8)
        for ax in ax_row:
            ax.set_axis_off()
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - COLOUR_BAR_WIDTH, 1.0))
    if overlay is not None:
        cax = fig.add_axes((1.0 - 0.8 * COLOUR_BAR_WIDTH, 0.3, 0.25 * COLOUR_BAR_WIDTH, 0.4),
                           label="<colorbar>")
        bar = fig.colorbar(overlay, cax=cax)
        bar.set_label("Grad-CAM (0–1 per map)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)


def class_rows(encoder: Encoder, images: torch.Tensor, records: Sequence[Record], name: str,
               prompt_sets: Sequence[PromptSet]) -> list[dict[str, Any]]:
    """Figure rows of one class: each image with its CAM for the class's prompt per language."""
    prompts = encoder.text_features([p.positive(name) for p in prompt_sets])  # (T, E)
    cams = similarity_cams(encoder, rgb(images), prompts)  # (T, B, H, W)
    displays = [p.display(name) for p in prompt_sets]
    return [
        {"class": name, "study": r.study_id, "image": images[b, 0].numpy(), "cams": cams[:, b],
         "prompts": displays}
        for b, r in enumerate(records)
    ]


def cam_correlation(rows: Sequence[dict[str, Any]], t: int) -> float | None:
    """Mean Pearson correlation between language 0's and language t's CAMs (None if undefined)."""
    values = []
    for row in rows:
        a, b = row["cams"][0].ravel(), row["cams"][t].ravel()
        if a.std() > 0 and b.std() > 0:
            values.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(values)) if values else None


@TASKS.register("gradcam")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Grad-CAM grid of the configured classes and languages, and how alike the languages' maps are."""
    cfg = ctx.cfg.gradcam
    records = ctx.data.require(cfg.dataset, SPLIT)
    images = ctx.data.images(cfg.dataset, SPLIT, "crop")  # (N, 1, S, S)
    corpus = corpus_stemming(encoder.tokenizer)
    prompt_sets = [load_prompts(language, cfg.prompt_dir, ctx.cfg.prompt_stemming, corpus)
                   for language in cfg.languages]
    picked = pick_images(records, cfg.classes, cfg.dataset, cfg.images_per_class, ctx.cfg.seed)
    rows: list[dict[str, Any]] = []
    for name, index in tqdm(picked.items(), desc="gradcam", unit="class", disable=not ctx.progress):
        rows += class_rows(encoder, images[index], [records[i] for i in index], name, prompt_sets)
    path = ctx.figure_path(encoder, "gradcam")
    plot_grid(rows, cfg.languages, str(path))
    out: dict[str, Any] = {
        "figures": {"gradcam": str(path.relative_to(ctx.out_dir))},
        "classes": list(picked),
        "images_per_class": cfg.images_per_class,
        "images": len(rows),
    }
    if len(cfg.languages) > 1:
        out["cam_correlation"] = {
            f"{cfg.languages[0]}-{language}": cam_correlation(rows, t)
            for t, language in enumerate(cfg.languages[1:], start=1)
        }
    return out
