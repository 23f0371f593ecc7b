"""The trained model outside its run: :func:`load` for Python, :func:`export` for a self-contained folder.

``unimed.load(path)`` takes a run folder, a checkpoint folder (whatever ``unimed evaluate`` takes) or
a folder written by :func:`export`, and returns a :class:`Pretrained` on the CPU unless told
otherwise: ``encode_image`` / ``encode_text`` (projected embeddings), ``zero_shot`` (the positive /
negative prompt rule of the zero-shot evaluation, prompts from the language's prompt file),
``encode_volume`` / ``zero_shot_volume`` (CT volumes in the reports' space, read as the 3D
evaluation reads them).
Images go in as file paths (PNG, JPEG, TIFF, DICOM: the project's readers), PIL images, or numpy arrays /
tensors ((H, W) grey or (C, H, W), floats in [0, 1], or uint8 / uint16 scaled by 255 / the top of
their 12, 14 or 16 stored bits), one
or a list (a 4-D array is a batch); they are resized and centre-cropped as in the zero-shot evaluation, and
the model normalises them itself. An array it cannot read as given (float pixels outside [0, 1], NaN,
channels last) is a ValueError naming its place in the input, not an embedding of clipped pixels.
``preprocess`` / ``preprocess_volume`` do the reading alone (in a DataLoader's workers, say); every
method that takes images or volumes takes their output with ``preprocessed=True``.

An exported folder holds everything the model needs, read with local files only::

    model.safetensors      # the model's weights (image and text towers, projectors)
    checksums.json         # its SHA-256, checked on load (a truncated or overwritten file)
    config.yaml            # the run's resolved config
    text_encoder/          # the text encoder's Hugging Face config (its weights are above)
    tokenizer/             # the tokenizer the model was trained with
    prompts/               # the zero-shot prompt files (one <language>.yaml each)
    preprocess.json        # image geometry and normalisation
    unimed_export.json     # what this folder is: format version, method, source checkpoint
    README.md              # model card: training data, evaluation table
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_model

from unimed.config import CONFIG_FILE, Config, load_config, load_run_config, save_config, to_dict
from unimed.data.images import load_image, pil_grey, stored_range
from unimed.data.records import language_code
from unimed.data.reports import count_tokens
from unimed.data.transforms import eval_transform
from unimed.data.volumes import axial_slices, read_volume
from unimed.errors import ConfigError
from unimed.eval.config import repeated_class
from unimed.eval.encoders import Encoder, build_encoder, default_device, inference_ready
from unimed.eval.features import volume_spaces
from unimed.eval.prompts import PROMPT_DIR, PromptSet, corpus_stemming, load_prompts
from unimed.eval.zero_shot import own_scores, prompt_scores
from unimed.machine import describe_software, software
from unimed.methods import create_method, method_label
from unimed.models.text import check_max_length, load_text_config, load_tokenizer
from unimed.text.stemming import copy_corpus_stemming
from unimed.train.checkpoint import (
    WEIGHTS_FILE,
    WRITE_ERRORS,
    checkpoint_config,
    find_checkpoint,
    load_weights,
    training_progress,
    umask_permissions,
    unfinished,
    verify_checksums,
    weights_sha256,
    write_checksums,
    write_failure,
)

log = logging.getLogger(__name__)

EXPORT_FILE = "unimed_export.json"
EXPORT_FORMAT = 1
TEXT_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
PROMPTS_DIR = "prompts"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"})

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclasses.dataclass(frozen=True)
class ZeroShot:
    """Zero-shot result for N images and C classes: `scores` (N, C) is the margin of the positive
    over the negative prompt (> 0 calls the class present); `probabilities` (N, C) is the two-way
    softmax of the positive and negative prompt at the model's temperature."""

    classes: tuple[str, ...]
    language: str
    scores: np.ndarray
    probabilities: np.ndarray


