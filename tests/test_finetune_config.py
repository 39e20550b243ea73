"""How a fine-tuning run's config is resolved: the command line of finetune/glue.py, the
pretrained checkpoint's structure, the fine-tuning defaults, and the routing settings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.glue import parse_args
from vqmoe_megatron.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneSettings,
    ModelConfig,
    MoEConfig,
    PretrainConfig,
    dump_yaml,
)
from vqmoe_megatron.deepspeed_config import deepspeed_config
from vqmoe_megatron.finetune.pretrained import load_finetune_config
from vqmoe_megatron.glue import GlueDataError

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=400)


def _consolidated(tmp_path: Path, **moe) -> Path:
    """A consolidated directory as far as the config goes (the weights are never read here)."""
    path = tmp_path / "pretrained"
    dump_yaml(
        PretrainConfig(model=MODEL, moe=MoEConfig(num_experts=4, **moe)), path / "config.yaml"
    )
    (path / "model.safetensors").write_bytes(b"")
    return path


def _required(pretrained: Path) -> list[str]:
    return ["finetune.task=rte", "finetune.data_dir=data/glue", f"finetune.pretrained={pretrained}"]


def _load(pretrained: Path, *overrides: str):
    return load_finetune_config(None, [*_required(pretrained), *overrides])


def test_flags_become_overrides_in_any_order_with_values_kept_as_strings():
    args, overrides = parse_args(
        ["--task", "sst2", "train.lr=1e-3", "--steps", "5", "parallel.expert_parallel=2"]
        + ["--output_dir", "on", "--local_rank=1", "--train_codebook", "--no_vq_loss"]
    )
    assert args.local_rank == 1 and args.config is None
    assert overrides == [
        'finetune.task="sst2"',
        'train.output_dir="on"',
        "finetune.steps=5",
        "finetune.train_codebook=true",
        "finetune.vq_loss=false",
        "train.lr=1e-3",
        "parallel.expert_parallel=2",
    ]


def test_structure_comes_from_the_checkpoint_and_the_rest_from_fine_tuning_defaults(tmp_path):
    pretrained = _consolidated(tmp_path, routing_mode="pretrain", vq_loss_coeff=0.3)
    cfg = _load(pretrained, "train.lr=3e-4", "model.hidden_dropout=0.1")
    assert cfg.model == replace(MODEL, hidden_dropout=0.1)
    assert cfg.finetune.task == "RTE" and cfg.train.output_dir == "runs/glue/RTE"
    assert cfg.train.lr == 3e-4 and cfg.train.lr_schedule == "linear"  # fine-tuning defaults
    assert cfg.train.weight_decay == 0.01 and cfg.parallel.expert_parallel == 1
    moe = cfg.moe
    assert moe.routing_mode == "discrete" and moe.num_experts == 4
    assert not moe.train_codebook_in_discrete and moe.vq_loss_in_discrete
    assert moe.vq_loss_coeff == 0.3


def test_routing_codebook_and_vq_loss_settings_are_written_into_moe(tmp_path):
    pretrained = _consolidated(tmp_path)
    cfg = _load(
        pretrained,
        "finetune.routing=pretrain",
        "finetune.train_codebook=true",
        "finetune.vq_loss=false",
    )
    assert cfg.moe.routing_mode == "pretrain" and cfg.moe.train_codebook_in_discrete
    assert not cfg.moe.vq_loss_in_discrete and cfg.moe.vq_loss_coeff == 0.0


@pytest.mark.parametrize("routing", ["discrete", "pretrain"])
def test_pretraining_only_options_are_off_in_fine_tuning(tmp_path, routing):
    """Router alignment, the gate loss and the discrete phase (METHOD.md section 8) shape
    pretraining; a fine-tuning run keeping the router does not inherit them."""
    pretrained = _consolidated(
        tmp_path,
        router_alignment_coeff=0.1,
        gate_discrete_coeff=0.2,
        gate_discrete_start=7,
        discrete_phase_start=3,
    )
    moe = _load(pretrained, f"finetune.routing={routing}").moe
    assert moe.routing_mode == routing
    assert moe.router_alignment_coeff == 0.0 and moe.gate_discrete_coeff == 0.0
    assert moe.discrete_phase_start is None


def test_a_fine_tuning_run_as_pretrained_carries_its_routing_settings_over(tmp_path):
    """Intermediate-task fine-tuning starts from the first run's ``moe`` section as written: its
    routing mode bounds the new run's, and a VQ loss it switched off is not silently kept off."""
    path = tmp_path / "mnli" / "best"
    moe = MoEConfig(num_experts=4, routing_mode="discrete", vq_loss_coeff=0.0)
    written = FinetuneConfig(finetune=FinetuneSettings(task="MNLI"), model=MODEL, moe=moe)
    dump_yaml(written, path / "config.yaml")
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="fine-tuned without the VQ loss .* --no_vq_loss"):
        _load(path)
    cfg = _load(path, "finetune.vq_loss=false")
    assert cfg.finetune.task == "RTE" and cfg.model == MODEL
    assert cfg.moe.routing_mode == "discrete" and cfg.moe.vq_loss_coeff == 0.0
    assert _load(path, "moe.vq_loss_coeff=0.25").moe.vq_loss_coeff == 0.25
    with pytest.raises(ConfigError, match="pretrained in discrete mode and has neither"):
        _load(path, "finetune.vq_loss=false", "finetune.routing=pretrain")


