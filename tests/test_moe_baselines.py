"""The baseline routers (moe/baselines.py) inside megatron's MoE layer against naive float64
per-token references: output, input gradient, every expert and router parameter gradient.

Grid: each router x top-k 1/2 (StableMoE: top-1, both stages) x two token shapes, plus X-MoE's
temperature variant and SMoE-Dropout's step ramp and evaluation k.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from moe_helpers import (
    baseline_settings,
    build_moe_layer,
    expert_weights,
    init_single_process,
    moe_variant,
    naive_ffn,
    switch_balance_loss,
)

from vqmoe_megatron.moe import metrics

TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(5, 3), (8, 2)]
VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


@dataclass
class Leaves:
    """float64 leaf copies of a layer's expert weights and router parameters."""

    fc1: list[torch.Tensor]
    fc2: list[torch.Tensor]
    router: dict[str, torch.Tensor]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().clone().requires_grad_(t.requires_grad)


def _leaves(layer) -> Leaves:
    fc1, fc2 = expert_weights(layer)
    router = {name: _leaf(p) for name, p in layer.router.named_parameters()}
    if "expert_embeddings" in router:  # X-MoE's no-grad rescale to norm 1.5 before use
        emb = router["expert_embeddings"].detach()
        router["expert_embeddings"] = (emb * (1.5 / emb.norm(dim=1, keepdim=True))).requires_grad_()
    for name, buf in layer.router.named_buffers():
        router[name] = buf.clone()
    return Leaves([_leaf(w) for w in fc1], [_leaf(w) for w in fc2], router)


def _mix(p: Leaves, x: torch.Tensor, experts, weights) -> torch.Tensor:
    return sum(w * naive_ffn(p.fc1[int(e)], p.fc2[int(e)], x) for e, w in zip(experts, weights))


def naive_xmoe(x, ids, p: Leaves, moe, training: bool):
    r = p.router
    outputs, scores, tops = [], [], []
    for t in range(x.shape[0]):
        reduced = r["projection"] @ x[t]
        emb = F.normalize(r["expert_embeddings"], dim=1, eps=1e-4)
        if moe.xmoe_temperature is None:
            logits = emb @ reduced
        else:
            logits = emb @ F.normalize(reduced, dim=0, eps=1e-4) / r["temperature"]
        probs = torch.softmax(logits, dim=0)
        weights, top = torch.topk(probs, moe.topk)
        scores.append(probs)
        tops.append(top)
        outputs.append(_mix(p, x[t], top, weights))
    loss = switch_balance_loss(scores, tops, len(p.fc1), moe) if training else x.sum() * 0
    return torch.stack(outputs), loss


def naive_hash(x, ids, p: Leaves, moe, training: bool):
    table = p.router["table"]
    outputs = [_mix(p, x[t], table[ids[t]], [1.0 / moe.topk] * moe.topk) for t in range(len(x))]
    return torch.stack(outputs), x.sum() * 0


def naive_smoe_dropout(x, ids, p: Leaves, moe, training: bool, k: int):
    outputs = []
    for t in range(x.shape[0]):
        logits = p.router["weight"] @ x[t]
        top_logits, top = torch.topk(logits, k)
        outputs.append(_mix(p, x[t], top, torch.softmax(top_logits, dim=0)))
    return torch.stack(outputs), x.sum() * 0


def naive_stablemoe(x, ids, p: Leaves, moe, training: bool, stage: int):
    r = p.router
    num_experts = len(p.fc1)
    learning = training and stage == 1
    experts, students, outputs, alphas = [], [], [], []
    for t in range(x.shape[0]):
        student = r["distill_centroids"] @ r["distill_embedding"][ids[t]]
        teacher = int((r["expert_centroids"].detach() @ x[t].detach()).argmax())
        e = teacher if learning else int(student.detach().argmax())
        alpha = torch.sigmoid(r["expert_centroids"][e] @ x[t])
        outputs.append(alpha * naive_ffn(p.fc1[e], p.fc2[e], x[t]) + (1 - alpha) * x[t])
        experts.append(e)
        students.append(student)
        alphas.append(alpha)
    y = torch.stack(outputs)
    if not learning:
        return y, x.sum() * 0
    tokens = x.shape[0]
    counts = torch.bincount(torch.tensor(experts), minlength=num_experts).double()
    mean = tokens / num_experts
    balance = sum((counts[e] - mean) / mean * a for e, a in zip(experts, alphas))
    distill = sum(F.cross_entropy(s[None], torch.tensor([e])) for s, e in zip(students, experts))
    loss = (moe.stablemoe_balance_coeff * balance + moe.stablemoe_distill_coeff * distill) / tokens
    return y, loss


