"""What a comparison runs: its settings, and for every (variant, seed) the command lines of its
pretraining, evaluations, routing-fluctuation measurement and fine-tunings.

Every variant is trained on the same shards with the same budget, config and seeds (seed ``s``
sets both ``train.seed`` and ``data.seed``, so seed ``s`` of every variant sees the same sample
order). A unit's outputs live in ``<workdir>/<variant>/seed<s>/``::

    pretrain/                 the pretraining run (checkpoints kept for fluctuation)
    eval_<routing>.json       vqmoe-evaluate on the valid split, per routing mode
    fluctuation_<routing>.json  vqmoe-evaluate --fluctuation between consecutive checkpoints
    finetune_<name>/          finetune/glue.py runs (results.json)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vqmoe_megatron.compare.variants import Variant
from vqmoe_megatron.pipeline import REPO, Step

PYTHON = sys.executable


@dataclass
class CompareSettings:
    """Everything that decides a comparison's numbers (written to ``compare.yaml``; resuming
    with other values is refused)."""

    config: str
    """Pretraining YAML every variant starts from."""
    variants: list[str]
    """Variant names (``compare.variants.VARIANTS``), in report order."""
    seeds: int
    """Seeds per variant: ``first_seed``, ``first_seed + 1``, ..."""
    steps: int
    """Pretraining optimizer steps per run."""
    data_dir: str
    """Shard directory (data_tools/shard.py) of pretraining and of the valid split."""
    glue_dir: Optional[str] = None
    """GLUE folder holding ``<task>/``; None: no fine-tuning."""
    task: str = "sst2"
    """The classification task every variant is fine-tuned on."""
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    checkpoints: int = 5
    """Checkpoints per pretraining run, evenly spaced (fluctuation is measured between them)."""
    evaluations: int = 10
    """Validation points per pretraining run (the validation curves)."""
    first_seed: int = 1
    nproc: int = 1
    """Processes per pretraining run (torchrun when > 1; add parallel.* overrides)."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``section.key=value`` pretraining overrides, applied to every variant last."""

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


@dataclass
class Unit:
    """One variant at one seed: its directory and its steps in order."""

    variant: Variant
    seed: int
    root: Path
    steps: list[Step]

    @property
    def title(self) -> str:
        return f"{self.variant.name} seed {self.seed}"

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretrain"


def unit_dir(workdir: Path, variant: str, seed: int) -> Path:
    return workdir / variant / f"seed{seed}"


def eval_file(root: Path, routing: str) -> Path:
    return root / f"eval_{routing}.json"


def fluctuation_file(root: Path, routing: str) -> Path:
    return root / f"fluctuation_{routing}.json"


def finetune_dir(root: Path, name: str) -> Path:
    return root / f"finetune_{name}"


def pretrain_command(s: CompareSettings, variant: Variant, seed: int, out: Path) -> list[str]:
    """The pretraining command line of one unit."""
    launcher = (
        [PYTHON]
        if s.nproc == 1
        else [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(s.nproc),
        ]
    )
    every_save = max(1, s.steps // s.checkpoints)
    return [
        *launcher,
        str(REPO / "pretrain" / "pretrain_vqmoe.py"),
        "--config",
        s.config,
        f"data.data_dir={s.data_dir}",
        f"train.output_dir={out}",
        f"train.steps={s.steps}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"train.save_interval={every_save}",
        f"train.keep_last={s.steps // every_save + 1}",
        f"train.eval_interval={max(1, s.steps // s.evaluations)}",
        *variant.pretrain_settings(s.steps),
        *s.overrides,
    ]


def evaluate_command(run: Path, data_dir: str, routing: str, out: Path, *flags: str) -> list[str]:
    """``vqmoe-evaluate`` of ``run`` on the valid split in ``routing``; ``flags`` such as
    ``--fluctuation`` (between its consecutive checkpoints) change what it measures."""
    return [
        PYTHON,
        "-m",
        "vqmoe_megatron.evaluate",
        "--checkpoint",
        str(run),
        *flags,
        "--data-dir",
        data_dir,
        "--routing",
        routing,
        "--json",
        str(out),
    ]


def finetune_command(
    s: CompareSettings, run: Path, seed: int, out: Path, args: tuple[str, ...]
) -> list[str]:
    assert s.glue_dir is not None
    return [
        PYTHON,
        str(REPO / "finetune" / "glue.py"),
        "--task",
        s.task,
        "--data_dir",
        s.glue_dir,
        "--pretrained",
        str(run),
        "--output_dir",
        str(out),
        "--steps",
        str(s.finetune_steps),
        "--lr",
        str(s.finetune_lr),
        f"train.seed={seed}",
        *args,
    ]


def plan_unit(s: CompareSettings, variant: Variant, seed: int, workdir: Path) -> Unit:
    """The steps of one (variant, seed), each skipped once its outputs exist."""
    root = unit_dir(workdir, variant.name, seed)
    run = root / "pretrain"
    steps = [
        Step(
            "pretrain",
            pretrain_command(s, variant, seed, run),
            lambda: (run / "complete").is_file(),
        )
    ]
    for routing in variant.evaluations:
        out = eval_file(root, routing)
        steps.append(
            Step(
                f"evaluate ({routing} routing)",
                evaluate_command(run, s.data_dir, routing, out),
                out.is_file,
            )
        )
    for routing in variant.evaluations if variant.has_experts else ():
        out = fluctuation_file(root, routing)
        steps.append(
            Step(
                f"routing fluctuation ({routing} routing)",
                evaluate_command(run, s.data_dir, routing, out, "--fluctuation"),
                out.is_file,
            )
        )
    if s.glue_dir is not None:
        for ft in variant.finetunings:
            out = finetune_dir(root, ft.name)
            steps.append(
                Step(
                    f"fine-tune {s.task} ({ft.name})",
                    finetune_command(s, run, seed, out, ft.args),
                    (out / "complete").is_file,
                )
            )
    return Unit(variant, seed, root, steps)
