"""What the discrete path's expert sees: ``x_d`` from the token ``x`` and ``offset = sg(q - x)``.

METHOD.md's three variants, each with gradient to ``x`` only (``q`` is behind a stop-gradient):

* ``paper``: ``x_d = (1 - rho) x + rho sg(q - x)``, gradient ``(1 - rho)``;
* ``quantized``: ``x_d = x + sg(q - x)`` (the value of q), gradient 1;
* ``token``: ``x_d = x``.

Shapes: ``x`` and ``offset`` are ``[T, H]``; ``offset`` is >= fp32 and cast to ``x.dtype``.
"""

from __future__ import annotations

import torch

from vqmoe_megatron.moe.transformer_config import EXPERT_INPUTS


def expert_input(x: torch.Tensor, offset: torch.Tensor, kind: str, rate: float) -> torch.Tensor:
    """``x_d`` [T, H] in the dtype of ``x``; ``rate`` is rho (used by ``paper`` only)."""
    if kind == "token":
        return x
    if kind == "quantized":
        return x + offset.to(x.dtype)
    if kind == "paper":
        return torch.lerp(x, offset.to(x.dtype), rate)
    raise ValueError(f"expert input must be one of {EXPERT_INPUTS}, got {kind!r}")


class _StackedStreams(torch.autograd.Function):
    """``[x; x_d]`` written into one ``[2T, H]`` buffer; backward ``g[:T] + (dx_d/dx) g[T:]``.

    The same values and gradient as ``torch.cat([x, expert_input(x, ...)])`` in one write of
    each half forward and one fused pass backward, instead of building ``x_d``, copying both
    halves, then scaling and accumulating the two gradients into ``x`` separately.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: torch.Tensor, kind: str, rate: float):
        tokens = x.shape[0]
        stacked = x.new_empty((2 * tokens, *x.shape[1:]))
        stacked[:tokens].copy_(x)
        offset = offset.to(x.dtype)
        if kind == "quantized":
            torch.add(x, offset, out=stacked[tokens:])
            ctx.input_grad_scale = 1.0
        else:
            torch.lerp(x, offset, rate, out=stacked[tokens:])
            ctx.input_grad_scale = 1.0 - rate
        ctx.tokens = tokens
        return stacked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        token_grad, expert_input_grad = grad[: ctx.tokens], grad[ctx.tokens :]
        grad_x = torch.add(token_grad, expert_input_grad, alpha=ctx.input_grad_scale)
        return grad_x, None, None, None


def stacked_streams(x: torch.Tensor, offset: torch.Tensor, kind: str, rate: float) -> torch.Tensor:
    """The two streams of a pretrain-mode plan, ``[x; x_d]`` as ``[2T, H]``.

    ``kind`` is ``paper`` or ``quantized`` (with ``token`` the streams merge instead of stacking).
    """
    if kind not in ("paper", "quantized"):
        raise ValueError(f"only the 'paper' and 'quantized' expert inputs stack, got {kind!r}")
    return _StackedStreams.apply(x, offset, kind, rate)
