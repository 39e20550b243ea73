"""A Hugging Face export opens like any checkpoint path: its weights read back equal the
consolidated weights bit for bit in both routing modes, the megatron model loaded from it
computes the original's logits, conversion and fine-tuning take it, and a damaged export is
refused naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from convert_helpers import (
    assert_one_error_line,
    cli,
    convert,
    project_logits_of,
    random_tokens,
    run_of,
    shards,
)
from finetune_helpers import finetune, glue_copy
from safetensors.torch import load_file, save_file

from vqmoe_megatron.checkpoint.consolidated import ROUTER_ONLY_KEYS
from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.hf_export import IGNORED_BUFFERS, hf_state_dict, project_tensors
from vqmoe_megatron.checkpoint.opened import HF, open_checkpoint
from vqmoe_megatron.checkpoint.training import model_signature
from vqmoe_megatron.config import PretrainConfig
from vqmoe_megatron.convert import read_consolidated

pytestmark = pytest.mark.slow

ROUTINGS = ("pretrain", "discrete")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The EP = 1 tiny run, its consolidated directory and its HF exports in both modes."""
    run = run_of(tmp_path_factory, "ep1_zero1")
    out = tmp_path_factory.mktemp("hf_open")
    convert("consolidated", run, out / "consolidated")
    for routing in ROUTINGS:
        convert("hf", run, out / routing, "--routing", routing)
    return run, out


def _exported_tensors(tensors: dict, routing: str) -> dict:
    """The consolidated tensors an export in ``routing`` holds (no codebook statistics; no
    router or gate in discrete mode)."""
    return {
        k: v
        for k, v in tensors.items()
        if not IGNORED_BUFFERS.search(k)
        and not (routing == "discrete" and any(part in k for part in ROUTER_ONLY_KEYS))
    }


@pytest.mark.parametrize("routing", ROUTINGS)
def test_an_export_opens_with_the_consolidated_weights_and_config(exported, routing):
    _, out = exported
    cfg, consolidated = read_consolidated(out / "consolidated")
    opened = open_checkpoint(out / routing)
    assert opened.kind == HF and opened.routing_mode == routing and opened.task is None
    assert opened.tokenizer_model() == out / routing / "tokenizer.model"
    expected = {**model_signature(cfg), "moe.routing_mode": routing}
    assert model_signature(opened.cfg) == expected
    assert opened.cfg.model.seq_length == cfg.model.seq_length

    _, tensors = read_consolidated(out / routing)
    want = _exported_tensors(consolidated, routing)
    assert sorted(tensors) == sorted(want)
    for key, value in want.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key


def test_the_codebook_update_rule_is_recorded_and_read_back(exported, tmp_path):
    """An EMA-trained codebook trained further after a round trip through HF moves by EMA."""
    _, out = exported
    raw = json.loads((out / "discrete" / "config.json").read_text())
    assert raw["codebook_update"] == "gradient"  # the tiny run's setting, written by the export
    shutil.copytree(out / "discrete", tmp_path / "ema")
    (tmp_path / "ema" / "config.json").write_text(json.dumps({**raw, "codebook_update": "ema"}))
    assert open_checkpoint(tmp_path / "ema").cfg.moe.codebook_update == "ema"


