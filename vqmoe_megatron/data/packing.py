"""Packing one split's documents into fixed-length training samples (the trainer's contract).

The split is one token stream: a leading EOS, then every document's ids each followed by EOS.
With ``S = seq_length``, sample ``i`` is ``stream[i*S : i*S + S + 1]``: consecutive samples
overlap by one token, so every token after the leading EOS is a prediction target exactly once.
The last sample is padded with ``pad_id``, which never occurs in real text; the trainer masks
targets equal to ``pad_id``. Positions below are stream positions (the leading EOS is 0).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class StreamPacker:
    """Cuts one split's stream into shards of ``samples_per_shard`` samples [n, S + 1].

    The packer puts the leading EOS at position 0 itself; ``first_position`` is the stream
    position of the first token passed to ``add`` (1 for a fresh stream). Tokens before
    ``skip_until`` are dropped: a resumed run feeds the stream from a checkpoint and the packer
    starts cutting at the first unfinished shard.
    """

    def __init__(
        self,
        *,
        seq_length: int,
        samples_per_shard: int,
        eos_id: int,
        pad_id: int,
        dtype: str,
        first_position: int = 1,
        skip_until: int = 0,
    ):
        self.seq_length = seq_length
        self.samples_per_shard = samples_per_shard
        self.pad_id = pad_id
        self.dtype = np.dtype(dtype)
        self.skip_until = skip_until
        self._parts: list[np.ndarray] = []
        self._length = 0
        self.position = 0
        self._append(np.array([eos_id], dtype=self.dtype))
        self.position = first_position

    def _append(self, ids: np.ndarray) -> None:
        drop = min(max(self.skip_until - self.position, 0), len(ids))
        self.position += len(ids)
        if drop < len(ids):
            self._parts.append(ids[drop:])
            self._length += len(ids) - drop

    def _take(self, samples: int) -> np.ndarray:
        """Remove ``samples`` samples from the buffer, keeping their last token (the overlap)."""
        stream = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        end = samples * self.seq_length
        windows = np.lib.stride_tricks.sliding_window_view(stream[: end + 1], self.seq_length + 1)
        out = windows[:: self.seq_length].copy()
        rest = stream[end:]
        self._parts = [rest] if len(rest) else []
        self._length = len(rest)
        return out

    @property
    def filling(self) -> float:
        """How full the shard being filled is, from 0 to 1 (for progress displays)."""
        return min(self._length / (self.samples_per_shard * self.seq_length), 1.0)

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """Append ids at ``position``; yield every shard that is now full."""
        self._append(ids)
        while self._length >= self.samples_per_shard * self.seq_length + 1:
            yield self._take(self.samples_per_shard)

    def finish(self) -> Iterator[np.ndarray]:
        """Yield the last shard: the remaining targets, the final sample padded with ``pad_id``."""
        if self._length < 2:
            return
        samples = -(-(self._length - 1) // self.seq_length)
        padding = samples * self.seq_length + 1 - self._length
        self._parts.append(np.full(padding, self.pad_id, dtype=self.dtype))
        self._length += padding
        yield self._take(samples)
