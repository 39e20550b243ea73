"""Round trips of the conversion CLI on tiny checkpoints saved at EP = 1 (ZeRO-1) and EP = 2
(ZeRO-2): consolidated fp32 checkpoints and the HF export reproduce the source model's logits
to 1e-5, at other layouts and in both routing modes."""

from __future__ import annotations

import pytest
import torch
from convert_helpers import (
    RUNS,
    conversion_record,
    convert,
    project_logits_of,
    random_tokens,
    run_of,
)
from safetensors import safe_open

from vqmoe_megatron.convert import read_consolidated
from vqmoe_megatron.data import Tokenizer

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


@pytest.mark.parametrize("name", sorted(RUNS))
def test_consolidated_round_trip_reproduces_the_checkpoint(tmp_path_factory, tmp_path, name):
    run = run_of(tmp_path_factory, name)
    out = tmp_path / "consolidated"
    proc = convert("consolidated", run, out)
    assert "verified" in proc.stdout
    record = conversion_record(out)
    assert record["verified"]["max_abs_logit_diff"] <= TOLERANCE
    cfg, tensors = read_consolidated(out)
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) for t in tensors.values())
    experts = {k for k in tensors if ".local_experts." in k and k.startswith("decoder.layers.0.")}
    assert len(experts) == 2 * cfg.moe.num_experts  # every global expert of layer 0, fc1 + fc2
    assert (out / "tokenizer.model").is_file()
    tokens = random_tokens(cfg.model.vocab_size)
    source = project_logits_of(run, tokens)
    converted = project_logits_of(out, tokens)
    assert (source - converted).abs().max() <= TOLERANCE


@pytest.mark.distributed
def test_consolidated_written_at_expert_parallel_2_matches_one_process(tmp_path_factory, tmp_path):
    run = run_of(tmp_path_factory, "ep1_zero1")
    out = tmp_path / "ep2"
    convert("consolidated", run, out, "--expert-parallel", "2", nproc=2)
    record = conversion_record(out)
    assert record["layout"]["expert_parallel"] == 2
    assert record["verified"]["max_abs_logit_diff"] <= TOLERANCE
    tokens = random_tokens(400)
    assert (
        project_logits_of(run, tokens) - project_logits_of(out, tokens)
    ).abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory):
    """The EP = 2 run exported in both routing modes (HF directories)."""
    run = run_of(tmp_path_factory, "ep2_zero2")
    out = tmp_path_factory.mktemp("hf")
    for routing in ("pretrain", "discrete"):
        convert("hf", run, out / routing, "--routing", routing)
    return run, out


@pytest.mark.parametrize("routing", ["pretrain", "discrete"])
def test_hf_model_equals_project_model(hf_exports, routing):
    from transformers import AutoModelForCausalLM

    run, out = hf_exports
    record = conversion_record(out / routing)
    assert record["routing"] == routing and record["verified"]["max_abs_logit_diff"] <= TOLERANCE
    model = AutoModelForCausalLM.from_pretrained(out / routing, trust_remote_code=True).eval()
    assert model.config.routing_mode == routing and model.config.vocab_size == 512
    tokens = random_tokens(400, batch=4, seed=11)
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    assert (logits - project_logits_of(run, tokens, routing)).abs().max() <= TOLERANCE
    with safe_open(out / routing / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    has_router = any(".mlp.router." in n or ".mlp.gate." in n for n in names)
    assert has_router == (routing == "pretrain")


def test_routing_modes_compute_different_functions(hf_exports):
    run, _ = hf_exports
    tokens = random_tokens(400, seed=3)
    gap = project_logits_of(run, tokens, "pretrain") - project_logits_of(run, tokens, "discrete")
    assert gap.abs().max() > 1e-2


def test_hf_tokenizer_and_generation(hf_exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = hf_exports
    tokenizer = AutoTokenizer.from_pretrained(out / "pretrain", trust_remote_code=True)
    project = Tokenizer(out / "pretrain" / "tokenizer.model")
    text = "Fellow-Citizens of the Senate </s> and <pad> House: café\n\n 1790"
    assert tokenizer(text)["input_ids"] == project.encode(text)
    assert tokenizer.decode(project.encode(text)) == project.decode(project.encode(text))
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == project.eos_id
    model = AutoModelForCausalLM.from_pretrained(out / "pretrain", trust_remote_code=True).eval()
    prompts = ["The state of the Union", "Fellow citizens of the Senate and House"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    cached = model.generate(**batch, max_new_tokens=10, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    alone = model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=10)
    assert alone[0, -10:].tolist() == cached[0, -10:].tolist()
    new = cached[:, batch["input_ids"].shape[1] :]
    assert new.max() < project.vocab_size and (new != project.pad_id).all()
    assert all(isinstance(s, str) for s in tokenizer.batch_decode(new))


def test_hf_export_from_a_consolidated_directory(tmp_path_factory, tmp_path):
    run = run_of(tmp_path_factory, "ep1_zero1")
    convert("consolidated", run, tmp_path / "c")
    convert("hf", tmp_path / "c", tmp_path / "hf", "--routing", "discrete")
    assert conversion_record(tmp_path / "hf")["verified"]["max_abs_logit_diff"] <= TOLERANCE
