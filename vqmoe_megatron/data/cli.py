"""What every data_tools/ command shares: one-line errors, exit codes, worker counts."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Optional, TypeVar

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.interrupt import run
from vqmoe_megatron.data.sources import COMPRESSIONS, KINDS, MAX_REPLACED_SHARE

T = TypeVar("T")


def available_cpus() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_cli(
    main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None
) -> NoReturn:
    """Run a command's ``main``: a DataError ends as one ``error: ...`` line and exit status 2,
    Ctrl-C as exit status 130 with a hint that re-running resumes (``interrupt.run``)."""

    def work() -> int:
        try:
            main(argv)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    run(work, "interrupted; outputs written so far are kept (re-run to resume)")


def text_tool_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every tool that reads raw text shares."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help=f"text files, directories or glob patterns ({', '.join(KINDS)}, optionally "
        f"compressed: {', '.join(COMPRESSIONS)})",
    )
    p.add_argument(
        "--text-documents",
        choices=["file", "line"],
        default="file",
        help="a .txt input is one document per file or one per line",
    )
    p.add_argument("--jsonl-field", default="text", help="text field of .jsonl inputs")
    p.add_argument(
        "--allow-invalid-text",
        action="store_true",
        help="read files that hold NUL characters or more than "
        f"{MAX_REPLACED_SHARE:.0%}% invalid UTF-8 anyway (invalid bytes become U+FFFD) instead "
        "of refusing them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_settings(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], cls: type[T]
) -> tuple[T, bool]:
    """Parse ``argv`` into the settings dataclass ``cls`` (one field per option) and --quiet."""
    args = vars(parser.parse_args(argv))
    quiet = args.pop("quiet")
    return cls(**args), quiet


def print_replacements(sources: Sequence[dict]) -> None:
    """One summary line per input file in which invalid UTF-8 was replaced (``sources``: dicts
    with ``path`` and ``replaced_characters``, as in the manifest and the tokenizer JSON)."""
    for source in sources:
        if source["replaced_characters"]:
            print(
                f"warning: {source['path']}: replaced {source['replaced_characters']} invalid "
                "UTF-8 sequences with U+FFFD"
            )
