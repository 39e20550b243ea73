"""One linear layer per expert as a single ``torch._grouped_mm`` call, forward and backward.

``grouped_linear(x, weight, offsets)`` computes ``y[r] = weight[e] @ x[r]`` for the rows ``r`` of
group ``e`` (rows ``offsets[e-1] .. offsets[e] - 1``), i.e. ``F.linear`` per expert on
expert-sorted rows, in one kernel on CPU and CUDA (torch >= 2.9). The autograd function owns
what the op demands of its operands:

* ``offsets`` are int32 cumulative row ends; the last one must equal the row count, because
  the op leaves output rows (and input-gradient rows) past it uninitialised;
* every stride a multiple of 16 bytes: a feature width that is not (fp32: % 4, bf16: % 8) is
  zero-padded for the call and sliced off the results (pads add zero terms only);
* incoming gradients may be non-contiguous or stride 0 (``y.sum().backward()``), which the CPU
  kernel rejects: they are made contiguous first;
* empty groups give zero rows and zero weight gradients; bf16/fp16 operands accumulate in fp32
  inside the kernel and round once on output (same as ``F.linear``);
* float64, which the kernel lacks, runs one matmul per group (the layer-level float64
  reference tests go through this path; the kernel itself is tested in fp32/bf16/fp16).

Shapes: ``x`` [R, K], ``weight`` [E, N, K] (``F.linear`` layout per expert), ``offsets`` [E]
int32, result [R, N].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ALIGN_BYTES = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(width: int, dtype: torch.dtype) -> int:
    """``width`` rounded up so that ``width * itemsize`` is a multiple of 16 bytes."""
    multiple = max(_ALIGN_BYTES // dtype.itemsize, 1)
    return -(-width // multiple) * multiple


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` zero-padded on its last dim to ``width``, contiguous and 16-byte aligned."""
    if t.shape[-1] != width:
        return F.pad(t, (0, width - t.shape[-1]))
    if not t.is_contiguous() or t.data_ptr() % _ALIGN_BYTES:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _padded_weight(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` [E, N, K] zero-padded to [E, rows, cols] (no copy when already aligned)."""
    if weight.shape[1:] != (rows, cols):
        return F.pad(weight, (0, cols - weight.shape[2], 0, rows - weight.shape[1]))
    return _pad_last(weight, cols)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offsets)``; dtypes the kernel lacks (float64, which the
    float64 reference tests of whole layers use) run one matmul per group instead."""
    if a.dtype in _KERNEL_DTYPES:
        return torch._grouped_mm(a, b, offs=offsets)
    ends = offsets.tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    if b.dim() == 3:  # [R, K] x [E, K, N] -> [R, N]
        out = a.new_zeros(a.shape[0], b.shape[2])
        for group, (start, end) in enumerate(bounds):
            torch.mm(a[start:end], b[group], out=out[start:end])
        return out
    return torch.stack([a[:, start:end] @ b[start:end] for start, end in bounds])  # [E, N, K]


class _GroupedLinear(torch.autograd.Function):
    """Per-group ``F.linear`` with explicit padding and contiguous gradients (see module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor):
        out_features, in_features = weight.shape[1:]
        n_pad, k_pad = _aligned(out_features, x.dtype), _aligned(in_features, x.dtype)
        x_p = _pad_last(x, k_pad)
        w_p = _padded_weight(weight, n_pad, k_pad)
        out = _grouped_mm(x_p, w_p.transpose(-2, -1), offsets)
        ctx.save_for_backward(x_p, w_p, offsets)
        ctx.shapes = (out_features, in_features)
        return out if n_pad == out_features else out[:, :out_features].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_p, w_p, offsets = ctx.saved_tensors
        out_features, in_features = ctx.shapes
        grad_p = _pad_last(grad.contiguous(), w_p.shape[1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_mm(grad_p, w_p, offsets)[:, :in_features]
        if ctx.needs_input_grad[1]:
            grad_w = _grouped_mm(grad_p.t(), x_p, offsets)
            grad_w = grad_w[:, :out_features, :in_features]
        return grad_x, grad_w, None


def expert_offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 cumulative row ends [E] on ``device`` from per-expert row counts [E]."""
    return torch.cumsum(tokens_per_expert.to(device), dim=0, dtype=torch.int32)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    rows: Optional[int] = None,
) -> torch.Tensor:
    """``F.linear(x[group e], weight[e])`` for every group, as [R, N] (see module doc).

    ``rows``: the total of the row counts when the caller knows it on the host; a mismatch with
    ``x.shape[0]`` is refused (the op would leave the extra rows uninitialised).
    """
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_linear needs x [R, K], weight [E, N, K]: {x.shape}, {weight.shape}"
        )
    if offsets.dtype != torch.int32 or offsets.shape != (weight.shape[0],):
        raise ValueError(
            f"offsets must be int32 [{weight.shape[0]}], got {offsets.dtype} {offsets.shape}"
        )
    if rows is not None and rows != x.shape[0]:
        raise ValueError(f"the groups hold {rows} rows but x has {x.shape[0]}")
    if x.dtype != weight.dtype:
        weight = weight.to(x.dtype)
    return _GroupedLinear.apply(x, weight, offsets)
