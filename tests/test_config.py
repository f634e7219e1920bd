from __future__ import annotations

import pytest

from fedlora.config import ConfigError, build_config, load_config


def test_misspelled_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field 'train.learning_rate'") as e:
        build_config({"train": {"learning_rate": 1e-3}})
    assert "\n" not in str(e.value)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("federation:\n  rounds: many\n")
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(p)


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain: {lr: 0.1}\n")
    cfg = load_config(p, ["train.lr=3e-4", "adapter.target_modules=[q_proj, v_proj]", "method.name=rolora"])
    assert cfg.train.lr == 3e-4 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.method.name == "rolora" and cfg.name == "x"
    with pytest.raises(ConfigError, match="unknown field 'train.lrr'"):
        load_config(p, ["train.lrr=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_config({"partition": {"num_clients": 3}, "federation": {"clients_per_round": 5}})
