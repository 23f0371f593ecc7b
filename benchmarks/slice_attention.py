"""What UniMedI's attentive slice selection looks at: the volume, the slab's position, or nothing.

    python benchmarks/slice_attention.py runs/demo/unimedi [--split valid] [--baselines init]

The ``slice_selection`` task scores where the selection lands; this says why. For the run's
native 3D encoder (a model with ``slice_attention``: UniMedI) and each `--baselines` encoder
(``init``: the model as pre-training starts it), on the volumes of `--split` of `--dataset` that
hold a finding by the phantom's ground truth, read at the depth the model reads a volume at, with
S slabs (``method.volume_patch``'s depth slices each) of which the model picks k:

* spread: per volume, (highest - lowest) / mean of its S slab scores (eq. 2: the mean [CLS]
  attention over each slab's tokens), the median over the volumes. Near 0 the attention is flat and
  the picks are decided by small differences;
* position share: the share of the slab scores' variance (over volumes and slabs) that the slab's
  position explains (the variance of the per-slab means over the total); 1 when every volume scores
  the slabs alike, whatever it shows;
* depth reversal: each volume upside down (its slices in reverse order). A selection that follows
  the anatomy picks the same slabs again once mapped back; one that follows the input position
  picks the same positions. The table gives the share of the k picked slabs kept either way (two
  random k-subsets of S slabs share k / S on average);
* picks on a finding: the share of the picked slabs that hold a finding, beside that of all slabs
  (random picks).

A table per encoder then gives, per slab, its mean score against a flat attention (1.00), how often
it is picked, how often the reversed volume's pick is at its input position, and how often it
holds a finding. The default split is the validation split; ``--split test`` explains the report's
``slice_selection`` numbers (nothing is chosen from them here).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from unimed.commands.evaluate import build_encoders
from unimed.commands.tables import print_table
from unimed.config import load_run_config
from unimed.data.errors import DataError
from unimed.errors import ConfigError
from unimed.eval.checks import percent
from unimed.eval.data import EvalData
from unimed.eval.errors import EvalError
from unimed.eval.tasks import TaskContext
from unimed.eval.volumes import batched, finding_slices, held_by_volume, selects_slices
from unimed.models.unimedi_ops import top_k_slices
from unimed.train.checkpoint import CheckpointError, checkpoint_config, find_checkpoint


def slab_scores(slice_scores: np.ndarray, thickness: int) -> np.ndarray:
    """(N, D) per-slice scores, equal within each slab of `thickness` slices -> (N, D / thickness)."""
    n, depth = slice_scores.shape
    slabs = slice_scores.reshape(n, depth // thickness, thickness)
    if not np.array_equal(slabs, np.repeat(slabs[..., :1], thickness, axis=-1)):
        raise ValueError(f"the slice scores are not constant within slabs of {thickness} slices")
    return slabs[..., 0]


def finding_slabs(held: dict[str, set[int]], thickness: int) -> set[int]:
    """{finding: slices holding it} of one volume -> the slabs holding any finding."""
    return {s // thickness for slices in held.values() for s in slices}


def picks(scores: np.ndarray, k: int) -> list[set[int]]:
    """(N, S) slab scores -> per volume the k slabs the model picks (its own ranking: ties to the
    lower index)."""
    return [set(row) for row in top_k_slices(torch.from_numpy(np.ascontiguousarray(scores)), k).tolist()]


def diagnose(scores: np.ndarray, reversed_scores: np.ndarray, found: list[set[int]], k: int) -> dict:
    """The module docstring's measures from (N, S) slab scores of the volumes and of the same
    volumes upside down (in the reversed input's order), the slabs holding a finding per volume and
    the k slabs picked."""
    n, slabs = scores.shape
    chosen, chosen_reversed = picks(scores, k), picks(reversed_scores, k)
    anatomy = [{slabs - 1 - s for s in c} for c in chosen_reversed]
    mean = scores.mean(0)
    total = scores.var()
    return {
        "volumes": n, "slabs": slabs, "k": k,
        "spread": float(np.median((scores.max(1) - scores.min(1)) / scores.mean(1))),
        "position_share": float(mean.var() / total) if total > 0 else float("nan"),
        "kept_anatomy": float(np.mean([len(a & b) / k for a, b in zip(chosen, anatomy)])),
        "kept_position": float(np.mean([len(a & b) / k for a, b in zip(chosen, chosen_reversed)])),
        "random_kept": k / slabs,
        "precision": float(np.mean([len(c & f) / k for c, f in zip(chosen, found)])),
        "random_precision": float(np.mean([len(f) / slabs for f in found])),
        "relative_score": mean / mean.mean(),
        "picked": np.bincount([s for c in chosen for s in c], minlength=slabs) / n,
        "picked_reversed": np.bincount([s for c in chosen_reversed for s in c], minlength=slabs) / n,
        "holds_finding": np.bincount([s for f in found for s in f], minlength=slabs) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (or checkpoint) of a UniMedI, e.g. runs/demo/unimedi")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--dataset", default="bimcv-covid19")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--baselines", default="init", help="comma-separated baselines (or empty)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = find_checkpoint(args.run)
    cfg = load_run_config(checkpoint_config(checkpoint), args.overrides)
    encoders = build_encoders(cfg, checkpoint, tuple(b for b in args.baselines.split(",") if b))
    volume = cfg.eval.volume
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TaskContext(EvalData(cfg.data), cfg.eval, Path(tmp))
        truth = finding_slices(ctx, args.dataset, "slice_selection")
        summary, per_slab = [], []
        for encoder in encoders:
            if not selects_slices(encoder):
                print(f"{encoder.label}: no slice_attention (a 2D encoder), skipped")
                continue
            model = encoder.model
            depth, side = encoder.volume_grid(volume.selection_slices, ctx.data.image_size)
            thickness = int(model.cfg.volume_patch[0])
            stacks = ctx.data.slice_stacks(args.dataset, args.split, depth, volume.window, side)
            held = held_by_volume(ctx, args.dataset, args.split, truth, depth)
            if not held:
                print(f"{encoder.label}: no {args.split} volume of {args.dataset} holds a finding")
                continue
            rows = list(held)
            scores, reversed_scores = (
                slab_scores(batched(method, encoder, stacks, cfg.eval.batch_size, rows).float().numpy(),
                            thickness)
                for method in (model.slice_attention, lambda v: model.slice_attention(v.flip(1))))
            found = [finding_slabs(h, thickness) for h in held.values()]
            out = diagnose(scores, reversed_scores, found, model.selection_k)  # k slabs
            summary.append([encoder.label, out["volumes"], f"{out['k']} of {out['slabs']}",
                            percent(out["spread"]), percent(out["position_share"]),
                            f"{percent(out['kept_anatomy'])} / {percent(out['kept_position'])} "
                            f"(random {percent(out['random_kept'])})",
                            f"{percent(out['precision'])} (random {percent(out['random_precision'])})"])
            per_slab.append((encoder.label, thickness, out))
    if not summary:
        raise SystemExit(f"{args.run}: no encoder to diagnose (a model with slice_attention, and "
                         f"{args.split} volumes of {args.dataset} that hold a finding)")
    print_table(f"What the attentive selection looks at: {args.dataset} {args.split}, volumes with a "
                "finding (%)",
                ["encoder", "volumes", "picks", "slab scores: median spread", "position share of "
                 "their variance", "picks kept when the volume is reversed: same anatomy / same "
                 "position", "picks on a finding"], summary)
    for label, thickness, out in per_slab:
        rows = [[f"{j} (slices {j * thickness}-{(j + 1) * thickness - 1})", f"{out['relative_score'][j]:.3f}",
                 percent(out["picked"][j]), percent(out["picked_reversed"][j]),
                 percent(out["holds_finding"][j])] for j in range(out["slabs"])]
        print_table(f"{label}, per slab (inferior first)",
                    ["slab", "mean score / flat", "picked %", "picked, reversed volume (input position) %",
                     "holds a finding %"], rows)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, EvalError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"slice_attention.py: {error}") from None
