"""Behaviour of the VQMoE pieces beyond the reference comparison: modes, gradients, codebook upkeep."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import TINY_MODEL, build_moe_layer, init_single_process, moe_variant

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.model import build_model
from vqmoe_megatron.moe import VectorQuantizer, metrics

S, B = 8, 4


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _forward_backward(layer, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(S, B, TINY_MODEL.hidden_size, requires_grad=True)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    return y


def test_continuous_router_gets_gradient_by_default():
    layer = build_moe_layer(moe_variant(topk=1, router_dtype="fp32"))
    _forward_backward(layer)
    assert torch.count_nonzero(layer.router.continuous.weight.grad) > 0


def test_reference_router_flag_gives_router_no_gradient():
    """The reference code's top-1 post-softmax router: weights are exactly 1, gradient 0."""
    layer = build_moe_layer(moe_variant(topk=1, reference_router=True, router_dtype="fp32"))
    _forward_backward(layer)
    grad = layer.router.continuous.weight.grad
    assert grad is None or torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(layer.router.gate.linear.weight.grad) > 0


@pytest.mark.parametrize("built_as", ["discrete", "switched"])
def test_discrete_mode_routes_one_row_per_token_without_router(built_as):
    if built_as == "discrete":
        layer = build_moe_layer(moe_variant(routing_mode="discrete"))
    else:
        layer = build_moe_layer(moe_variant(routing_mode="pretrain"))
        layer.set_routing_mode("discrete")
    names = [name for name, _ in layer.named_parameters()]
    assert not [n for n in names if "continuous" in n or "gate" in n], names
    assert not any("continuous" in k or "gate" in k for k in layer.state_dict())
    seen = {}

    def capture(module, args):
        seen["tokens_per_expert"] = args[1]

    handle = layer.experts.register_forward_pre_hook(capture)
    _forward_backward(layer)
    handle.remove()
    assert int(seen["tokens_per_expert"].sum()) == S * B
    assert not layer.router.quantizer.codebook.requires_grad
    touched = [n for n, p in layer.named_parameters() if p.grad is not None]
    assert touched and all(".experts." in f".{n}" for n in touched), touched


def test_switching_back_to_pretrain_after_dropping_router_is_refused():
    layer = build_moe_layer(moe_variant())
    layer.set_routing_mode("discrete")
    with pytest.raises(ValueError, match="no router and gate"):
        layer.set_routing_mode("pretrain")


def test_discrete_mode_can_keep_training_the_codebook():
    layer = build_moe_layer(moe_variant(routing_mode="discrete", train_codebook_in_discrete=True))
    _forward_backward(layer)
    assert torch.count_nonzero(layer.router.quantizer.codebook.grad) > 0


def _collapsed_tokens(quantizer: VectorQuantizer, n: int = 256) -> torch.Tensor:
    """Tokens that all sit next to code 0 (plus noise): every other code is dead."""
    torch.manual_seed(5)
    return quantizer.codebook.detach()[0] + 1e-4 * torch.randn(n, quantizer.hidden_size)


@pytest.mark.parametrize("update", ["gradient", "ema"])
def test_dead_code_restart_revives_unused_codes(update):
    quantizer = VectorQuantizer(16, 8, update=update, dead_code_threshold=0.01)
    x = _collapsed_tokens(quantizer)
    codes = quantizer.assign(x)
    assert codes.unique().tolist() == [0]
    quantizer.record(x, codes)
    restart = quantizer.maintain(
        step=10, interval=10, generator=torch.Generator().manual_seed(0), group=None
    )
    assert restart is not None
    assert sorted(restart.codes.tolist()) == list(range(1, 8))
    # new code vectors are recent tokens
    gaps = (restart.vectors[:, None, :] - x[None, :, :]).norm(dim=-1)
    assert gaps.min(dim=1).values.max() == 0
    if update == "gradient":
        with torch.no_grad():
            quantizer.codebook[restart.codes] = restart.vectors
    else:
        torch.testing.assert_close(quantizer.codebook[restart.codes], restart.vectors)
    assert quantizer.assign(x).unique().numel() > 1
    assert int(quantizer.window_counts.sum()) == 0


def test_no_restart_between_intervals():
    quantizer = VectorQuantizer(16, 8)
    x = _collapsed_tokens(quantizer)
    quantizer.record(x, quantizer.assign(x))
    assert quantizer.maintain(step=3, interval=10, generator=torch.Generator(), group=None) is None
    assert int(quantizer.window_counts.sum()) == x.shape[0]


