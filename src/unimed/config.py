"""Typed, frozen configuration: YAML presets layered over defaults, then dotted CLI overrides.

Every section is a frozen dataclass owned by the module that uses it; :class:`Config` composes them.
The `method` section is the config class of the method `method.name` names (see
:mod:`unimed.methods`). Unknown keys fail with the list of valid keys, so a typo never silently does
nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from pathlib import Path, PurePath
from typing import Any, TypeVar

import yaml

from unimed import yaml_files
from unimed.bounds import PATH_OPTION, check_bounds, path_option
from unimed.data.config import DataConfig
from unimed.errors import ConfigError, yaml_problem
from unimed.eval.config import EvalConfig
from unimed.methods import METHODS, MethodConfig
from unimed.models.config import MedUniCConfig
from unimed.phantom.config import PhantomConfig
from unimed.text.config import MLMConfig, VocabConfig
from unimed.train.config import TrainConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_FILE = "config.yaml"
"""Name of the resolved config saved in every output folder."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes, and its global seed."""

    name: str = "demo"
    output_dir: str = path_option("runs")
    seed: int = 0

    def __post_init__(self) -> None:
        check_bounds("run", self, non_negative=("seed",))
        parts = PurePath(self.name).parts
        if not parts or PurePath(self.name).is_absolute() or ".." in parts:
            raise ConfigError(f"run.name must name a folder inside run.output_dir (a/b nests one), "
                              f"got {self.name!r}")

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`unimed demo` only: further method presets (YAML files, relative to the working directory)
    the demo trains and evaluates beside `method`. From each it takes the `method` and `train`
    sections; the run, phantom, data, vocabulary, MLM text encoder and evaluation are this
    config's, and the method's outputs go to ``<run dir>/<method name>/``."""

    methods: tuple[str, ...] = path_option(())


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    run: RunConfig = RunConfig()
    phantom: PhantomConfig = PhantomConfig()
    data: DataConfig = DataConfig()
    vocab: VocabConfig = VocabConfig()
    mlm: MLMConfig = MLMConfig()
    method: MethodConfig = MedUniCConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    demo: DemoConfig = DemoConfig()


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(path: str, key: str, cls: type) -> ConfigError:
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key '{where}'; valid keys here: {valid}")


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is MethodConfig:
        return _build_method(value, path)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' expects a mapping, got {value!r}")
        return _build(annotation, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' expects a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{path}' expects true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if value is None or isinstance(value, (dict, list, tuple)) or (
                    annotation is not str and isinstance(value, bool)):
                raise TypeError  # str() or int() would take these: "None", "{'a': 1}", 1 for true
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key '{path}' expects {annotation.__name__}, got {value!r}"
            ) from None
    return value


def _build(cls: type[T], values: dict[str, Any], path: str = "") -> T:
    types_ = _field_types(cls)
    paths = {f.name for f in dataclasses.fields(cls) if f.metadata.get(PATH_OPTION)}
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(path, key, cls)
        kwargs[key] = _coerce(value, types_[key], f"{path}.{key}" if path else key)
        if key in paths:  # "~/data": no shell expands the ~ of a preset or of a key=value override
            kwargs[key] = _home(kwargs[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own validation (__post_init__) names the key
        raise ConfigError(str(exc)) from None


def _home(value: Any) -> Any:
    """A path option's value (a path, a list of them, or None) with a leading ~ expanded."""
    if isinstance(value, str):
        return os.path.expanduser(value)
    if isinstance(value, tuple):
        return tuple(_home(v) for v in value)
    return value


