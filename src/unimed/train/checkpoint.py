"""Checkpoint I/O of training and evaluation: weights in safetensors, training state in a
weights_only-loadable `.pt` beside them, and finding a run's checkpoint and config.

Layout under a run's checkpoint folder::

    step_00000120/model.safetensors   # method.state_dict(): the model under "model.", the
                                      # method's other modules and buffers beside it
    step_00000120/state.pt            # optimizer, scheduler, scaler, counters, RNG states
    step_00000120/checksums.json      # SHA-256 of the two files above
    latest                            # the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, fsynced, then renamed into place, and `latest` is
replaced the same way, so a crash mid-write leaves the previous checkpoint and pointer intact; a
failed save is one CheckpointError line. Reading checks the checksums, so a truncated or corrupt
file is named; resuming then falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from unimed.config import CONFIG_FILE
from unimed.models.heads import statistic_before_domains

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKSUM_FILE = "checksums.json"
LATEST_FILE = "latest"
CHECKPOINT_DIR = "checkpoints"  # a training stage's checkpoints folder
TEXT_MODEL_FILE = "config.json"  # a transformers model folder's (the MLM stage writes one)
PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
# What reading a truncated or corrupt weights / state file raises.
_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, struct.error,
                SafetensorError)
# What a failed write (full disk, read-only folder) raises: safetensors has its own error for it.
WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file."""


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason ("No space left on device"), or the
    first line of the error that safetensors raises instead of an OSError."""
    return getattr(exc, "strerror", None) or _first_line(exc)


def umask_permissions(*paths: str | Path) -> None:
    """Give each file the permissions a plain ``open()`` gives a new file (0o666 less the umask).

    safetensors 0.8 writes through a temporary file that is created 0o600 and renamed into place
    (safetensors/safetensors#782, open), so a model file came out readable by its owner only while
    the config beside it is readable by all: a run or export shared on a lab server, or copied into
    a container that runs as another user, could not be loaded there. Call it on every file that
    safetensors (or transformers' ``save_pretrained``) writes. No-op where there are no POSIX modes.
    """
    if os.name != "posix":
        return
    mask = os.umask(0)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and (when present) CUDA generator states as tensors, ints and floats,
    so the `.pt` file loads with `weights_only=True`."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states written by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_writable(folder: str | Path) -> None:
    """Create `folder` and a file in it (removed again), or fail with one CheckpointError line, so
    a run that could not save its checkpoints stops before it trains."""
    folder = Path(folder)
    probe = folder / f"{_TMP_PREFIX}probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoints to {folder} ({exc.strerror or exc}); "
                              "set run.output_dir to a writable folder") from None


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps (sorts by step)."""
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2
) -> Path:
    """Atomically write weights + `state` as checkpoint `step`, point `latest` at it, and keep only
    the newest `keep` checkpoints; returns the checkpoint folder.

    `state` must hold only tensors, numbers, strings, lists and dicts (weights_only loading).
    A save that fails (unwritable folder, full disk) raises one CheckpointError line and leaves
    the previous checkpoint and `latest` as they were.
    """
    root = Path(root)
    name = checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS_FILE))
        umask_permissions(tmp / WEIGHTS_FILE)
        _save_state(state, tmp / STATE_FILE)
        write_checksums(tmp, (WEIGHTS_FILE, STATE_FILE))
        for file in (WEIGHTS_FILE, STATE_FILE, CHECKSUM_FILE):
            _fsync_file(tmp / file)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_pointer(root, name)
    except BaseException as exc:  # whatever stopped the write, its half-written folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, WRITE_ERRORS):
            raise
        previous = root / LATEST_FILE
        kept = (f"the previous checkpoint {previous.read_text(encoding='utf-8').strip()} is intact"
                if previous.is_file() else "no earlier checkpoint exists")
        raise CheckpointError(f"cannot save checkpoint {final} ({write_failure(exc)}); {kept}") from None
    _prune(root, keep, final)
    log.info("saved checkpoint %s", final)
    return final