def test_ema_update_moves_codes_to_their_tokens():
    quantizer = VectorQuantizer(4, 2, update="ema", ema_decay=0.5)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        quantizer.ema_sum.copy_(quantizer.codebook)
        quantizer.ema_count.fill_(1.0)
    x = torch.tensor([[3.0, 0, 0, 0]] * 4 + [[-3.0, 0, 0, 0]] * 4)
    quantizer.record(x, quantizer.assign(x))
    quantizer.maintain(step=1, interval=0, generator=torch.Generator(), group=None)
    assert quantizer.codebook[0, 0] > 2.0 and quantizer.codebook[1, 0] < -2.0


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.randn(4, 8) * 10
    x = centers.repeat_interleave(50, dim=0) + 0.1 * torch.randn(200, 8)
    quantizer = VectorQuantizer(8, 4, data_init=True)
    assert bool(quantizer.needs_data_init)
    quantizer.init_from_data(x, iters=10, generator=torch.Generator().manual_seed(0))
    assert not bool(quantizer.needs_data_init)
    assert torch.cdist(centers, quantizer.codebook.detach()).min(dim=1).values.max() < 0.5


def test_training_refuses_uninitialised_kmeans_codebook():
    layer = build_moe_layer(moe_variant(codebook_init="kmeans"))
    with pytest.raises(RuntimeError, match="data-dependent initialisation"):
        _forward_backward(layer)


@pytest.mark.parametrize("mode,rows", [("pretrain", 2.0), ("discrete", 1.0)])
def test_routing_metrics_are_collected(mode, rows):
    layer = build_moe_layer(moe_variant(routing_mode=mode, expert_input="paper", num_codes=8))
    _forward_backward(layer)
    stats = layer.router.routing_metrics.summarize()[1]
    assert stats["tokens"] == S * B
    assert stats["rows_per_token"] == rows
    assert 1.0 <= stats["code_perplexity"] <= 8.0
    assert 0 <= stats["dead_codes"] <= 7
    assert stats["imbalance"] >= 1.0
    assert len(stats["expert_load"]) == 4 and sum(stats["expert_load"]) == pytest.approx(1.0)
    assert max(stats["expert_load"]) * 4 == pytest.approx(stats["imbalance"])
    assert stats["vq_loss"] > 0
    if mode == "pretrain":
        assert 0 < stats["gate_discrete"] < 1
        assert 0 <= stats["agreement"] <= 1
        assert 0 < stats["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert layer.router.routing_metrics.summarize() == {}


def _tokens(seed: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, TINY_MODEL.vocab_size, (batch, TINY_MODEL.seq_length), generator=generator
    )


def test_two_models_in_one_process_keep_their_routing_metrics_apart():
    """A student and a teacher run interleaved: each model's summary equals what it reports when
    it runs alone, and pausing one (or both through a module holding them) is per model."""
    parallel = ParallelConfig()
    student = build_model(TINY_MODEL, moe_variant(routing_mode="pretrain"), parallel, seed=1)
    teacher = build_model(TINY_MODEL, moe_variant(routing_mode="discrete"), parallel, seed=2)
    student.eval()
    teacher.eval()
    assert student.routing_metrics is not teacher.routing_metrics
    assert metrics.collectors(student) == [student.routing_metrics]
    with torch.no_grad():
        student(_tokens(0, 2), None, None)
        alone = student.routing_metrics.summarize()
        student(_tokens(0, 2), None, None)
        teacher(_tokens(1, 3), None, None)
        with teacher.routing_metrics.paused():
            teacher(_tokens(2, 5), None, None)
            student(_tokens(3, 4), None, None)
        mixed = student.routing_metrics.summarize()
        taught = teacher.routing_metrics.summarize()
        pair = torch.nn.ModuleList([student, teacher])
        with metrics.paused(pair):
            student(_tokens(0, 2), None, None)
            teacher(_tokens(1, 3), None, None)
    seq = TINY_MODEL.seq_length
    assert sorted(alone) == sorted(mixed) == sorted(taught) == [1, 2]
    for layer in (1, 2):
        assert (alone[layer]["tokens"], alone[layer]["rows_per_token"]) == (2 * seq, 2.0)
        assert (taught[layer]["tokens"], taught[layer]["rows_per_token"]) == (3 * seq, 1.0)
        assert "gate_discrete" not in taught[layer] and "router_entropy" not in taught[layer]
        assert mixed[layer]["tokens"] == 6 * seq
    assert student.routing_metrics.summarize() == teacher.routing_metrics.summarize() == {}
    assert student.routing_metrics.enabled and teacher.routing_metrics.enabled
    with torch.no_grad():
        student(_tokens(0, 2), None, None)
    assert student.routing_metrics.summarize() == alone
