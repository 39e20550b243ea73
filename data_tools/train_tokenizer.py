"""Train the sentencepiece tokenizer for pretraining: ``python data_tools/train_tokenizer.py --help``.

Writes ``<prefix>.model`` and ``<prefix>.json`` (resolved settings, checksum, special ids, corpus
counts). Ids 0-3 are <unk>, <s>, </s>, <pad>; <sep> (sentence pairs) follows.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.remove(str(Path(__file__).resolve().parent))

from vqmoe_megatron.interrupt import guard_startup

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

from collections.abc import Sequence
from typing import Optional

from vqmoe_megatron.data.cli import (
    available_cpus,
    parse_settings,
    print_replacements,
    run_cli,
    text_tool_parser,
)
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, model_paths, train_tokenizer


def parse_args(argv: Optional[Sequence[str]]) -> tuple[TokenizerSettings, bool]:
    defaults = TokenizerSettings(inputs=[], output_prefix="")
    p = text_tool_parser(__doc__)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.json")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help="pieces including the 5 special tokens; at most 65536 keeps shards uint16",
    )
    p.add_argument("--model-type", choices=["unigram", "bpe"], default=defaults.model_type)
    p.add_argument(
        "--character-coverage",
        type=float,
        default=defaults.character_coverage,
        help="fraction of characters covered by pieces; the rest become bytes or <unk>",
    )
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="set byte_fallback to False: unknown characters become <unk> instead of UTF-8 "
        "byte pieces (breaks exact round trips)",
    )
    p.add_argument(
        "--sample-sentences",
        type=int,
        default=defaults.sample_sentences,
        help="train on a uniform random sample of this many lines (0: all)",
    )
    p.add_argument(
        "--max-sentence-bytes",
        type=int,
        default=defaults.max_sentence_bytes,
        help="longer lines are cut at spaces into pieces of this size",
    )
    p.add_argument(
        "--normalization",
        choices=["identity", "nmt_nfkc", "nfkc"],
        default=defaults.normalization,
        help="identity keeps text exactly as is (exact round trip, exact bits per byte)",
    )
    p.add_argument("--split-digits", action="store_true", help="one piece per digit")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sentence sampling")
    p.add_argument("--threads", type=int, default=available_cpus(), help="sentencepiece threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    return parse_settings(p, argv, TokenizerSettings)


def main(argv: Optional[Sequence[str]] = None) -> None:
    settings, quiet = parse_args(argv)
    info = train_tokenizer(settings, progress=not quiet)
    model, meta = model_paths(settings.output_prefix)
    corpus = info["corpus"]
    print(
        f"trained a {settings.model_type} model of {info['vocab_size']} pieces on "
        f"{corpus['sentences_used']} of {corpus['sentences']} lines ({corpus['documents']} documents)"
    )
    print_replacements(info["inputs"])
    print(f"wrote {model} (sha256 {info['sha256']})")
    print(f"wrote {meta}")


if __name__ == "__main__":
    run_cli(main)
