"""`unimed export`, `unimed classify`, `unimed embed`: the trained model outside its run.

    unimed export runs/demo exported/demo
    unimed classify exported/demo xrays/ --classes "pleural effusion,pneumonia" --language es --out scores.csv
    unimed embed runs/demo xrays/ --out embeddings.npy
    unimed classify runs/demo ct/ --volumes --classes "nodule" --out ct_scores.csv

MODEL is what :func:`unimed.load` takes (an exported folder, a run or a checkpoint folder); its own
config is used, so these commands take no preset or overrides. Inference runs on the CPU unless
``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

from unimed.commands import command
from unimed.config import Config
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.errors import ConfigError

BATCH = 32
VOLUME_BATCH = 4  # volumes read and embedded at once (each is read whole before it is resized)
EMBEDDING_SUFFIXES = (".npy", ".safetensors")


def list_images(path: str | Path) -> list[Path]:
    """The images (PNG, JPEG, DICOM by suffix) of a folder, searched recursively and sorted, or the
    single image file `path`; a missing path or a folder without images is a DataError."""
    from unimed.pretrained import IMAGE_SUFFIXES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("image folder or file not found", path, reason=MISSING_IMAGE)
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder", path,
                        reason=MISSING_IMAGE)
    return found


def list_volumes(path: str | Path) -> list[Path]:
    """The CT volumes at `path`: a volume file (NIfTI, .mhd), a folder that is one volume (a DICOM
    series or slice images: files only), or a folder of volumes (its volume files and sub-folders,
    one level, sorted); a DataError naming `path` otherwise."""
    from unimed.data.volumes import VOLUME_SUFFIXES, volume_kind

    path = Path(path)
    if not path.exists():
        raise DataError("volume folder or file not found", path, reason=MISSING_IMAGE)
    if path.is_file():
        volume_kind(path)  # a file that is no volume is a DataError naming it
        return [path]
    inside = sorted(path.iterdir())
    volumes = [p for p in inside if p.is_dir() or p.name.endswith(VOLUME_SUFFIXES)]
    if volumes:
        return volumes
    if not inside:
        raise DataError("empty folder: no volume in it, and not a volume itself", path, reason=MISSING_IMAGE)
    return [path]  # its files are the slices of one volume


def _batches(items: Sequence[Path], desc: str, progress: bool, size: int = BATCH,
             unit: str = "image") -> Iterator[list[Path]]:
    """`items` in lists of `size`, with a progress bar over them unless `progress` is off."""
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        for start in range(0, len(items), size):
            batch = list(items[start : start + size])
            yield batch
            bar.update(len(batch))


def _relative(file: Path, root: Path) -> str:
    return file.name if root.is_file() or file == root else file.relative_to(root).as_posix()


def _model_config(args: argparse.Namespace) -> str:
    """The model's own config (validated by the shared CLI path); the handler loads the model."""
    from unimed.pretrained import is_export
    from unimed.train.checkpoint import checkpoint_config, find_checkpoint

    model = Path(args.model)
    if is_export(model):
        return str(model / "config.yaml")
    try:
        return str(checkpoint_config(find_checkpoint(model)))
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc} (or a folder written by `unimed export`)") from None


def _no_preset(args: argparse.Namespace) -> None:
    given = [a for a in (args.config_path, args.config_flag) if a] + list(args.overrides)
    if given:
        raise ConfigError(f"`unimed {args.command}` uses the model's own config; remove {' '.join(given)}")


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="exported model folder, run folder or checkpoint folder")


def _inference_args(parser: argparse.ArgumentParser) -> None:
    _model_arg(parser)
    parser.add_argument("images", help="an image file or a folder of PNG / JPEG / DICOM images "
                                        "(with --volumes: CT volumes)")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--volumes", action="store_true",
                        help="the path holds CT volumes: a NIfTI or .mhd file, a folder of one DICOM "
                             "series or of slice images, or a folder of such volumes (one level)")


