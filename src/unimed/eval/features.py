"""Frozen features of each encoder, computed once per evaluation run and shared by every task.

Evaluation trains only small heads on a frozen encoder, so the encoder's forward passes are the
part worth sharing: segmentation and detection read one split's dense maps, zero-shot, retrieval
and the bias audit the same test images' embeddings, retrieval and the bias audit the same reports,
the zero-shot sets the prompts of the classes they share.
:class:`FeatureCache` keys them

* dense maps by (encoder, dataset, split, "full" geometry, image size): every level the encoder
  offers (:func:`unimed.eval.dense.dense_features`, float16);
* image embeddings by (encoder, dataset, split, geometry, image size): a whole split, both
  ``"pooled"`` (F_v) and ``"projected"`` (P_v F_v) from one pass of the tower, unnormalised
  float32 rows in record order;
* text embeddings by encoder and the text itself, both spaces from one pass;
* volume embeddings by (encoder, dataset, split, slices, window, image size): the slice-wise
  adapter, the mean over a volume's axial slices of their embeddings (pooled F_v) and the
  projection of that mean (P_v), so a 2D encoder has a volume embedding in both spaces.

Everything lives in memory on the CPU, sized for the phantom's and the papers' test sets (a few
thousand images), not for embedding a whole pre-training corpus (a volume split too large to hold
streams through the encoder, and only its embeddings stay); the runner releases an encoder's
entries once its last task is done (:meth:`FeatureCache.release`), so the cache holds one encoder
at a time. With ``enabled=False`` every call computes afresh (what the tests compare the cached
path against). Every pass the cache computes is listed in :attr:`FeatureCache.passes` with its
seconds, in this process (what ``benchmarks/eval_speed.py --passes`` prints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import torch

from unimed.eval.data import EvalData, rgb
from unimed.eval.dense import GEOMETRY, Maps, dense_features, select_levels
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError

log = logging.getLogger(__name__)

SPACES = ("pooled", "projected")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise EvalError(f"unknown feature space {space!r}; valid: {', '.join(SPACES)}")


@dataclasses.dataclass(frozen=True)
class FeaturePass:
    """One pass of an encoder that the cache computed: `kind` (maps, images, volumes,
    volume_maps or texts), what it read (dataset and split, or how many texts) and its seconds."""

    encoder: str
    kind: str
    what: str
    seconds: float


class FeatureCache:
    """Dense maps, image and text embeddings of each encoder, computed on first use."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.passes: list[FeaturePass] = []  # kept when an encoder's features are released
        self._maps: dict[tuple, Maps] = {}
        self._images: dict[tuple, dict[str, torch.Tensor]] = {}
        self._texts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._volumes: dict[tuple, dict[str, torch.Tensor]] = {}
        self._volume_maps: dict[tuple, Maps] = {}

    def release(self, name: str) -> None:
        """Forget every feature of the encoder called `name` (it has run its last task)."""
        for store in (self._maps, self._images, self._volumes, self._volume_maps):
            for key in [k for k in store if k[0] == name]:
                del store[key]
        self._texts.pop(name, None)

    @contextlib.contextmanager
    def _timed(self, encoder: Encoder, kind: str, what: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.passes.append(FeaturePass(encoder.name, kind, what, time.perf_counter() - start))

    def maps(self, encoder: Encoder, data: EvalData, dataset: str, split: str, *, min_stride: int,
             size: int, batch_size: int) -> Maps:
        """Maps of stride >= `min_stride` of `data.images(dataset, split, "full", size)`, shallow
        to deep (one encoder pass per dataset split and image size, whichever task asks first)."""
        key = (encoder.name, dataset, split, GEOMETRY, size)
        maps = self._maps.get(key)
        if maps is None:
            log.debug("dense features of %s on %s/%s at %d px", encoder.name, dataset, split, size)
            allocate = data.allocator(encoder.name, dataset, split, size, "maps",
                                      what=f"{encoder.name}'s maps of {dataset}/{split}")
            with self._timed(encoder, "maps", f"{dataset}/{split} at {size} px"):
                maps = dense_features(encoder, data.images(dataset, split, GEOMETRY, size), batch_size,
                                      allocate=allocate)
            if self.enabled:
                self._maps[key] = maps
        return select_levels(maps, size, min_stride)

    def images(self, encoder: Encoder, data: EvalData, dataset: str, split: str | None, *,
               space: str, geometry: str = "crop", batch_size: int) -> torch.Tensor:
        """(N, D) embeddings of `data.images(dataset, split, geometry)`, unnormalised; both spaces
        are kept from the one pass of the image tower that computes either."""
        _check_space(space)
        key = (encoder.name, dataset, split, geometry, data.image_size)
        spaces = self._images.get(key)
        if spaces is None:
            log.debug("image features of %s on %s/%s", encoder.name, dataset, split)
            with self._timed(encoder, "images", f"{dataset}/{split}"):
                images = rgb(data.images(dataset, split, geometry))  # (N, 3, S, S)
                spaces = encoder.image_spaces(images, batch_size=batch_size)
            if self.enabled:
                self._images[key] = spaces
        return spaces[space]

    def volumes(self, encoder: Encoder, data: EvalData, dataset: str, split: str, *, space: str,
                slices: int, window: tuple[float, float], batch_size: int) -> torch.Tensor:
        """(N, D) embeddings of the volumes of `dataset`/`split`: a native 3D encoder's own
        (:meth:`Encoder.volume_spaces`, the volumes read at its own depth,
        :meth:`Encoder.volume_grid`), else through the slice-wise adapter: pooled = the mean of
        the slices' pooled features, projected = P_v of that mean. A split too large to hold
        streams (:meth:`EvalData.stack_pieces`): only its embeddings are kept."""
        _check_space(space)
        slices, side = encoder.volume_grid(slices, data.image_size)
        key = (encoder.name, dataset, split, slices, tuple(window), side)
        spaces = self._volumes.get(key)
        if spaces is None:
            with self._timed(encoder, "volumes", f"{dataset}/{split}"):
                parts = [(indices, volume_spaces(encoder, stacks, batch_size))
                         for indices, stacks in data.stack_pieces(dataset, split, slices, window, side)]
                spaces = _in_record_order(parts)
            if self.enabled:
                self._volumes[key] = spaces
        return spaces[space]

    def volume_maps(self, encoder: Encoder, data: EvalData, dataset: str, split: str, *, depth: int,
                    window: tuple[float, float], min_stride: int, batch_size: int) -> Maps:
        """3D maps (:meth:`Encoder.volume_maps`) of the labelled volumes of `dataset`/`split`."""
        key = (encoder.name, dataset, split, depth, tuple(window), min_stride, data.image_size)
        maps = self._volume_maps.get(key)
        if maps is None:
            allocate = data.allocator(*key, what=f"{encoder.name}'s 3D maps of {dataset}/{split}")
            with self._timed(encoder, "volume_maps", f"{dataset}/{split}"):
                volumes, _ = data.labelled_volumes(dataset, split, depth, window)  # (N, D, S, S)
                maps = encoder.volume_maps(volumes[:, :, None], batch_size=batch_size, min_stride=min_stride,
                                           allocate=allocate)
            if self.enabled:
                self._volume_maps[key] = maps
        return maps

    def texts(self, encoder: Encoder, texts: Sequence[str], *, space: str, batch_size: int
              ) -> torch.Tensor:
        """(N, D) embeddings of `texts` in order, unnormalised; each distinct text is encoded once
        per encoder over the whole run, both spaces from one pass of the text tower."""
        _check_space(space)
        if not self.enabled:
            with self._timed(encoder, "texts", f"{len(texts)} texts"):
                return encoder.text_spaces(texts, batch_size=batch_size)[space]
        known = self._texts.setdefault(encoder.name, {})
        # Length-sorted batches pad less (each batch is padded to its longest text).
        missing = sorted((t for t in dict.fromkeys(texts) if t not in known), key=len)
        if missing:
            with self._timed(encoder, "texts", f"{len(missing)} texts"):
                spaces = encoder.text_spaces(missing, batch_size=batch_size)
            known.update(zip(missing, zip(spaces["pooled"], spaces["projected"])))
        if not texts:
            return torch.empty(0)
        column = SPACES.index(space)
        return torch.stack([known[t][column] for t in texts])


def _in_record_order(parts: list[tuple[list[int], dict[str, torch.Tensor]]]
                     ) -> dict[str, torch.Tensor]:
    """The spaces of the pieces (record indices, {space: rows in their order}) of one split,
    as one tensor per space in record order."""
    if len(parts) == 1:
        return parts[0][1]
    order = torch.tensor([i for indices, _ in parts for i in indices]).argsort()
    return {space: torch.cat([spaces[space] for _, spaces in parts])[order] for space in SPACES}


def volume_spaces(encoder: Encoder, stacks: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """{"pooled", "projected"} (N, D) embeddings of (N, K, 1, S, S) slice stacks read at
    :meth:`Encoder.volume_grid`: a native 3D encoder's own, else the slice-wise adapter's."""
    return (encoder.volume_spaces(stacks, batch_size=batch_size)
            or _slice_wise_spaces(encoder, stacks, batch_size))


def _slice_wise_spaces(encoder: Encoder, stacks: torch.Tensor, batch_size: int
                       ) -> dict[str, torch.Tensor]:
    """The slice-wise adapter's volume embeddings: pooled = the mean of the (N, K) slices' pooled
    features, projected = P_v of that mean."""
    n, k = stacks.shape[:2]
    flat = encoder.image_spaces(rgb(stacks.flatten(0, 1)), batch_size=batch_size)["pooled"]
    pooled = flat.view(n, k, -1).mean(1) if n else flat  # (N, D_v)
    with torch.no_grad():
        projected = encoder.model.project_image(pooled.to(encoder.device)).float().cpu()
    return {"pooled": pooled, "projected": projected}
