"""Routing fluctuation (moe/fluctuation.py): counts on hand-made assignments, and the top-1
expert each router's layer records for a token set."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import (
    TINY_MODEL,
    baseline_settings,
    build_moe_layer,
    init_single_process,
    moe_variant,
)

from vqmoe_megatron.moe.fluctuation import Top1Recorder, count_changes, fluctuation


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _t(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def test_identical_assignments_do_not_fluctuate():
    a = {1: _t(0, 1, 2, 3), 2: _t(3, 3, 0, 1)}
    result = fluctuation(count_changes(a, {k: v.clone() for k, v in a.items()}))
    assert result == {"layers": {1: 0.0, 2: 0.0}, "overall": 0.0, "tokens": 4}


def test_every_token_changed_fluctuates_fully():
    result = fluctuation(count_changes({1: _t(0, 1, 2)}, {1: _t(1, 2, 0)}))
    assert result["layers"] == {1: 1.0} and result["overall"] == 1.0


def test_partial_changes_per_layer_and_overall():
    before = {1: _t(0, 1, 2, 3), 2: _t(0, 0, 0, 0)}
    after = {1: _t(0, 1, 2, 0), 2: _t(1, 1, 0, 0)}  # layer 1: 1 of 4, layer 2: 2 of 4
    counts = count_changes(before, after)
    assert counts == {1: (1, 4), 2: (2, 4)}
    result = fluctuation(counts)
    assert result["layers"] == {1: 0.25, 2: 0.5}
    assert result["overall"] == pytest.approx(3 / 8)


def test_padding_is_not_compared():
    before = {1: _t(0, -1, 2, -1, 1)}
    after = {1: _t(1, 3, -1, -1, 1)}  # only tokens 0 and 4 are real in both: 1 change
    assert count_changes(before, after) == {1: (1, 2)}
    assert fluctuation({1: (0, 0)})["overall"] == 0.0


def test_different_token_sets_or_layers_are_refused():
    with pytest.raises(ValueError, match="same token set"):
        count_changes({1: _t(0, 1)}, {1: _t(0, 1, 2)})
    with pytest.raises(ValueError, match="different MoE layers"):
        count_changes({1: _t(0)}, {2: _t(0)})


def _record(layer, x, ids=None, padding=None):
    if ids is not None:
        layer.router.set_token_ids(ids)
    with torch.no_grad(), Top1Recorder(torch.nn.ModuleList([layer])) as recorder:
        recorder.mark_padding(padding)
        layer(x)
    return recorder.assignments()[layer.router.layer_number]


@pytest.mark.parametrize("router", ["topk", "xmoe", "smoe_dropout", "hash", "stablemoe"])
def test_top1_of_baseline_routers_is_the_argmax_of_their_probs(router):
    layer = build_moe_layer(
        moe_variant(topk=2 if router == "hash" else 1, **baseline_settings(router))
    )
    layer.eval()
    x = torch.randn(5, 3, TINY_MODEL.hidden_size)
    ids = torch.randint(0, 64, (3, 5)) if router in ("hash", "stablemoe") else None
    top1 = _record(layer, x, ids)
    with torch.no_grad(), layer.router.routing_metrics.paused():
        probs, _ = layer.router(x)
    assert top1.tolist() == probs.argmax(dim=-1).tolist()
    if router == "hash":  # equal weights: the lowest expert id of the token id's table row
        assert top1.tolist() == layer.router.table[ids.t().reshape(-1)].min(dim=1).values.tolist()


def test_top1_of_vqmoe_discrete_is_the_nearest_codes_expert():
    layer = build_moe_layer(moe_variant(routing_mode="discrete")).eval()
    x = torch.randn(5, 3, TINY_MODEL.hidden_size)
    padding = torch.zeros(5, 3, dtype=torch.bool)
    padding[4, 1] = True
    top1 = _record(layer, x, padding=padding)
    codes = layer.router.quantizer.assign(x.reshape(-1, TINY_MODEL.hidden_size))
    expected = codes % layer.config.num_moe_experts
    expected[padding.reshape(-1)] = -1
    assert top1.tolist() == expected.tolist()


def test_top1_of_vqmoe_pretrain_is_the_top1_of_the_combined_routing():
    """Naive: g_c * softmax-top-k(router) + g_d * onehot(nearest code's expert), argmax."""
    layer = build_moe_layer(moe_variant(routing_mode="pretrain")).eval()
    router = layer.router
    x = torch.randn(5, 3, TINY_MODEL.hidden_size)
    top1 = _record(layer, x)
    flat = x.reshape(-1, TINY_MODEL.hidden_size)
    with torch.no_grad(), router.routing_metrics.paused():
        probs_c, _ = router.continuous(x)
        gate = router.gate(flat)
        expert_d = router.quantizer.assign(flat) % layer.config.num_moe_experts
    combined = gate[:, :1] * probs_c + gate[:, 1:] * torch.nn.functional.one_hot(expert_d, 4)
    assert top1.tolist() == combined.argmax(dim=-1).tolist()
