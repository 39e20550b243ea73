"""What every conversion starts from: a checkpoint's config, its tokenizer, and the loaded model.

A source is any path :func:`~vqmoe_megatron.checkpoint.opened.open_checkpoint` takes. Its
tokenizer is ``--tokenizer``, else the one the checkpoint knows
(:meth:`~vqmoe_megatron.checkpoint.opened.Checkpoint.tokenizer_model`); it must have exactly the
model's vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.opened import TRAINING, Checkpoint, open_checkpoint
from vqmoe_megatron.checkpoint.training import (
    ALLOW_TOKENIZER_CHANGE,
    check_tokenizer,
    tokenizer_record,
)
from vqmoe_megatron.config import ParallelConfig, PretrainConfig
from vqmoe_megatron.data import DataError, Tokenizer
from vqmoe_megatron.model import VQMoEGPTModel, build_model


@dataclass
class Source:
    """A checkpoint to convert or evaluate: where the user said it is, the opened checkpoint
    (run config, kind, routing facts), its tokenizer."""

    path: Path
    checkpoint: Checkpoint
    tokenizer: Optional[Tokenizer]

    @property
    def cfg(self) -> PretrainConfig:
        """The backbone's run config."""
        return self.checkpoint.cfg

    @property
    def description(self) -> str:
        """The resolved location (the step directory for training checkpoints)."""
        return str(self.checkpoint.path)


def open_source(
    path: Path,
    tokenizer: Optional[Path] = None,
    require_tokenizer: bool = False,
    allow_tokenizer_change: bool = False,
) -> Source:
    """Resolve ``path`` and its tokenizer; refuse a vocabulary that does not fit the model, and
    a tokenizer other than the one a training checkpoint records having been trained with
    (unless ``allow_tokenizer_change``)."""
    path = Path(path)
    checkpoint = open_checkpoint(path)
    cfg = checkpoint.cfg
    if cfg.model.vocab_size is None:
        raise CheckpointError(f"the config of {path} has no model.vocab_size")
    found = Path(tokenizer) if tokenizer is not None else checkpoint.tokenizer_model()
    if found is None:
        if require_tokenizer:
            raise CheckpointError(
                f"cannot find the tokenizer of {path} (its data manifest is gone); pass "
                "--tokenizer PATH/TO/tokenizer.model"
            )
        return Source(path, checkpoint, None)
    try:
        tok = Tokenizer(found)
    except DataError as exc:
        raise CheckpointError(str(exc)) from exc
    if tok.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(
            f"vocabulary mismatch: tokenizer {found} has {tok.vocab_size} pieces, the model of "
            f"{path} was trained with model.vocab_size={cfg.model.vocab_size}; pass the "
            "tokenizer the model was trained with (--tokenizer)"
        )
    if checkpoint.kind == TRAINING:
        recorded = checkpoint.tokenizer
        check_tokenizer(
            recorded,
            tokenizer_record(tok.sha256, found.resolve()),
            checkpoint.path,
            allow_tokenizer_change,
            f"Pass --tokenizer {recorded.get('model')} (fine-tuning also takes "
            f"{ALLOW_TOKENIZER_CHANGE} to go on with this one anyway)",
        )
    return Source(path, checkpoint, tok)


def with_layout(
    cfg: PretrainConfig, tensor_parallel: int, expert_parallel: int, routing: Optional[str] = None
) -> PretrainConfig:
    """``cfg`` at another parallel layout (and routing mode), for building the model; refuses
    a layout that does not divide the model."""
    model, moe = cfg.model, cfg.moe
    splits = {
        "attention heads": (model.num_attention_heads, tensor_parallel),
        "query groups": (model.num_query_groups or model.num_attention_heads, tensor_parallel),
        "experts": (moe.num_experts or expert_parallel, expert_parallel),
    }
    problems = [f"{n} {total} by {parts}" for n, (total, parts) in splits.items() if total % parts]
    if problems:
        raise CheckpointError(
            f"TP={tensor_parallel} EP={expert_parallel} cannot split this model: "
            + ", ".join(problems)
        )
    moe = cfg.moe if routing is None else replace(cfg.moe, routing_mode=routing)
    parallel = ParallelConfig(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel)
    # The portable layer spec on every device: the same tensor names everywhere (TE's grouped
    # expert weights are named differently) and nothing that needs CUDA.
    model = replace(cfg.model, use_transformer_engine="never")
    return replace(cfg, model=model, moe=moe, parallel=parallel)


def load_model(source: Source, cfg: PretrainConfig, weights: Optional[Path] = None):
    """Build ``cfg``'s model at the current megatron layout and load ``weights`` (default: the
    source) into it; eval mode, on the GPU when there is one. Collective; a structural mismatch
    is a CheckpointError."""
    gpt: VQMoEGPTModel = build_model(cfg.model, cfg.moe, cfg.parallel, seed=cfg.train.seed)
    checkpoint = source.checkpoint if weights is None else open_checkpoint(weights)
    try:
        checkpoint.load_weights(gpt, cfg)
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot load {weights or source.path}: {exc}") from exc
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt.eval()


def probe_tokens(source: Source, count: int = 4, seed: int = 0) -> torch.LongTensor:
    """``count`` fixed sequences [count, seq_length] for comparing models: encoded probe text
    when the tokenizer is known (real routing statistics), else seeded random ids."""
    length = source.cfg.model.seq_length
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(source.cfg.model.vocab_size, (count, length), generator=generator)
    if source.tokenizer is not None:
        text = " ".join(
            f"Section {i}: the union, the congress and the people of {1790 + 7 * i}."
            for i in range(length)
        )
        encoded = torch.tensor(source.tokenizer.encode(text)[: length * count // 2])
        ids.view(-1)[: encoded.numel()] = encoded
    return ids
