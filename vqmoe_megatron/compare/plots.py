"""The comparison's plots (matplotlib, PNG): validation curves, per-layer expert load over
training, codebook usage with the gate weight and router-code agreement over training, routing
fluctuation over training, and the headline numbers.

Curves are the mean over seeds with the seeds' range shaded; the expert-load heatmaps show the
first seed of each variant (the others look alike and are in the run directories).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vqmoe_megatron.compare.results import Spread, UnitResult, layer_mean  # noqa: E402

Series = list[tuple[int, float]]


def _by_variant(units: list[UnitResult]) -> dict[str, list[UnitResult]]:
    grouped: dict[str, list[UnitResult]] = {}
    for unit in units:
        grouped.setdefault(unit.variant.name, []).append(unit)
    return grouped


def _colors(units: list[UnitResult]) -> dict[str, tuple]:
    """One colour per variant, the same in every plot (in the comparison's order)."""
    palette = plt.get_cmap("tab20" if len(_by_variant(units)) > 10 else "tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(_by_variant(units))}


def _mean_curve(ax, name: str, series: list[Series], color: tuple) -> None:
    """Plot the mean of seed curves sampled at the same steps, with their min-max band
    (nothing when every seed's curve is empty: the variant does not log that series)."""
    series = [s for s in series if s]
    if not series:
        return
    length = min(len(s) for s in series)
    steps = [step for step, _ in series[0][:length]]
    values = np.array([[v for _, v in s[:length]] for s in series])
    ax.plot(steps, values.mean(axis=0), marker=".", label=name, color=color)
    if len(series) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2, color=color)


def _curves_figure(
    units: list[UnitResult], series_of: Callable[[UnitResult], Series], ylabel: str, title: str
):
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = _colors(units)
    for name, seeds in _by_variant(units).items():
        _mean_curve(ax, name, [series_of(u) for u in seeds], colors[name])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def validation_curves(units: list[UnitResult]):
    return _curves_figure(
        units,
        lambda u: u.valid_curve,
        "validation loss (nats/token)",
        "Validation loss during pretraining (mean over seeds, range shaded)",
    )


def fluctuation_curves(units: list[UnitResult]):
    return _curves_figure(
        units,
        lambda u: u.fluctuation,
        "share of held-out tokens whose top-1 expert changed",
        "Routing fluctuation between consecutive checkpoints",
    )


def expert_load_heatmaps(units: list[UnitResult]):
    """One panel per variant (first seed): rows are (layer, expert), columns training steps,
    colour the share of the layer's routed rows that expert got."""
    firsts = [seeds[0] for seeds in _by_variant(units).values() if seeds[0].expert_load]
    columns = min(4, len(firsts)) or 1
    rows = -(-len(firsts) // columns) or 1
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False, layout="constrained"
    )
    image = None
    for ax, unit in zip(axes.flat, firsts):
        layers = sorted(unit.expert_load)
        steps = [step for step, _ in unit.expert_load[layers[0]]]
        grid = np.concatenate(
            [np.array([load for _, load in unit.expert_load[layer]]).T for layer in layers]
        )
        experts = grid.shape[0] // len(layers)
        image = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
            vmax=min(1.0, 3.0 / experts),
            extent=(steps[0], steps[-1], grid.shape[0] - 0.5, -0.5),
        )
        ax.set_yticks(
            [i * experts + (experts - 1) / 2 for i in range(len(layers))],
            [f"layer {layer}" for layer in layers],
        )
        for i in range(1, len(layers)):
            ax.axhline(i * experts - 0.5, color="white", linewidth=1)
        ax.set_title(f"{unit.variant.name} (seed {unit.seed})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(firsts) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of routed rows per expert")
    fig.suptitle("Per-layer expert load over training (rows: experts of each layer)")
    return fig


def vq_routing_curves(units: list[UnitResult]):
    """Three panels over training, VQ variants, mean over layers and seeds: codebook usage
    (code perplexity / codebook size; 1.0: every code used equally), the gate's weight on the
    discrete path g_d, and the share of tokens whose router top-1 is their nearest code's
    expert. Gate and agreement exist only while a router runs (not in discrete phases)."""
    panels = [
        ("code_perplexity", "code perplexity / codebook size", True),
        ("gate_discrete", "gate weight on the discrete path (g_d)", False),
        ("agreement", "router top-1 = nearest code's expert", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.8), squeeze=False)
    colors = _colors(units)
    for ax, (name, label, per_code) in zip(axes.flat, panels):
        for variant, seeds in _by_variant(units).items():
            curves = [
                [(s, v / u.codebook_size if per_code else v) for s, v in layer_mean(u, name)]
                for u in seeds
            ]
            _mean_curve(ax, variant, curves, colors[variant])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Codebook usage, gate and router-code agreement during pretraining")
    fig.tight_layout()
    return fig


def headline_bars(table: dict[str, dict[str, Spread]], metrics: list[tuple[str, str]]):
    """One bar panel per (metric key, label): each variant's mean with its seed std."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        names = [n for n in table if key in table[n]]
        means = [table[n][key].mean for n in names]
        stds = [table[n][key].std for n in names]
        ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        margin = (high - low) * 0.3 or abs(high) * 0.05 or 1.0
        ax.set_ylim(low - margin, high + margin)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(
    units: list[UnitResult],
    table: dict[str, dict[str, Spread]],
    headline: list[tuple[str, str]],
    out: Path,
) -> list[Path]:
    """Write every plot to ``out`` and return the files written."""
    figures = {
        "validation_loss.png": validation_curves(units),
        "expert_load.png": expert_load_heatmaps(units),
        "codebook_usage.png": vq_routing_curves(units),
        "fluctuation.png": fluctuation_curves(units),
        "headline.png": headline_bars(table, headline),
    }
    written = []
    for name, fig in figures.items():
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