@pytest.mark.parametrize(
    "router,routing,settings",
    [
        ("vqmoe", "discrete", {}),
        ("topk", "pretrain", {}),
        ("xmoe", "pretrain", {}),
        ("smoe_dropout", "pretrain", {"smoe_dropout_k_min": 4, "smoe_dropout_k_max": 4}),
        ("stablemoe", "pretrain", {"stablemoe_stage1_steps": 0}),
    ],
)
def test_default_fine_tune_routing_follows_the_router(tmp_path, router, routing, settings):
    """No --routing: VQMoE drops its router, every other router is kept in its final routing
    (SMoE-Dropout at its evaluation k, all 4 experts; StableMoE's distilled router, frozen)."""
    cfg = _load(_consolidated(tmp_path, router=router))
    assert cfg.finetune.routing == routing and cfg.moe.routing_mode == routing
    for key, value in settings.items():
        assert getattr(cfg.moe, key) == value, key


@pytest.mark.parametrize(
    "overrides,moe,message",
    [
        (("model.num_layers=3",), {}, "model.num_layers: checkpoint 2, given 3"),
        (("moe.num_experts=8",), {}, "moe.num_experts: checkpoint 4, given 8"),
        (
            ("finetune.routing=pretrain",),
            {"routing_mode": "discrete"},
            "pretrained in discrete mode and has neither",
        ),
        (
            ("finetune.routing=discrete",),
            {"router": "topk"},
            "no codebook to route by (moe.router=topk)",
        ),
        (("finetune.epochs=two",), {}, "'finetune.epochs': expected an integer"),
        (("finetune.pooling=max",), {}, "'max' is not one of ['last', 'mean']"),
    ],
)
def test_settings_that_cannot_work_are_refused(tmp_path, overrides, moe, message):
    with pytest.raises(ConfigError) as err:
        _load(_consolidated(tmp_path, **moe), *overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,setter",
    [
        ("train.steps=10", "finetune.epochs"),
        ("train.warmup_steps=3", "finetune.warmup_fraction"),
        ("moe.routing_mode=pretrain", "finetune.routing"),
        ("moe.train_codebook_in_discrete=true", "finetune.train_codebook"),
        ("moe.vq_loss_in_discrete=false", "finetune.vq_loss"),
    ],
)
def test_settings_fine_tuning_derives_are_refused_not_replaced(tmp_path, override, setter):
    pretrained = _consolidated(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"command line: '{key}' is derived .*{setter}"):
        _load(pretrained, override)
    config = tmp_path / "finetune.yaml"
    section, name = key.split(".")
    config.write_text(f"{section}:\n  {name}: {override.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=f"{config}: '{key}' is derived"):
        load_finetune_config(config, _required(pretrained))


def test_missing_paths_and_unknown_tasks_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="finetune.task is not set: pass --task"):
        load_finetune_config(None, ["finetune.data_dir=x", "finetune.pretrained=y"])
    with pytest.raises(ConfigError, match="finetune.pretrained is not set: pass --pretrained"):
        load_finetune_config(None, ["finetune.task=rte", "finetune.data_dir=x"])
    with pytest.raises(ConfigError, match="finetune.data_dir is not set: pass --data_dir"):
        load_finetune_config(None, ["finetune.task=rte", f"finetune.pretrained={tmp_path}"])
    with pytest.raises(GlueDataError, match="unknown GLUE task 'mnli2'.*did you mean MNLI"):
        _load(_consolidated(tmp_path), "finetune.task=mnli2")


def test_a_deepspeed_config_may_not_change_the_batch(tmp_path):
    cfg = _load(_consolidated(tmp_path), "finetune.micro_batch_size=8")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = replace(cfg, train=replace(cfg.train, deepspeed_config=str(ds)))
    deepspeed_config(cfg.train, 8, 4, "--micro_batch_size")
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4, "train_batch_size": 32}))
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg.train, 8, 4, "--micro_batch_size")
    assert str(err.value).startswith(f"{ds} sets gradient_accumulation_steps=4")
    assert "--micro_batch_size and train.gradient_accumulation_steps" in str(err.value)
    ds.unlink()
    with pytest.raises(ConfigError, match=f"train.deepspeed_config: {ds} does not exist"):
        deepspeed_config(cfg.train, 8, 4, "--micro_batch_size")
