"""`unimed export`, `unimed classify`, `unimed embed`: the trained model outside its run.

    unimed export runs/demo exported/demo
    unimed classify exported/demo xrays/ --classes "pleural effusion,pneumonia" --language es --out scores.csv
    unimed embed runs/demo xrays/ --out embeddings.npy
    unimed classify runs/demo ct/ --volumes --classes "nodule" --out ct_scores.csv

MODEL is what :func:`unimed.load` takes (an exported folder, a run or a checkpoint folder); its own
config is used, so these commands take no preset or overrides. Inference runs on the CPU unless
``--device`` says otherwise; ``--workers N`` reads and resizes the files in N processes beside it.
A file that cannot be read stops the command with one line naming it; with ``--on-error skip`` it is
left out and listed, with the reason, in ``<out>.skipped.csv`` (written whenever skip is on).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from unimed.commands import command
from unimed.config import Config
from unimed.data.errors import MISSING_IMAGE, ON_ERROR_OPTIONS, DataError
from unimed.errors import ConfigError, why_unwritable

if TYPE_CHECKING:
    from unimed.pretrained import Pretrained

log = logging.getLogger(__name__)

BATCH = 32
VOLUME_BATCH = 4  # volumes read and embedded at once (each is read whole before it is resized)
EMBEDDING_SUFFIXES = (".npy", ".safetensors")
SKIPPED_SUFFIX = ".skipped.csv"
SKIPPED_HEADER = ("file", "reason", "error")
NAMES_HEADER = ("row", "file")  # embed's `<out>.csv`: which file each embedding row is


def _hidden(path: Path, root: Path) -> bool:
    """Whether `path` is hidden below `root` (a name starting with '.' on the way: the '._a.png'
    resource forks a Mac copies beside each file, .DS_Store, .ipynb_checkpoints)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_below(folder: Path) -> Iterator[Path]:
    """Every file below `folder`, linked folders entered too (rglob does not: a folder of images
    often links its sub-folders in from elsewhere), each real folder once, so a link cycle ends."""
    seen: set[str] = set()
    for parent, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        yield from (Path(parent) / name for name in files)


def list_images(path: str | Path) -> list[Path]:
    """The images of a folder (PNG, JPEG, TIFF, DICOM by suffix, and DICOM files named without one,
    found by their 'DICM' prefix; not a DICOMDIR index, nor hidden files and folders), searched
    recursively (linked folders too) and sorted, or the single image file `path`; a missing path or
    a folder without images is a DataError."""
    from unimed.data.images import is_dicom
    from unimed.pretrained import IMAGE_SUFFIXES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("image folder or file not found", path, reason=MISSING_IMAGE)
    found = sorted(p for p in _files_below(path) if p.is_file() and not _hidden(p, path) and (
        p.suffix.lower() in IMAGE_SUFFIXES or (p.name.upper() != "DICOMDIR" and is_dicom(p))))
    if not found:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder", path,
                        reason=MISSING_IMAGE)
    return found


def _holds_a_file(folder: Path) -> bool:
    return any(p.is_file() and not _hidden(p, folder) for p in folder.iterdir())


def list_volumes(path: str | Path) -> list[Path]:
    """The CT volumes at `path`: a volume file (NIfTI, .mhd, .mha), a folder that is one volume (a DICOM
    series or slice images: files only), or a folder of volumes (its volume files and the
    sub-folders that hold a file, one level, sorted; a sub-folder without one is named in a
    warning); a DataError naming `path` otherwise."""
    from unimed.data.volumes import is_volume_file, volume_kind

    path = Path(path)
    if not path.exists():
        raise DataError("volume folder or file not found", path, reason=MISSING_IMAGE)
    if path.is_file():
        volume_kind(path)  # a file that is no volume is a DataError naming it
        return [path]
    inside = sorted(p for p in path.iterdir() if not _hidden(p, path))
    hollow = [p for p in inside if p.is_dir() and not _holds_a_file(p)]
    volumes = [p for p in inside if (p.is_dir() and p not in hollow) or is_volume_file(p)]
    if hollow:
        log.warning("%s: %d sub-folder(s) hold no file, left out: %s", path, len(hollow),
                    ", ".join(p.name for p in hollow))
    if volumes:
        return volumes
    if not inside:
        raise DataError("empty folder: no volume in it, and not a volume itself", path, reason=MISSING_IMAGE)
    return [path]  # its files are the slices of one volume


