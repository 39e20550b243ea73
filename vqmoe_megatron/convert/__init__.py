"""Checkpoint conversion: consolidated fp32 weights, HF-format export, layout changes.

The names below are imported on first use, so that ``python -m vqmoe_megatron.convert`` can
guard Ctrl-C (``interrupt.guard_startup``) before torch and megatron load.
"""

import importlib

__all__ = [
    "is_consolidated",
    "load_pretrained",
    "pretrained_config",
    "read_consolidated",
    "write_consolidated",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("vqmoe_megatron.convert.consolidated"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
