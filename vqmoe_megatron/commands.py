"""Console entry points (setup.py): each guards Ctrl-C from its first moment (``interrupt``)
and only then imports its command, which takes seconds (torch, megatron, DeepSpeed)."""

from __future__ import annotations

from typing import NoReturn

from vqmoe_megatron.interrupt import guard_startup, run


def convert() -> NoReturn:
    """``vqmoe-convert``: ``vqmoe_megatron.convert.__main__.main``."""
    guard_startup()
    from vqmoe_megatron.convert.__main__ import main

    run(main)


def evaluate() -> NoReturn:
    """``vqmoe-evaluate``: ``vqmoe_megatron.evaluate.main``."""
    guard_startup()
    from vqmoe_megatron.evaluate import main

    run(main)