def _compare(layer, moe, naive, shape, training=True, seed=0):
    """Run ``layer`` and ``naive`` on the same tokens; compare outputs and every gradient."""
    torch.manual_seed(seed)
    seq, batch = shape
    hidden = layer.config.hidden_size
    x = torch.randn(seq, batch, hidden, dtype=torch.float64)
    proj = torch.randn(seq, batch, hidden, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (batch, seq))
    layer.double().train(training)
    leaves = _leaves(layer)
    if hasattr(layer.router, "set_token_ids"):
        layer.router.set_token_ids(ids)
    xl = x.clone().requires_grad_(True)
    y, _ = layer(xl)
    (y * proj).sum().backward()

    x_ref = x.reshape(-1, hidden).clone().requires_grad_(True)
    y_ref, loss = naive(x_ref, ids.t().reshape(-1), leaves, moe, training)
    ((y_ref * proj.reshape(-1, hidden)).sum() + loss).backward()

    torch.testing.assert_close(y.reshape(-1, hidden), y_ref.detach(), **TOL)
    torch.testing.assert_close(xl.grad.reshape(-1, hidden), x_ref.grad, **TOL)
    fc1_grads, fc2_grads = expert_weights(layer, grads=True)
    for i in range(len(leaves.fc1)):
        for got, leaf in ((fc1_grads[i], leaves.fc1[i]), (fc2_grads[i], leaves.fc2[i])):
            if leaf.grad is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, leaf.grad, **TOL)
    for name, param in layer.router.named_parameters():
        leaf = leaves.router[name]
        assert param.requires_grad == leaf.requires_grad, name
        if param.requires_grad:
            expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(got, expected, **TOL, msg=name)


@pytest.mark.parametrize(
    "topk,temperature,shape", list(itertools.product([1, 2], [None, 0.5], SHAPES))
)
def test_xmoe_matches_naive_reference(topk, temperature, shape):
    moe = moe_variant(router="xmoe", topk=topk, xmoe_dim=3, xmoe_temperature=temperature)
    _compare(build_moe_layer(moe), moe, naive_xmoe, shape)


def test_xmoe_rescales_expert_embeddings_without_changing_logits():
    moe = moe_variant(router="xmoe", xmoe_dim=3)
    layer = build_moe_layer(moe).double().train()
    x = torch.randn(4, 2, layer.config.hidden_size, dtype=torch.float64)
    before = layer.router.gating(x).detach()
    norms = layer.router.expert_embeddings.detach().norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 1.5))
    torch.testing.assert_close(layer.router.gating(x), before)


@pytest.mark.parametrize("topk,shape", list(itertools.product([1, 2], SHAPES)))
def test_hash_matches_naive_reference(topk, shape):
    moe = moe_variant(router="hash", topk=topk)
    _compare(build_moe_layer(moe), moe, naive_hash, shape)


def test_hash_table_is_fixed_and_balanced_over_the_vocabulary():
    layer = build_moe_layer(moe_variant(router="hash", topk=2))
    table = layer.router.table
    assert table.shape == (128, 2)  # the padded vocabulary
    assert (table[:, 0] != table[:, 1]).all()
    assert torch.bincount(table[:, 0], minlength=4).tolist() == [32] * 4
    again = build_moe_layer(moe_variant(router="hash", topk=2))
    assert torch.equal(again.router.table, table)
    assert "router.table" in layer.state_dict()


@pytest.mark.parametrize(
    "step,training,shape",
    [(0, True, SHAPES[0]), (5, True, SHAPES[1]), (10, True, SHAPES[0]), (3, False, SHAPES[1])],
)
def test_smoe_dropout_matches_naive_reference(step, training, shape):
    """k grows 1 -> 4 over 10 steps (k = round(3 * step / 10) + 1); evaluation uses eval_k 3."""
    moe = moe_variant(
        router="smoe_dropout",
        smoe_dropout_k_min=1,
        smoe_dropout_k_max=4,
        smoe_dropout_ramp_steps=10,
        smoe_dropout_eval_k=3,
    )
    layer = build_moe_layer(moe)
    layer.begin_step(step, seed=0)
    k = round(3 * step / 10) + 1 if training else 3

    def naive(x, ids, p, moe, training):
        return naive_smoe_dropout(x, ids, p, moe, training, k)

    _compare(layer, moe, naive, shape, training=training)
    assert layer.router.topk == k
    assert not layer.router.weight.requires_grad


