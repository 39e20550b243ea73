"""Typed YAML configs with command-line overrides: values, errors, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqmoe_megatron.config import ConfigError, PretrainConfig, dump_yaml, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_shipped_configs_load(name):
    cfg = load_config(PretrainConfig, ROOT / "pretrain" / "configs" / f"{name}.yaml")
    assert cfg.moe.num_experts > 0


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(
        PretrainConfig,
        ROOT / "pretrain/configs/tiny.yaml",
        [
            "moe.topk=2",
            "train.lr=1e-3",
            "moe.z_loss_coeff=null",
            "train.inject_nonfinite_steps=[3, 4]",
        ],
    )
    assert cfg.moe.topk == 2 and cfg.train.lr == 1e-3 and cfg.moe.z_loss_coeff is None
    assert cfg.train.inject_nonfinite_steps == [3, 4]


def test_unknown_key_names_source_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  topkk: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'moe.topkk' .*did you mean 'topk'"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match=r"command line: 'train.lrr'"):
        load_config(PretrainConfig, None, ["train.lrr=1"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("moe.topk=two", "expected an integer"),
        ("moe.expert_input=mixed", "not one of"),
        ("train.tensorboard=3", "expected true/false"),
        ("moe=3", "must be a mapping"),
        ("train.lr", "must look like section.key=value"),
    ],
)
def test_bad_values_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(PretrainConfig, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, ROOT / "pretrain/configs/base.yaml", ["moe.num_codes=32"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg


def test_the_routing_modes_are_defined_once():
    """Every list of routing modes is config.ROUTING_MODES (the HF export's self-contained
    copy included), and both routing settings take their values from it."""
    import typing

    from vqmoe_megatron import config
    from vqmoe_megatron.hf import configuration_vqmoe
    from vqmoe_megatron.moe import transformer_config

    assert config.ROUTING_MODES == ("pretrain", "discrete")
    assert configuration_vqmoe.ROUTING_MODES == config.ROUTING_MODES
    assert transformer_config.ROUTING_MODES is config.ROUTING_MODES
    assert typing.get_type_hints(config.MoEConfig)["routing_mode"] == config.RoutingMode
    # fine-tuning's None: follow the pretrained router (discrete for VQMoE, its router otherwise)
    hint = typing.get_type_hints(config.FinetuneSettings)["routing"]
    assert hint == typing.Optional[config.RoutingMode]
