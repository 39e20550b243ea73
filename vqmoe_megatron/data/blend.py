"""Training on several shard directories at once, each drawn with a weight (``data.sources``).

Like Megatron's ``--data-path 0.3 A 0.7 B``: sample ``n`` of a rank's stream (counted over all
its micro-batches) comes from the source whose count lags its share the most,
``argmax_k(w_k * (n + 1) - c_k)`` with ``c_k`` its samples so far and ties to the first source
(Megatron's ``build_blending_indices``). No randomness: after any ``n`` samples each source's
count is within half a sample of its share ``w_k * n`` for two sources, and within two samples
for any number of them (tests/test_data_blend.py checks both over random weights). Within a source the samples come from that
source's own :class:`TokenShardLoader` (shuffled per epoch from the seed, endless), so the state
is the blend position plus each source loader's state, and resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.loader import TokenShardLoader
from vqmoe_megatron.data.manifest import Manifest

STATE_VERSION = 1


@dataclass(frozen=True)
class BlendSource:
    """One weighted corpus: its label (logs, metrics), normalised weight and manifest."""

    name: str
    weight: float
    manifest: Manifest


def check_blend(sources: Sequence[BlendSource]) -> None:
    """Refuse a blend whose corpora cannot share one model: every source must come from the same
    tokenizer (sha256) and packing (seq_length, dtype); names must be distinct."""
    first = sources[0].manifest
    for source in sources[1:]:
        m = source.manifest
        for what, mine, theirs in (
            ("tokenizer sha256", m.tokenizer_sha256, first.tokenizer_sha256),
            ("seq_length", m.seq_length, first.seq_length),
            ("dtype", m.dtype, first.dtype),
        ):
            if mine != theirs:
                raise DataError(
                    f"data.sources: {m.path} has {what} {mine}, {first.path} has {theirs}; every "
                    "source must be sharded with the same tokenizer and --seq-length"
                )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: names {names} are not distinct; give each source a 'name'")


def blend_fingerprint(sources: Sequence[BlendSource]) -> str:
    """sha256 of the sources' data fingerprints, names and weights (what the stream depends on)."""
    described = [[s.name, s.weight, s.manifest.fingerprint] for s in sources]
    return hashlib.sha256(json.dumps(described).encode("utf-8")).hexdigest()


def next_source(weights: np.ndarray, counts: np.ndarray) -> int:
    """The source of the next sample: the one furthest below its share (first on a tie)."""
    return int(np.argmax(weights * (counts.sum() + 1) - counts))


class BlendedLoader:
    """Micro-batches ``{"tokens": [B, S + 1], "index": [B], "source": [B]}`` drawn from weighted
    sources (``index``: the sample's number in its source's train split, ``source``: its position
    in ``sources``). Endless; ``state_dict`` / ``load_state_dict`` as for TokenShardLoader (same
    sources, weights and loader settings required). Each source streams through its own
    ``num_workers`` loader workers. Keep one live iterator per loader.
    """

    def __init__(
        self,
        sources: Sequence[BlendSource],
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        seed: int,
        verify_checksums: bool = False,
    ):
        check_blend(sources)
        self.sources = list(sources)
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.micro_batch_size = micro_batch_size
        self.fingerprint = blend_fingerprint(sources)
        self.loaders = [
            TokenShardLoader(
                s.manifest,
                "train",
                micro_batch_size=1,
                dp_rank=dp_rank,
                dp_size=dp_size,
                num_workers=num_workers,
                seed=seed,
                verify_checksums=verify_checksums,
            )
            for s in sources
        ]
        self.counts = np.zeros(len(sources), dtype=np.int64)

    def __iter__(self) -> Iterator[dict]:
        streams = [iter(loader) for loader in self.loaders]
        try:
            while True:
                picked = []
                for _ in range(self.micro_batch_size):
                    k = next_source(self.weights, self.counts)
                    sample = next(streams[k])
                    self.counts[k] += 1
                    picked.append((k, sample))
                yield {
                    "tokens": torch.cat([s["tokens"] for _, s in picked]),
                    "index": torch.cat([s["index"] for _, s in picked]),
                    "source": torch.tensor([k for k, _ in picked], dtype=torch.long),
                }
        finally:
            for stream in streams:
                stream.close()

    def state_dict(self) -> dict:
        """The blend position (samples per source) and each source loader's state."""
        return {
            "version": STATE_VERSION,
            "blend_fingerprint": self.fingerprint,
            "micro_batch_size": self.micro_batch_size,
            "counts": self.counts.tolist(),
            "sources": [loader.state_dict() for loader in self.loaders],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuse one saved with other sources, weights or settings."""
        if (
            not isinstance(state, dict)
            or state.get("version") != STATE_VERSION
            or "blend_fingerprint" not in state
        ):
            raise DataError(
                "cannot resume the data loader exactly: the saved state is not a blended-sources "
                f"state of version {STATE_VERSION} (was the run started with data.data_dir?)"
            )
        for key, mine in (
            ("blend_fingerprint", self.fingerprint),
            ("micro_batch_size", self.micro_batch_size),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data loader exactly: {key} was {state.get(key)!r}, is now "
                    f"{mine!r} (data.sources, their weights or data changed). Resume with the "
                    "saved settings and data, or start the data stream afresh"
                )
        for loader, saved in zip(self.loaders, state["sources"], strict=True):
            loader.load_state_dict(saved)
        self.counts = np.array(state["counts"], dtype=np.int64)
