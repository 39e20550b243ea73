"""Checkpoint conversion: consolidated fp32 weights, HF-format export, layout changes.

The names below (from :mod:`vqmoe_megatron.checkpoint`) are imported on first use, so that
``python -m vqmoe_megatron.convert`` can guard Ctrl-C (``interrupt.guard_startup``) before torch
and megatron load.
"""

import importlib

_HOMES = {
    "is_consolidated": "vqmoe_megatron.checkpoint.consolidated",
    "write_consolidated": "vqmoe_megatron.checkpoint.consolidated",
    "load_pretrained": "vqmoe_megatron.checkpoint.opened",
    "pretrained_config": "vqmoe_megatron.checkpoint.opened",
    "read_consolidated": "vqmoe_megatron.checkpoint.opened",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