def _inputs(args: argparse.Namespace) -> tuple[list[Path], str, int]:
    """The files the command reads (volumes with --volumes, else images), what one is called, and
    how many are read at once."""
    if args.volumes:
        return list_volumes(args.images), "volume", VOLUME_BATCH
    return list_images(args.images), "image", BATCH


def _classify_args(parser: argparse.ArgumentParser) -> None:
    _inference_args(parser)
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--language", default="en", help="prompt language (default: en)")


def _export_args(parser: argparse.ArgumentParser) -> None:
    _model_arg(parser)
    parser.add_argument("out", help="new folder for the exported model")


@command("export", "write a trained run's model as a self-contained folder (weights, config, "
         "tokenizer, model card)", _export_args, _model_config)
def export_command(cfg: Config, args: argparse.Namespace) -> int:
    from unimed.pretrained import export

    _no_preset(args)
    out = export(args.model, args.out)
    print(f"exported: {out}")
    return 0


@command("classify", "zero-shot class scores of images (or, with --volumes, CT volumes) as a CSV, "
         "with prompts in a language",
         _classify_args, _model_config)
def classify_command(cfg: Config, args: argparse.Namespace) -> int:
    import numpy as np

    from unimed.pretrained import load

    _no_preset(args)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise ConfigError("--classes: give at least one class name")
    files, what, size = _inputs(args)
    out = _writable(args.out)
    model = load(args.model, device=args.device)
    model.prompts(args.language)  # an unknown language fails before any image is read
    classify = model.zero_shot_volume if args.volumes else model.zero_shot
    scores, probabilities = [], []
    for batch in _batches(files, "classify", args.progress, size, what):
        result = classify(batch, classes, args.language)
        scores.append(result.scores)
        probabilities.append(result.probabilities)
    score, prob = np.concatenate(scores), np.concatenate(probabilities)
    root = Path(args.images)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *(f"p({c})" for c in classes), *(f"score({c})" for c in classes)])
        for i, file in enumerate(files):
            writer.writerow([_relative(file, root), *(f"{v:.6f}" for v in prob[i]),
                             *(f"{v:.6f}" for v in score[i])])
    print(f"classified {len(files)} {what}(s) into {len(classes)} class(es) ({args.language} "
          f"prompts): {out}")
    return 0


@command("embed", "image (or, with --volumes, CT volume) embeddings of a folder (.npy or "
         ".safetensors + a CSV of files)", _inference_args, _model_config)
def embed_command(cfg: Config, args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from unimed.pretrained import load
    from unimed.train.checkpoint import umask_permissions

    _no_preset(args)
    out = Path(args.out)
    if out.suffix not in EMBEDDING_SUFFIXES:
        raise ConfigError(f"--out {out}: the file must end in {' or '.join(EMBEDDING_SUFFIXES)}")
    files, what, size = _inputs(args)
    _writable(out)
    model = load(args.model, device=args.device)
    encode = model.encode_volume if args.volumes else model.encode_image
    embeddings = torch.cat([encode(batch) for batch in _batches(files, "embed", args.progress, size, what)])
    if out.suffix == ".npy":
        np.save(out, embeddings.numpy())
    else:
        save_file({"embeddings": embeddings.contiguous()}, str(out))
        umask_permissions(out)
    names = out.with_suffix(".csv")
    root = Path(args.images)
    with names.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "file"])
        writer.writerows((i, _relative(file, root)) for i, file in enumerate(files))
    print(f"embedded {len(files)} {what}(s) as {tuple(embeddings.shape)}: {out} (files: {names})")
    return 0


def _writable(path: str | Path) -> Path:
    """`path` with its folder created; a folder that cannot be written is a ConfigError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except (FileExistsError, NotADirectoryError):  # a file where the path needs a folder
        blocking = next((folder for folder in path.parents if folder.is_file()), path.parent)
        raise ConfigError(f"cannot write {path} ({blocking} is a file, not a folder)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path
