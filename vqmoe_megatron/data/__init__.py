"""Data for pretraining: tokenizer, shard manifest and the resumable streaming loader.

The tools that make the data live in ``data_tools/`` (fetch_corpus, train_tokenizer, shard,
inspect); docs/data.md describes the commands, the manifest and the packing convention.
"""

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.loader import TokenShardLoader
from vqmoe_megatron.data.manifest import (
    Manifest,
    ShardInfo,
    SplitInfo,
    check_manifest_matches,
    load_manifest,
)
from vqmoe_megatron.data.tokenizer import Tokenizer

__all__ = [
    "DataError",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "TokenShardLoader",
    "Tokenizer",
    "check_manifest_matches",
    "load_manifest",
]