@dataclasses.dataclass(repr=False)
class Pretrained:
    """A trained model ready for inference: its encoder, its config, where its prompts are and its
    image geometry (``image_size`` after centre-cropping a ``resize_size`` square)."""

    encoder: Encoder
    config: Config
    prompt_dir: Path
    image_size: int
    resize_size: int

    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def languages(self) -> tuple[str, ...]:
        """The languages the model has zero-shot prompts for."""
        return tuple(sorted(p.stem for p in self.prompt_dir.glob("*.yaml")))

    def __repr__(self) -> str:
        return (f"Pretrained(method={self.config.method.name!r}, image={self.config.method.image.encoder!r}, "
                f"image_size={self.image_size}, languages={self.languages}, device={str(self.device)!r})")

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """(N, 3, S, S) pixels in [0, 1] of one image or a list of them (see the module docstring):
        what the image methods take with ``preprocessed=True``."""
        items = _some([images] if _is_single(images) else list(images), "images")
        transform = eval_transform(self.image_size, self.resize_size)
        out = torch.empty(len(items), 3, self.image_size, self.image_size)
        for i, item in enumerate(items):
            out[i] = transform(_checked(_grey(item, self.resize_size, i), i))
        return out

    def preprocess_volume(self, volumes: str | Path | Sequence[str | Path]) -> torch.Tensor:
        """(N, K, 1, S, S) axial slices of CT volumes (files or folders that
        :func:`unimed.data.volumes.read_volume` reads: NIfTI, MetaImage, a DICOM series, slice
        images; one or a list) as the 3D evaluation reads them: in ``eval.volume.window``, at the
        model's depth K and side S (a native 3D model its own, a 2D model ``eval.volume.slices``
        slices at the image size). What the volume methods take with ``preprocessed=True``."""
        paths = _some([volumes] if isinstance(volumes, (str, Path)) else list(volumes), "volumes")
        cfg = self.config.eval.volume
        slices, side = self._volume_grid()
        stacks = torch.empty(len(paths), slices, 1, side, side)
        for i, path in enumerate(paths):
            volume = read_volume(Path(path).expanduser())
            stacks[i, :, 0] = axial_slices(volume, size=side, slices=slices, window=cfg.window)
        return stacks

    def _volume_grid(self) -> tuple[int, int]:
        return self.encoder.volume_grid(self.config.eval.volume.slices, self.config.data.image_size)

    def _pixels(self, images: Any, preprocessed: bool) -> torch.Tensor:
        if not preprocessed:
            return self.preprocess(images)
        return _batch_of(images, (3, self.image_size, self.image_size), "preprocess")

    def _stacks(self, volumes: Any, preprocessed: bool) -> torch.Tensor:
        if not preprocessed:
            return self.preprocess_volume(volumes)
        slices, side = self._volume_grid()
        return _batch_of(volumes, (slices, 1, side, side), "preprocess_volume")

    def encode_image(self, images: ImageInput | Sequence[ImageInput], *, normalize: bool = True,
                     batch_size: int = 64, preprocessed: bool = False) -> torch.Tensor:
        """(N, D) projected image embeddings (L2-normalised unless `normalize=False`);
        ``preprocessed=True`` takes :meth:`preprocess`'s output (e.g. from a DataLoader's workers)."""
        return self.encoder.image_features(self._pixels(images, preprocessed), normalize=normalize,
                                           batch_size=_batch_size(batch_size))

    def encode_volume(self, volumes: str | Path | Sequence[str | Path] | torch.Tensor, *,
                      normalize: bool = True, batch_size: int = 16,
                      preprocessed: bool = False) -> torch.Tensor:
        """(N, D) projected embeddings of CT volumes (as :meth:`preprocess_volume` reads them, or
        its output with ``preprocessed=True``) in the space of the reports' embeddings: a 2D model
        embeds the slices and mean-pools them (the slice-wise adapter of the 3D evaluation)."""
        stacks = self._stacks(volumes, preprocessed)
        features = volume_spaces(self.encoder, stacks, _batch_size(batch_size))["projected"]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: str | Sequence[str], language: str | None = None, *, normalize: bool = True,
                    batch_size: int = 64) -> torch.Tensor:
        """(N, D) projected text embeddings. With `language`, each text is first written as the
        model's training reports of that language were (lowercased and stemmed where they were:
        PadChest's Spanish reports are distributed stemmed), as the zero-shot prompts are; without
        it the texts are embedded as given. A text that is not a string, or holds no words, is a
        ValueError, as is a dict or a set of texts (their order is not the caller's)."""
        unordered = isinstance(texts, (Mapping, AbstractSet))
        if unordered or isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (str, Iterable)):
            why = " (a dict's keys or a set's arbitrary order would be embedded)" if unordered else ""
            raise ValueError(f"texts are a string or a sequence of strings, not {type(texts).__name__}{why}")
        texts = _some([texts] if isinstance(texts, str) else list(texts), "texts")
        wrong = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if wrong is not None:
            raise ValueError(f"texts are strings; item {wrong} is {texts[wrong]!r}")
        blank = next((i for i, text in enumerate(texts) if not count_tokens(text)), None)
        if blank is not None:  # the model would embed [CLS] [SEP] as if it were a report
            raise ValueError(f"texts hold words; item {blank} is {texts[blank]!r} (a report without "
                             "words is left out of training and evaluation too)")
        if language is not None:
            prepare = self.prompts(language).prepare
            texts = [prepare(text) for text in texts]
        return self.encoder.text_features(texts, normalize=normalize, batch_size=_batch_size(batch_size))

    def prompts(self, language: str) -> PromptSet:
        """The zero-shot prompts of `language` (its code in any case and with or without a region,
        "ES" and "es-ES" as "es"), stemmed as the run's ``eval.prompt_stemming`` says; an unknown
        language is a ConfigError naming those there are."""
        known = next((code for code in self.languages if code.lower() == language_code(language)), None)
        if known is None:
            raise ConfigError(f"unknown language '{language}': the model has prompts for "
                              f"{', '.join(self.languages) or 'no language'} (in {self.prompt_dir})")
        return load_prompts(known, self.prompt_dir, self.config.eval.prompt_stemming,
                            corpus_stemming(self.encoder.tokenizer))

    def zero_shot(self, images: ImageInput | Sequence[ImageInput], class_names: str | Sequence[str],
                  language: str = "en", *, batch_size: int = 64, preprocessed: bool = False) -> ZeroShot:
        """Per-image, per-class zero-shot scores with the prompts of `language`, by the rule of the
        zero-shot evaluation (the model's own ``zero_shot_scores`` when it has one); `class_names`
        is one class or a list of them; ``preprocessed`` as in :meth:`encode_image`."""
        classes, prompts = checked_class_names(class_names), self.prompts(language)
        pixels, batch_size = self._pixels(images, preprocessed), _batch_size(batch_size)
        if hasattr(self.model, "zero_shot_scores"):
            scores = own_scores(self.encoder, pixels, prompts, classes, batch_size)
        else:
            features = self.encoder.image_features(pixels, normalize=True, batch_size=batch_size)
            scores = prompt_scores(self.encoder, features, prompts, classes)
        return self._zero_shot(classes, language, scores)

    def zero_shot_volume(self, volumes: str | Path | Sequence[str | Path] | torch.Tensor,
                         class_names: str | Sequence[str], language: str = "en", *, batch_size: int = 16,
                         preprocessed: bool = False) -> ZeroShot:
        """Per-volume, per-class zero-shot scores of CT volumes (:meth:`encode_volume`) against the
        prompts of `language`: the cosine to "{disease}" minus the cosine to its negative prompt,
        the rule of the 2D zero-shot evaluation, in the space volume <-> report retrieval reads."""
        classes, prompts = checked_class_names(class_names), self.prompts(language)
        features = self.encode_volume(volumes, batch_size=batch_size, preprocessed=preprocessed)
        return self._zero_shot(classes, language, prompt_scores(self.encoder, features, prompts, classes))

    def _zero_shot(self, classes: tuple[str, ...], language: str, scores: np.ndarray) -> ZeroShot:
        probabilities = torch.sigmoid(torch.from_numpy(scores) / self.encoder.temperature).numpy()
        return ZeroShot(classes, language, scores, probabilities)


