"""The hand-written autograd pieces of the VQMoE router against plain autograd, over a grid.

Each fused op (the stacked token / expert-input streams, the one-pass VQ loss) is compared with
the naive expression it replaces: the value and the gradient of every input that takes one.
"""

from __future__ import annotations

import pytest
import torch

from vqmoe_megatron.moe import VectorQuantizer
from vqmoe_megatron.moe.expert_input import expert_input, stacked_streams

SHAPES = [(1, 4), (7, 16), (64, 32)]


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("kind", ["paper", "quantized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stacked_streams_match_concatenation(tokens, hidden, kind, dtype):
    torch.manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    offset = torch.randn(tokens, hidden, dtype=torch.promote_types(dtype, torch.float32))
    grad = torch.randn(2 * tokens, hidden, dtype=dtype)

    fused = stacked_streams(x, offset, kind, 0.05)
    (fused_grad,) = torch.autograd.grad(fused, x, grad)
    naive = torch.cat([x, expert_input(x, offset, kind, 0.05)], dim=0)
    # The gradient against float64 autograd on the same inputs, within the dtype's rounding of
    # the two terms it sums (g[:T] + (1 - rho) g[T:] may cancel).
    x64 = x.detach().double().requires_grad_(True)
    naive64 = torch.cat([x64, expert_input(x64, offset.double(), kind, 0.05)], dim=0)
    (naive_grad,) = torch.autograd.grad(naive64, x64, grad.double())
    bound = torch.finfo(dtype).eps * (grad[:tokens].double().abs() + grad[tokens:].double().abs())

    assert fused.dtype == fused_grad.dtype == dtype and fused.shape == (2 * tokens, hidden)
    torch.testing.assert_close(fused, naive, rtol=0, atol=0)
    assert ((fused_grad.double() - naive_grad).abs() <= bound).all()


def test_expert_inputs_follow_the_method():
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 8, dtype=torch.float64)
    offset = q - x.detach()
    paper = expert_input(x, offset, "paper", 0.25)
    torch.testing.assert_close(paper, 0.75 * x + 0.25 * offset)
    torch.testing.assert_close(expert_input(x, offset, "quantized", 0.25), q)
    assert expert_input(x, offset, "token", 0.25) is x
    (grad,) = torch.autograd.grad(paper.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 0.75))
    with pytest.raises(ValueError, match="expert input"):
        expert_input(x, offset, "codes", 0.25)
    with pytest.raises(ValueError, match="stack"):
        stacked_streams(x, offset, "token", 0.25)


def _naive_vq_loss(x, codebook, codes, keep, beta):
    """``mean_valid(||sg(x) - c||^2 + beta ||x - sg(c)||^2)`` over tokens and dims, by autograd."""
    c = codebook[codes]
    per_token = ((x.detach() - c) ** 2).sum(1) + beta * ((x - c.detach()) ** 2).sum(1)
    return (per_token * keep).sum() / (keep.sum() * x.shape[1])


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("trained", ["both", "codebook", "tokens"])
def test_vq_loss_matches_autograd(tokens, hidden, beta, padded, trained):
    torch.manual_seed(tokens + hidden)
    vq = VectorQuantizer(hidden, 6, commitment_cost=beta, init_std=1.0).double()
    vq.codebook.requires_grad_(trained != "tokens")
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=trained != "codebook")
    codes = vq.assign(x)
    valid = torch.rand(tokens) > 0.3 if padded else None
    if valid is not None:
        valid[0] = True
    keep = torch.ones(tokens, dtype=torch.float64) if valid is None else valid.double()

    inputs = [t for t in (x, vq.codebook) if t.requires_grad]
    fused = vq.loss(x, codes, valid)
    fused_grads = torch.autograd.grad(fused, inputs)
    naive = _naive_vq_loss(x, vq.codebook, codes, keep, beta)
    naive_grads = torch.autograd.grad(naive, inputs)

    torch.testing.assert_close(fused, naive)
    for got, want in zip(fused_grads, naive_grads):
        torch.testing.assert_close(got, want)
