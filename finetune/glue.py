"""Fine-tune a pretrained VQMoE GPT on a GLUE task (router dropped: discrete routing only).

    python finetune/glue.py --task sst2 --data_dir data/glue --pretrained runs/tiny \\
        --output_dir runs/glue/sst2
    torchrun --nproc_per_node 2 finetune/glue.py --task mnli ... parallel.expert_parallel=2
    deepspeed --num_gpus 8 finetune/glue.py --task qqp ... --deepspeed_config ds.json
    TASK=mrpc PRETRAINED=runs/vqmoe-large sbatch slurm/finetune_glue.sh

--data_dir is the GLUE folder holding one folder per task (data/glue/SST-2/train.tsv, ...).
--pretrained is a pretraining run directory, its checkpoints/ or a step_* directory, or a
consolidated directory. Any other setting is a ``section.key=value`` override (finetune.*,
train.*, parallel.*, non-structural model.* / moe.*). A run directory that holds checkpoints
resumes automatically. Outputs: results.json, predictions/<TASK>.tsv (GLUE submission format),
best/ (the best dev model), checkpoints/, config.yaml, metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqmoe_megatron.interrupt import guard_startup, run  # noqa: E402

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

from vqmoe_megatron.commands import run_finetuning  # noqa: E402

FLAGS = {
    # flag: (override key, type, help)
    "--task": (
        "finetune.task",
        str,
        "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli",
    ),
    "--data_dir": ("finetune.data_dir", str, "GLUE data folder holding <TASK>/*.tsv"),
    "--pretrained": (
        "finetune.pretrained",
        str,
        "pretraining or fine-tuning run, step or consolidated dir (a run's best/)",
    ),
    "--output_dir": ("train.output_dir", str, "run directory (runs/glue/<TASK>); resumes"),
    "--deepspeed_config": ("train.deepspeed_config", str, "DeepSpeed JSON overriding ours"),
    "--tokenizer": ("finetune.tokenizer", str, "sentencepiece model (default: the checkpoint's)"),
    "--routing": (
        "finetune.routing",
        str,
        "discrete or pretrain (keep the router); default: discrete for vqmoe, else pretrain",
    ),
    "--pooling": ("finetune.pooling", str, "last (default: the EOS token) or mean"),
    "--epochs": ("finetune.epochs", int, "training epochs (default 3)"),
    "--steps": ("finetune.steps", int, "optimizer steps instead of epochs"),
    "--micro_batch_size": ("finetune.micro_batch_size", int, "examples per rank and step (32)"),
    "--max_seq_length": ("finetune.max_seq_length", int, "tokens per input (model's seq_length)"),
    "--lr": ("train.lr", float, "peak learning rate (1e-4, linear decay, 10%% warmup)"),
    "--seed": ("train.seed", int, "seed of the head, dropout and data order"),
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The parsed arguments and the override list they amount to."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "--train_codebook", action="store_true", help="learn the codebook (frozen by default)"
    )
    parser.add_argument("--no_vq_loss", action="store_true", help="drop the VQ loss")
    parser.add_argument("--config", default=None, help="YAML with finetune/train/... sections")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value settings")
    args = parser.parse_intermixed_args(argv)
    overrides = [  # values as JSON: a path such as "on" or "007" stays a string
        f"{key}={json.dumps(getattr(args, flag[2:]))}"
        for flag, (key, _, _) in FLAGS.items()
        if getattr(args, flag[2:]) is not None
    ]
    if args.train_codebook:
        overrides.append("finetune.train_codebook=true")
    if args.no_vq_loss:
        overrides.append("finetune.vq_loss=false")
    return args, overrides + args.overrides


if __name__ == "__main__":
    arguments, settings = parse_args(sys.argv[1:])
    run(lambda: run_finetuning(arguments.config, settings))