def checked_class_names(names: str | Sequence[str], given_as: str = "zero-shot") -> tuple[str, ...]:
    """One class name or a list of them as a tuple. None, a blank or non-string name, or a name
    given twice (ignoring case, as the prompt files' lookups do: both would get the same prompts
    and the same output column) is a ConfigError that `given_as` starts."""
    if not isinstance(names, (str, Iterable)) or isinstance(names, Mapping):  # None was a TypeError
        raise ConfigError(f"{given_as}: give a class name or a list of them, got {names!r}")
    classes = (names,) if isinstance(names, str) else tuple(names)
    if not classes:
        raise ConfigError(f"{given_as}: give at least one class name")
    blank = next((i for i, name in enumerate(classes) if not isinstance(name, str) or not name.strip()), None)
    if blank is not None:
        raise ConfigError(f"{given_as}: class names are non-empty strings, got {classes[blank]!r}")
    twice = repeated_class(classes)
    if twice is not None:
        raise ConfigError(f"{given_as}: class {twice[1]!r} is given twice (as {twice[0]!r} and {twice[1]!r}; "
                          "class names ignore case)")
    return classes


def _batch_of(pixels: Any, shape: tuple[int, ...], made_by: str) -> torch.Tensor:
    """`pixels` when it is a float tensor of shape (N, *shape), as `made_by` makes it, in float32
    (float64 was a RuntimeError from inside the model); a ValueError that says what it should be
    otherwise, or that it holds NaN or infinite values (scored as NaN before)."""
    if not (isinstance(pixels, torch.Tensor) and pixels.is_floating_point()
            and tuple(pixels.shape[1:]) == shape and pixels.ndim == len(shape) + 1 and len(pixels)):
        got = (f"a {pixels.dtype} tensor of shape {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor)
               else f"a {type(pixels).__name__}")
        sizes = ", ".join(map(str, shape))
        raise ValueError(f"preprocessed=True takes the float tensor of shape (N, {sizes}), N >= 1, that "
                         f"{made_by}() returns, got {got}")
    if not torch.isfinite(pixels).all():
        raise ValueError(f"preprocessed=True: the tensor holds NaN or infinite values (item "
                         f"{int((~torch.isfinite(pixels)).flatten(1).any(1).nonzero()[0])})")
    return pixels.float()


