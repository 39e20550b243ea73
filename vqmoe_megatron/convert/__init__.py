"""Checkpoint conversion: consolidated fp32 weights, HF-format export, layout changes."""

from vqmoe_megatron.convert.consolidated import (
    is_consolidated,
    load_pretrained,
    pretrained_config,
    read_consolidated,
    write_consolidated,
)

__all__ = [
    "is_consolidated",
    "load_pretrained",
    "pretrained_config",
    "read_consolidated",
    "write_consolidated",
]
