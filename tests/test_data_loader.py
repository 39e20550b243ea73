"""The streaming loader: slot assignment, exact resume across ranks and workers, eval coverage,
state checks, damaged shards and manifest checks."""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
from data_helpers import FIXTURE, tiny_shards

from vqmoe_megatron.data import DataError, TokenShardLoader, check_manifest_matches, load_manifest
from vqmoe_megatron.data.loader import SAMPLES_PER_MESSAGE
from vqmoe_megatron.data.schedule import SlotSchedule


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """17 train shards: more shards than 2 ranks x 2 workers (slots get whole shards)."""
    return tiny_shards(tmp_path_factory, "main")


@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 train shards, 1 valid shard: fewer shards than slots (slots share shards by sample)."""
    return tiny_shards(tmp_path_factory, "few", shard_size_mb=1.0)


def _loader(data: Path, split: str = "train", **kwargs) -> TokenShardLoader:
    settings = {"micro_batch_size": 5, "dp_rank": 0, "dp_size": 2, "num_workers": 2, "seed": 11}
    return TokenShardLoader(data, split, **{**settings, **kwargs})


def _take(loader: TokenShardLoader, batches: int) -> list[dict]:
    stream = iter(loader)
    return [next(stream) for _ in range(batches)]


@pytest.mark.parametrize("shards", [(5, 4), (17, 4), (3, 4), (1, 3), (2, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_epoch_gives_each_sample_to_exactly_one_slot(shards: tuple[int, int], shuffle: bool):
    count, slots = shards
    sizes = tuple(int(n) for n in np.random.default_rng(count).integers(1, 40, size=count))
    offsets = np.cumsum((0,) + sizes)
    orders = []
    for epoch in range(3):
        seen = []
        for slot in range(slots):
            schedule = SlotSchedule(sizes, slot, slots, seed=5, shuffle=shuffle)
            assert schedule.by_shard == (count >= slots)
            taken = [
                int(offsets[shard]) + int(i)
                for shard in schedule.shard_order(epoch)
                for i in schedule.samples(epoch, int(shard))
            ]
            assert len(taken) == schedule.epoch_length(epoch)
            seen += taken
        assert sorted(seen) == list(range(sum(sizes)))
        orders.append(seen)
    assert (orders[0] != orders[1]) == shuffle and (orders[1] != orders[2]) == shuffle


def test_walk_starts_at_any_position_of_the_endless_stream():
    schedule = SlotSchedule((7, 3, 9, 4), 1, 2, seed=3, shuffle=True)
    full = [(e, s, int(i)) for e, s, arr in schedule.walk(0, epochs=4) for i in arr]
    for start in (0, 1, 5, 9, 13, 30):
        tail = [(e, s, int(i)) for e, s, arr in schedule.walk(start, epochs=4) for i in arr]
        assert tail == full[start:]


@pytest.mark.parametrize("name", ["many", "few"])
def test_resume_is_exact_across_ranks_and_workers(name: str, request: pytest.FixtureRequest):
    data = request.getfixturevalue(name)
    epoch = max(_loader(data, dp_rank=rank).num_samples for rank in (0, 1)) // 5  # in batches
    total, stops = epoch + 30, (37, epoch + 5)  # one stop mid-epoch, one after the epoch boundary
    for rank in (0, 1):
        full = _take(_loader(data, dp_rank=rank), total)
        resumed, state, done = [], None, 0
        for stop in (*stops, total):
            loader = _loader(data, dp_rank=rank)
            if state is not None:
                loader.load_state_dict(state)
            resumed += _take(loader, stop - done)
            state, done = json.loads(json.dumps(loader.state_dict())), stop
        assert len(resumed) == total
        for a, b in zip(full, resumed):
            assert a["index"].tolist() == b["index"].tolist()
            assert a["tokens"].shape == (5, 65) and bool((a["tokens"] == b["tokens"]).all())
    ranks = [_take(_loader(data, dp_rank=r), 60) for r in (0, 1)]
    first = [set(np.concatenate([b["index"].numpy() for b in batches])) for batches in ranks]
    assert not first[0] & first[1]  # within an epoch the ranks read disjoint samples


def test_state_counts_batches_handed_out_not_prefetched(many: Path):
    loader = _loader(many, num_workers=2)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    assert sum(state["consumed"]) == 15 and state["batches"] == 3 and state["next_slot"] == 1


def test_workers_survive_the_stop_signals_sent_to_every_process(many: Path):
    """SIGTERM/SIGUSR1 (slurm signals the whole job step) and SIGINT (a terminal's Ctrl-C
    reaches the whole foreground group) reach loader workers too: the workers go on serving
    batches, so the training process can finish its step and save."""
    expected = _take(_loader(many, num_workers=2), 20)
    before = {p.pid for p in psutil.Process().children()}
    stream = iter(_loader(many, num_workers=2))
    try:
        first = next(stream)
        workers = [p for p in psutil.Process().children() if p.pid not in before]
        assert len(workers) == 2
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            worker.send_signal(signal.SIGUSR1)
            worker.send_signal(signal.SIGINT)
        # 20 batches are more than the workers had prefetched: they must still be serving.
        batches = [first, *(next(stream) for _ in range(19))]
        assert all(w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        stream.close()
    assert all(np.array_equal(got["index"], want["index"]) for got, want in zip(batches, expected))


@pytest.mark.parametrize("name", ["many", "few"])
def test_eval_covers_the_split_once_across_ranks(name: str, request: pytest.FixtureRequest):
    data = request.getfixturevalue(name)
    samples = load_manifest(data).split("valid").samples
    seen = []
    for rank in (0, 1):
        loader = _loader(data, "valid", dp_rank=rank, micro_batch_size=7)
        assert not loader.infinite and not loader.shuffle
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [len(b["index"]) for b in batches[:-1]] == [7] * (len(batches) - 1)
        assert 1 <= len(batches[-1]["index"]) <= 7
        again = [b["index"].tolist() for b in loader]  # a finished pass starts over
        assert again == [b["index"].tolist() for b in batches]
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(samples))


def test_state_from_other_settings_is_refused(many: Path):
    state = _loader(many).state_dict()
    for change, message in [
        ({"num_workers": 1}, "num_workers was 2, is now 1"),
        ({"dp_size": 4}, "dp_size was 2, is now 4"),
        ({"seed": 12}, "seed was 11, is now 12"),
        ({"micro_batch_size": 4}, "micro_batch_size was 5, is now 4"),
    ]:
        with pytest.raises(DataError, match=message):
            _loader(many, **change).load_state_dict(state)


def _damaged_copy(data: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    path = copy / "train-000003.tar"
    path.write_bytes(edit(bytearray(path.read_bytes())))
    return copy


def _read_all(data: Path, **kwargs) -> int:
    loader = _loader(data, dp_size=1, infinite=False, shuffle=False, micro_batch_size=64, **kwargs)
    return sum(len(b["index"]) for b in loader)


def test_truncated_shard_is_an_error_naming_it(many: Path, tmp_path: Path):
    copy = _damaged_copy(many, tmp_path, lambda b: b[: len(b) // 2 + 100])
    with pytest.raises(DataError, match=r"train-000003\.tar is truncated or corrupt"):
        _read_all(copy)


def test_changed_bytes_are_caught_by_checksum_verification(many: Path, tmp_path: Path):
    def change_one_token(data: bytearray) -> bytearray:
        data[512 + 128 + 20] ^= 1  # first sample, a token id 10 positions in; stays < vocab
        return data

    copy = _damaged_copy(many, tmp_path, change_one_token)
    assert _read_all(copy) == load_manifest(many).split("train").samples
    with pytest.raises(DataError, match=r"train-000003\.tar .*sha256 differs"):
        _read_all(copy, verify_checksums=True)


def test_manifest_checks(many: Path, tmp_path: Path):
    manifest = load_manifest(many)
    check_manifest_matches(
        manifest, vocab_size=400, seq_length=64, tokenizer_sha256=manifest.tokenizer_sha256
    )
    with pytest.raises(DataError) as err:
        check_manifest_matches(manifest, vocab_size=32000, seq_length=512, tokenizer_sha256="f00")
    message = str(err.value)
    assert "vocab_size: the data's tokenizer has 400, the config has 32000" in message
    assert "seq_length: the data was packed for 64, the config has 512" in message
    assert f"made with {manifest.tokenizer_sha256}" in message and "expects f00" in message
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_splits_too_small_for_the_loader(few: Path, tmp_path_factory: pytest.TempPathFactory):
    with pytest.raises(DataError, match="too few for dp_size x num_workers = 4000 streams"):
        _loader(few, dp_size=2000)
    single = tiny_shards(
        tmp_path_factory,
        "no_valid",
        inputs=[str(FIXTURE / "1790_george_washington_n.txt")],
        valid_fraction=0.0,
    )
    with pytest.raises(DataError, match="split 'valid' .* has no samples"):
        _loader(single, "valid")
    with pytest.raises(DataError, match="has no split 'test'"):
        _loader(single, "test")


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_stream_is_one_sample_per_slot_round_robin(many: Path, workers: int, split: str):
    """Workers send their samples many per message (straddling shard ends); the stream is still
    the slots' samples taken one at a time round-robin, a slot that has ended skipped."""
    manifest = load_manifest(many)
    first = np.cumsum([0] + [s.samples for s in manifest.split(split).shards])
    counts = tuple(s.samples for s in manifest.split(split).shards)
    slots = max(1, workers)
    walks = []
    for slot in range(slots):
        schedule = SlotSchedule(counts, slot, slots, seed=11, shuffle=split == "train")
        epochs = 2 if split == "train" else 1
        walks.append(
            [int(first[s]) + int(i) for _, s, w in schedule.walk(0, epochs=epochs) for i in w]
        )
    expected, position = [], [0] * slots
    while any(p < len(w) for p, w in zip(position, walks)):
        for slot in range(slots):
            if position[slot] < len(walks[slot]):
                expected.append(walks[slot][position[slot]])
                position[slot] += 1
            elif split == "train":  # endless: the reference is only walked for two epochs
                position = [len(w) for w in walks]
                break
    loader = _loader(many, split, dp_size=1, num_workers=workers, micro_batch_size=7)
    stream = iter(loader)
    got = []
    while len(got) < len(expected):
        batch = next(stream, None)
        if batch is None:
            break
        got += batch["index"].tolist()
    stream.close()
    assert got[: len(expected)] == expected
    assert split == "valid" or len(expected) > 2 * SAMPLES_PER_MESSAGE * slots