def _batch_size(value: Any) -> int:
    """`value` when it is a whole number >= 1; a ValueError otherwise (-1 gave an empty result)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"batch_size is a whole number >= 1, got {value!r}")
    return int(value)


def _some(items: list, what: str) -> list:
    """`items`, or a ValueError when there are none (instead of an empty result of the wrong shape,
    or an error from inside the model)."""
    if not items:
        raise ValueError(f"no {what} given (an empty list)")
    return items


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, Path, Image.Image, np.generic)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3


def _grey(image: ImageInput, resize_size: int, index: int) -> np.ndarray | torch.Tensor:
    """A grey (H, W) image in [0, 1] (or channel-first (C, H, W) as given) from any accepted input
    (`index`: its place in the input, for the errors); uint8 arrays are scaled by 255, uint16 by
    the top of the bits their pixels use (4095, 16383 or 65535, as a 16-bit file is read: 12-bit
    pixel data of pydicom, say, is not read 16 times darker), booleans are 0 and 1, other integer
    types are a ValueError: they have no fixed range (scaled by int64's maximum, a 12-bit image would
    read as black). A JPEG file decodes at the smallest DCT scale whose sides stay >= `resize_size`,
    as pre-training and evaluation read it."""
    if isinstance(image, (str, Path)):
        return load_image(Path(image).expanduser(), min_side=resize_size)
    if isinstance(image, Image.Image):
        return pil_grey(image)
    if isinstance(image, np.generic):
        image = np.asarray(image)  # a numpy scalar: its shape () is named below
    if isinstance(image, torch.Tensor):  # bfloat16 has no numpy type
        image = image.cpu().numpy() if not image.is_floating_point() else image.float()
    if isinstance(image, np.ndarray) and image.dtype.kind not in "biuf":
        raise ValueError(f"image {index}: a {image.dtype} array; pass real pixels (uint8, uint16 or "
                         "floats in [0, 1])")
    if isinstance(image, np.ndarray):
        image = np.asarray(image, order="C")  # a flipped view has negative strides torch cannot take
    if isinstance(image, np.ndarray) and image.dtype == np.bool_:
        return image.astype(np.float32)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.integer):
        if image.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"image {index}: a {image.dtype} array; pass uint8 or uint16 pixels (scaled "
                             "by 255 or by the top of their stored bits) or floats in [0, 1]: other "
                             "integer types have no fixed range")
        top = 255.0 if image.dtype == np.uint8 else stored_range(int(image.max(initial=0)))
        return image.astype(np.float32) / top
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    raise TypeError(f"an image must be a file path, a PIL image, a numpy array or a tensor, "
                    f"not {type(image).__name__}")


def _checked(image: np.ndarray | torch.Tensor, index: int) -> np.ndarray | torch.Tensor:
    """`image` ((H, W), or (C, H, W) with C = 1 or 3) when its pixels are finite and in [0, 1];
    otherwise a ValueError naming the image (its place in the input) and what is wrong, instead of
    an embedding of clipped or NaN pixels, or an error from deep in the resize."""
    shape = tuple(image.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))):
        raise ValueError(f"image {index}: an image array must be (H, W) grey or (C, H, W) with C = 1 "
                         f"or 3, got shape {shape}")
    values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if not values.size:
        raise ValueError(f"image {index}: it is empty, shape {shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"image {index}: its pixels include NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"image {index}: float pixels must lie in [0, 1], these span {low:g} .. {high:g} "
                         "(pass integers, e.g. uint8, to have them scaled by their type's maximum)")
    return image


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by :func:`export`. One that holds an export's
    preprocess.json but not its unimed_export.json is a ConfigError saying so (read as a checkpoint
    folder, it lacked "state.pt")."""
    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        return True
    if (path / PREPROCESS_FILE).is_file():
        raise ConfigError(f"{path} holds an exported model's {PREPROCESS_FILE} but no {EXPORT_FILE}, "
                          "which says what the folder is: copy it from the export, or export the "
                          "run again")
    return False


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Pretrained:
    """The trained model at `path` (an exported folder, a run folder or a checkpoint folder) on
    `device` (default: the CPU), in eval mode, with local files only ("~/runs/demo" is under the
    home folder, as are image and volume paths "~/...")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"no model at {path}: the folder does not exist")
    device = _usable_device(device)
    if is_export(path):
        return _load_export(path, device)
    try:
        checkpoint = find_checkpoint(path)
        cfg = load_run_config(checkpoint_config(checkpoint))
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc} (or a folder written by `unimed export`)") from None
    return _load_run(cfg, checkpoint, device)


def _usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine can put a tensor on; a ConfigError naming it
    otherwise (not a device name, no CUDA device, no such device)."""
    name = str(device)
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):  # TypeError: None, a number of the wrong kind
        raise ConfigError(f"device {name!r} is not a torch device name (cpu, cuda, cuda:1, ...)") from None
    if checked.type == "meta":  # holds shapes, not values: the model's weights would be gone
        raise ConfigError(f"device {name!r} holds no data, only shapes (use cpu or cuda)")
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no usable CUDA device (use cpu)")
    if checked.type == "cuda" and (checked.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=checked)
    except (RuntimeError, AssertionError, NotImplementedError):
        raise ConfigError(f"device {name!r}: this torch build or machine cannot run on it (use cpu)") from None
    return checked


