"""Imports point one way (DESIGN §1): no module of unlearn_fast imports, directly or through others -
at module level or inside a function - a module that imports it back. Package ``__init__`` files are
not nodes (they import their submodules to run registrations)."""
from __future__ import annotations

import ast
from pathlib import Path

import unlearn_fast

ROOT = Path(unlearn_fast.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("unlearn_fast",) + p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in mods:
                return cand
        return None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(m.split(".")[: -node.level] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                r = resolve(t)
                if r and r != m:
                    graph[m].add(r)
                    break
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, seen = [], set()

    def dfs(u: str, stack: list[str]) -> None:
        seen.add(u)
        stack.append(u)
        for v in sorted(graph[u]):
            if v in stack:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in seen:
                dfs(v, stack)
        stack.pop()

    for m in sorted(graph):
        if m not in seen:
            dfs(m, [])
    return cycles


def test_graph_sees_lazy_imports():
    """The checker must see function-level imports (a planted cycle through one is found)."""
    g = import_graph()
    assert "unlearn_fast.compare" in g["unlearn_fast.api"]          # lazy, inside api.compare()
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
