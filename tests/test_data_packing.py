"""The packing contract: leading EOS, one-token overlap, every token a target once, pad at the end."""

import numpy as np
import pytest

from vqmoe_megatron.data.packing import StreamPacker

EOS, PAD, S = 2, 3, 8


def _pack(docs, *, samples_per_shard=3, chunks=None, **kwargs) -> list[np.ndarray]:
    packer = StreamPacker(
        seq_length=S,
        samples_per_shard=samples_per_shard,
        eos_id=EOS,
        pad_id=PAD,
        dtype="uint16",
        **kwargs,
    )
    shards = []
    for ids in chunks if chunks is not None else docs:
        shards += list(packer.add(np.asarray(ids, dtype=np.uint16)))
    return shards + list(packer.finish())


def _docs(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(10, 100, size=rng.integers(1, 30))) + [EOS] for _ in range(count)]


@pytest.mark.parametrize("seed, count", [(0, 1), (1, 7), (2, 40)])
def test_stream_is_cut_with_one_token_overlap_and_padded(seed: int, count: int):
    docs = _docs(seed, count)
    stream = np.array([EOS] + [t for d in docs for t in d])
    shards = _pack(docs)
    samples = np.concatenate(shards)
    assert samples.shape[1] == S + 1 and samples.dtype == np.uint16
    assert all(len(s) == 3 for s in shards[:-1]) and 1 <= len(shards[-1]) <= 3
    assert len(samples) == -(-(len(stream) - 1) // S)
    for i, sample in enumerate(samples):
        real = stream[i * S : i * S + S + 1]
        assert (sample[: len(real)] == real).all()
        assert (sample[len(real) :] == PAD).all()
    targets = np.concatenate([s[1:] for s in samples])
    assert (targets[targets != PAD] == stream[1:]).all()  # every real token is a target once


def test_stream_of_an_exact_multiple_has_no_padding():
    docs = [[10] * (S - 1) + [EOS], [11] * (S - 1) + [EOS]]  # 1 + 2*S tokens: exactly 2 samples
    samples = np.concatenate(_pack(docs))
    assert len(samples) == 2 and not (samples == PAD).any()


def test_empty_stream_gives_no_samples():
    assert _pack([]) == []


def test_resumed_packer_continues_exactly():
    """Feeding from a checkpoint position and skipping to shard k equals the fresh run's shards."""
    docs = _docs(3, 60)
    fresh = _pack(docs)
    stream = [EOS] + [t for d in docs for t in d]
    for k in range(1, len(fresh)):
        restart_at = k * 3 * S - 5  # a chunk boundary somewhat before shard k begins
        resumed = _pack(
            None,
            chunks=[stream[restart_at : restart_at + 13], stream[restart_at + 13 :]],
            first_position=restart_at,
            skip_until=k * 3 * S,
        )
        assert len(resumed) == len(fresh) - k
        for a, b in zip(resumed, fresh[k:]):
            assert (a == b).all()


def test_filling_reports_how_full_the_current_shard_is():
    packer = StreamPacker(seq_length=S, samples_per_shard=4, eos_id=EOS, pad_id=PAD, dtype="uint16")
    assert packer.filling == pytest.approx(1 / 32)  # the leading EOS
    assert list(packer.add(np.full(15, 10, dtype=np.uint16))) == []
    assert packer.filling == pytest.approx(0.5)
    assert len(list(packer.add(np.full(17, 10, dtype=np.uint16)))) == 1
    assert packer.filling == pytest.approx(1 / 32)  # the overlap token starts the next shard