def _load_run(cfg: Config, checkpoint: Path, device: torch.device) -> Pretrained:
    from unimed.commands.train import text_encoder_dir, trained_tokenizer_dir

    unfinished(checkpoint)  # said, not refused: an early checkpoint may be what is wanted
    method_cfg = dataclasses.replace(cfg.method, image=dataclasses.replace(cfg.method.image, weights=None))
    name = cfg.method.name
    encoder = build_encoder(name, method_label(name), method_cfg, text_encoder=text_encoder_dir(cfg),
                            tokenizer=trained_tokenizer_dir(cfg, checkpoint), weights=checkpoint,
                            seed=cfg.run.seed, max_length=cfg.data.max_length, device=device)
    prompt_dir = Path(cfg.eval.zero_shot.prompt_dir or PROMPT_DIR)
    return Pretrained(encoder, cfg, prompt_dir, cfg.data.image_size, cfg.data.resize_size)


def _load_export(folder: Path, device: torch.device, *, for_inference: bool = False,
                 max_length: int | None = None) -> Pretrained:
    """The exported model in `folder`; with `for_inference`, its encoder as the evaluation builds
    one (:func:`unimed.eval.encoders.build_encoder`'s `for_inference`); texts tokenized to
    `max_length` (default: the export's ``data.max_length``)."""
    meta = _read_json(folder / EXPORT_FILE)
    if meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{folder / EXPORT_FILE}: export format {meta.get('format')!r}, this "
                          f"version of unimed reads format {EXPORT_FORMAT}")
    cfg = load_config(folder / CONFIG_FILE)
    preprocess = _read_json(folder / PREPROCESS_FILE)
    for file in (WEIGHTS_FILE, f"{TEXT_DIR}/config.json"):
        if not (folder / file).is_file():
            raise ConfigError(f"exported model {folder} has no {file}")
    verify_checksums(folder, (WEIGHTS_FILE,))
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    text_config = load_text_config(folder / TEXT_DIR)
    image = dataclasses.replace(cfg.method.image, weights=None, compile=False)
    method_cfg = dataclasses.replace(cfg.method, image=image)
    method = create_method(method_cfg, vocab_size=len(tokenizer), text_encoder=text_config)
    max_length = cfg.data.max_length if max_length is None else max_length
    check_max_length(max_length, method.model.text)
    load_weights(method.model, folder / WEIGHTS_FILE)
    model = inference_ready(method.model) if for_inference else method.model
    name = cfg.method.name
    encoder = Encoder(name, method_label(name), model, tokenizer, max_length, device,
                      float(model.temperature))
    image_size, resize_size = (_size(preprocess, key, folder / PREPROCESS_FILE)
                               for key in ("image_size", "resize_size"))
    return Pretrained(encoder, cfg, folder / PROMPTS_DIR, image_size, resize_size)


