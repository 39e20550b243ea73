"""The import graph of the ``vqmoe_megatron`` package, checked against a declared layer order.

Reads every module's source with :mod:`ast` (nothing is imported, so it runs without torch or
megatron) and records each import of another package module, at module level or inside a
function alike: a deferred import is still a dependency. Prints the graph between *units* (a
sub-package such as ``moe``, or a top-level module such as ``model``) and flags

* cycles between modules (module A imports B, which imports ... A), and between units;
* upward arrows: a unit importing a unit of a higher layer in :data:`LAYERS`.

Layers, lowest first; a unit may import its own layer and the ones below (acyclically)::

    python tools/import_graph.py            # graph + problems; exit status 1 if any
    python tools/import_graph.py --modules  # module-level edges as well
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "vqmoe_megatron"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: tuple[tuple[str, ...], ...] = (
    # 0: leaves: third-party patches, paths, process helpers, tensor-parallel tags, error lines,
    #    the step runner of multi-command pipelines
    ("compat", "paths", "processes", "interrupt", "parallel_tensors", "console", "pipeline"),
    # 1: settings, what DeepSpeed is told from them, launcher and process groups
    ("config", "config_reference", "deepspeed_config", "distributed"),
    # 2: building blocks
    ("moe", "data", "glue"),
    # 3: the model
    ("model",),
    # 4: a run's settings checked against the model and DeepSpeed before anything is built;
    #    checkpoint files
    ("config_checks", "checkpoint"),
    # 5: the training loop and its tasks, fine-tuning, conversion, evaluation
    ("training", "finetune", "convert", "hf", "evaluate", "eval_tasks"),
    # 6: command-line entry points, and the router comparison that runs them
    ("commands", "compare"),
)
"""Units by layer, lowest first. A unit not listed here is reported as a problem."""

ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
"""Known upward arrows (importer module, imported module) -> the issue part removing them.
They are left out of the cycle check too. Empty when the graph is clean; an entry here is a debt
with a named owner, never a waiver."""


def module_name(path: Path, root: Path = ROOT) -> str:
    """``vqmoe_megatron/moe/router.py`` -> ``vqmoe_megatron.moe.router`` (``__init__`` dropped)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layered unit of a package module: its first component below the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, int]]:
    """(dotted name, line) of every import in ``tree``, relative imports resolved; ``from X
    import y`` yields ``X.y`` (:meth:`ImportGraph.resolve` falls back to ``X`` when ``y`` is a
    name defined in ``X`` rather than a submodule)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


@dataclass
class ImportGraph:
    """Module-level edges of the package: importer -> {imported: first line}."""

    modules: set[str] = field(default_factory=set)
    edges: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))

    @classmethod
    def scan(cls, root: Path = ROOT) -> ImportGraph:
        graph = cls()
        paths = sorted(root.rglob("*.py"))
        graph.modules = {module_name(p, root) for p in paths}
        for path in paths:
            importer = module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            names = _imported_names(tree, importer, path.name == "__init__.py")
            for name, line in names:
                target = graph.resolve(name)
                if target is None or target == importer:
                    continue
                graph.edges[importer].setdefault(target, line)
        return graph

    def resolve(self, name: str) -> str | None:
        """The package module a dotted import name refers to (longest existing prefix)."""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in self.modules:
                return candidate
            parts.pop()
        return None

    def unit_edges(self, skip: Iterable[tuple[str, str]] = ()) -> dict[str, set[str]]:
        """Edges between units (self-loops and the module edges in ``skip`` dropped)."""
        skip = set(skip)
        out: dict[str, set[str]] = defaultdict(set)
        for importer, targets in self.edges.items():
            for target in targets:
                if (importer, target) in skip:
                    continue
                a, b = unit_of(importer), unit_of(target)
                if a != b and a != PACKAGE and b != PACKAGE:
                    out[a].add(b)
        return out


def find_cycles(edges: dict[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    nodes = set(edges) | {n for targets in edges.values() for n in targets}
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return sorted(components)


def layer_of(unit: str) -> int | None:
    """The index of ``unit``'s layer in :data:`LAYERS`, or None when undeclared."""
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    return None


@dataclass(frozen=True)
class Problems:
    """What the checks found: each list empty on a clean graph."""

    module_cycles: list[list[str]]
    unit_cycles: list[list[str]]
    upward: list[str]
    undeclared: list[str]
    stale_allowances: list[str]

    def __bool__(self) -> bool:
        return any(
            (
                self.module_cycles,
                self.unit_cycles,
                self.upward,
                self.undeclared,
                self.stale_allowances,
            )
        )


def check(graph: ImportGraph) -> Problems:
    """Cycles, upward arrows not in :data:`ALLOWED_UPWARD`, units missing from :data:`LAYERS`,
    and allow-list entries that no longer match an import (so the list cannot go stale)."""
    upward, used = [], set()
    for importer, targets in sorted(graph.edges.items()):
        for target, line in sorted(targets.items()):
            a, b = layer_of(unit_of(importer)), layer_of(unit_of(target))
            if a is None or b is None or b <= a:
                continue
            if (importer, target) in ALLOWED_UPWARD:
                used.add((importer, target))
                continue
            upward.append(f"{importer}:{line} -> {target} (layer {a} imports layer {b})")
    units = {unit_of(m) for m in graph.modules} - {PACKAGE}
    return Problems(
        module_cycles=find_cycles(graph.edges),
        unit_cycles=find_cycles(graph.unit_edges(skip=ALLOWED_UPWARD)),
        upward=upward,
        undeclared=sorted(u for u in units if layer_of(u) is None),
        stale_allowances=sorted(f"{a} -> {b}" for a, b in set(ALLOWED_UPWARD) - used),
    )


def render(graph: ImportGraph, problems: Problems, modules: bool = False) -> str:
    """The text report: units by layer with their imports, then the problems."""
    lines = []
    unit_edges = graph.unit_edges()
    present = {unit_of(m) for m in graph.modules}
    for level, units in reversed(list(enumerate(LAYERS))):
        units = [u for u in units if u in present]
        if units:
            lines.append(f"layer {level}:")
        for unit in units:
            targets = sorted(unit_edges.get(unit, ()), key=lambda u: (layer_of(u) or -1, u))
            marked = [f"{t} (UP)" if (layer_of(t) or -1) > level else t for t in targets]
            lines.append(f"  {unit} -> {', '.join(marked) if marked else '(nothing)'}")
    if modules:
        lines.append("modules:")
        for importer in sorted(graph.edges):
            lines.append(f"  {importer} -> {', '.join(sorted(graph.edges[importer]))}")
    for title, items in (
        ("module cycles", [" <-> ".join(c) for c in problems.module_cycles]),
        ("unit cycles", [" <-> ".join(c) for c in problems.unit_cycles]),
        ("upward imports", problems.upward),
        ("units missing from LAYERS", problems.undeclared),
        ("allowed upward imports that no longer exist", problems.stale_allowances),
    ):
        lines.append(f"{title}: {len(items)}")
        lines.extend(f"  {item}" for item in items)
    for (importer, target), reason in sorted(ALLOWED_UPWARD.items()):
        lines.append(f"allowed upward: {importer} -> {target} ({reason})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="also list module-level edges")
    args = parser.parse_args(argv)
    graph = ImportGraph.scan()
    problems = check(graph)
    print(render(graph, problems, modules=args.modules))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
