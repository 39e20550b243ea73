"""The tiny fine-tuning classifier and a padded batch, built alike in one process and at TP = 2."""

from __future__ import annotations

import torch
from moe_helpers import TINY_MODEL, moe_variant

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.finetune.classifier import SequenceClassifier
from vqmoe_megatron.finetune.glue_task import freeze_unused
from vqmoe_megatron.model import build_model


def tiny_classifier(parallel: ParallelConfig, pooling: str) -> SequenceClassifier:
    """Discrete-routing tiny GPT + 3-way head in float64, frozen codebook, VQ loss on (its mean
    runs over the real tokens of all sequence-parallel slices), no dropout."""
    moe = moe_variant(routing_mode="discrete", expert_input="paper")
    gpt = build_model(TINY_MODEL, moe, parallel, seed=11)
    freeze_unused(gpt, train_codebook=False)
    return SequenceClassifier(gpt, 3, pooling, dropout=0.0, seed=5).double()


def classifier_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [4, 8] right-padded with 0, lengths [4], labels [4]."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([8, 5, 2, 7])
    ids = torch.randint(5, TINY_MODEL.vocab_size, (4, 8), generator=generator)
    ids[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, torch.tensor([0, 2, 1, 2])
