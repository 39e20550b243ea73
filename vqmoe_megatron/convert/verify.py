"""Self-checks of conversions: logits of the source and the converted model on the same tokens.

Every conversion computes the source model's logits on a few fixed sequences
(:func:`vqmoe_megatron.convert.source.probe_tokens`) and the converted model's logits on the same
sequences, and refuses its output when the largest absolute difference exceeds the tolerance.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

DEFAULT_TOLERANCE = 1e-4
"""Max |logit difference| accepted in fp32 (a re-implementation differs by ~1e-6; a wrong
weight mapping by O(1))."""


class VerificationError(RuntimeError):
    """A converted model that does not compute what its source computes."""


@torch.no_grad()
def project_logits(gpt: torch.nn.Module, tokens: torch.LongTensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits [B, S, V] (on the CPU) of a project model at any layout
    (collective: every rank passes the same tokens and gets the same logits)."""
    tokens = tokens.to(next(gpt.parameters()).device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = gpt(tokens, positions, None)
    return gather_from_tensor_model_parallel_region(logits.contiguous()).float().cpu()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float, what: str):
    """Max |reference - candidate|; raises VerificationError above ``tolerance``."""
    if reference.shape != candidate.shape:
        raise VerificationError(
            f"{what}: logits of shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}"
        )
    diff = float((reference.double() - candidate.double()).abs().max())
    if not diff <= tolerance:
        raise VerificationError(
            f"{what}: logits differ from the source model's by up to {diff:.3g} (tolerance "
            f"{tolerance:g}); the output was not written"
        )
    return diff
