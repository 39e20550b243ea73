"""``report.md`` of a comparison: the tables (mean ± standard deviation over seeds), the
ablation rows as differences, a plain statement of where VQMoE is beaten, the plots, and the
exact commands that made every number."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from vqmoe_megatron.compare.plan import PYTHON, CompareSettings, Unit
from vqmoe_megatron.compare.results import Spread
from vqmoe_megatron.compare.variants import VARIANTS
from vqmoe_megatron.pipeline import REPO

Table = dict[str, dict[str, Spread]]

HEADLINE = [
    ("bpb/as_trained", "valid bits per byte (as trained)"),
    ("finetune/default", "fine-tuned dev score"),
    ("fluctuation/as_trained", "routing fluctuation as trained (mean over intervals)"),
]
"""The metrics of headline.png: (key, label)."""

# (key, label, higher is better, digits)
RANKED = [
    ("bpb", "valid bits per byte", False, 4),
    ("finetune/default", "fine-tuned dev score", True, 4),
    ("params/active/as_trained", "active parameters per token as trained (compute)", False, 0),
    ("fluctuation", "routing fluctuation between checkpoints", False, 4),
]


def display(command: list[str]) -> str:
    """A command as a user types it in the repository: ``python``, repository-relative paths."""
    prefix = f"{REPO}/"
    return shlex.join("python" if c == PYTHON else c.removeprefix(prefix) for c in command)


def _cell(table: Table, variant: str, key: str, digits: int = 4) -> str:
    spread = table.get(variant, {}).get(key)
    return "–" if spread is None or math.isnan(spread.mean) else spread.format(digits)


def _count(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"


def _markdown_table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def pretraining_rows(table: Table) -> list[list[str]]:
    rows = []
    for name, metrics in table.items():
        for routing in VARIANTS[name].evaluations:
            rows.append(
                [
                    f"`{name}`",
                    routing,
                    _cell(table, name, f"bpb/{routing}"),
                    _cell(table, name, f"ppl/{routing}", 1),
                    f"{_count(metrics['params/total'].mean)} / "
                    f"{_count(metrics[f'params/active/{routing}'].mean)}",
                    _cell(table, name, f"experts_per_token/{routing}", 2),
                    _cell(table, name, "tokens_per_s", 0),
                    _cell(table, name, f"max_imbalance/{routing}", 2),
                    _cell(table, name, f"fluctuation/{routing}", 4),
                ]
            )
    return rows


def diagnostics_rows(table: Table) -> list[list[str]]:
    rows = []
    for name in table:
        for routing in VARIANTS[name].evaluations:
            keys = (
                "imbalance",
                "dead_experts",
                "router_entropy",
                "code_perplexity",
                "dead_codes",
                "agreement",
            )
            cells = [_cell(table, name, f"{key}/{routing}", 3) for key in keys]
            if any(c != "–" for c in cells):
                rows.append([f"`{name}`", routing, *cells])
    return rows


def finetuning_rows(table: Table) -> list[list[str]]:
    return [
        [f"`{name}`", ft.label, _cell(table, name, f"finetune/{ft.name}")]
        for name in table
        for ft in VARIANTS[name].finetunings
    ]


def _pair(table: Table, a: tuple[str, str], b: tuple[str, str]) -> Optional[tuple[Spread, Spread]]:
    """The spreads of metric keys a=(variant, key) and b=(variant, key), None if one is missing."""
    first, second = table.get(a[0], {}).get(a[1]), table.get(b[0], {}).get(b[1])
    return None if first is None or second is None else (first, second)


def _versus(table: Table, a: tuple[str, str], b: tuple[str, str]) -> str:
    """'mean_a - mean_b (± combined std)' or '–' when either is missing."""
    pair = _pair(table, a, b)
    if pair is None:
        return "–"
    first, second = pair
    return f"{first.mean - second.mean:+.4f} (±{math.hypot(first.std, second.std):.4f})"


def router_free_rows(table: Table) -> list[list[str]]:
    """Per VQ variant: bits per byte with the router kept and dropped, the relative cost of
    dropping it, and the differences that the router-free claim is about: dropped vs top-1,
    kept vs top-2, and the fine-tuned score (router dropped) vs top-2 fine-tuned with its
    router. Negative bits-per-byte differences and positive score differences favour VQ."""
    rows = []
    for name in table:
        if "discrete" not in VARIANTS[name].evaluations:
            continue
        kept, dropped = table[name].get("bpb/pretrain"), table[name]["bpb/discrete"]
        cost = "–" if kept is None else f"{(dropped.mean / kept.mean - 1) * 100:+.2f}%"
        rows.append(
            [
                f"`{name}`",
                _cell(table, name, "bpb/pretrain"),
                _cell(table, name, "bpb/discrete"),
                cost,
                _versus(table, (name, "bpb/discrete"), ("topk", "bpb/pretrain")),
                _versus(table, (name, "bpb/pretrain"), ("topk2", "bpb/pretrain")),
                _versus(table, (name, "finetune/default"), ("topk2", "finetune/default")),
            ]
        )
    return rows


def _difference(table: Table, a: tuple[str, str], b: tuple[str, str]) -> Optional[str]:
    """'a → b (Δ mean_b - mean_a, combined std)' of metric keys a and b, None if one is missing."""
    pair = _pair(table, a, b)
    if pair is None:
        return None
    first, second = pair
    delta = second.mean - first.mean
    return f"{first.format()} → {second.format()} (Δ {delta:+.4f}, seed std {math.hypot(first.std, second.std):.4f})"


ABLATIONS = [
    ("VQMoE evaluated with the router kept → router dropped (discrete only), bits per byte",
     ("vqmoe", "bpb/pretrain"), ("vqmoe", "bpb/discrete")),
    ("VQMoE router dropped → discrete-only from scratch (`vq_only`), bits per byte",
     ("vqmoe", "bpb/discrete"), ("vq_only", "bpb/discrete")),
    ("expert input `paper` → `token`, bits per byte as trained",
     ("vqmoe", "bpb/pretrain"), ("vqmoe_token_input", "bpb/pretrain")),
    ("expert input `paper` → `token`, bits per byte router dropped",
     ("vqmoe", "bpb/discrete"), ("vqmoe_token_input", "bpb/discrete")),
    ("codebook update `gradient` → `ema`, bits per byte as trained",
     ("vqmoe", "bpb/pretrain"), ("vqmoe_ema", "bpb/pretrain")),
    ("codebook update `gradient` → `ema`, bits per byte router dropped",
     ("vqmoe", "bpb/discrete"), ("vqmoe_ema", "bpb/discrete")),
    ("fine-tuning: codebook frozen → trained (discrete routing), dev score",
     ("vqmoe", "finetune/default"), ("vqmoe", "finetune/codebook_trained")),
    ("fine-tuning: router dropped → router kept, dev score",
     ("vqmoe", "finetune/default"), ("vqmoe", "finetune/router_kept")),
]  # fmt: skip
"""Ablation rows: (what changes, (variant, metric) before, (variant, metric) after)."""


def ablation_lines(table: Table) -> list[str]:
    lines = []
    for label, before, after in ABLATIONS:
        difference = _difference(table, before, after)
        if difference is not None:
            lines.append(f"- {label}: {difference}")
    return lines or ["- (none of the ablation variants were part of this comparison)"]


def _best_of(table: Table, key: str, variant: str) -> Optional[Spread]:
    """A variant's metric; for bits per byte and fluctuation the better of its routing modes."""
    metrics = table.get(variant, {})
    if key not in ("bpb", "fluctuation"):
        return metrics.get(key)
    modes = [v for k, v in metrics.items() if k.startswith(f"{key}/") and k != f"{key}/as_trained"]
    return min(modes, key=lambda s: s.mean) if modes else None


