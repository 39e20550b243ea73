"""The fused VQMoE layer against a naive float64 per-token reference: output and every gradient.

Grid: both routing modes x the three expert inputs x top-k 1/2 x K = E and K = 2E, plus discrete
layer norms, cosine distance and the reference router flag. Tolerances are loose enough for
megatron's fp32 softmax inside the router (1e-7 relative) and tight enough to catch any
structural error (those are O(1)).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from moe_helpers import (
    build_moe_layer,
    expert_weights,
    init_single_process,
    moe_variant,
    naive_params,
    naive_vqmoe,
)

TOKENS_S, TOKENS_B = 12, 3
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _run_layer(layer, x: torch.Tensor, proj: torch.Tensor):
    """Forward the layer on ``x`` [S, B, H] (float64), backprop sum(y * proj); return y [T, H]."""
    x = x.clone().requires_grad_(True)
    y, bias = layer(x)
    assert bias is None
    (y * proj).sum().backward()
    return y.reshape(-1, y.shape[-1]), x.grad.reshape(-1, x.shape[-1])


def _compare(layer, moe, mode: str, seed: int = 0, gate_coeff: float = 0.0):
    torch.manual_seed(seed)
    hidden = layer.config.hidden_size
    x = torch.randn(TOKENS_S, TOKENS_B, hidden, dtype=torch.float64)
    proj = torch.randn(TOKENS_S, TOKENS_B, hidden, dtype=torch.float64)
    layer.double().train()
    ref = naive_params(layer)
    y, x_grad = _run_layer(layer, x, proj)

    x_ref = x.reshape(-1, hidden).clone().requires_grad_(True)
    y_ref, losses = naive_vqmoe(x_ref, ref, moe, mode, gate_coeff)
    ((y_ref * proj.reshape(-1, hidden)).sum() + losses).backward()

    torch.testing.assert_close(y, y_ref.detach(), **TOL)
    torch.testing.assert_close(x_grad, x_ref.grad, **TOL)
    router = layer.router
    pairs = [(router.quantizer.codebook, ref.codebook)]
    fc1_grads, fc2_grads = expert_weights(layer, grads=True)
    for i in range(len(ref.fc1)):
        torch.testing.assert_close(fc1_grads[i], ref.fc1[i].grad, **TOL)
        torch.testing.assert_close(fc2_grads[i], ref.fc2[i].grad, **TOL)
    if mode == "pretrain":
        pairs += [
            (router.continuous.weight, ref.router),
            (router.gate.linear.weight, ref.gate_w),
            (router.gate.linear.bias, ref.gate_b),
        ]
    if ref.ln_in is not None:
        pairs += [
            (router.discrete_norm_in.weight, ref.ln_in[0]),
            (router.discrete_norm_in.bias, ref.ln_in[1]),
            (router.discrete_norm_out.weight, ref.ln_out[0]),
            (router.discrete_norm_out.bias, ref.ln_out[1]),
        ]
    for param, leaf in pairs:
        assert param.requires_grad == leaf.requires_grad
        if param.requires_grad:
            torch.testing.assert_close(param.grad, leaf.grad, **TOL)


GRID = list(
    itertools.product(["pretrain", "discrete"], ["paper", "token", "quantized"], [1, 2], [1, 2])
)


@pytest.mark.parametrize("mode,expert_input,topk,codes_per_expert", GRID)
def test_layer_matches_naive_reference(mode, expert_input, topk, codes_per_expert):
    moe = moe_variant(
        routing_mode=mode,
        expert_input=expert_input,
        topk=topk,
        num_codes=4 * codes_per_expert,
    )
    _compare(build_moe_layer(moe), moe, mode)


@pytest.mark.parametrize("mode", ["pretrain", "discrete"])
def test_discrete_layernorm_matches_reference(mode):
    moe = moe_variant(routing_mode=mode, discrete_layernorm=True, topk=2)
    _compare(build_moe_layer(moe), moe, mode)


@pytest.mark.parametrize("expert_input", ["paper", "token"])
def test_cosine_distance_matches_reference(expert_input):
    moe = moe_variant(distance="cosine", expert_input=expert_input, num_codes=8)
    _compare(build_moe_layer(moe), moe, "pretrain")


def test_reference_router_flag_matches_reference():
    moe = moe_variant(reference_router=True)
    _compare(build_moe_layer(moe), moe, "pretrain")


def test_token_mode_merges_rows_when_paths_agree():
    """x_d = x: one stream; a token whose router and VQ experts coincide routes ONE row whose
    weight is g_c * w + g_d."""
    moe = moe_variant(expert_input="token", topk=1)
    layer = build_moe_layer(moe).double()
    torch.manual_seed(3)
    x = torch.randn(TOKENS_S, TOKENS_B, layer.config.hidden_size, dtype=torch.float64)
    plan = layer.router(x)
    assert plan.num_streams == 1 and plan.hidden is x
    rows_per_token = plan.routing_map.sum(dim=1)
    assert set(rows_per_token.tolist()) == {1, 2}, "must exercise merged and unmerged tokens"
    flat = x.reshape(-1, x.shape[-1])
    gate = layer.router.gate(flat)
    router_weight = torch.softmax(flat @ layer.router.continuous.weight.t(), dim=-1).max(dim=-1)
    expected_total = gate[:, 0] * router_weight.values + gate[:, 1]
    torch.testing.assert_close(plan.probs.sum(dim=1), expected_total, **TOL)
    merged = rows_per_token == 1
    torch.testing.assert_close(plan.probs[merged].max(dim=1).values, expected_total[merged], **TOL)


def test_stacked_streams_dispatch_k_plus_one_rows():
    moe = moe_variant(expert_input="paper", topk=2)
    layer = build_moe_layer(moe).double()
    x = torch.randn(TOKENS_S, TOKENS_B, layer.config.hidden_size, dtype=torch.float64)
    plan = layer.router(x)
    tokens = TOKENS_S * TOKENS_B
    assert plan.num_streams == 2
    assert plan.hidden.shape == (2 * TOKENS_S, TOKENS_B, layer.config.hidden_size)
    assert plan.num_rows == tokens * 3 == int(plan.routing_map.sum())
    assert plan.routing_map[tokens:].sum(dim=1).eq(1).all()


@pytest.mark.parametrize(
    "expert_input,topk,distance",
    [("paper", 1, "l2"), ("token", 2, "l2"), ("paper", 2, "cosine")],
)
def test_router_alignment_and_gate_losses_match_reference(expert_input, topk, distance):
    """Both pretraining losses of METHOD.md section 8, on the fused path (L2) and the separate
    one (cosine), with the gate loss half-way up its ramp (step 4 of 3..6: weight 0.5 x 0.5)."""
    moe = moe_variant(
        expert_input=expert_input,
        topk=topk,
        distance=distance,
        router_alignment_coeff=0.3,
        gate_discrete_coeff=0.5,
        gate_discrete_start=3,
        gate_discrete_ramp_steps=4,
    )
    layer = build_moe_layer(moe)
    layer.begin_step(4, seed=0)
    assert layer.router.gate_loss_coeff == pytest.approx(0.25)
    _compare(layer, moe, "pretrain", gate_coeff=0.25)


def test_gate_loss_ramps_from_its_start_step():
    moe = moe_variant(gate_discrete_coeff=0.8, gate_discrete_start=3, gate_discrete_ramp_steps=4)
    router = build_moe_layer(moe).router
    weights = []
    for step in (1, 2, 3, 4, 6, 50):
        router.begin_step(step)
        weights.append(router.gate_loss_coeff)
    assert weights == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.8, 0.8])


def test_discrete_phase_routes_by_codes_and_leaves_router_and_gate_unused():
    """From ``discrete_phase_start`` on, the pretrain-mode layer is the discrete reference (VQ
    loss on, codebook still learning); router and gate get no gradient, and stay in the model."""
    moe = moe_variant(discrete_phase_start=5, topk=2)
    layer = build_moe_layer(moe)
    layer.begin_step(4, seed=0)
    assert layer.router.active_routing == "pretrain"
    layer.begin_step(5, seed=0)
    assert layer.router.active_routing == "discrete" and layer.routing_mode == "pretrain"
    _compare(layer, moe, "discrete")
    router = layer.router
    assert router.quantizer.codebook.grad is not None
    for param in (*router.continuous.parameters(), *router.gate.parameters()):
        assert param.grad is None
    assert "router.continuous.weight" in layer.state_dict()
