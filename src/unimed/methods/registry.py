"""The method registry: ``method.name`` in the config names one entry, which gives the class of the
method's config section and, imported only when a method is built, its builder.

This module imports nothing heavy, so reading a config never loads torch models.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Protocol

from unimed.errors import ConfigError
from unimed.registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class MethodConfig(Protocol):
    """What every method's config section has: the method's registered name."""

    name: str


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config section class, its builder ("module:function", called as
    ``builder(cfg, vocab_size=..., text_encoder=...)``) and the label tables show."""

    config: type
    builder: str
    label: str


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, config: type, builder: str, label: str) -> None:
    """Add a method to :data:`METHODS`."""
    METHODS.register(name)(MethodSpec(config, builder, label))


def method_label(name: str) -> str:
    """The display name of the registered method `name` (e.g. "Med-UniC")."""
    return METHODS.get(name).label


def create_method(cfg: MethodConfig, *, vocab_size: int | None = None,
                  text_encoder: str | PretrainedConfig | None = None) -> Any:
    """Build the method registered as ``cfg.name`` (a :class:`unimed.methods.base.Method`).

    `vocab_size` is the tokenizer's size; `text_encoder` (a local Hugging Face folder, e.g. the MLM
    stage's output) overrides the config's text encoder; a Hugging Face config object instead builds
    an uninitialised text encoder of that architecture, for weights loaded next (an exported model).
    """
    module, function = METHODS.get(cfg.name).builder.split(":")
    build = getattr(importlib.import_module(module), function)
    try:
        return build(cfg, vocab_size=vocab_size, text_encoder=text_encoder)
    except ConfigError:
        raise
    except ValueError as exc:  # a setting checkable only on the built model (a level count, a stride)
        raise ConfigError(str(exc)) from None