def test_the_name_mapping_inverts_for_swiglu_and_grouped_queries(tmp_path):
    """Shapes the tiny run lacks: SwiGLU's [gate; up] and 2 query groups of 2 heads (d = 5)."""
    cfg = PretrainConfig()
    cfg.model.activation, cfg.model.hidden_size = "swiglu", 20
    cfg.model.num_attention_heads, cfg.model.num_query_groups = 4, 2
    g = torch.Generator().manual_seed(0)
    tensors = {
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(40, 20, generator=g),
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight": torch.randn(
            6, 20, generator=g
        ),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, 20, generator=g),
    }
    hf = hf_state_dict(tensors, cfg)
    assert sorted(hf) == [
        "model.layers.0.mlp.experts.1.gate_proj.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (10, 20)
    back = project_tensors(hf, cfg, tmp_path)
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize(
    "router, name",
    [("vqmoe", "router.continuous.weight"), ("xmoe", "router.weight"), ("hash", "router.table")],
)
def test_router_weights_sharing_an_hf_name_come_back_by_the_router(tmp_path, router, name):
    cfg = PretrainConfig()
    cfg.moe.router = router
    tensors = {f"decoder.layers.1.mlp.{name}": torch.arange(6.0).view(2, 3)}
    back = project_tensors(hf_state_dict(tensors, cfg), cfg, tmp_path)
    assert list(back) == list(tensors) and torch.equal(
        back[f"decoder.layers.1.mlp.{name}"], tensors[f"decoder.layers.1.mlp.{name}"]
    )


@pytest.mark.parametrize("routing", ROUTINGS)
def test_the_model_loaded_from_an_export_computes_the_original_logits(exported, routing):
    run, out = exported
    tokens = random_tokens(open_checkpoint(run).cfg.model.vocab_size)
    torch.testing.assert_close(
        project_logits_of(out / routing, tokens),
        project_logits_of(run, tokens, routing),
        rtol=0,
        atol=0,
    )


def test_an_export_converts_to_a_consolidated_directory(exported, tmp_path):
    _, out = exported
    convert("consolidated", out / "pretrain", tmp_path / "c")
    _, want = read_consolidated(out / "consolidated")
    _, got = read_consolidated(tmp_path / "c")
    assert sorted(_exported_tensors(got, "pretrain")) == sorted(_exported_tensors(want, "pretrain"))
    for key, value in _exported_tensors(want, "pretrain").items():
        assert torch.equal(got[key], value), key
    # the export carries no codebook statistics: the converted codebook counts as initialised
    assert not any(bool(v) for k, v in got.items() if k.endswith("needs_data_init"))


def test_fine_tuning_starts_from_an_export(exported, tmp_path):
    _, out = exported
    run = tmp_path / "run"
    finetune(
        "sst2", glue_copy(tmp_path / "glue"), out / "discrete", run, "--steps", "2",
        "--micro_batch_size", "2",
    )  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["settings"]["routing"] == "discrete"


def test_evaluation_of_an_export_equals_the_run_s(exported, tmp_path_factory, tmp_path):
    run, out = exported
    data = shards(tmp_path_factory)
    results = {}
    for name, args in (("run", (run, "--routing", "discrete")), ("hf", (out / "discrete",))):
        cli("vqmoe_megatron.evaluate", "--checkpoint", *args, "--data-dir", data,
            "--json", tmp_path / f"{name}.json")  # fmt: skip
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["hf"]["routing"] == "discrete"
    assert results["hf"]["loss"] == results["run"]["loss"]
    assert results["hf"]["tokens"] == results["run"]["tokens"]


def _damaged(exported, tmp_path, name: str):
    copy = tmp_path / "hf"
    shutil.copytree(exported[1] / "pretrain", copy)
    file = copy / name
    return copy, file


def test_an_export_without_config_or_weights_is_refused_naming_the_file(exported, tmp_path):
    for name in ("config.json", "model.safetensors"):
        copy, file = _damaged(exported, tmp_path / name, name)
        file.unlink()
        with pytest.raises(CheckpointError, match=f"{file} is missing"):
            open_checkpoint(copy)
    copy, file = _damaged(exported, tmp_path / "old", "config.json")
    raw = json.loads(file.read_text())
    del raw["moe_layer_freq"]
    file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="lacks moe_layer_freq: it was written by an older"):
        open_checkpoint(copy)


def test_an_export_with_a_tensor_of_the_wrong_shape_is_refused_naming_the_file(exported, tmp_path):
    copy, file = _damaged(exported, tmp_path, "model.safetensors")
    tensors = load_file(str(file))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(file))
    proc = convert("consolidated", copy, tmp_path / "out", check=False)
    assert_one_error_line(proc, str(file), "decoder.layers.0.self_attention.linear_proj.weight")
    assert not (tmp_path / "out").exists()
