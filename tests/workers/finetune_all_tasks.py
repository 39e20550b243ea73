"""Worker: fine-tune every GLUE task of a data folder in one process with ``run_finetuning`` (the
CLI minus argument parsing), a few steps each, into OUT/<task>; exits with the first failure."""

import argparse
import sys

from vqmoe_megatron.commands import run_finetuning
from vqmoe_megatron.glue import TASKS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for task in TASKS:
        code = run_finetuning(
            None,
            [
                f"finetune.task={task}",
                f"finetune.data_dir={args.data_dir}",
                f"finetune.pretrained={args.pretrained}",
                f"train.output_dir={args.out}/{task}",
                "finetune.epochs=2",
                "finetune.micro_batch_size=2",
                "train.log_interval=1",
            ],
        )
        print(f"task {task} exit {code}", flush=True)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
