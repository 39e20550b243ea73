"""``python -m vqmoe_megatron.compare``: the same as ``vqmoe-compare``."""

from vqmoe_megatron.interrupt import guard_startup, run

guard_startup()

from vqmoe_megatron.compare.cli import INTERRUPTED, main  # noqa: E402

run(main, INTERRUPTED)