def _build_method(value: Any, path: str) -> Any:
    """The section of the method that `value["name"]` names (default: Config's default method)."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' expects a mapping, got {value!r}")
    name = value.get("name", Config.method.name)
    if name not in METHODS:
        raise ConfigError(
            f"unknown method '{name}' ({path}.name); valid names: {', '.join(METHODS.names())}"
        )
    return _build(METHODS.get(name).config, value, path)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml_files.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or yaml_problem(exc)
        raise ConfigError(f"override '{item}': its value is not valid YAML ({problem}); quote a list "
                          "or mapping for the shell, e.g. 'data.pretrain_datasets=[mimic-cxr]'") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-serialisable data."""
    out = dataclasses.asdict(cfg)
    return _plain(out)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type[T] = Config
) -> T:
    """Defaults <- YAML preset (which may name `base:` presets) <- dotted overrides.

    The method section starts from the chosen method's own defaults (its dataclass), so switching
    `method.name` never carries another method's keys along.
    """
    data = _defaults(cls)
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
    return _build(cls, _overridden(data, overrides))


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a run saved (``config.yaml`` in its run folder or in a stage folder of it) <-
    dotted overrides, its paths read where the run folder is now.

    A run reads a relative path option (:func:`unimed.bounds.path_option`: its output folder, the
    data root, the text encoder, ...) against the working directory it was launched from, and saves
    it as given. Read from another working directory (a notebook elsewhere, ``unimed evaluate
    /abs/runs/demo``), or after the run folder was renamed or moved, those paths would name other
    folders (another run's), or none. So where the run folder is now (:func:`run_folder`) is not
    ``run.output_dir/run.name`` seen from here, the run section names it, and a path option under
    the run folder, under a folder above it or under the folder it was launched from is read at the
    same place relative to the run folder now (:func:`_relocated`), where that names something.
    Overrides stay relative to the working directory. A run that pre-trained on its own MLM output
    (no ``method.text.encoder``) gets that folder named, so overriding ``run.output_dir`` /
    ``run.name`` (to evaluate into another folder) keeps the text encoder the run was trained with.
    """
    data = _merge(_defaults(Config), _read_yaml(Path(path)))
    saved = _build(Config, data)
    here = run_folder(Path(path), saved.run)
    if here is not None and here != saved.run.dir.resolve():
        for keys, value in _path_options(saved):
            node = data
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = _relocated(value, saved.run.dir, here)
            _warn_if_read_from_here(".".join(keys), value, node[keys[-1]], saved.run.dir)
        data["run"].update(output_dir=str(here.parent), name=here.name)
    mlm = (here or saved.run.dir.resolve()) / "mlm"
    if saved.method.text.encoder is None and (mlm / "config.json").is_file():
        data["method"]["text"]["encoder"] = str(mlm)
    return _build(Config, _overridden(data, overrides))


RUN_STAGES = ("vocab", "mlm", "pretrain", "eval")
"""The sub-folders of a run folder in which a stage saves its config (``unimed.commands.run_dir``)."""


def run_folder(saved: Path, run: RunConfig) -> Path | None:
    """The run folder, as it is now, of the config file `saved` that a run wrote: the nearest
    folder above the file whose last parts are ``run.output_dir/run.name`` (read from anywhere),
    else the folder the file is in, or the one above it when that is a stage folder
    (:data:`RUN_STAGES`: the run folder was renamed or moved); None for a file in neither place."""
    folder = saved.resolve().parent
    parts = tuple(part for part in run.dir.parts if part != ".")
    if not run.dir.is_absolute() and ".." not in parts:
        for above in (folder, *folder.parents):
            if len(above.parts) > len(parts) and above.parts[len(above.parts) - len(parts):] == parts:
                return above
    if folder.name in RUN_STAGES:
        return folder.parent
    return folder if folder.name == run.name else None


def _relocated(value: Any, old_run: Path, here: Path) -> Any:
    """A path option's `value` (a path, a list of them, or None) read with the run folder
    `old_run` (as the run saved it) now at `here`: a path under `old_run` or under a folder above
    it (up to the launch folder, for a relative `old_run`) becomes the path at the same place
    relative to `here`, where that names something; packaged names (``es-en``, a packaged
    encoder), paths elsewhere and paths that name nothing there are kept."""
    if isinstance(value, (list, tuple)):
        return type(value)(_relocated(v, old_run, here) for v in value)
    if not value or Path(value).is_absolute() != old_run.is_absolute():
        return value
    path = Path(value)
    olds = [old_run, *old_run.parents]  # a relative one ends at Path("."), the launch folder
    for depth, old in enumerate(olds):
        if depth <= len(here.parents) and path.is_relative_to(old):
            candidate = (here.parents[depth - 1] if depth else here) / path.relative_to(old)
            return str(candidate) if candidate.exists() else value
    return value


def _warn_if_read_from_here(key: str, saved: Any, now: Any, old_run: Path) -> None:
    """A relative path option the moved run's folder could not place (it names nothing at the
    same place relative to the run folder now) is read from the working directory; where it names
    something there, a warning says so: it may be another project's folder of that name (a run
    whose data root had moved scored the data in ./data without a word)."""
    if (isinstance(saved, str) and saved and saved == now and not old_run.is_absolute()
            and not Path(saved).is_absolute() and Path(saved).exists()):
        log.warning("%s=%s names nothing where the run folder is now; read from the working "
                    "directory as %s", key, saved, Path(saved).resolve())


def _path_options(section: Any, keys: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(dotted keys, value) of every path option in the config `section`, depth first."""
    found = []
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            found += _path_options(value, (*keys, field.name))
        elif field.metadata.get(PATH_OPTION):
            found.append(((*keys, field.name), value))
    return found


def _defaults(cls: type) -> dict[str, Any]:
    data = to_dict(cls())
    if isinstance(data.get("method"), dict):
        data["method"] = {"name": data["method"]["name"]}
    return data


def _overridden(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`data` with the dotted `overrides` set in it (in place)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            if key not in node and depth > 0 and keys[0] == "method":
                node[key] = {}  # a method sub-section not yet given: its defaults fill in
            child = node.get(key)
            if not isinstance(child, dict):
                raise ConfigError(
                    f"unknown config section '{'.'.join(keys[: depth + 1])}' in override '{item}'"
                )
            node = child
        node[keys[-1]] = value
    return data


def _read_yaml(path: Path, below: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of the config file `path` over the one its ``base:`` names (read the same way);
    `below` are the files whose ``base:`` led here, so a chain that comes back to one is refused."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in below:
        chain = " -> ".join(str(p) for p in (*below, path.resolve()))
        raise ConfigError(f"config file {path}: its base: chain comes back to itself ({chain})")
    with path.open(encoding="utf-8") as f:
        try:
            data = yaml_files.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse config file {path}: {yaml_problem(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: "
                              f"{exc.object[exc.start:exc.start + 1]!r})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / base, (*below, path.resolve())), data)
    return data


def save_config(cfg: Any, directory: str | Path) -> Path:
    """Write the resolved config as `config.yaml` in `directory` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / CONFIG_FILE
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return out
