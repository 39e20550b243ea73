"""The grouped-GEMM expert backend: the op against a float64 per-expert loop, the module against
megatron's SequentialMLP, and checkpoints that do not care which backend wrote them.

Expert parallelism (EP = 2) and tensor parallelism (TP = 2) of both backends are in
test_moe_distributed.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from megatron.core import dist_checkpointing
from moe_helpers import (
    TINY_MODEL,
    build_moe_layer,
    expert_weights,
    init_single_process,
    moe_variant,
)

from vqmoe_megatron.checkpoint.consolidated import full_state_dict, load_full_tensors
from vqmoe_megatron.checkpoint.training import (
    STATE_FILE,
    TrainerState,
    _sharded_state,
    load_model_weights,
    model_signature,
)
from vqmoe_megatron.config import ConfigError, ParallelConfig, PretrainConfig
from vqmoe_megatron.model import build_model, expert_backend
from vqmoe_megatron.moe import GroupedGemmExperts
from vqmoe_megatron.moe.grouped_gemm import expert_offsets, grouped_linear

# (rows per expert, in features K, out features N): empty experts, one busy expert, no rows at
# all, and widths that are not 16-byte multiples (padded for the kernel).
SHAPES = [
    ([3, 0, 4, 3], 16, 24),
    ([2, 2, 1], 5, 7),
    ([0, 9], 8, 12),
    ([0, 0, 0], 8, 8),
    ([5], 6, 3),
    ([1, 7, 0, 2, 4], 32, 40),
]
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _loop_reference(x, weight, counts, grad):
    """float64 ``F.linear`` per expert, its output and the gradients of x and weight."""
    x = x.detach().double().requires_grad_(True)
    weight = weight.detach().double().requires_grad_(True)
    parts = [rows @ weight[e].t() for e, rows in enumerate(x.split(counts))]
    out = torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
    out = out + 0 * weight.sum() + 0 * x.sum()  # keep both leaves in the graph when R == 0
    out.backward(grad.double())
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("counts,in_features,out_features", SHAPES)
def test_grouped_linear_matches_float64_loop(dtype, counts, in_features, out_features):
    gen = torch.Generator().manual_seed(sum(counts) * 31 + in_features)
    rows = sum(counts)
    x = torch.randn(rows, in_features, generator=gen).to(dtype).requires_grad_(True)
    weight = torch.randn(len(counts), out_features, in_features, generator=gen)
    weight = weight.to(dtype).requires_grad_(True)
    grad = torch.randn(rows, out_features, generator=gen).to(dtype)
    offsets = expert_offsets(torch.tensor(counts), x.device)
    out = grouped_linear(x, weight, offsets, rows)
    out.backward(grad)
    ref_out, ref_x, ref_w = _loop_reference(x, weight, counts, grad)
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (rows, out_features)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(x.grad.double(), ref_x, **tol)
    torch.testing.assert_close(weight.grad.double(), ref_w, **tol)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert not weight.grad[empty].any(), "an expert without rows has a zero gradient"


def test_grouped_linear_accepts_stride_zero_and_non_contiguous_gradients():
    """``out.sum().backward()`` sends a stride-0 gradient, which the CPU kernel rejects."""
    counts = [3, 1, 4]
    x = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(3, 8, 16, requires_grad=True)
    offsets = expert_offsets(torch.tensor(counts), x.device)
    grouped_linear(x, weight, offsets).sum().backward()
    _, ref_x, ref_w = _loop_reference(x, weight, counts, torch.ones(8, 8))
    torch.testing.assert_close(x.grad.double(), ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_w, rtol=1e-5, atol=1e-5)
    x.grad = weight.grad = None
    grad = torch.randn(8, 16)[:, ::2]  # non-contiguous
    grouped_linear(x, weight, offsets).backward(grad)
    _, ref_x, _ = _loop_reference(x, weight, counts, grad)
    torch.testing.assert_close(x.grad.double(), ref_x, rtol=1e-5, atol=1e-5)


def test_grouped_linear_refuses_rows_past_the_last_offset_and_int64_offsets():
    x, weight = torch.randn(6, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="groups hold 5 rows but x has 6"):
        grouped_linear(x, weight, expert_offsets(torch.tensor([2, 3]), x.device), rows=5)
    with pytest.raises(ValueError, match="int32"):
        grouped_linear(x, weight, torch.tensor([2, 6]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("router", ["vqmoe", "topk"])
def test_grouped_experts_match_sequential_mlp(dtype, activation, router):
    """Same weights (init is per global expert), same tokens: same output and every gradient."""
    model = replace(TINY_MODEL, activation=activation)
    results = {}
    for backend in ("grouped", "sequential"):
        moe = moe_variant(topk=2, router=router, router_dtype="fp32", expert_backend=backend)
        layer = build_moe_layer(moe, model).to(dtype).train()
        torch.manual_seed(3)
        x = torch.randn(8, 2, model.hidden_size).to(dtype).requires_grad_(True)
        proj = torch.randn(8, 2, model.hidden_size).to(dtype)
        y, _ = layer(x)
        (y * proj).sum().backward()
        results[backend] = (y, x.grad, *expert_weights(layer, grads=True))
    assert isinstance(build_moe_layer(moe_variant()).experts, GroupedGemmExperts)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grouped, sequential = results["grouped"], results["sequential"]
    torch.testing.assert_close(grouped[0], sequential[0], **tol)
    torch.testing.assert_close(grouped[1], sequential[1], **tol)
    for fc in (2, 3):
        for mine, theirs in zip(grouped[fc], sequential[fc]):
            torch.testing.assert_close(mine, theirs, **tol)


def _tiny_config(backend: str, activation: str) -> PretrainConfig:
    cfg = PretrainConfig(model=replace(TINY_MODEL, activation=activation), moe=moe_variant())
    cfg.moe = replace(cfg.moe, topk=2, router_dtype="fp32", expert_backend=backend)
    return cfg


def _gpt(cfg: PretrainConfig, seed: int):
    return build_model(cfg.model, cfg.moe, ParallelConfig(), seed=seed).eval()


def _logits(gpt, tokens):
    with torch.no_grad():
        logits = gpt(tokens, None, None)
    return logits


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("saved,loaded", [("grouped", "sequential"), ("sequential", "grouped")])
def test_checkpoint_of_one_backend_loads_into_the_other(tmp_path, activation, saved, loaded):
    """A training checkpoint (dist format) and a consolidated export written by one backend
    load into a model of the other backend with equal logits."""
    source_cfg, target_cfg = _tiny_config(saved, activation), _tiny_config(loaded, activation)
    source = _gpt(source_cfg, seed=5)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, TINY_MODEL.seq_length))
    expected = _logits(source, tokens)

    step_dir = tmp_path / "step_00000001"
    (step_dir / "dist").mkdir(parents=True)
    sharded, _ = _sharded_state(source, None, for_load=False)
    dist_checkpointing.save(sharded, str(step_dir / "dist"))
    state = TrainerState(step=1, signature=model_signature(source_cfg))
    (step_dir / STATE_FILE).write_text(json.dumps(asdict(state)), "utf-8")
    target = _gpt(target_cfg, seed=6)
    assert not torch.allclose(_logits(target, tokens), expected)
    load_model_weights(target, step_dir, target_cfg)
    torch.testing.assert_close(_logits(target, tokens), expected, rtol=1e-5, atol=1e-6)

    tensors = full_state_dict(source)
    target = _gpt(target_cfg, seed=7)
    assert sorted(tensors) == sorted(full_state_dict(target)), "consolidated names agree"
    load_full_tensors(target, tensors, tmp_path)
    torch.testing.assert_close(_logits(target, tokens), expected, rtol=1e-5, atol=1e-6)


def test_expert_backend_te_needs_transformer_engine():
    cfg = _tiny_config("te", "gelu")
    if torch.cuda.is_available():
        pytest.skip("this process may have Transformer Engine")
    with pytest.raises(ConfigError, match="moe.expert_backend=te needs Transformer Engine"):
        expert_backend(cfg.model, cfg.moe)
    assert expert_backend(cfg.model, replace(cfg.moe, expert_backend="auto")) == "grouped"