class _Files(Dataset):
    """Each file read by `read` (in the loader's workers): (index, pixels, None), or (index, None,
    the DataError) for a file that cannot be read."""

    def __init__(self, read: Callable[[Path], torch.Tensor], files: Sequence[Path]) -> None:
        self.read, self.files = read, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, DataError | None]:
        try:
            return index, self.read(self.files[index])[0], None
        except DataError as exc:
            return index, None, exc


def _collate(items: list[tuple[int, torch.Tensor | None, DataError | None]]) -> tuple:
    read = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    errors = [error for _, _, error in items if error is not None]
    return [index for index, _ in read], torch.stack([p for _, p in read]) if read else None, errors


def _read(model: Pretrained, files: Sequence[Path], what: str, args: argparse.Namespace,
          skipped: list[DataError]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The files' pixels as the model reads them, in batches (with their indices in `files`), read
    in ``args.workers`` processes; a file that cannot be read is raised (a DataError naming it) or,
    with ``--on-error skip``, appended to `skipped`."""
    from tqdm.auto import tqdm

    read, size = (model.preprocess_volume, VOLUME_BATCH) if args.volumes else (model.preprocess, BATCH)
    loader = DataLoader(_Files(read, files), batch_size=size, num_workers=args.workers, collate_fn=_collate)
    with tqdm(total=len(files), desc=args.command, unit=what, disable=not args.progress) as bar:
        for indices, pixels, errors in loader:
            if errors and args.on_error == "raise":
                raise errors[0]
            skipped.extend(errors)
            if pixels is not None:
                yield indices, pixels
            bar.update(len(indices) + len(errors))


def _write_skipped(out: Path, skipped: list[DataError], total: int, what: str, root: Path) -> None:
    """`<out>.skipped.csv`: one row per file left out (relative to `root`, the command's input, as in
    the output), with the reason; all of them left out is a DataError naming `root`."""
    listing = _skipped_listing(out)
    with listing.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SKIPPED_HEADER)
        writer.writerows((_relative(e.path, root), e.reason, e.message) for e in skipped)
    if len(skipped) == total:
        raise DataError(f"none of the {total} {what}(s) could be read (each is listed in {listing})",
                        root, reason=skipped[0].reason)
    if skipped:
        print(f"skipped {len(skipped)} of {total} {what}(s) that could not be read (--on-error skip): "
              f"{listing}")


def _skipped_listing(out: Path) -> Path:
    return out.with_name(out.stem + SKIPPED_SUFFIX)


def _own_listing(path: Path, header: Sequence[str], option: str) -> None:
    """A listing written beside the output (embed's `<out>.csv`, `<out>.skipped.csv`) replaces only
    an earlier one of its kind: a file of another kind at that path (a table of the user's own beside
    `--out`) is a ConfigError, checked before any image is read."""
    if path.exists() and _first_row(path) != tuple(header):
        raise ConfigError(f"{option}: {path} exists and was not written by unimed (its first row is not "
                          f"{','.join(header)}); it would be overwritten: choose another --out or move it")


def _own_scores(path: Path) -> None:
    """classify's `--out` replaces only an earlier table of scores (first row: file, p(...), ...,
    score(...)); any other file there is a ConfigError, checked before any image is read."""
    row = _first_row(path) if path.exists() else None
    if path.exists() and not (row and row[0] == "file" and len(row) > 1 and row[1].startswith("p(")):
        raise ConfigError(f"--out: {path} exists and was not written by unimed classify (its first row is "
                          "not file,p(<class>),...); it would be overwritten: choose another --out or "
                          "move it")


def _first_row(path: Path) -> tuple[str, ...] | None:
    """The first row of the CSV file `path`; None for one that cannot be read as UTF-8 CSV."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader(f), ()))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _relative(file: Path, root: Path) -> str:
    if root.is_file() or file == root:
        return file.name
    return file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)


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
    parser.add_argument("images", help="an image file or a folder of PNG / JPEG / TIFF / DICOM images "
                                        "(with --volumes: CT volumes)")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--volumes", action="store_true",
                        help="the path holds CT volumes: a NIfTI, .mhd or .mha file, a folder of one DICOM "
                             "series or of slice images, or a folder of such volumes (one level)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that read and resize the files beside the model (default: 0, "
                             "read in the main process)")
    parser.add_argument("--on-error", choices=ON_ERROR_OPTIONS, default="raise",
                        help="a file that cannot be read: stop with a line naming it (raise, the "
                             "default) or leave it out and list it in <out>.skipped.csv (skip)")


