"""The package's layering, read from the source: every import (at module level or inside a
function) of a grape_dist module runs downward, and the subpackages import each other without a
circle. The layers, bottom to top:

    config, errors, fileio, rng, optim, trace, faults   plain helpers
    data, models                                         what is trained on and what is trained
    rules                                                the learning rules (models)
    runtime                                              layout, transport, schedules, engine
    distributed                                          torch.distributed under the runtime
    metrics                                              alignment probe, writers (runtime)
    build                                                assembles the engine (runtime, distributed)
    trainer, train_state, startup, stopping,             the loop, by concern, and the entry
    checkpointing, run_folder, ray_job, train, report    points
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grape_dist"
LAYERS = [
    {"config", "errors", "fileio", "rng", "optim", "trace", "faults"},
    {"data", "models"},
    {"rules"},
    {"runtime"},
    {"distributed"},
    {"metrics"},
    {"build"},
    {"trainer", "train_state", "startup", "stopping", "checkpointing", "run_folder", "ray_job",
     "train", "report"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """grape_dist.runtime.engine -> runtime; grape_dist.trainer -> trainer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> list[tuple[str, str, int, str]]:
    """(importing unit, imported unit, line, file) for every import of a grape_dist module."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        parts = ["grape_dist", *path.relative_to(PACKAGE).with_suffix("").parts]
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        here = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    # `from .. import trace` names a module of the package itself.
                    names = [f"{target}.{a.name}" for a in node.names] if not node.module \
                        else [target]
                elif node.module and node.module.split(".")[0] == "grape_dist":
                    names = [node.module]
                else:
                    continue
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "grape_dist"]
            else:
                continue
            for name in names:
                out.append((_unit(here), _unit(name), node.lineno, str(path)))
    return out


def test_every_module_is_in_a_layer():
    units = {_unit(".".join(["grape_dist", *p.relative_to(PACKAGE).with_suffix("").parts]))
             for p in PACKAGE.rglob("*.py")} - {"", "__init__"}
    assert units <= set(LEVEL), f"place these in LAYERS: {sorted(units - set(LEVEL))}"


def test_no_import_runs_upward():
    upward = [f"{path}:{line}: {src} imports {dst}" for src, dst, line, path in _imports()
              if src and dst and src != dst and LEVEL[dst] > LEVEL[src]]
    assert not upward, "\n".join(upward)


def test_the_subpackages_import_each_other_without_a_circle():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in _imports():
        if src and dst and src != dst:
            graph.setdefault(src, set()).add(dst)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(u for u in graph if u in reach(u))
    assert not circles, f"import circles through {circles}"


@pytest.mark.parametrize("src,dst", [("runtime", "distributed"), ("runtime", "metrics")])
def test_the_arrows_that_used_to_run_upward_are_gone(src, dst):
    assert not [x for x in _imports() if (x[0], x[1]) == (src, dst)]


def test_metrics_moves_no_messages():
    """The alignment probe is a runtime schedule (runtime/probe.py): metrics/ computes cosines
    on what it hands back and calls no transport itself."""
    calls = []
    for path in (PACKAGE / "metrics").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {
                    "send", "recv", "broadcast", "all_reduce", "check_idle", "transport"}:
                calls.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not calls, "\n".join(calls)
