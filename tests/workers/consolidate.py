"""Worker: convert a training checkpoint into a consolidated directory (one process)."""

import argparse
from pathlib import Path

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.convert import load_pretrained, pretrained_config, write_consolidated
from vqmoe_megatron.data import load_manifest
from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    init_distributed(1, 1)
    cfg = pretrained_config(Path(args.checkpoint))
    gpt = build_model(cfg.model, cfg.moe, ParallelConfig(), seed=0)
    load_pretrained(gpt, Path(args.checkpoint), cfg)
    tokenizer = Path(load_manifest(cfg.data.data_dir).tokenizer_model)
    write_consolidated(gpt, cfg, Path(args.out), tokenizer)
    destroy_distributed()


if __name__ == "__main__":
    main()