def _save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` of `state` to `path`, a failed write raised as the OSError it is.

    Given a path, torch's zip writer reports a full disk as "RuntimeError: enforce fail at
    inline_container.cc ... unexpected pos"; given a Python file, the OSError comes first and the
    writer's RuntimeError while closing the archive hides it (its ``__context__``).
    """
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def checkpoints(root: str | Path) -> list[Path]:
    """The checkpoint folders under `root` (none when it does not exist), lowest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete all but `current` (the checkpoint just written) and the `keep` - 1 newest others,
    and leftovers of interrupted writes. `current` stays whatever its step: a run started afresh
    in a folder holding an earlier, longer run's checkpoints must not delete what it writes."""
    others = [p for p in checkpoints(root) if p != current]
    for old in others[: max(0, len(others) - (max(1, keep) - 1))]:
        shutil.rmtree(old)
    for stale in root.glob(f"{_TMP_PREFIX}{PREFIX}*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> Path:
    """`path` when its weights and state files are there and match the checksums written with
    them; else one CheckpointError line naming the file. Checkpoints written before checksums
    existed are only checked for presence."""
    path = Path(path)
    for file in (WEIGHTS_FILE, STATE_FILE):
        if not (path / file).is_file():
            raise CheckpointError(f"checkpoint {path} is missing or incomplete: no {file}")
    verify_checksums(path, (WEIGHTS_FILE, STATE_FILE))
    return path


def write_checksums(folder: Path, files: tuple[str, ...]) -> None:
    """`CHECKSUM_FILE` in `folder`: the SHA-256 of each of its `files`."""
    sums = {file: _sha256(folder / file) for file in files}
    (folder / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")


def verify_checksums(folder: Path, files: tuple[str, ...]) -> None:
    """One CheckpointError line naming the first of `files` in `folder` whose SHA-256 differs from
    the one its `CHECKSUM_FILE` holds; nothing to check in a folder written before checksums were."""
    sums_file = folder / CHECKSUM_FILE
    if not sums_file.is_file():
        return
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {sums_file}: {_first_line(exc)}") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"cannot read {sums_file}: not a JSON object")
    for file in files:
        if sums.get(file) != _sha256(folder / file):
            raise CheckpointError(f"{folder / file} is truncated or corrupt: its SHA-256 differs "
                                  f"from the one in {CHECKSUM_FILE}")


def weights_sha256(folder: Path) -> str:
    """SHA-256 of the weights in a checkpoint or exported model `folder`: the one its
    `CHECKSUM_FILE` holds (checked when the weights are loaded), else computed."""
    try:
        sums = json.loads((folder / CHECKSUM_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sums = None
    if isinstance(sums, dict) and isinstance(sums.get(WEIGHTS_FILE), str):
        return sums[WEIGHTS_FILE]
    return _sha256(folder / WEIGHTS_FILE)


def latest_checkpoint(root: str | Path, *, fallback: bool = False) -> Path | None:
    """The checkpoint that `latest` names, checked (:func:`verify_checkpoint`); None when there is
    none yet.

    When that checkpoint is missing, truncated or corrupt: a CheckpointError naming the file, or
    with `fallback` the newest intact checkpoint under `root`, said in one warning line (an error
    when none is intact).
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    try:
        if not name or "/" in name or name in (".", ".."):
            raise CheckpointError(f"{pointer} names no checkpoint folder ({name!r}): it should hold "
                                  f"the newest one's name, such as {checkpoint_name(0)}")
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
        return verify_checkpoint(path)
    except CheckpointError as exc:
        if not fallback:
            raise
        problem = str(exc)
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                         and p.name != path.name), reverse=True)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        log.warning("%s; resuming from the newest intact checkpoint %s instead", problem, candidate)
        return candidate
    raise CheckpointError(f"{problem}; no other intact checkpoint under {root}")


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of checkpoint folder `path`, read with `torch.load(weights_only=True)`."""
    return _read_state(verify_checkpoint(path), map_location)


def _read_state(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location=map_location, weights_only=True, mmap=mmap)
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot read {path / STATE_FILE} (truncated or corrupt?): "
                              f"{_first_line(exc)}") from None


def training_progress(path: str | Path) -> tuple[int, int | None]:
    """(step, last step its run was to train to) of checkpoint folder `path`, read without loading
    its optimizer state; the last step is None for a checkpoint written before it was recorded."""
    state = _read_state(Path(path), mmap=True)
    return int(state["step"]), state.get("last_step")


def unfinished(path: str | Path) -> str | None:
    """A line saying that checkpoint `path` is not its run's last step (training was stopped or is
    still running), logged as a warning; None when it is (or its checkpoint does not say)."""
    step, last = training_progress(path)
    if last is None or step >= last:
        return None
    line = (f"checkpoint {path} is step {step} of the {last} its run trains: training stopped early "
            "or is still running (`--resume` continues it)")
    log.warning(line)
    return line


def load_checkpoint(
    path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load the weights of checkpoint folder `path` into `model` (strict) and return its state dict."""
    state = load_state(path, map_location)
    load_weights(model, Path(path) / WEIGHTS_FILE)
    return state


def load_weights(model: nn.Module, file: str | Path) -> None:
    """Load a safetensors weights file into `model`, failing on an unreadable file, on tensors
    that do not fit (:func:`weights_mismatch`) or on NaN or infinite values (a file overwritten
    with other bytes where no checksum says so: every output would be NaN) with one
    CheckpointError line naming the file."""
    check_weights_fit(model, file)
    device = next(iter(model.state_dict().values())).device
    try:
        load_model(model, str(file), strict=True, device=str(device))
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot load weights from {file}: {_first_line(exc)}") from None
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise CheckpointError(f"the weights in {file} hold NaN or infinite values ({len(broken)} "
                              f"tensor(s), e.g. {broken[0]}): the file is corrupt, or was saved "
                              "from a run that diverged")


def check_weights_fit(model: nn.Module, file: str | Path) -> None:
    """One CheckpointError line naming `file` when its tensors do not fit `model`
    (:func:`weights_mismatch`)."""
    mismatch = weights_mismatch(model, file)
    if mismatch is not None:
        raise CheckpointError(f"the weights in {file} do not fit the model ({mismatch}): they were "
                              "trained under other method settings (method.name, image encoder, "
                              "text encoder, sizes) than this config's")


def weights_mismatch(model: nn.Module, file: str | Path) -> str | None:
    """How the tensors in the safetensors file `file` differ from `model`'s in name or shape, read
    from the file's header (the counts and the first tensor that differs), or None where they fit;
    an unreadable file is one CheckpointError line naming it. A tensor of `model` that shares its
    storage with one in the file (tied weights, which safetensors saves once) is not missing."""
    try:
        with safe_open(str(file), "pt") as stored:
            held = {name: list(stored.get_slice(name).get_shape()) for name in stored.keys()}
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot load weights from {file}: {_first_line(exc)}") from None
    state = model.state_dict()
    saved_storage = {state[name].data_ptr() for name in held.keys() & state.keys()}
    differ = sorted(name for name in held.keys() & state.keys() if held[name] != list(state[name].shape))
    missing = sorted(name for name in state.keys() - held.keys()
                     if state[name].data_ptr() not in saved_storage
                     and statistic_before_domains(name) not in held)  # filled on load
    extra = sorted(held.keys() - state.keys())
    if not (differ or missing or extra):
        return None
    if differ:
        first = f"{differ[0]} is {held[differ[0]]} there and {list(state[differ[0]].shape)} here"
    else:
        first = f"{missing[0]} is not there" if missing else f"{extra[0]} is not here"
    return (f"{len(differ)} tensors of another shape, {len(missing)} missing, {len(extra)} "
            f"unexpected; {first}")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder (holding model.safetensors) that `path` names.

    `path` may be the checkpoint folder itself, a `checkpoints/` folder (its `latest`) or that
    `latest` file, a pre-training output folder (`pretrain/`) or a run folder (`runs/<name>`). A
    missing, truncated or corrupt file of the checkpoint found is a CheckpointError naming it.
    """
    path = Path(path)
    if path.name == LATEST_FILE and path.is_file():  # the pointer file itself: its checkpoints folder
        path = path.parent
    stage = path.parent if path.name == CHECKPOINT_DIR else (
        path.parent.parent if path.parent.name == CHECKPOINT_DIR else path)
    if (stage / TEXT_MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: {stage} is a text encoder (a transformers model folder, as "
            f"`unimed mlm` writes one), not a pre-trained image-text model; give the run folder "
            f"({stage.parent}) or its pretrain/checkpoints")
    if (path / WEIGHTS_FILE).is_file():
        return verify_checkpoint(path)
    for folder in (path, path / CHECKPOINT_DIR, path / "pretrain" / CHECKPOINT_DIR):
        if (folder / LATEST_FILE).is_file():
            found = latest_checkpoint(folder)
            if found is not None:
                return found
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a folder with {WEIGHTS_FILE}, a checkpoints folder "
        f"with a '{LATEST_FILE}' file, or a run folder holding pretrain/checkpoints"
    )


def checkpoint_config(checkpoint: str | Path) -> Path:
    """The resolved config.yaml saved with the run that wrote `checkpoint` (first one above it)."""
    checkpoint = Path(checkpoint).resolve()
    for folder in (checkpoint, *checkpoint.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    raise FileNotFoundError(f"no {CONFIG_FILE} in {checkpoint} or the folders above it")
