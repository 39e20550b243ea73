"""Codebook upkeep from the state a user gets by default: EMA updates, restart candidates, frozen
codebooks (each test starts from a freshly built quantizer, layer or model, no hand-set buffers)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import torchrun
from moe_helpers import TINY_MODEL, build_moe_layer, init_single_process, moe_variant

from vqmoe_megatron.moe import VectorQuantizer
from vqmoe_megatron.moe.vq import MAX_RESTART_CANDIDATES

H, K = 8, 4


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def clustered_tokens(centers: torch.Tensor, per_center: int, seed: int) -> torch.Tensor:
    """``per_center`` tokens scattered around each row of ``centers`` [n, H]."""
    generator = torch.Generator().manual_seed(seed)
    noise = 0.01 * torch.randn(centers.shape[0] * per_center, centers.shape[1], generator=generator)
    return centers.repeat_interleave(per_center, dim=0) + noise


def default_ema_quantizer(dtype: torch.dtype) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(H, K, update="ema").to(dtype)


def ema_step(quantizer: VectorQuantizer, x: torch.Tensor, step: int) -> torch.Tensor:
    """One optimizer step on ``x`` (the activations' dtype): record, fold in; returns the codes."""
    codes = quantizer.assign(x)
    quantizer.record(x, codes)
    quantizer.maintain(step=step, interval=0, generator=torch.Generator(), group=None)
    return codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_first_step_from_default_init(dtype):
    """Unused codes stay where they were; used codes move to the mean of their tokens."""
    quantizer = default_ema_quantizer(dtype)
    before = quantizer.codebook.clone()
    # tokens around codes 0 and 1 (shifted away from them), none near codes 2 and 3
    x = clustered_tokens(before[:2] * 3.0, per_center=32, seed=1).to(dtype)
    codes = ema_step(quantizer, x, step=1)
    assert set(codes.tolist()) == {0, 1}
    after = quantizer.codebook
    torch.testing.assert_close(after[2:], before[2:], rtol=0, atol=0)
    for code in (0, 1):
        mean = x[codes == code].float().mean(dim=0)
        torch.testing.assert_close(after[code], mean, rtol=1e-5, atol=1e-6)
    assert after.norm(dim=1).max() < 10 * before.norm(dim=1).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_many_steps_from_default_init(dtype):
    """300 steps of fresh tokens from two clusters: used codes settle at the cluster means,
    unused codes never move, no code's norm leaves the data's scale."""
    quantizer = default_ema_quantizer(dtype)
    before = quantizer.codebook.clone()
    centers = before[:2] * 3.0
    for step in range(1, 301):
        ema_step(quantizer, clustered_tokens(centers, per_center=16, seed=step).to(dtype), step)
    after = quantizer.codebook
    torch.testing.assert_close(after[2:], before[2:], rtol=0, atol=0)
    torch.testing.assert_close(after[:2], centers.float(), rtol=0, atol=2e-3)
    assert torch.isfinite(quantizer.ema_sum).all() and torch.isfinite(quantizer.ema_count).all()


def test_ema_code_that_stops_being_used_stays_at_its_mean():
    quantizer = default_ema_quantizer(torch.float32)
    centers = quantizer.codebook[:2].clone() * 3.0
    ema_step(quantizer, clustered_tokens(centers, per_center=16, seed=0), step=1)
    settled = quantizer.codebook[1].clone()
    for step in range(2, 200):
        ema_step(quantizer, clustered_tokens(centers[:1], per_center=16, seed=step), step)
    torch.testing.assert_close(quantizer.codebook[1], settled, rtol=1e-4, atol=1e-6)


def test_ema_and_restarts_agree_across_two_data_parallel_ranks():
    """DP=2 (gloo): each rank records half of every step's tokens; the codebooks equal one
    process that saw all of them, on both ranks, and dead-code restarts agree."""
    output = torchrun("codebook_upkeep_parallel.py", 2)
    assert "codebook upkeep ok" in output


def collapsed_sequence_batch(quantizer: VectorQuantizer, seq: int, batch: int) -> torch.Tensor:
    """[S*B, H] tokens flattened sequence-first (as the router sees them), all nearest to code 0,
    each distinct, so that a restarted vector identifies the position it came from."""
    generator = torch.Generator().manual_seed(3)
    noise = 1e-4 * torch.randn(seq * batch, quantizer.hidden_size, generator=generator)
    return quantizer.codebook.detach()[0] + noise


def restart_origins(quantizer: VectorQuantizer, micro_batches: list[torch.Tensor], seed: int):
    """Record the micro-batches as one optimizer step, restart; returns (micro-batch, row) of
    every restarted vector."""
    quantizer.begin_step(seed)
    for x in micro_batches:
        quantizer.record(x, quantizer.assign(x))
    restart = quantizer.maintain(
        step=1, interval=1, generator=torch.Generator().manual_seed(seed), group=None
    )
    assert restart is not None
    everything = torch.cat(micro_batches)
    match = (restart.vectors[:, None, :] == everything[None, :, :]).all(dim=-1)
    assert bool(match.any(dim=1).all()), "every restarted vector is one of the step's tokens"
    flat = match.float().argmax(dim=1)
    rows = micro_batches[0].shape[0]
    return [(int(i) // rows, int(i) % rows) for i in flat]


def test_restart_candidates_are_drawn_from_the_whole_step():
    """64 codes, 63 dead, 8192 tokens in two micro-batches of [S=256, B=16]: the 63 restarted
    vectors are distinct tokens from both micro-batches and from every part of the sequence
    (today's bug kept only the first 1024 rows of the last micro-batch: positions < 64)."""
    quantizer = VectorQuantizer(16, 64, dead_code_threshold=0.01)
    seq, batch = 256, 16
    micro_batches = [
        collapsed_sequence_batch(quantizer, seq, batch),
        collapsed_sequence_batch(quantizer, seq, batch) + 1e-5,
    ]
    assert quantizer.assign(torch.cat(micro_batches)).unique().tolist() == [0]
    origins = restart_origins(quantizer, micro_batches, seed=11)
    assert len(origins) == 63 and len(set(origins)) == 63
    assert {mb for mb, _ in origins} == {0, 1}
    positions = [row // batch for _, row in origins]  # sequence position of each row
    quarters = {position * 4 // seq for position in positions}
    assert quarters == {0, 1, 2, 3}, sorted(positions)


def test_restart_candidates_are_reproducible_and_bounded():
    def run(seed: int):
        quantizer = VectorQuantizer(16, 64, dead_code_threshold=0.01)
        x = collapsed_sequence_batch(quantizer, 256, 16)
        return restart_origins(quantizer, [x[:4096], x[4096:]], seed), quantizer

    first, quantizer = run(5)
    again, _ = run(5)
    other, _ = run(6)
    assert first == again and first != other
    x = collapsed_sequence_batch(quantizer, 256, 16)
    quantizer.record(x, quantizer.assign(x))
    assert quantizer.candidates.shape == (MAX_RESTART_CANDIDATES, 16)


def test_skipped_step_forgets_its_candidates():
    quantizer = VectorQuantizer(16, 64, dead_code_threshold=0.01)
    x = collapsed_sequence_batch(quantizer, 32, 4)
    quantizer.record(x, quantizer.assign(x))
    quantizer.discard_step_statistics()
    assert quantizer.candidates is None
    assert quantizer.maintain(step=1, interval=1, generator=torch.Generator(), group=None) is None


@pytest.mark.parametrize("update", ["gradient", "ema"])
def test_frozen_codebook_is_neither_restarted_nor_moved(update):
    """Discrete routing freezes the codebook by default (pretraining VQ-only, fine-tuning): the
    per-step upkeep the training loops run must leave it exactly as it is."""
    layer = build_moe_layer(
        moe_variant(routing_mode="discrete", codebook_update=update, dead_code_interval=1)
    )
    quantizer = layer.router.quantizer
    assert not quantizer.trainable
    before = quantizer.codebook.detach().clone()
    torch.manual_seed(0)
    hidden = before[0] + 1e-3 * torch.randn(8, 4, TINY_MODEL.hidden_size)
    layer.begin_step(1, seed=0)
    y, _ = layer(hidden.requires_grad_())
    y.sum().backward()
    assert layer.maintain_codebook(step=1, seed=0) is None
    torch.testing.assert_close(quantizer.codebook, before, rtol=0, atol=0)


def test_trainable_discrete_codebook_is_still_restarted():
    layer = build_moe_layer(
        moe_variant(routing_mode="discrete", train_codebook_in_discrete=True, dead_code_interval=1)
    )
    quantizer = layer.router.quantizer
    assert quantizer.trainable
    torch.manual_seed(0)
    hidden = quantizer.codebook.detach()[0] + 1e-3 * torch.randn(8, 4, TINY_MODEL.hidden_size)
    layer.begin_step(1, seed=0)
    y, _ = layer(hidden.requires_grad_())
    y.sum().backward()
    restart = layer.maintain_codebook(step=1, seed=0)
    assert restart is not None and restart.codes.numel() == quantizer.num_codes - 1