def where_vqmoe_loses(table: Table) -> list[str]:
    """Plain sentences: for each ranked metric, the variants ahead of VQMoE, and whether the
    gap is larger than the seeds' spread (the sum of the two standard deviations)."""
    if "vqmoe" not in table:
        return ["- `vqmoe` was not part of this comparison."]
    lines = []
    for key, label, higher, digits in RANKED:
        ours = _best_of(table, key, "vqmoe")
        if ours is None:
            continue
        ahead = []
        for name in table:
            theirs = _best_of(table, key, name)
            if name == "vqmoe" or theirs is None:
                continue
            gap = theirs.mean - ours.mean if higher else ours.mean - theirs.mean
            if gap > 0:
                clear = gap > ours.std + theirs.std
                spread = "" if clear else ", within the seed spread"
                ahead.append(f"`{name}` ({theirs.format(digits)}{spread})")
        what = f"{label} (the better routing mode)" if key in ("bpb", "fluctuation") else label
        if ahead:
            lines.append(
                f"- **{what}**: VQMoE ({ours.format(digits)}) is beaten by {', '.join(ahead)}."
            )
        else:
            lines.append(f"- **{what}**: VQMoE ({ours.format(digits)}) is not beaten here.")
    return lines


def write_report(
    settings: CompareSettings,
    table: Table,
    units: list[Unit],
    command: str,
    plots: list[Path],
    out: Path,
) -> Path:
    """Write ``<out>/report.md`` and return its path."""
    task = settings.task.upper() if settings.glue_dir else None
    lines = [
        f"# Router comparison: {out.name}",
        "",
        f"{len(table)} variants × {settings.seeds} seeds ({', '.join(map(str, settings.seed_list))}), "
        f"{settings.steps} pretraining steps each from `{settings.config}` on `{settings.data_dir}`"
        + (f"; each fine-tuned {settings.finetune_steps} steps on {task}." if task else "."),
        "Numbers are mean ± sample standard deviation over the seeds. Tokens/s are measured "
        "while the comparison ran, with `--jobs` runs and anything else on the machine sharing "
        "the CPU unevenly: they are a sanity check, not a speed ranking (bench/ measures speed "
        "side by side); active parameters per token are the compute comparison.",
        "",
        "Made by:",
        "",
        "```",
        command,
        "```",
        "",
        "## Pretraining (valid split)",
        "",
        "`routing`: how the model routes at evaluation (`discrete`: nearest code only, router and "
        "gate dropped). Parameters are total / active per token; experts/token is measured.",
        "",
        *_markdown_table(
            [
                "variant",
                "routing",
                "bits/byte",
                "perplexity",
                "params (total / active)",
                "experts/token",
                "tokens/s",
                "max imbalance",
                "fluctuation",
            ],
            pretraining_rows(table),
        ),  # fmt: skip
        "",
        "## Router-free inference",
        "",
        "Bits per byte with the router kept and dropped, what dropping it costs, and the "
        "differences the router-free claim is about (mean difference, ± the combined seed std; "
        "`topk` is top-1 SMoE, `topk2` top-2; – where that baseline is not in this comparison). "
        "Negative bits-per-byte differences and positive fine-tuning differences favour the VQ "
        "variant.",
        "",
        *_markdown_table(
            [
                "variant",
                "bits/byte, router kept",
                "router dropped",
                "cost of dropping",
                "dropped − top-1",
                "kept − top-2",
                "fine-tuned (dropped) − top-2 fine-tuned",
            ],
            router_free_rows(table),
        ),  # fmt: skip
        "",
        "## Routing diagnostics (valid split, mean over layers)",
        "",
        *_markdown_table(
            [
                "variant",
                "routing",
                "imbalance",
                "dead experts",
                "router entropy",
                "code perplexity",
                "dead codes",
                "router-VQ agreement",
            ],
            diagnostics_rows(table),
        ),  # fmt: skip
        "",
    ]
    if task:
        majority = next(iter(table.values())).get("finetune/majority")
        lines += [
            f"## Fine-tuning on {task} (best dev score)",
            "",
            f"Majority class: {majority.mean:.4f}." if majority else "",
            "",
            *_markdown_table(["variant", "fine-tuning", "dev score"], finetuning_rows(table)),
            "",
        ]
    lines += [
        "## Ablations (before → after)",
        "",
        *ablation_lines(table),
        "",
        "## Where VQMoE does not win",
        "",
        *where_vqmoe_loses(table),
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "## Every command (first seed of each variant; other seeds change only the seed values)",
        "",
        "```",
        *[
            display(step.command)
            for unit in units
            if unit.seed == settings.first_seed
            for step in unit.steps
        ],
        "```",
        "",
        "Variants:",
        "",
        *[f"- `{name}`: {VARIANTS[name].label}" for name in table],
        "",
    ]
    path = out / "report.md"
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines), encoding="utf-8")
    temporary.replace(path)
    return path
