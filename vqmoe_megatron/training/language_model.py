"""The module DeepSpeed wraps for pretraining: next-token loss of a megatron GPT."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vqmoe_megatron.model import VQMoEGPTModel


class LanguageModel(nn.Module):
    """The module DeepSpeed wraps: next-token loss of a megatron GPT on packed token windows."""

    def __init__(self, gpt: VQMoEGPTModel, pad_id: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.pad_id = pad_id

    def forward(
        self, tokens: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens`` [B, S+1] -> (mean loss over real targets, NLL sum, number of targets).

        Targets equal to the pad id are not counted; ``loss_mask`` [B, S] (1 = count) instead
        selects the targets explicitly (evaluation windows that score only their tail).
        """
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        per_token = self.gpt(inputs, None, None, labels=labels)
        mask = labels != self.pad_id if loss_mask is None else loss_mask.bool()
        mask = mask.to(per_token.dtype)
        nll_sum = (per_token.float() * mask).sum()
        count = mask.sum()
        return nll_sum / count.clamp(min=1), nll_sum.detach(), count.detach()
