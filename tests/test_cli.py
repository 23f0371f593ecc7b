"""End-to-end: the `unimed` command line on a tiny phantom world (2D and CT), every Med-UniC stage
and the demo's further methods (PRIOR, UniMedI)."""

import contextlib
import errno
import hashlib
import html
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch.multiprocessing as mp
import yaml

from unimed.cli import main
from unimed.config import load_config
from unimed.errors import ConfigError
from unimed.eval import data as eval_data

TINY = {
    "run": {"name": "tiny", "seed": 0},
    "phantom": {
        "image_size": 64, "mimic_studies": 40, "padchest_studies": 40, "chexpert_studies": 30,
        "cxp500_studies": 16, "rsna_studies": 40, "siim_studies": 40, "covidx_studies": 30,
        "object_cxr_studies": 40, "pdc_studies": 16, "control_studies": 12,
        "ct": {"enabled": True, "shape": [8, 32, 32], "bimcv_studies": 16, "ccii_studies": 9,
               "luna_studies": 6, "bcv_studies": 4},
    },
    "data": {"image_size": 64, "resize_size": 72, "max_length": 48, "progress": False},
    "vocab": {"english_vocab_size": 300, "new_terms": 40},
    "mlm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
            "epochs": 1, "batch_size": 16, "max_length": 48},
    "method": {"name": "medunic", "image": {"encoder": "vit_tiny_patch8_64"},
               "text": {"frozen_layers": 1},
               "projector": {"embed_dim": 32, "ctr_dim": 64, "hidden_dim": 64}},
    "train": {"epochs": 1, "batch_size": 8, "max_steps": 2, "log_every": 1, "tensorboard": False},
    "eval": {
        "fractions": [1.0], "min_train_images": 4,
        "linear_probe": {"epochs": 2, "patience": 1},
        "segmentation": {"epochs": 1, "patience": 1},
        "detection": {"epochs": 1, "patience": 1},
        "bias": {"samples_per_group": 12, "folds": 2, "knn_k": 3},
        "gradcam": {"classes": ["pleural effusion"]},
        "modality_gap": {"per_class": 8, "min_per_class": 2},
        "tasks": ["zero_shot", "linear_probe", "segmentation", "detection", "retrieval", "bias",
                  "gradcam", "slice_selection", "modality_gap"],
    },
}


# The demo's second method: its own method and train sections, everything else from TINY.
TINY_PRIOR = {
    "method": {"name": "prior", "image": {"encoder": "efficientnet_lite0"},
               "text": {"frozen_layers": 1, "frozen_dropout": False}, "image_size": 64,
               "stage_epochs": [1, 1, 1], "min_sentences": 1, "embed_dim": 16, "pool_heads": 2,
               "prototypes": 8, "decoder_layers": 1, "decoder_heads": 2, "decoder_queries": 4,
               "max_sentences": 4},
    "train": {"batch_size": 8, "epoch_steps": 1, "log_every": 1, "tensorboard": False},
}


# The demo's third method: X-rays and the CT world's BIMCV volumes with their reports.
TINY_UNIMEDI = {
    "method": {"name": "unimedi", "image": {"encoder": "vit_tiny_patch8_64"},
               "text": {"frozen_layers": 1}, "volume_shape": [4, 32, 32], "volume_patch": [2, 8, 8],
               "volume_batch_size": 4, "selected_slices": 1, "projector_hidden": 16,
               "embed_dim": 16, "head_out": 16, "head_hidden": 16, "head_bottleneck": 8,
               "teacher_temperature_epochs": 1},
    "data": {"pretrain_datasets": ["mimic-cxr", "padchest", "bimcv-covid19"]},
    "train": {"epochs": 1, "batch_size": 8, "epoch_steps": 2, "log_every": 1,
              "tensorboard": False},
}


