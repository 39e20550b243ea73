"""Which samples a loader slot reads, in which order: a pure function of (data, seed, epoch, slot).

A slot is one (data-parallel rank, loader worker) pair; there are ``num_slots = dp_size *
max(1, num_workers)`` of them, slot ``dp_rank * workers + worker``. Each epoch the split's shards
are put in a seeded order. With at least as many shards as slots, slot ``j`` reads shards
``order[j::num_slots]`` whole; with fewer, every slot reads every shard and takes the samples at
``j::num_slots`` of each. Within a shard the samples are in a seeded order too (or file order
without shuffling). Because the order is a function, a slot can skip to any position without
reading what it skips: that is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotSchedule:
    """The sample order of one slot over a split of shards holding ``shard_samples`` samples."""

    shard_samples: tuple[int, ...]
    slot: int
    num_slots: int
    seed: int
    shuffle: bool

    @property
    def by_shard(self) -> bool:
        """True when slots get whole shards; False when they share shards sample by sample."""
        return len(self.shard_samples) >= self.num_slots

    def shard_order(self, epoch: int) -> np.ndarray:
        """Indices of the shards this slot reads in ``epoch``, in reading order."""
        count = len(self.shard_samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(count)
        else:
            order = np.arange(count)
        return order[self.slot :: self.num_slots] if self.by_shard else order

    def samples(self, epoch: int, shard: int) -> np.ndarray:
        """Indices within ``shard`` of the samples this slot takes from it in ``epoch``, in order."""
        count = self.shard_samples[shard]
        if self.shuffle:
            order = np.random.default_rng([self.seed, 1, epoch, shard]).permutation(count)
        else:
            order = np.arange(count)
        return order if self.by_shard else order[self.slot :: self.num_slots]

    def count(self, shard: int) -> int:
        """How many samples this slot takes from ``shard`` (the same every epoch)."""
        count = self.shard_samples[shard]
        return count if self.by_shard else len(range(self.slot, count, self.num_slots))

    def epoch_length(self, epoch: int) -> int:
        return sum(self.count(int(s)) for s in self.shard_order(epoch))

    def walk(self, start: int, *, epochs: int | None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(epoch, shard, samples)`` from the ``start``-th sample of this slot's stream on
        (the first ``samples`` array is cut to begin there); ``epochs=None`` never ends."""
        epoch, skip = 0, start
        while epochs is None or epoch < epochs:
            length = self.epoch_length(epoch)
            if length == 0:
                return
            if skip >= length:
                skip -= length
                epoch += 1
                continue
            for shard in self.shard_order(epoch):
                count = self.count(int(shard))
                if skip >= count:
                    skip -= count
                    continue
                yield epoch, int(shard), self.samples(epoch, int(shard))[skip:]
                skip = 0
            epoch += 1
