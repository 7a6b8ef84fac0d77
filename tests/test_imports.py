"""The package's import graph: no cycles, and the library never imports the command line.

Every ``import`` of every module under ``sd_jax/`` counts, at module level and inside
functions alike: a function-level import that dodges a circle is still a circle in the
design (STYLE.md: models <- weights <- pipeline <- (batch, server) <- cli).
"""
from __future__ import annotations

import ast
import os

import sd_jax

ROOT = os.path.dirname(os.path.abspath(sd_jax.__file__))

def _modules() -> dict[str, str]:
    """``{module name: file}`` for every module under sd_jax/ (packages as their ``__init__``)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def _resolve(name: str, modules) -> str | None:
    """The sd_jax module ``name`` refers to (a module, or the package holding a name), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: str, modules) -> set[str]:
    """The sd_jax modules ``module`` imports, anywhere in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from a.b import c`: c is a module a.b.c or a name in a.b
            names = [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "sd_jax":
                target = _resolve(n, modules)
                # importing a submodule runs its packages' __init__ too; a package's own
                # (already running) __init__ and the empty top-level package do not count
                if target and target != module and target != "sd_jax":
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS, colours)."""
    colour = {m: 0 for m in graph}   # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_graph_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "sd_jax.batch" in graph["sd_jax.commands"]           # imported inside functions
    assert "sd_jax.diffusion.schedules" in graph["sd_jax.diffusion.samplers"]   # `from . import`
    assert "sd_jax.weights.loader" in graph["sd_jax.pipeline"]


def test_find_cycle_reports_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_cli_imports_the_cli():
    graph = _graph()
    importers = sorted(m for m, ts in graph.items() if "sd_jax.cli" in ts)
    assert importers == [], f"these modules import sd_jax.cli: {importers}"
