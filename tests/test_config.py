import dataclasses

import pytest
import yaml

from unimed.config import Config, ConfigError, load_config, save_config, to_dict


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


def test_missing_or_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["run.seed=11", "method.text.encoder=/models/bert"])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["run"]["seed"] == 11
    assert load_config(path) == cfg
    assert to_dict(load_config(path)) == to_dict(cfg)
