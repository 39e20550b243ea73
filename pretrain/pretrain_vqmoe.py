"""Pretrain a VQMoE GPT (megatron-core + DeepSpeed ZeRO).

Runs the same way everywhere:
    python pretrain/pretrain_vqmoe.py --config pretrain/configs/tiny.yaml data.data_dir=data/sotu
    torchrun --nproc_per_node 2 pretrain/pretrain_vqmoe.py --config ... parallel.expert_parallel=2
    deepspeed --num_gpus 8 pretrain/pretrain_vqmoe.py --config pretrain/configs/base.yaml ...
    mpirun -np 2 python pretrain/pretrain_vqmoe.py --config ...
    sbatch slurm/pretrain_large.sh
Overrides are ``section.key=value`` (parsed as YAML). A run directory that holds checkpoints
resumes automatically. ``--dry-run`` prints sizes, FLOPs and memory without allocating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqmoe_megatron.interrupt import guard_startup, run  # noqa: E402

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

from vqmoe_megatron.commands import run_pretraining  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run config (pretrain/configs/*.yaml)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameters, FLOPs per token and memory per device for the layout, then exit",
    )
    parser.add_argument("--world-size", type=int, default=None, help="devices assumed by --dry-run")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value settings")
    return parser.parse_intermixed_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    run(
        lambda: run_pretraining(
            args.config, args.overrides, dry_run=args.dry_run, world_size=args.world_size
        )
    )