def _inputs(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The files the command reads (volumes with --volumes, else images) and what one is called."""
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 or more processes")
    if args.volumes:
        return list_volumes(args.images), "volume"
    return list_images(args.images), "image"


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

    from unimed.pretrained import checked_class_names, load

    _no_preset(args)
    classes = checked_class_names([c.strip() for c in args.classes.split(",") if c.strip()], "--classes")
    files, what = _inputs(args)
    out = _writable(args.out)
    _own_scores(out)
    if args.on_error == "skip":
        _own_listing(_skipped_listing(out), SKIPPED_HEADER, "--on-error skip")
    model = load(args.model, device=args.device)
    model.prompts(args.language)  # an unknown language fails before any image is read
    classify = model.zero_shot_volume if args.volumes else model.zero_shot
    rows, scores, probabilities, skipped = [], [], [], []
    for indices, pixels in _read(model, files, what, args, skipped):
        result = classify(pixels, classes, args.language, preprocessed=True)
        rows.extend(indices)
        scores.append(result.scores)
        probabilities.append(result.probabilities)
    if args.on_error == "skip":
        _write_skipped(out, skipped, len(files), what, Path(args.images))
    score, prob = np.concatenate(scores), np.concatenate(probabilities)
    root = Path(args.images)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *(f"p({c})" for c in classes), *(f"score({c})" for c in classes)])
        for i, row in enumerate(rows):
            writer.writerow([_relative(files[row], root), *(f"{v:.6f}" for v in prob[i]),
                             *(f"{v:.6f}" for v in score[i])])
    print(f"classified {len(rows)} {what}(s) into {len(classes)} class(es) ({args.language} "
          f"prompts): {out}")
    return 0


@command("embed", "image (or, with --volumes, CT volume) embeddings of a folder (.npy or "
         ".safetensors + a CSV of files)", _inference_args, _model_config)
def embed_command(cfg: Config, args: argparse.Namespace) -> int:
    import numpy as np
    from safetensors.torch import save_file

    from unimed.pretrained import load
    from unimed.train.checkpoint import umask_permissions

    _no_preset(args)
    out = Path(args.out)
    if out.suffix not in EMBEDDING_SUFFIXES:
        raise ConfigError(f"--out {out}: the file must end in {' or '.join(EMBEDDING_SUFFIXES)}")
    files, what = _inputs(args)
    _writable(out)
    names = out.with_suffix(".csv")
    _own_listing(names, NAMES_HEADER, "--out")
    if out.exists() and not names.exists():  # an earlier embed wrote both
        raise ConfigError(f"--out: {out} exists without the listing {names.name} that unimed embed "
                          "writes beside its embeddings; it would be overwritten: choose another "
                          "--out or move it")
    if args.on_error == "skip":
        _own_listing(_skipped_listing(out), SKIPPED_HEADER, "--on-error skip")
    model = load(args.model, device=args.device)
    encode = model.encode_volume if args.volumes else model.encode_image
    rows, embedded, skipped = [], [], []
    for indices, pixels in _read(model, files, what, args, skipped):
        rows.extend(indices)
        embedded.append(encode(pixels, preprocessed=True))
    if args.on_error == "skip":
        _write_skipped(out, skipped, len(files), what, Path(args.images))
    embeddings = torch.cat(embedded)
    if out.suffix == ".npy":
        np.save(out, embeddings.numpy())
    else:
        save_file({"embeddings": embeddings.contiguous()}, str(out))
        umask_permissions(out)
    root = Path(args.images)
    with names.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(NAMES_HEADER)
        writer.writerows((i, _relative(files[row], root)) for i, row in enumerate(rows))
    print(f"embedded {len(rows)} {what}(s) as {tuple(embeddings.shape)}: {out} (files: {names})")
    return 0


def _writable(path: str | Path) -> Path:
    """`path` with its folder created; a folder that cannot be written is a ConfigError. The check
    leaves no empty file behind, for a command stopped before it writes one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with path.open("a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({why_unwritable(path.parent, exc)})") from None
    return path
