"""Reading a finished comparison back: every unit's numbers from the files its commands wrote,
and their mean and spread over seeds.

One unit gives a flat ``metrics`` mapping (``bpb/pretrain``, ``finetune/default``, ...) that the
report aggregates, plus the series the plots draw (validation loss, per-layer expert load and
code perplexity over training, fluctuation between consecutive checkpoints).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean, stdev

from vqmoe_megatron.compare.plan import (
    CompareSettings,
    eval_file,
    finetune_dir,
    fluctuation_file,
    unit_dir,
)
from vqmoe_megatron.compare.variants import VARIANTS, Variant
from vqmoe_megatron.config import PretrainConfig, load_config
from vqmoe_megatron.training.flops import model_size

LAYER_KEY = re.compile(r"^layer(\d+)/(.+)$")
TRACKED = ("code_perplexity", "gate_discrete", "agreement")
"""Per-layer training metrics kept as series: codebook perplexity, the gate's weight on the
discrete path, and router/nearest-code agreement (VQ variants; see docs/routing_metrics.md)."""


@dataclass
class UnitResult:
    """The numbers of one (variant, seed)."""

    variant: Variant
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Flat scalar results: ``bpb/<routing>``, ``ppl/<routing>``, ``finetune/<name>``, ...;
    ``<key>/as_trained`` repeats ``<key>/<routing>`` of the routing the variant trained with."""
    valid_curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of the pretraining run's periodic evaluations."""
    expert_load: dict[int, list[tuple[int, list[float]]]] = field(default_factory=dict)
    """layer -> [(step, share of routed rows per expert)] over training."""
    layer_series: dict[str, dict[int, list[tuple[int, float]]]] = field(default_factory=dict)
    """metric of :data:`TRACKED` -> layer -> [(step, value)] over training, where logged."""
    fluctuation: list[tuple[int, float]] = field(default_factory=list)
    """(step of the later checkpoint, overall fluctuation since the one before), in the
    routing the variant was trained with."""
    codebook_size: int = 0


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _step_of(checkpoint: str) -> int:
    match = re.search(r"step_(\d+)", checkpoint)
    if match is None:
        raise ValueError(f"no step_* in checkpoint name {checkpoint!r}")
    return int(match.group(1))


def _layer_means(layers: dict, key: str) -> float:
    values = [stats[key] for stats in layers.values() if key in stats]
    return mean(values) if values else math.nan


def read_unit(settings: CompareSettings, workdir: Path, variant: Variant, seed: int) -> UnitResult:
    """Everything one finished unit wrote, as numbers."""
    root = unit_dir(workdir, variant.name, seed)
    run = root / "pretrain"
    cfg = load_config(PretrainConfig, run / "config.yaml")
    result = UnitResult(variant, seed, codebook_size=cfg.moe.codebook_size)
    m = result.metrics
    m["params/total"] = model_size(cfg.model, cfg.moe).total

    records = _records(run)
    train = [r for r in records if r.get("kind") == "train"]
    second_half = [r["tokens_per_s"] for r in train[len(train) // 2 :] if "tokens_per_s" in r]
    m["tokens_per_s"] = mean(second_half) if second_half else math.nan
    m["train_loss"] = mean(r["loss"] for r in train[-max(1, len(train) // 10) :])
    result.valid_curve = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
    for record in train:
        for key, value in record.items():
            match = LAYER_KEY.match(key)
            if match is None:
                continue
            layer, name = int(match.group(1)), match.group(2)
            if name == "expert_load":
                result.expert_load.setdefault(layer, []).append((record["step"], value))
            elif name in TRACKED:
                series = result.layer_series.setdefault(name, {}).setdefault(layer, [])
                series.append((record["step"], value))

    for routing in variant.evaluations:
        evaluation = _read_json(eval_file(root, routing))
        m[f"bpb/{routing}"] = evaluation["bpb"]
        m[f"ppl/{routing}"] = evaluation["ppl"]
        moe = replace(cfg.moe, routing_mode=routing) if cfg.moe.router == "vqmoe" else cfg.moe
        m[f"params/active/{routing}"] = model_size(cfg.model, moe).active
        layers = evaluation.get("layers", {})
        for key in ("imbalance", "router_entropy", "code_perplexity", "dead_codes", "agreement"):
            if any(key in stats for stats in layers.values()):
                m[f"{key}/{routing}"] = _layer_means(layers, key)
        if variant.has_experts:
            pairs = _read_json(fluctuation_file(root, routing))["fluctuation"]
            if routing == variant.evaluations[0]:
                result.fluctuation = [(_step_of(p["after"]), p["overall"]) for p in pairs]
            m[f"fluctuation/{routing}"] = mean(p["overall"] for p in pairs)
        if layers:
            m[f"experts_per_token/{routing}"] = _layer_means(layers, "rows_per_token")
            m[f"max_imbalance/{routing}"] = max(s["imbalance"] for s in layers.values())
            m[f"dead_experts/{routing}"] = sum(
                sum(1 for load in s["expert_load"] if load == 0.0) for s in layers.values()
            )

    trained = variant.evaluations[0]  # the routing the variant was pretrained with
    for key in ("bpb", "fluctuation", "params/active"):
        if f"{key}/{trained}" in m:
            m[f"{key}/as_trained"] = m[f"{key}/{trained}"]

    if settings.glue_dir is not None:
        for ft in variant.finetunings:
            results = _read_json(finetune_dir(root, ft.name) / "results.json")
            m[f"finetune/{ft.name}"] = results["best"]["score"]
            m["finetune/majority"] = results["baseline"]["dev"][results["main_metric"]]
    return result


def layer_mean(unit: UnitResult, name: str) -> list[tuple[int, float]]:
    """The series ``name`` of :data:`TRACKED` averaged over the MoE layers, at the steps every
    layer logged it ([] when the variant never logs it)."""
    layers = unit.layer_series.get(name, {})
    if not layers:
        return []
    by_step = [dict(series) for series in layers.values()]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    return [(step, mean(d[step] for d in by_step)) for step in steps]


def read_all(settings: CompareSettings, workdir: Path) -> list[UnitResult]:
    """Every unit of the comparison, variant by variant, seed by seed."""
    return [
        read_unit(settings, workdir, VARIANTS[name], seed)
        for name in settings.variants
        for seed in settings.seed_list
    ]


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over seeds (0 for one seed)."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 4) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def aggregate(units: list[UnitResult]) -> dict[str, dict[str, Spread]]:
    """variant -> metric -> its spread over the variant's seeds (metrics every seed has)."""
    by_variant: dict[str, list[UnitResult]] = {}
    for unit in units:
        by_variant.setdefault(unit.variant.name, []).append(unit)
    table = {}
    for name, seeds in by_variant.items():
        keys = set.intersection(*(set(u.metrics) for u in seeds))
        table[name] = {
            key: Spread(
                mean(values := [u.metrics[key] for u in seeds]),
                stdev(values) if len(values) > 1 else 0.0,
                len(values),
            )
            for key in sorted(keys)
        }
    return table