def _size(preprocess: dict, key: str, path: Path) -> int:
    """`preprocess[key]`, an image side in pixels; a ConfigError naming `path` and `key` otherwise."""
    value = preprocess.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: {key} must be a side in pixels (an integer >= 1), got {value!r}")
    return value


def export_encoder(folder: str | Path, max_length: int) -> Encoder:
    """The encoder of the exported model in `folder` as `unimed evaluate` evaluates a run's
    checkpoint: on the evaluation's device, its image backbone made ready for inference, texts
    tokenized to `max_length` (``data.max_length``, overrides applied, as for a run)."""
    return _load_export(Path(folder), default_device(), for_inference=True, max_length=max_length).encoder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def export(run: str | Path, out: str | Path) -> Path:
    """Write the model of `run` (a run or checkpoint folder) as a self-contained folder `out`
    (see the module docstring); returns `out`. `out` must be new or empty."""
    run, out = Path(run), Path(out)
    if is_export(run):
        raise ConfigError(f"{run} is already an exported model; copy the folder instead")
    pretrained = load(run)
    checkpoint = find_checkpoint(run)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export folder {out} already exists and is not empty; choose a new one")
    card = model_card(pretrained, checkpoint)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"  # renamed to `out` once whole
    try:
        partial.mkdir(parents=True)
        _write_export(pretrained, checkpoint, partial, card)
        if out.is_dir():
            out.rmdir()
        partial.rename(out)
    except WRITE_ERRORS as exc:
        raise ConfigError(f"cannot write the export folder {out} ({write_failure(exc)})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("exported %s to %s", checkpoint, out)
    return out


def _write_export(pretrained: Pretrained, checkpoint: Path, out: Path, card: str) -> None:
    model, cfg = pretrained.model, pretrained.config
    save_model(model, str(out / WEIGHTS_FILE))
    umask_permissions(out / WEIGHTS_FILE)
    write_checksums(out, (WEIGHTS_FILE,))
    save_config(_as_exported(cfg, checkpoint), out)
    model.text.config.save_pretrained(str(out / TEXT_DIR))
    pretrained.encoder.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    copy_corpus_stemming(pretrained.encoder.tokenizer.name_or_path, out / TOKENIZER_DIR)
    (out / PROMPTS_DIR).mkdir()
    for prompt_file in sorted(pretrained.prompt_dir.glob("*.yaml")):
        shutil.copyfile(prompt_file, out / PROMPTS_DIR / prompt_file.name)
    preprocess = {
        "input": "grey image, pixels scaled to [0, 1] by bit depth (16-bit: the 12, 14 or 16 bits its "
                 "pixels use; DICOM: its VOI LUT or window, "
                 "else BitsStored; MONOCHROME1 inverted), repeated to 3 channels",
        "resize_size": pretrained.resize_size,
        "image_size": pretrained.image_size,
        "geometry": "resize to resize_size x resize_size, then centre crop image_size",
        "mean": model.pixel_mean.flatten().tolist(),
        "std": model.pixel_std.flatten().tolist(),
    }
    _write_json(out / PREPROCESS_FILE, preprocess)
    _write_json(out / EXPORT_FILE, {"format": EXPORT_FORMAT, "method": cfg.method.name,
                                    "checkpoint": checkpoint.name})
    (out / CARD_FILE).write_text(card, encoding="utf-8")


def _as_exported(cfg: Config, checkpoint: Path) -> Config:
    """`cfg` as the export saves it: a text encoder that the run trained from its own MLM output
    stays unnamed, as the run saved it (:func:`unimed.config.load_run_config` names that folder by
    its path on this machine, which the export neither holds nor needs: it holds the encoder)."""
    if load_config(checkpoint_config(checkpoint)).method.text.encoder is not None:
        return cfg
    text = dataclasses.replace(cfg.method.text, encoder=None)
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, text=text))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def find_metrics(checkpoint: Path) -> Path | None:
    """The metrics.json of the run that wrote `checkpoint` (first one above it), if evaluated."""
    for folder in checkpoint.resolve().parents:
        if (folder / METRICS_FILE).is_file():
            return folder / METRICS_FILE
    return None