@pytest.fixture()
def preset(tmp_path: Path) -> Path:
    cfg = dict(TINY)
    cfg["run"] = {**TINY["run"], "output_dir": str(tmp_path / "runs")}
    cfg["phantom"] = {**TINY["phantom"], "root": str(tmp_path / "world")}
    cfg["data"] = {**TINY["data"], "root": str(tmp_path / "world")}
    prior = tmp_path / "tiny_prior.yaml"
    prior.write_text(yaml.safe_dump(TINY_PRIOR))
    unimedi = tmp_path / "tiny_unimedi.yaml"
    unimedi.write_text(yaml.safe_dump(TINY_UNIMEDI))
    cfg["demo"] = {"methods": [str(prior), str(unimedi)]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_runs_every_stage(preset: Path, tmp_path: Path, capsys, caplog):
    caplog.set_level("INFO")  # as the command line's logging is; pytest's leaves the root at WARNING
    assert main(["demo", str(preset), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "read back through the adapters" in out
    words = " ".join(out.split())  # table titles wrap at the table's width
    assert "Med-UniC pre-training losses over 2 steps" in words
    assert "PRIOR pre-training losses over 3 steps" in words  # one step in each of its 3 stages
    assert "UniMedI pre-training losses over 2 steps" in words  # one X-ray and one CT batch
    assert "machine: fp32 GEMM peak" in words and "Demo stages" in words
    lines = out.splitlines()
    tally = next(i for i, line in enumerate(lines) if line.startswith("Checks: "))
    # one line per method; no "baselines" line, since no random-init encoder runs beside ImageNet init
    assert [line.split()[0] for line in lines[tally + 1:tally + 5]] == ["Med-UniC", "PRIOR", "UniMedI",
                                                                        "report:"]
    run = tmp_path / "runs" / "tiny"
    assert (run / "config.yaml").is_file() and (run / "phantom_preview.png").is_file()
    assert (run / "vocab" / "added_terms.txt").is_file()
    assert (run / "mlm" / "config.json").is_file()
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    terms = ["cvl_loss", "ssv_loss", "tf_loss", "tt_loss"]  # L_CVL + L_SSV + L_CTR (= L_TF + L_TT)
    for row in log:  # the total is the weighted sum (weights 1) of every objective
        assert sorted(k for k in row if k.endswith("_loss")) == terms
        assert row["loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5)
    assert (run / "pretrain" / "checkpoints" / "latest").exists()
    stage_log = (run / "pretrain" / "pretrain.log").read_text()
    assert stage_log.startswith("--- unimed pretrain, pid ") and "saved checkpoint" in stage_log
    demo_log = (run / "demo.log").read_text()  # every stage's lines, the evaluation's too
    assert demo_log.startswith("--- unimed demo, pid ") and stage_log.splitlines()[-1] in demo_log
    assert (run / "evaluation.log").read_text().splitlines()[-1] in demo_log
    # It ends as the console does: what passed and failed, the stages' times, the outputs.
    ending = demo_log.splitlines()[-10:]
    assert ending[-1] == lines[-1] and ending[-1].startswith("outputs: ")
    assert lines[tally] in demo_log and "demo stages (seconds): phantom world " in ending[-3]
    saved = yaml.safe_load((run / "pretrain" / "config.yaml").read_text())
    assert saved["method"]["image"]["encoder"] == "vit_tiny_patch8_64"

    prior_log = [json.loads(line) for line in
                 (run / "prior" / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [(row["step"], row["stage"]) for row in prior_log] == [(1, 0), (2, 1), (3, 2)]
    assert "image_rec_loss" in prior_log[-1] and "spb_loss" in prior_log[1]

    unimedi_log = [json.loads(line) for line in
                   (run / "unimedi" / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in unimedi_log] == [1, 2]
    for row in unimedi_log:  # CLIP + DINO on [CLS] + iBOT on the patches, weights 1
        terms = ["icl_loss", "pcl_loss", "vl_loss"]
        assert sorted(k for k in row if k.endswith("_loss")) == terms
        assert row["loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5)

    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["encoders"]) == ["medunic", "prior", "unimedi", "init"]
    assert metrics["methods"] == ["medunic", "prior", "unimedi"]
    for name in metrics["methods"]:
        assert set(metrics["encoders"][name]["tasks"]) == {
            "zero_shot", "linear_probe", "segmentation", "detection", "retrieval", "bias", "gradcam",
            "slice_selection", "modality_gap"}
    selection = metrics["encoders"]["unimedi"]["tasks"]["slice_selection"]
    assert "skipped" in metrics["encoders"]["medunic"]["tasks"]["slice_selection"]
    assert "skipped" not in selection
    assert metrics["pretraining_methods"]["prior"]["terms"][0] == "loss"
    html = (run / "report.html").read_text()
    assert "PRIOR: Zero-shot CXP500" in html and "Med-UniC: Zero-shot CXP500" in html
    assert "UniMedI: Zero-shot CXP500" in html and "Attentive slice selection vs random" in html
    assert "Pre-training loss per term (PRIOR)" in html
    assert_outputs_of_evaluation(run, metrics, out)

    # Evaluating the run folder again keeps the methods trained beside Med-UniC, and reads the
    # tokenizer each was trained with, kept beside its checkpoints: the run's vocabulary built again
    # meanwhile (here the same tokens under other ids) changes nothing.
    mlm_tokenizer = run / "mlm" / "tokenizer.json"
    original = mlm_tokenizer.read_text()
    assert (run / "pretrain" / "tokenizer" / "tokenizer.json").is_file()
    mlm_tokenizer.write_text(json.dumps(renumbered(json.loads(original))))
    assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["methods"] == ["medunic", "prior", "unimedi"]
    assert list(again["encoders"]) == ["medunic", "prior", "unimedi"]
    for name in again["methods"]:
        zero_shot = again["encoders"][name]["tasks"]["zero_shot"]
        assert zero_shot == metrics["encoders"][name]["tasks"]["zero_shot"]
    # Resuming under the rebuilt vocabulary would go on with other token ids: one line.
    capsys.readouterr()
    assert main(["pretrain", str(preset), "--resume", "train.max_steps=3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with the tokenizer kept in" in err[0], err
    mlm_tokenizer.write_text(original)
    vocab_tokenizer = run / "vocab" / "tokenizer.json"
    built = vocab_tokenizer.read_text()
    vocab_tokenizer.write_text(json.dumps(renumbered(json.loads(built))))
    assert main(["mlm", str(preset), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'mlm'} was trained with the tokenizer kept in" in err[0], err
    vocab_tokenizer.write_text(built)
    # So does evaluating it into another folder.
    assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.baselines=[]",
                 f"run.output_dir={tmp_path / 'elsewhere'}", "--quiet"]) == 0
    elsewhere = json.loads((tmp_path / "elsewhere" / "tiny" / "metrics.json").read_text())
    assert elsewhere["methods"] == again["methods"]
    assert {name: e["tasks"] for name, e in elsewhere["encoders"].items()} == {
        name: e["tasks"] for name, e in again["encoders"].items()}

    assert main(["pretrain", str(preset), "train.max_steps=3", "--resume", "--quiet"]) == 0
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log][-1] == 3

    # Training afresh over it would replace its config and mix two runs' checkpoints: one line,
    # and nothing of the earlier run changes.
    saved, latest = (run / "pretrain" / "config.yaml").read_text(), (run / "pretrain" / "checkpoints" / "latest").read_text()
    capsys.readouterr()
    assert main(["pretrain", str(preset), "train.max_steps=1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the checkpoints of an earlier run" in err[0] and "--resume" in err[0]
    assert (run / "pretrain" / "config.yaml").read_text() == saved
    assert (run / "pretrain" / "checkpoints" / "latest").read_text() == latest

    # The same stage, or an evaluation of the same run, started while another process writes it
    # (a job submitted twice): one line naming that process, and nothing of the run changes.
    metrics_json = (run / "metrics.json").read_text()
    kept = sorted(p.name for p in (run / "previous_evaluations").iterdir())
    for folder, job, argv in [(run / "pretrain", "pretrain", ["pretrain", str(preset), "--resume"]),
                              (run, "evaluation", ["evaluate", str(run), "--tasks", "zero_shot"])]:
        with held_by_another_process(folder, job) as pid:
            capsys.readouterr()
            assert main([*argv, "--quiet"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{folder} is in use" in err[0] and f"pid {pid} " in err[0], err
        assert (run / "pretrain" / "config.yaml").read_text() == saved
        assert (run / "pretrain" / "checkpoints" / "latest").read_text() == latest
        assert (run / "metrics.json").read_text() == metrics_json
        assert sorted(p.name for p in (run / "previous_evaluations").iterdir()) == kept

    # `unimed pretrain` as torchrun starts it, two ranks: rank 0 alone holds the folder, keeps the
    # tokenizer and writes the log and checkpoints, and both ranks end with 0.
    ddp = tmp_path / "runs" / "tiny-ddp"
    mp.start_processes(_pretrain_rank, args=(2, _free_port(), str(preset), str(run / "mlm"), str(ddp)),
                       nprocs=2, join=True, start_method="fork")
    assert [(ddp / f"rank{rank}.exit").read_text() for rank in range(2)] == ["0", "0"]
    ddp_log = [json.loads(line) for line in (ddp / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in ddp_log] == [1, 2]
    assert (ddp / "pretrain" / "tokenizer" / "tokenizer.json").is_file()
    assert (ddp / "pretrain" / ".unimed-pretrain.lock").read_text() == ""  # the hold ended with the run

    # A learning rate that blows the weights up: one line naming the step and the newest checkpoint.
    capsys.readouterr()
    assert main(["pretrain", str(preset), "run.name=tiny-nan", f"method.text.encoder={run / 'mlm'}",
                 "train.lr=1e38", "train.max_steps=3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"unimed: training diverged: step \d \(epoch 0, stage \w+\) gave a "
                                      r"non-finite .*newest checkpoint is none yet", err[0]), err

    # Resumed under settings its checkpoint cannot take: one line, and the run's config still
    # describes its checkpoints (so evaluating or exporting the run still loads them).
    for setting, message in [("method.text.frozen_layers=0", "trained other parameters than this run"),
                             ("method.image.encoder=resnet18", "do not fit the model ("),
                             ("data.max_length=100000", "data.max_length=100000 is more tokens than the "
                                                        "text encoder's"),
                             ("train.max_steps=1", "is step 3, past this run's last step 1")]:
        capsys.readouterr()
        assert main(["pretrain", str(preset), "--resume", setting, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert (run / "pretrain" / "config.yaml").read_text() == saved
        assert (run / "pretrain" / "checkpoints" / "latest").read_text() == latest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_rank(rank: int, world_size: int, port: int, preset: str, mlm: str, out: str) -> None:
    """One rank of `unimed pretrain` under torchrun's environment; its exit code in rank<k>.exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch

    torch.set_num_threads(1)
    code = main(["pretrain", preset, "run.name=tiny-ddp", f"method.text.encoder={mlm}",
                 "train.max_steps=2", "--quiet"])
    Path(out, f"rank{rank}.exit").write_text(str(code))


def renumbered(tokenizer: dict) -> dict:
    """A WordPiece tokenizer.json's vocabulary of the same size and tokens, the ids of every token
    but the special ones reversed: a rebuilt vocabulary that a model trained on the first misreads."""
    vocab = tokenizer["model"]["vocab"]
    special = {token["content"] for token in tokenizer["added_tokens"]}
    plain = [token for token in vocab if token not in special]
    ids = sorted(vocab[token] for token in plain)
    tokenizer["model"]["vocab"] = {**{t: vocab[t] for t in special}, **dict(zip(plain, reversed(ids)))}
    return tokenizer


@contextlib.contextmanager
def held_by_another_process(folder: Path, job: str) -> Iterator[int]:
    """A Python process holding `folder` for `job` as a unimed command does; killed outright at
    the end (its hold ends with it); yields its pid."""
    code = ("import sys; from pathlib import Path; from unimed.commands import holding\n"
            "with holding(Path(sys.argv[1]), sys.argv[2]):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), job], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.communicate()


def test_a_folder_is_held_by_one_process_at_a_time(tmp_path: Path, caplog):
    """The hold of a job on a folder stops a second hold of the same job there, names the holder,
    ends with the process (a killed holder leaves nothing that stops the next), and leaves other
    jobs in the same folder alone (the demo holds its run folder while its stages hold theirs)."""
    from unimed.commands import holding

    folder = tmp_path / "runs" / "x"
    with held_by_another_process(folder, "pretrain") as pid:
        with pytest.raises(ConfigError, match=rf"{folder} is in use: .*pid {pid} on .* writing its "
                                              "pretrain there"):
            with holding(folder, "pretrain"):
                pytest.fail("held twice")
        with holding(folder, "evaluation"), holding(folder / "mlm", "mlm"):
            pass
    with holding(folder, "pretrain"):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} "):
            with holding(folder, "pretrain"):
                pytest.fail("held twice")
    with holding(folder, "pretrain"):
        assert (folder / ".unimed-pretrain.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert (folder / ".unimed-pretrain.lock").read_text() == ""  # left empty: equal outputs stay equal

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    with mock.patch("fcntl.flock", no_locks), caplog.at_level("WARNING"):
        with holding(folder, "pretrain"):
            pass
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text

    (tmp_path / "file").write_text("")
    # The OSError says "Not a directory" (a file above the folder) or "File exists" (the folder's
    # own path a file): the line names the file.
    for folder in (tmp_path / "file" / "run", tmp_path / "file"):
        with pytest.raises(ConfigError) as err:
            with holding(folder, "pretrain"):
                pytest.fail("held a folder that cannot exist")
        assert str(err.value) == (f"cannot write the run folder {folder} ({tmp_path / 'file'} is a file, not "
                                  "a folder); set run.output_dir to a writable folder")
    with pytest.raises(ConfigError, match="cannot write the folder .*; set phantom.root to a writable"):
        with holding(tmp_path / "file" / "world", "phantom world", setting="phantom.root"):
            pytest.fail("held a folder that cannot exist")


def test_a_job_logs_to_a_file_in_the_folder_it_holds(tmp_path: Path, caplog, capsys):
    """A run's folder kept no log: the warnings of a long training (files skipped, reports cut) were
    on the console alone, lost with it."""
    from unimed.commands import holding
    from unimed.machine import describe_software, software

    folder = tmp_path / "runs" / "x"
    said = logging.getLogger("unimed.test")
    caplog.set_level("INFO")
    with holding(folder, "pretrain"):
        said.info("during the job")
    said.info("after the job")
    with pytest.raises(ConfigError, match="a bad value"):
        with holding(folder, "pretrain"):
            said.warning("before the error")
            raise ConfigError("a bad value")
    lines = (folder / "pretrain.log").read_text().splitlines()
    headers = [line.startswith("--- unimed pretrain, pid ") for line in lines]
    assert headers == [True, False, False, True, False, False, False]
    assert lines[1] == lines[4] == f"--- {describe_software(software())}"  # what ran it
    assert lines[2].endswith(" INFO unimed.test: during the job")
    assert lines[5].endswith(" WARNING unimed.test: before the error")
    assert lines[6] == "stopped: ConfigError: a bad value"
    files = [getattr(handler, "baseFilename", None) for handler in logging.getLogger().handlers]
    assert str(folder / "pretrain.log") not in files
    (folder / "mlm.log").mkdir()  # a log file that cannot be written: the job goes on
    with caplog.at_level("WARNING"), holding(folder, "mlm"):
        said.info("still runs")
    assert f"cannot write the log file {folder / 'mlm.log'} (Is a directory)" in caplog.text
    (folder / "vocab.log").symlink_to("/dev/full")  # a disk full for the log: the job still ends well
    caplog.clear()
    with holding(folder, "vocab"):
        said.info("first line")
        said.info("second line")
    failed = [r.getMessage() for r in caplog.records if "cannot write the log file" in r.getMessage()]
    assert failed == [f"cannot write the log file {folder / 'vocab.log'} (No space left on device): this "
                      "vocab is logged on the console only from here"]
    assert "second line" in caplog.text and "Logging error" not in caplog.text
    caplog.clear()
    with holding(folder, "pretrain"):  # the disk fills up mid-job: said once, the job goes on
        log_file = next(h for h in logging.getLogger().handlers if getattr(h, "job", None) == "pretrain")
        log_file.stream = open("/dev/full", "w", encoding="utf-8")
        said.info("lost line")
        said.info("another")
    assert log_file not in logging.getLogger().handlers
    assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()] == [
        f"cannot write the log file {folder / 'pretrain.log'} (No space left on device): this pretrain "
        "is logged on the console only from here"]
    assert "another" in caplog.text and "Logging error" not in capsys.readouterr().err
    with holding(tmp_path / "world", "phantom world", setting="phantom.root", logged=False):
        said.info("not logged")
    assert not list((tmp_path / "world").glob("*.log"))


def test_the_demo_starts_its_training_stages_over(preset: Path, tmp_path: Path):
    """`make demo` run twice: the second run removes the checkpoints the first left in its own
    training stages (which a plain rerun of a stage refuses) and nothing else."""
    import torch

    from unimed.commands.demo import method_presets, start_over
    from unimed.commands.train import writable_run_dir
    from unimed.train.checkpoint import checkpoints, save_checkpoint

    cfg = load_config(preset)
    run = tmp_path / "runs" / "tiny"
    stages = [run / "mlm", run / "pretrain", run / "prior" / "pretrain", run / "unimedi" / "pretrain"]
    for stage in stages:
        save_checkpoint(stage / "checkpoints", 7, torch.nn.Linear(2, 2), {"step": 7})
    (run / "eval").mkdir()
    (run / "eval" / "kept.txt").write_text("evaluation output")
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run"):
        with writable_run_dir(cfg, "pretrain", True, resume=False):
            pytest.fail("the earlier run's checkpoints were not seen")
    start_over(cfg, method_presets(cfg))
    assert [checkpoints(stage / "checkpoints") for stage in stages] == [[], [], [], []]
    assert (run / "eval" / "kept.txt").read_text() == "evaluation output"
    with writable_run_dir(cfg, "pretrain", True, resume=False) as out:
        assert out == run / "pretrain"


def assert_outputs_of_evaluation(run: Path, metrics: dict, out: str) -> None:
    """Intervals beside the values, paired replicates in bootstrap.npz, published split files
    whose hashes match, loss curves and checks in the report and the terminal."""
    tasks = metrics["encoders"]["medunic"]["tasks"]
    zero_shot = tasks["zero_shot"]["cxp500"]["en"]
    assert zero_shot["ci"]["f1"][0] <= zero_shot["f1"] <= zero_shot["ci"]["f1"][1]
    row = tasks["linear_probe"]["rsna"]["fractions"]["100%"]
    assert row["ci"][0] <= row["value"] <= row["ci"][1]
    assert set(tasks["retrieval"]["pooled"]) == {"all_languages", "within_language", "chance"}
    assert {"loss_mixed", "loss_single_language", "top1"} <= set(tasks["retrieval"]["shortcut"])
    with np.load(run / "bootstrap.npz") as saved:
        ours, theirs = (saved[f"{e}/linear_probe/rsna/fractions/100%/value"] for e in ("medunic", "init"))
    assert ours.shape == theirs.shape == (metrics["bootstrap"]["resamples"],)
    cxp500 = metrics["splits"]["cxp500/test"]
    split_file = (run / "eval" / cxp500["file"]).read_bytes()
    assert hashlib.sha256(split_file).hexdigest() == cxp500["sha256"]
    assert len(split_file.splitlines()) == cxp500["images"] == zero_shot["images"]
    assert metrics["pretraining"]["terms"] == ["loss", "cvl_loss", "ssv_loss", "tf_loss", "tt_loss"]
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and cxp500["sha256"] in html
    assert "Pre-training loss per term" in html and "Quality checks" in out
    assert re.search(r"\d+\.\d \(\d+\.\d–\d+\.\d\)", out)  # a value with its interval
    flagged = [line for line in out.splitlines() if line.startswith(("FAIL: ", "TIE: "))]
    assert flagged and all(" -- " in line and line.split(" -- ")[1] for line in flagged)


def _tiny_english_bert(path: Path) -> Path:
    """A tiny English BERT folder standing in for the packaged MiniLM (the row without MLM needs one)."""
    import string

    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits,
              *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(str(path))
    return path


def test_evaluate_and_ablate(preset: Path, tmp_path: Path, capsys, monkeypatch, caplog):
    from unimed.machine import describe_software, software

    caplog.set_level("INFO")  # as the command line's logging is
    base = f"vocab.base_model={_tiny_english_bert(tmp_path / 'english_bert')}"
    for stage in ("phantom", "vocab", "mlm", "pretrain"):
        assert main([stage, str(preset), base, "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    checkpoint = next((run / "pretrain" / "checkpoints").glob("step_*"))
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["encoders"]) == ["medunic"]
    assert set(metrics["encoders"]["medunic"]["tasks"]) == {"zero_shot"}
    assert metrics["checkpoint"] == str(checkpoint)
    assert metrics["software"] == {**software(), "commit": metrics["software"]["commit"]}  # what made it
    report = (run / "report.html").read_text()
    assert html.escape(describe_software(metrics["software"])) in report
    sha = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()  # the weights that ran
    assert metrics["weights"] == {"medunic": {"path": str(checkpoint), "sha256": sha}} and sha[:16] in report
    # The log says which weights were loaded, before the evaluation's own lines, and ends as the
    # console does.
    evaluation_log = (run / "evaluation.log").read_text()
    assert f"medunic: loaded weights from {checkpoint}" in evaluation_log
    assert evaluation_log.splitlines()[-1] == f"metrics: {run / 'metrics.json'}"
    assert "CXP500" in capsys.readouterr().out
    # Where no split fits in memory, the images go to the run's spill folder, which is gone after.
    mapped: list[Path] = []
    spilled = eval_data._spilled
    monkeypatch.setattr(eval_data, "available_memory", lambda: 4096)
    monkeypatch.setattr(eval_data, "_spilled", lambda path: mapped.append(path.parent) or spilled(path))
    assert main(["evaluate", str(checkpoint), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert (json.dumps(again["encoders"]["medunic"]["tasks"]["zero_shot"], sort_keys=True)
            == json.dumps(metrics["encoders"]["medunic"]["tasks"]["zero_shot"], sort_keys=True))
    assert mapped and set(mapped) == {run / "eval" / ".spill"} and not (run / "eval" / ".spill").exists()
    monkeypatch.undo()

    capsys.readouterr()
    assert main(["ablate", str(preset), base, "--seeds", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Ablation: the rows of the method's paper table" in out and "Quality checks" not in out
    ablation = json.loads((run / "ablation.json").read_text())
    assert [row["name"] for row in ablation["rows"]] == [
        "CVL + MLM", "SSV + CVL + MLM", "SSV + CVL + CTR", "SSV + CVL + CTR + MLM"]
    assert all(set(row["metrics"]) == {"zero_shot", "linear_probe", "segmentation"}
               and set(row["seeds"]) == {"0", "1"} for row in ablation["rows"])
    for seed in ("seed0", "seed1"):
        assert (run / "ablation" / "ssv_cvl_ctr" / seed / "pretrain" / "checkpoints" / "latest").is_file()
    assert ablation["orderings"] and {o["verdict"] for o in ablation["orderings"]} <= {
        "holds", "reversed", "tie"}
    assert json.loads((run / "metrics.json").read_text())["ablation"] == ablation
    assert main(["ablate", str(preset), base, "--seeds", "2", "train.lr=1e-3", "--quiet"]) == 2
    assert "was pre-trained with another config" in capsys.readouterr().err

    assert main(["evaluate", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--tasks", "zero_shot,telepathy", "--quiet"]) == 2
    assert "unknown task(s) ['telepathy']" in capsys.readouterr().err
    for empty in ("", " , "):  # an empty list in a script's variable ran every task
        assert main(["evaluate", str(run), "--tasks", empty, "--quiet"]) == 2
        assert capsys.readouterr().err.startswith(
            "unimed: config error: unknown task(s) (none given); valid: ")


def test_resuming_with_other_data_settings_names_them(tmp_path: Path, caplog) -> None:
    """A resumed run with another data.image_size went on without a word (another learning rate is
    said); where files are kept and how progress shows are not what a run trains on."""
    from unimed.commands.train import writable_run_dir
    from unimed.config import load_config, save_config

    before = load_config("configs/demo.yaml", [f"run.output_dir={tmp_path}"])
    save_config(before, before.run.dir / "pretrain")
    for overrides, said in [(["data.num_workers=3", "data.progress=true"], None),
                            (["data.image_size=48", "data.num_workers=3"], "data.image_size 96 -> 48")]:
        caplog.clear()
        with caplog.at_level("WARNING"), writable_run_dir(load_config("configs/demo.yaml", [
                f"run.output_dir={tmp_path}", *overrides]), "pretrain", is_main=True, resume=True):
            pass
        assert ("resuming with other data settings" in caplog.text) == (said is not None)
        assert said is None or said in caplog.text


def test_version_names_the_package(capsys) -> None:
    import unimed

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"unimed {unimed.__version__}\n"


def test_a_task_named_twice_runs_once() -> None:
    from unimed.commands.evaluate import parse_tasks
    from unimed.config import Config

    assert parse_tasks("zero_shot, retrieval,zero_shot", Config()) == ("zero_shot", "retrieval")


def test_unknown_key_is_a_clean_error(preset: Path, capsys):
    assert main(["phantom", str(preset), "phantom.studies=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'phantom.studies'" in err and "mimic_studies" in err


def test_a_train_value_out_of_range_is_one_line_before_any_work(preset: Path, capsys):
    assert main(["pretrain", str(preset), "train.batch_size=0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "unimed: config error: train.batch_size must be >= 1, got 0"


def test_overrides_may_follow_options_but_stray_words_fail(preset: Path, capsys):
    assert main(["phantom", str(preset), "--quiet", "phantom.studies=5"]) == 2
    assert "unknown config key 'phantom.studies'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["phantom", str(preset), "--quiet", "stray", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: stray --bogus" in capsys.readouterr().err


def test_pretrain_without_text_encoder_explains(preset: Path, capsys):
    assert main(["pretrain", str(preset), "--quiet"]) == 2
    assert "run `unimed mlm` first" in capsys.readouterr().err


def test_every_preset_loads():
    presets = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)


def test_quiet_silences_the_transformers_load_report(tmp_path: Path):
    """An MLM checkpoint loaded as a BertModel (no pooler, an unused MLM head) makes transformers
    log a LOAD REPORT table; under --quiet it does not, and the setting is restored after."""
    import logging

    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    from unimed.cli import library_output

    folder = _tiny_english_bert(tmp_path / "bert")
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)  # transformers' root logger does not propagate
    try:
        bars = hf_logging.is_progress_bar_enabled()
        with library_output(quiet=True, progress=False):
            BertModel.from_pretrained(str(folder), local_files_only=True)
            assert not hf_logging.is_progress_bar_enabled()
        assert not any("LOAD REPORT" in r for r in reports)
        assert hf_logging.is_progress_bar_enabled() == bars
        BertModel.from_pretrained(str(folder), local_files_only=True)
        assert any("LOAD REPORT" in r for r in reports)
    finally:
        hf_logging.get_logger().removeHandler(handler)


@pytest.mark.parametrize(("argv", "tty", "progress"), [
    ([], True, True), (["--quiet"], True, False), ([], False, False),
])
def test_progress_bars_only_on_a_terminal_and_not_quiet(argv, tty, progress, preset: Path,
                                                         monkeypatch):
    """A redirected log (stderr not a terminal) gets no progress bars: each redraw would be a line."""
    import unimed.cli as cli
    from unimed.commands import Command

    seen = []
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: tty, raising=False)
    monkeypatch.setitem(cli.COMMANDS, "vocab", Command("probe", lambda cfg, args: seen.append(args.progress) or 0))
    assert main(["vocab", str(preset), *argv]) == 0
    assert seen == [progress]
