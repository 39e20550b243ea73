"""``vqmoe-compare``: train every routing variant on the same data, budget and seeds, evaluate,
fine-tune and report.

    vqmoe-compare --config pretrain/configs/tiny.yaml --data-dir runs/demo/data/shards \\
        --glue-dir runs/demo/data/glue_rt --task sst2 \\
        --routers topk,xmoe,stablemoe,smoe_dropout,hash,dense,vqmoe,vq_only \\
        --seeds 3 --steps 600 --jobs 2 --out reports/NAME [section.key=value ...]

Writes ``<out>/report.md`` (tables with mean ± std over seeds, ablations, where VQMoE is beaten,
every command), ``<out>/results.json``, the PNG plots and ``<out>/compare.yaml`` (the settings).
The runs themselves go to ``--workdir`` (default ``runs/compare/<out name>``). The same command
resumes an interrupted comparison; a finished report is never overwritten, and a directory made
with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from vqmoe_megatron.compare.plan import CompareSettings, Unit, plan_unit
from vqmoe_megatron.compare.runner import CompareError, claim, run_units
from vqmoe_megatron.compare.variants import VARIANTS, select
from vqmoe_megatron.config import ConfigError, PretrainConfig, load_config, read_yaml
from vqmoe_megatron.console import fail, quiet_third_party_warnings
from vqmoe_megatron.interrupt import run
from vqmoe_megatron.pipeline import StepFailed

INTERRUPTED = "interrupted: run the same command again to continue the comparison"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqmoe-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="pretraining YAML every variant starts from"
    )
    parser.add_argument(
        "--routers",
        default=",".join(VARIANTS),
        help=f"comma-separated variants (default: all): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True, help="pretraining steps per run")
    parser.add_argument("--data-dir", help="shard directory (default: the config's data.data_dir)")
    parser.add_argument("--glue-dir", help="GLUE folder holding <TASK>/ (needed to fine-tune)")
    parser.add_argument("--task", default="sst2", help="classification task (default sst2)")
    parser.add_argument("--no-finetune", action="store_true", help="skip fine-tuning")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--checkpoints", type=int, default=5, help="checkpoints per run (fluctuation)"
    )
    parser.add_argument("--evaluations", type=int, default=10, help="validation points per run")
    parser.add_argument("--nproc", type=int, default=1, help="processes per pretraining run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="report directory (reports/NAME)")
    parser.add_argument("--workdir", type=Path, help="run directory (runs/compare/<out name>)")
    parser.add_argument("overrides", nargs="*", help="section.key=value pretraining overrides")
    return parser


def settings_of(args: argparse.Namespace) -> CompareSettings:
    """The settings, checked before anything runs: known variants, sane counts, a config that
    loads with the overrides, the data and GLUE folders present."""
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    select(names)
    for flag in ("seeds", "steps", "checkpoints", "evaluations", "nproc", "jobs", "finetune_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: use a number >= 1")
    load_config(PretrainConfig, args.config, args.overrides)
    data_dir = args.data_dir or (read_yaml(args.config).get("data") or {}).get("data_dir")
    if not data_dir:
        raise ValueError(f"{args.config} sets no data.data_dir: give --data-dir SHARDS")
    if "://" not in data_dir and not (Path(data_dir) / "manifest.json").is_file():
        raise ValueError(
            f"--data-dir {data_dir} holds no manifest.json: write shards with data_tools/shard.py "
            "(make demo writes runs/demo/data/shards)"
        )
    glue_dir = None
    if not args.no_finetune:
        if not args.glue_dir:
            raise ValueError(
                "give --glue-dir (the GLUE folder; make demo writes runs/demo/data/glue_rt) or "
                "--no-finetune"
            )
        if not Path(args.glue_dir).is_dir():
            raise ValueError(f"--glue-dir {args.glue_dir} is not a directory")
        glue_dir = args.glue_dir
    if not 2 <= args.checkpoints <= args.steps:
        raise ValueError(
            f"--checkpoints {args.checkpoints}: routing fluctuation needs at least 2 checkpoints, "
            f"and at most one per step (--steps {args.steps})"
        )
    return CompareSettings(
        config=args.config,
        variants=names,
        seeds=args.seeds,
        steps=args.steps,
        data_dir=data_dir,
        glue_dir=glue_dir,
        task=args.task,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        checkpoints=args.checkpoints,
        evaluations=args.evaluations,
        first_seed=args.first_seed,
        nproc=args.nproc,
        overrides=list(args.overrides),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_of(args)
    except (ValueError, ConfigError) as exc:
        return fail(str(exc))
    out = args.out
    workdir = args.workdir or Path("runs") / "compare" / out.name
    report = out / "report.md"
    try:
        claim(settings, out, workdir)
    except CompareError as exc:
        return fail(str(exc))
    if report.is_file():
        print(f"{report} is already written (a report is never overwritten): nothing to do")
        return 0

    units = [
        plan_unit(settings, VARIANTS[name], seed, workdir)
        for name in settings.variants
        for seed in settings.seed_list
    ]
    print(
        f"comparing {len(settings.variants)} variants x {settings.seeds} seeds "
        f"({sum(len(u.steps) for u in units)} steps, {args.jobs} at a time); runs in {workdir}, "
        f"logs in {workdir / 'logs'}",
        flush=True,
    )
    try:
        run_units(units, workdir, args.jobs)
    except (CompareError, StepFailed) as exc:
        return fail(str(exc))
    return write_outputs(settings, units, workdir, out, command_line(settings, out))


def command_line(s: CompareSettings, out: Path) -> str:
    """The command that remakes a comparison, every setting spelled out (the defaults of
    ``--routers`` and others may change; ``--jobs`` and ``--workdir`` change no number)."""
    args = ["--config", s.config, "--data-dir", s.data_dir]
    if s.glue_dir is None:
        args.append("--no-finetune")
    else:
        args += ["--glue-dir", s.glue_dir, "--task", s.task]
        args += ["--finetune-steps", str(s.finetune_steps), "--finetune-lr", str(s.finetune_lr)]
    args += ["--routers", ",".join(s.variants), "--seeds", str(s.seeds)]
    args += ["--first-seed", str(s.first_seed), "--steps", str(s.steps)]
    args += ["--checkpoints", str(s.checkpoints), "--evaluations", str(s.evaluations)]
    args += ["--nproc", str(s.nproc), "--out", str(out), *s.overrides]
    return "vqmoe-compare " + shlex.join(args)


def write_outputs(
    settings: CompareSettings, units: list[Unit], workdir: Path, out: Path, command: str
) -> int:
    """Read every unit back, plot, and write results.json and (last) report.md."""
    quiet_third_party_warnings()
    from vqmoe_megatron.compare.plots import write_plots
    from vqmoe_megatron.compare.report import HEADLINE, write_report
    from vqmoe_megatron.compare.results import aggregate, read_all

    results = read_all(settings, workdir)
    table = aggregate(results)
    plots = write_plots(results, table, HEADLINE, out)
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "command": command,
                "variants": {n: {k: asdict(s) for k, s in m.items()} for n, m in table.items()},
                "runs": [{"variant": r.variant.name, "seed": r.seed, **r.metrics} for r in results],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    path = write_report(settings, table, units, command, plots, out)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    run(main, INTERRUPTED)