def model_card(pretrained: Pretrained, checkpoint: Path) -> str:
    """The exported folder's README.md: what the model is, how to use it, what it was trained on
    and, when the run was evaluated, its evaluation tables."""
    from unimed.eval.report import format_tables, read_metrics

    cfg = pretrained.config
    settings = to_dict(cfg)
    name = method_label(cfg.method.name)
    step, last = training_progress(checkpoint)
    progress = (f" That is step {step} of the {last} its run trains: training did not finish."
                if last is not None and step < last else "")
    lines = [
        f"# {name} model `{cfg.run.name}`", "",
        f"Exported by unimed from checkpoint `{checkpoint.name}` of run `{cfg.run.name}`.{progress}", "",
        "## Use", "",
        "```python", "import unimed", "model = unimed.load(\"path/to/this/folder\")",
        "result = model.zero_shot([\"image.png\"], [\"pleural effusion\"], language=\"en\")",
        "```", "",
        "```", "unimed classify path/to/this/folder IMAGES --classes \"pleural effusion,pneumonia\" "
        "--language en --out scores.csv",
        "unimed evaluate path/to/this/folder data.root=DATA   # the downstream protocol, on your data",
        "```", "",
        "## Model", "",
        f"- method: {name} (`method.name={cfg.method.name}`)",
        f"- image encoder: `{cfg.method.image.encoder}`, input {pretrained.image_size} px "
        f"(resize {pretrained.resize_size}, centre crop)",
        f"- text encoder: {pretrained.model.text.config.num_hidden_layers} layers, width "
        f"{pretrained.model.text.config.hidden_size}, vocabulary {len(pretrained.encoder.tokenizer)}",
        f"- zero-shot prompt languages: "
        f"{', '.join(sorted(p.stem for p in pretrained.prompt_dir.glob('*.yaml')))}",
        f"- exported with: {describe_software(software())}", "",
        "## Training data", "",
        f"- data root: `{cfg.data.root}`",
        f"- pre-training datasets: {', '.join(cfg.data.pretrain_datasets)}",
        f"- text-stage corpora: {', '.join(cfg.data.text_datasets) or 'the pre-training datasets'} "
        f"(splits: {', '.join(cfg.data.text_splits)})",
        f"- training: {settings['train'].get('epochs')} epoch(s), batch size "
        f"{settings['train'].get('batch_size')}, seed {cfg.run.seed}", "",
    ]
    metrics_file = find_metrics(checkpoint)
    lines += ["## Evaluation", ""]
    try:
        metrics = None if metrics_file is None else read_metrics(metrics_file)
    except ConfigError as exc:
        log.warning("the model card has no evaluation tables: %s", exc)
        lines += [f"The run's `{METRICS_FILE}` could not be read; run `unimed evaluate` on it.", ""]
        return "\n".join(lines)
    if metrics is None:
        lines += ["The run was not evaluated (no metrics.json); run `unimed evaluate` on it.", ""]
    else:
        lines += [f"From the run's `{METRICS_FILE}` (data root `{metrics.get('data_root')}`); "
                  "values in %, 95 % bootstrap intervals in brackets.", ""]
        if isinstance(metrics.get("software"), dict):
            lines += [f"Evaluated with: {describe_software(metrics['software'])}.", ""]
        weights = metrics.get("weights") if isinstance(metrics.get("weights"), dict) else {}
        evaluated = weights.get(cfg.method.name)
        if not isinstance(evaluated, dict):  # an evaluation from before unimed recorded its weights
            lines += ["The run's evaluation does not record which weights it measured (its checkpoint: "
                      f"`{metrics.get('checkpoint')}`): evaluate this folder to be sure the tables are "
                      "its own.", ""]
        elif evaluated.get("sha256") != weights_sha256(checkpoint):
            lines += [f"**These tables were measured on other weights** (`{evaluated.get('path')}`) than "
                      f"the exported checkpoint `{checkpoint.name}`: evaluate this folder for its own.", ""]
        for title, header, rows in format_tables(metrics):
            lines += [f"### {title}", "", _markdown_row(header),
                      _markdown_row(["---"] * len(header)), *(_markdown_row(r) for r in rows), ""]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
