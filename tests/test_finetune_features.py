"""Fine-tuning inputs: the token layout of single sentences and pairs, truncation, padding, the
training order over epochs and data-parallel ranks, and the evaluation split over ranks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import tiny_tokenizer

from vqmoe_megatron.data import Tokenizer
from vqmoe_megatron.finetune.features import (
    EncodedSplit,
    TrainSchedule,
    collate,
    encode_split,
    eval_batches,
    join_pair,
)
from vqmoe_megatron.glue import GlueDataError, read_split

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
EOS, SEP = 2, 4


def test_a_single_sentence_is_framed_by_eos_and_cut_from_the_end():
    assert join_pair([10, 11, 12], None, SEP, EOS, 8) == ([EOS, 10, 11, 12, EOS], False)
    assert join_pair(list(range(10, 20)), None, SEP, EOS, 6) == ([EOS, 10, 11, 12, 13, EOS], True)


def test_a_pair_is_joined_by_the_separator_and_the_longer_text_is_cut_first():
    a, b = list(range(10, 18)), [30, 31]
    assert join_pair(a, b, SEP, EOS, 20) == ([EOS, *a, SEP, *b, EOS], False)
    ids, cut = join_pair(a, b, SEP, EOS, 9)
    assert cut and ids == [EOS, 10, 11, 12, 13, SEP, 30, 31, EOS]
    ids, cut = join_pair([1, 2, 3], [5, 6, 7], SEP, EOS, 7)
    assert cut and ids == [EOS, 1, 2, SEP, 5, 6, EOS]
    with pytest.raises(ValueError, match="no room"):
        join_pair(a, b, SEP, EOS, 4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(tiny_tokenizer(tmp_path_factory))


@pytest.mark.parametrize("task", ["SST-2", "RTE", "STS-B", "MNLI"])
def test_encoded_splits_keep_labels_guids_and_the_sentences(tokenizer, task):
    for name in ("train", "dev_matched" if task == "MNLI" else "dev"):
        split = read_split(FIXTURES, task, name)
        encoded = encode_split(split, tokenizer, 64)
        assert len(encoded) == len(split.examples)
        assert encoded.guids == [e.guid for e in split.examples]
        assert encoded.labels.tolist() == pytest.approx([e.label for e in split.examples])
        assert encoded.labels.dtype == (np.float32 if task == "STS-B" else np.int64)
        for ids, example in zip(encoded.ids, split.examples):
            assert ids[0] == ids[-1] == tokenizer.eos_id
            if example.text_b is None:
                assert tokenizer.decode(ids[1:-1]) == example.text_a
            else:
                cut = ids.index(tokenizer.sep_id)
                assert tokenizer.decode(ids[1:cut]) == example.text_a
                assert tokenizer.decode(ids[cut + 1 : -1]) == example.text_b
    test = encode_split(read_split(FIXTURES, task, split.task.test_splits[0]), tokenizer, 64)
    assert test.labels is None


def test_a_pair_task_needs_a_tokenizer_with_a_separator(tokenizer):
    no_sep = SimpleNamespace(
        sep_id=None, eos_id=tokenizer.eos_id, processor=tokenizer.processor, path="x.model"
    )
    with pytest.raises(GlueDataError, match="RTE joins sentence pairs.*x.model has none"):
        encode_split(read_split(FIXTURES, "RTE", "train"), no_sep, 64)
    assert len(encode_split(read_split(FIXTURES, "SST-2", "train"), no_sep, 64)) > 0


def _split(lengths: list[int]) -> EncodedSplit:
    ids = [list(range(1, n + 1)) for n in lengths]
    labels = np.arange(len(lengths), dtype=np.int64)
    return EncodedSplit("dev", ids, labels, [str(i) for i in range(len(lengths))], 0)


def test_batches_are_right_padded_to_a_multiple_of_the_tp_size():
    batch = collate(_split([3, 5, 2]), np.array([2, 0]), pad_id=0, multiple_of=4)
    assert batch.input_ids.tolist() == [[1, 2, 0, 0], [1, 2, 3, 0]]
    assert batch.lengths.tolist() == [2, 3] and batch.labels.tolist() == [2, 0]
    assert collate(_split([3, 5, 2]), np.array([1]), 0).input_ids.shape == (1, 5)


def test_each_epoch_shows_every_example_once_split_over_ranks_and_micro_batches():
    schedule = TrainSchedule(25, micro_batch_size=3, data_parallel=2, accumulation=2, seed=7)
    assert schedule.global_batch == 12 and schedule.steps_per_epoch == 3
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3 + 1, epoch * 3 + 4):
            per_rank = [schedule.micro_batches(step, rank) for rank in range(2)]
            assert all(len(mbs) == 2 and all(len(m) == 3 for m in mbs) for mbs in per_rank)
            seen += [int(i) for mbs in per_rank for m in mbs for i in m]
        assert set(seen) == set(range(25)) and len(seen) == 36  # 11 filled up from the start
    assert [schedule.ends_epoch(s) for s in range(1, 7)] == [False, False, True] * 2
    assert [schedule.epoch(s) for s in (1, 3, 4, 6)] == [0, 0, 1, 1]


def test_the_order_is_a_function_of_seed_epoch_and_step_only():
    one = TrainSchedule(40, 4, 1, 1, seed=3)
    again = TrainSchedule(40, 4, 1, 1, seed=3)
    for step in (1, 7, 10, 11, 25):
        assert np.array_equal(one.micro_batches(step, 0)[0], again.micro_batches(step, 0)[0])
    assert not np.array_equal(one.order(0), one.order(1))
    assert not np.array_equal(one.order(0), TrainSchedule(40, 4, 1, 1, seed=4).order(0))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_evaluation_batches_cover_the_split_with_the_same_count_on_every_rank(dp_size):
    split = _split([5, 1, 4, 4, 2, 9, 3])
    shares = [eval_batches(split, 2, rank, dp_size) for rank in range(dp_size)]
    assert len({len(share) for share in shares}) == 1
    kept = [int(i) for share in shares for indices, keep in share if keep for i in indices]
    assert sorted(kept) == list(range(7))
    for share in shares:
        for indices, _ in share:
            batch = collate(split, indices, 0)
            assert batch.input_ids.shape[1] == max(len(split.ids[i]) for i in indices)
    assert torch.equal(collate(split, shares[0][0][0], 0).lengths, torch.tensor([1, 2]))