@pytest.mark.parametrize("stage,shape", list(itertools.product([1, 2], SHAPES)))
def test_stablemoe_matches_naive_reference(stage, shape):
    moe = moe_variant(router="stablemoe", stablemoe_stage1_steps=3, stablemoe_distill_dim=5)
    layer = build_moe_layer(moe)
    layer.begin_step(3 if stage == 1 else 4, seed=0)

    def naive(x, ids, p, moe, training):
        return naive_stablemoe(x, ids, p, moe, training, stage)

    _compare(layer, moe, naive, shape)


def test_stablemoe_evaluates_with_the_distilled_router():
    moe = moe_variant(router="stablemoe", stablemoe_stage1_steps=3, stablemoe_distill_dim=5)
    layer = build_moe_layer(moe)
    layer.begin_step(1, seed=0)

    def naive(x, ids, p, moe, training):
        return naive_stablemoe(x, ids, p, moe, training, stage=1)

    _compare(layer, moe, naive, SHAPES[0], training=False)


def test_token_id_router_needs_ids():
    layer = build_moe_layer(moe_variant(router="hash"))
    layer.router.set_token_ids(None)
    with pytest.raises(RuntimeError, match="routes by token id"):
        layer(torch.randn(2, 2, layer.config.hidden_size))


@pytest.mark.parametrize(
    "router,extra",
    [("xmoe", {}), ("xmoe", {"xmoe_temperature": 0.1}), ("hash", {})]
    + [("smoe_dropout", {}), ("stablemoe", {})],
)
def test_model_size_counts_every_router_parameter(router, extra):
    from moe_helpers import TINY_MODEL

    from vqmoe_megatron.config import ParallelConfig
    from vqmoe_megatron.model import build_model
    from vqmoe_megatron.training.flops import model_size

    moe = moe_variant(router=router, **extra)
    gpt = build_model(TINY_MODEL, moe, ParallelConfig(), seed=1)
    assert model_size(TINY_MODEL, moe).total == sum(p.numel() for p in gpt.parameters())


@pytest.mark.parametrize("router", ["topk", "xmoe", "hash", "smoe_dropout", "stablemoe"])
def test_every_router_records_its_routing_metrics(router):
    """Tokens, expert load, dead experts and imbalance equal the counts of the router's own
    routing map; every router with scores records their entropy (hash has none)."""
    moe = moe_variant(topk=2 if router in ("topk", "hash") else 1, **baseline_settings(router))
    layer = build_moe_layer(moe).eval()
    x = torch.randn(5, 3, layer.config.hidden_size)
    if hasattr(layer.router, "set_token_ids"):
        layer.router.set_token_ids(torch.randint(0, VOCAB, (3, 5)))
    collector = layer.router.routing_metrics
    with torch.no_grad(), collector.paused():
        _, routing_map = layer.router(x)
    with torch.no_grad():
        layer(x)
    stats = collector.summarize()[layer.router.layer_number]
    rows = routing_map.sum(dim=0).double()
    assert stats["tokens"] == 15
    assert stats["rows_per_token"] == pytest.approx(rows.sum().item() / 15)
    assert stats["expert_load"] == pytest.approx((rows / rows.sum()).tolist())
    assert stats["dead_experts"] == (rows == 0).sum().item()
    assert stats["imbalance"] == pytest.approx((rows.max() / rows.mean()).item())
    if router == "hash":
        assert "router_entropy" not in stats
    else:
        assert 0 <= stats["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_recorded_assignment_excludes_padding():
    collector = metrics.RoutingMetrics()
    routing_map = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    padding = torch.tensor([[False, False], [True, False]])  # [S=2, B=2]: token 2 is padding
    metrics.record_assignment(collector, 1, routing_map, padding)
    stats = collector.summarize()[1]
    assert stats["tokens"] == 3
    assert stats["expert_load"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert stats["dead_experts"] == 0
