"""A pretrained VQMoE GPT with a classification (or regression) head on a pooled sentence vector.

``pooling``: ``last`` takes the final hidden state (after the decoder's final norm) of each
input's last real token, its EOS; under causal attention that is the only position that has
seen the whole input, and right padding never reaches it. ``mean`` averages the states of the
real tokens. The head is ``Linear(H, num_labels)`` after dropout (one output for STS-B), its
parameters replicated on every rank. Under sequence parallelism the decoder output is gathered
over tensor parallelism first; every TP rank then computes the same head and loss, and the
gather's backward hands each rank the gradient of its own slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.moe.layer import derived_generator

POOLINGS = ("last", "mean")


class SequenceClassifier(nn.Module):
    """GPT trunk + pooling + linear head: ``[B, S]`` ids -> ``[B, num_labels]`` logits (fp32,
    or fp64 for a float64 model)."""

    def __init__(
        self,
        gpt: VQMoEGPTModel,
        num_labels: int,
        pooling: str,
        dropout: float,
        seed: int,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt = gpt
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.hidden_size, num_labels)
        with torch.no_grad():
            weight = torch.randn(self.head.weight.shape, generator=derived_generator(seed, "head"))
            self.head.weight.copy_(weight * gpt.config.init_method_std)
            self.head.bias.zero_()

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``hidden`` [S, B, H] (full sequence), ``lengths`` [B] -> sentence vectors [B, H]."""
        if self.pooling == "last":
            batch = torch.arange(hidden.shape[1], device=hidden.device)
            return hidden[lengths - 1, batch]
        positions = torch.arange(hidden.shape[0], device=hidden.device)
        real = (positions[:, None] < lengths[None, :]).to(hidden.dtype).unsqueeze(-1)
        return (hidden * real).sum(dim=0) / lengths[:, None].to(hidden.dtype)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, S] right-padded, ``lengths`` [B] real tokens -> logits [B, C]."""
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)
        padding_mask = positions[None, :] >= lengths[:, None]
        hidden = self.gpt.final_hidden_states(
            input_ids, positions.expand(batch, seq), padding_mask=padding_mask
        )
        if self.gpt.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        logits = self.head(self.dropout(self.pool(hidden, lengths)))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def sharded_state_dict(self) -> dict:
        """megatron sharded state dict: the GPT's under ``gpt.``, the replicated head's under
        ``head.`` (what :class:`~vqmoe_megatron.checkpoint.training.CheckpointManager` saves)."""
        state = self.gpt.sharded_state_dict(prefix="gpt.")
        state.update(
            make_sharded_tensors_for_checkpoint(
                self.head.state_dict(prefix="", keep_vars=True), "head."
            )
        )
        return state


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Mean cross-entropy over the batch, or mean squared error of the one regression output."""
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def predictions(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """Class ids [B] (argmax) or scores [B] from ``logits`` [B, C]."""
    return logits.squeeze(-1) if regression else logits.argmax(dim=-1)
