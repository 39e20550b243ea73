"""The training and evaluation data loader over the shards of data_tools/shard.py.

Each loader worker (a torch DataLoader worker, or this process with ``num_workers=0``) streams
the samples of one slot of ``schedule.SlotSchedule``, ``SAMPLES_PER_MESSAGE`` samples per
DataLoader fetch as one array (one pickled message each instead of one per sample, which made the
pipe the bottleneck). This process takes the samples one at a time round-robin over the slots,
skipping slots that have ended, exactly the order one-sample fetches would have had, and groups
them into micro-batches. The state is, per worker, how many of its samples went into batches
already handed out, plus which worker is next in the round-robin. A fresh loader given that state
starts each worker at its position and rotates the worker-to-slot assignment so that the
round-robin continues with the same slot: the resumed sequence equals the uninterrupted one
exactly, whatever the workers had prefetched when the run stopped.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.manifest import Manifest, load_manifest
from vqmoe_megatron.data.schedule import SlotSchedule
from vqmoe_megatron.data.shard_format import read_shard
from vqmoe_megatron.data.store import FetchPolicy
from vqmoe_megatron.processes import end_forked_children_with_this_process, end_with_parent

STATE_VERSION = 1
SAMPLES_PER_MESSAGE = 256  # per worker message: 256 KiB at seq_length 512 (2-byte ids)
_STATE_KEYS = (
    "split",
    "data_fingerprint",
    "seed",
    "dp_rank",
    "dp_size",
    "num_workers",
    "micro_batch_size",
    "shuffle",
    "infinite",
)


def _init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: die with the training process, and leave the stop signals
    (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) to it.

    slurm signals every process of a job step, and a terminal's Ctrl-C every process of the
    foreground group, loader workers included. torch's worker dies on a SIGTERM its parent did
    not send (and ends its loop on SIGINT), and the training process's SIGCHLD handler then
    raises "DataLoader worker ... is killed by signal" in the middle of a step instead of letting
    it save. Ignoring them is safe: the training process shuts its workers down itself, and a
    worker is killed when its parent is gone (:func:`~vqmoe_megatron.processes.end_with_parent`).
    """
    end_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _SlotStream(IterableDataset):
    """The samples of this rank's slots; each DataLoader worker streams one slot."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        schedules: list[SlotSchedule],
        start: list[int],
        rotation: int,
        *,
        infinite: bool,
        verify_checksums: bool,
    ):
        self.manifest = manifest
        self.shards = manifest.split(split).shards
        self.first_index = np.cumsum([0] + [s.samples for s in self.shards])
        self.schedules = schedules
        self.start = start
        self.rotation = rotation
        self.infinite = infinite
        self.verify_checksums = verify_checksums

    def _read(self, shard: int, wanted: np.ndarray) -> np.ndarray:
        """The ``wanted`` samples of one shard, in that order: [len(wanted), seq_length + 1]."""
        info = self.shards[shard]
        return read_shard(
            self.manifest.store,
            info.name,
            first_index=int(self.first_index[shard]),
            samples=info.samples,
            sample_length=self.manifest.seq_length + 1,
            dtype=self.manifest.dtype,
            vocab_size=self.manifest.vocab_size,
            sha256=info.sha256 if self.verify_checksums else None,
            rows=wanted,
        )

    def __iter__(self) -> Iterator[dict]:
        """Messages ``{"slot", "tokens" [n, seq_length + 1], "index" [n]}`` with n =
        ``SAMPLES_PER_MESSAGE`` (fewer only in the last one), then ``{"slot", "end"}`` when a
        finite stream is done, or ``{"slot", "error"}`` after the samples read before it."""
        worker = get_worker_info()
        slot = ((worker.id if worker else 0) + self.rotation) % len(self.schedules)
        schedule = self.schedules[slot]
        tokens: list[np.ndarray] = []
        index: list[np.ndarray] = []
        held = 0
        end: dict = {"slot": slot, "end": True}
        try:
            for _, shard, wanted in schedule.walk(
                self.start[slot], epochs=None if self.infinite else 1
            ):
                tokens.append(self._read(shard, wanted))
                index.append(int(self.first_index[shard]) + wanted.astype(np.int64))
                held += len(wanted)
                if held < SAMPLES_PER_MESSAGE:
                    continue
                all_tokens, all_index = np.concatenate(tokens), np.concatenate(index)
                sent = held - held % SAMPLES_PER_MESSAGE
                for a in range(0, sent, SAMPLES_PER_MESSAGE):
                    b = a + SAMPLES_PER_MESSAGE
                    yield {"slot": slot, "tokens": all_tokens[a:b], "index": all_index[a:b]}
                tokens, index, held = [all_tokens[sent:]], [all_index[sent:]], held - sent
        except DataError as exc:
            end = {"slot": slot, "error": str(exc)}
        if held:
            yield {"slot": slot, "tokens": np.concatenate(tokens), "index": np.concatenate(index)}
        yield end


def _as_is(item: dict) -> dict:
    """DataLoader ``collate_fn``: pass messages through as numpy (pickled through a pipe, which
    costs far less than a torch tensor in shared memory)."""
    return item


class TokenShardLoader:
    """Micro-batches ``{"tokens": LongTensor [B, seq_length + 1], "index": LongTensor [B]}``
    from the shards of ``data`` (a directory made by data_tools/shard.py, or its Manifest; a
    directory may be an http(s) prefix or pipe: template, fetched as ``fetch`` says).

    ``index`` is each sample's number within the split. Train (``infinite``, shuffled): an endless
    stream, reshuffled every epoch with ``(seed, epoch)``. Eval (finite, in order): the ranks get
    disjoint parts of the split that together hold every sample once; the last batch may be
    smaller, and a finished pass starts over on the next ``iter()``. ``state_dict()`` describes
    exactly the batches handed out so far; ``load_state_dict()`` on a fresh loader with the same
    data and settings continues from there. Each ``iter()`` starts DataLoader workers that
    continue from the current state: keep one live iterator per loader.
    """

    def __init__(
        self,
        data: Union[str, Path, Manifest],
        split: str = "train",
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        seed: int,
        shuffle: Optional[bool] = None,
        infinite: Optional[bool] = None,
        verify_checksums: bool = False,
        fetch: Optional[FetchPolicy] = None,
    ):
        if micro_batch_size < 1 or num_workers < 0 or seed < 0 or not 0 <= dp_rank < dp_size:
            raise DataError(
                "data loader settings out of range: need micro_batch_size >= 1, num_workers >= 0, "
                f"seed >= 0 and 0 <= dp_rank < dp_size (got {micro_batch_size}, {num_workers}, "
                f"{seed}, {dp_rank}, {dp_size})"
            )
        self.manifest = data if isinstance(data, Manifest) else load_manifest(data, fetch)
        self.split = split
        info = self.manifest.split(split)
        if info.samples == 0:
            raise DataError(
                f"split '{split}' of {self.manifest.path} has no samples; re-shard with a larger "
                "--valid-fraction (valid) or more text"
            )
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_workers = num_workers
        self.seed = seed
        self.infinite = split == "train" if infinite is None else infinite
        self.shuffle = self.infinite if shuffle is None else shuffle
        self.verify_checksums = verify_checksums
        workers = max(1, num_workers)
        counts = tuple(s.samples for s in info.shards)
        self._schedules = [
            SlotSchedule(counts, dp_rank * workers + w, dp_size * workers, seed, self.shuffle)
            for w in range(workers)
        ]
        last = SlotSchedule(counts, dp_size * workers - 1, dp_size * workers, seed, self.shuffle)
        if self.infinite and last.epoch_length(0) == 0:  # the last slot gets the fewest samples
            raise DataError(
                f"split '{split}' of {self.manifest.path} has {info.samples} samples in "
                f"{len(counts)} shards: too few for dp_size x num_workers = {dp_size * workers} "
                "streams; use fewer loader workers, smaller shards or more data"
            )
        self._reset()

    def _reset(self) -> None:
        self._consumed = [0] * len(self._schedules)
        self._next_slot = 0
        self._batches = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (per pass, for a finite loader)."""
        return sum(s.epoch_length(0) for s in self._schedules)

    def __len__(self) -> int:
        """Batches in one pass of a finite loader."""
        if self.infinite:
            raise TypeError("an infinite (training) loader has no length")
        return -(-self.num_samples // self.micro_batch_size)

    def _in_order(self, messages: Iterator[dict]) -> Iterator[tuple[int, dict, int]]:
        """``(slot, message, row)`` for each sample, in the order of one sample per fetch:
        round-robin over the slots from ``self._next_slot`` on, skipping slots that have ended
        (as torch's DataLoader skips exhausted workers). Messages of other slots that arrive
        while one is awaited are held until their turn."""
        slots = len(self._schedules)
        pending: list[deque] = [deque() for _ in range(slots)]
        row = [0] * slots
        ended = [False] * slots
        slot = self._next_slot
        while not all(ended):
            queue = pending[slot]
            while not queue:
                message = next(messages)
                pending[message["slot"]].append(message)
            message = queue[0]
            if "error" in message:
                raise DataError(message["error"])
            if "end" in message:
                ended[slot] = True
            else:
                yield slot, message, row[slot]
                row[slot] += 1
                if row[slot] == len(message["index"]):
                    queue.popleft()
                    row[slot] = 0
            for _ in range(slots):
                slot = (slot + 1) % slots
                if not ended[slot]:
                    break

    def _batch(self, items: list[tuple[int, dict, int]]) -> dict:
        """Collate and count the samples as handed out (this is all the state there is)."""
        for slot, _, _ in items:
            self._consumed[slot] += 1
        self._next_slot = (items[-1][0] + 1) % len(self._schedules)
        self._batches += 1
        return {
            "tokens": torch.from_numpy(
                np.stack([message["tokens"][row] for _, message, row in items]).astype(np.int64)
            ),
            "index": torch.tensor(
                [int(message["index"][row]) for _, message, row in items], dtype=torch.long
            ),
        }

    def __iter__(self) -> Iterator[dict]:
        stream = _SlotStream(
            self.manifest,
            self.split,
            self._schedules,
            list(self._consumed),
            self._next_slot,
            infinite=self.infinite,
            verify_checksums=self.verify_checksums,
        )
        end_forked_children_with_this_process()
        loader = DataLoader(
            stream,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            worker_init_fn=_init_worker,
        )
        items: list[tuple[int, dict, int]] = []
        for item in self._in_order(iter(loader)):
            items.append(item)
            if len(items) == self.micro_batch_size:
                yield self._batch(items)
                items = []
        if items:
            yield self._batch(items)
        self._reset()

    def state_dict(self) -> dict:
        """A small JSON-serialisable description of the position (and of what it is valid for)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "data_fingerprint": self.manifest.fingerprint,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "shuffle": self.shuffle,
            "infinite": self.infinite,
            "consumed": list(self._consumed),
            "next_slot": self._next_slot,
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuse one saved with other data or settings."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(
                f"data loader state has version {state.get('version') if isinstance(state, dict) else None!r}, "
                f"this code reads version {STATE_VERSION}; start the data stream afresh"
            )
        mine = self.state_dict()
        differences = [
            f"{key} was {state.get(key)!r}, is now {mine[key]!r}"
            for key in _STATE_KEYS
            if state.get(key) != mine[key]
        ]
        if differences:
            raise DataError(
                "cannot resume the data loader exactly: "
                + "; ".join(differences)
                + ". Resume with the saved settings and data, or start the data stream afresh "
                "(skip load_state_dict)"
            )
        consumed = state.get("consumed")
        if not isinstance(consumed, list) or len(consumed) != len(self._schedules):
            raise DataError(f"data loader state is damaged: 'consumed' is {consumed!r}")
        self._consumed = [int(c) for c in consumed]
        self._next_slot = int(state["next_slot"]) % len(self._schedules)
        self._batches = int(state["batches"])
