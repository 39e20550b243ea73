"""GLUE examples as model inputs: token ids, padded batches, and the order they are seen in.

An example becomes ``</s> text_a [<sep> text_b] </s>``. The leading EOS makes the input look
like a document start in the pretraining stream (where every document follows an EOS); the
tokenizer's separator joins a sentence pair; the closing EOS makes the last real token (the
pooling position of ``pooling: last``) the same symbol for every example, one that under causal
attention has seen the whole input. Inputs longer than ``max_length`` lose tokens from the end of
the longer text first.

Batches are right-padded with the pad id to their longest input, rounded up to a multiple of the
tensor-parallel size (sequence parallelism splits the sequence by it). The training order is a
pure function of (seed, epoch, step): epoch e is a permutation drawn from (seed, e), cut into
global batches of micro-batch x data-parallel x accumulation examples, the last batch of an epoch
filled up from the start of the permutation. A resumed run needs nothing but the step number to
continue with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vqmoe_megatron.data.tokenizer import Tokenizer
from vqmoe_megatron.glue.tasks import GlueDataError, GlueSplit


@dataclass
class EncodedSplit:
    """One split as token ids: ``labels`` [N] (int64 class ids, float32 scores, or None for a
    test split), ``guids`` the GLUE ids, ``truncated`` how many inputs were cut."""

    name: str
    ids: list[list[int]]
    labels: Optional[np.ndarray]
    guids: list[str]
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)


def join_pair(
    a: list[int], b: Optional[list[int]], sep_id: Optional[int], eos_id: int, max_length: int
) -> tuple[list[int], bool]:
    """``eos a [sep b] eos`` in at most ``max_length`` ids (the longer text is cut first);
    returns (ids, whether anything was cut)."""
    if b is None:
        budget = max_length - 2
        return [eos_id] + a[:budget] + [eos_id], len(a) > budget
    budget = max_length - 3
    if budget < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a sentence pair")
    keep_a, keep_b = len(a), len(b)
    while keep_a + keep_b > budget:
        if keep_a >= keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    cut = keep_a < len(a) or keep_b < len(b)
    return [eos_id] + a[:keep_a] + [sep_id] + b[:keep_b] + [eos_id], cut


def encode_split(split: GlueSplit, tokenizer: Tokenizer, max_length: int) -> EncodedSplit:
    """Tokenize every example of ``split`` (see the module docstring for the input format)."""
    task = split.task
    pair = task.text_b is not None
    if pair and tokenizer.sep_id is None:
        raise GlueDataError(
            f"GLUE task {task.name} joins sentence pairs with the tokenizer's <sep> piece, but "
            f"{tokenizer.path} has none; use a tokenizer made by data_tools/train_tokenizer.py"
        )
    firsts = tokenizer.processor.encode([e.text_a for e in split.examples])
    seconds = tokenizer.processor.encode([e.text_b or "" for e in split.examples]) if pair else None
    ids, truncated = [], 0
    for i, first in enumerate(firsts):
        joined, cut = join_pair(
            first,
            seconds[i] if pair else None,
            tokenizer.sep_id,
            tokenizer.eos_id,
            max_length,
        )
        ids.append(joined)
        truncated += cut
    labels = None
    if not split.spec.is_test:
        dtype = np.float32 if task.is_regression else np.int64
        labels = np.asarray([e.label for e in split.examples], dtype=dtype)
    return EncodedSplit(split.spec.name, ids, labels, [e.guid for e in split.examples], truncated)


@dataclass
class Batch:
    """``input_ids`` [B, L] right-padded, ``lengths`` [B], ``labels`` [B] or None."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: Optional[torch.Tensor]

    def to(self, device: torch.device) -> Batch:
        labels = None if self.labels is None else self.labels.to(device)
        return Batch(self.input_ids.to(device), self.lengths.to(device), labels)


def collate(split: EncodedSplit, indices: np.ndarray, pad_id: int, multiple_of: int = 1) -> Batch:
    """The examples at ``indices`` as one right-padded batch."""
    rows = [split.ids[i] for i in indices]
    lengths = [len(r) for r in rows]
    width = -(-max(lengths) // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    labels = None if split.labels is None else torch.from_numpy(split.labels[indices])
    return Batch(ids, torch.tensor(lengths, dtype=torch.long), labels)


class TrainSchedule:
    """Which examples each data-parallel rank's micro-batches hold at every optimizer step."""

    def __init__(
        self,
        num_examples: int,
        micro_batch_size: int,
        data_parallel: int,
        accumulation: int,
        seed: int,
    ) -> None:
        if num_examples == 0:
            raise ValueError("the training split is empty")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.data_parallel = data_parallel
        self.accumulation = accumulation
        self.seed = seed
        self.global_batch = micro_batch_size * data_parallel * accumulation
        self.steps_per_epoch = -(-num_examples // self.global_batch)
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def epoch(self, step: int) -> int:
        """0-based epoch of 1-based optimizer step ``step``."""
        return (step - 1) // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` is the last step of its epoch."""
        return step % self.steps_per_epoch == 0

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, filled up to a whole number of global batches.

        Kept for the current epoch: every step of it slices the same permutation.
        """
        if self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_examples)
            self._epoch_order = (epoch, np.resize(order, self.steps_per_epoch * self.global_batch))
        return self._epoch_order[1]

    def micro_batches(self, step: int, dp_rank: int) -> list[np.ndarray]:
        """The ``accumulation`` micro-batches (example indices) of ``dp_rank`` at ``step``."""
        within = (step - 1) % self.steps_per_epoch
        block = self.order(self.epoch(step))[
            within * self.global_batch : (within + 1) * self.global_batch
        ]
        shaped = block.reshape(self.accumulation, self.data_parallel, self.micro_batch_size)
        return list(shaped[:, dp_rank])


def eval_batches(
    split: EncodedSplit, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[tuple[np.ndarray, bool]]:
    """This rank's share of one pass over ``split``: ``(indices, keep)`` pairs.

    Examples are sorted by length (little padding) and batches dealt round-robin. Every rank
    gets the same number of batches, so that expert-parallel all-to-alls stay in step; a rank
    short of one runs a filler batch (``keep`` False) whose outputs are dropped.
    """
    by_length = np.argsort([len(ids) for ids in split.ids], kind="stable")
    chunks = [
        by_length[start : start + micro_batch_size]
        for start in range(0, len(by_length), micro_batch_size)
    ]
    rounds = -(-len(chunks) // dp_size)
    mine = [(chunk, True) for chunk in chunks[dp_rank::dp_size]]
    filler = chunks[0] if chunks else np.zeros(0, dtype=np.int64)
    return mine + [(filler, False)] * (rounds - len(mine))
