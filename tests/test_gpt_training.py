"""A tiny megatron-core GPT with VQMoE layers learns on CPU (plain torch optimiser, one process)."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import TINY_MODEL, init_single_process, moe_variant

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.model import build_model


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def progression_batch(generator: torch.Generator, batch: int, length: int, vocab: int):
    """Sequences t_{i+1} = (t_i + d) mod vocab: learnable after two tokens."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 5, (batch, 1), generator=generator)
    return (start + step * torch.arange(length + 1)) % vocab


@pytest.mark.parametrize(
    "mode,router", [("pretrain", "vqmoe"), ("discrete", "vqmoe"), ("pretrain", "topk")]
)
def test_tiny_gpt_loss_drops(mode, router):
    moe = moe_variant(
        routing_mode=mode, router=router, topk=1, router_dtype="fp32", dead_code_interval=10
    )
    model = build_model(TINY_MODEL, moe, ParallelConfig(), seed=3).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, 61):
        tokens = progression_batch(generator, 16, TINY_MODEL.seq_length, TINY_MODEL.vocab_size)
        loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.maintain_codebooks(step, seed=3)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 3.5 and last < 0.6 * first, losses
