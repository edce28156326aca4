"""Level 1: the package layout is the architecture. Imports point downward
only (control -> replication -> analytics -> front ends -> engine -> errors) and no modules
import each other in a circle, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pstoraged"
# lower number = lower layer; a module may import its own layer or below
LAYERS = {"errors": 0, "engine": 1, "frontends": 2, "analytics": 3, "replication": 4,
          "control": 5}

# Known exceptions, each to be removed by the change that ends it; a listed
# import that no longer exists fails the test too, so the list cannot go stale.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pstoraged modules `name` imports, wherever in the file."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.get(parts[1], -1) if len(parts) > 1 else -1


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_belongs_to_a_layer():
    stray = [m for m in modules() if m != "pstoraged" and layer(m) < 0]
    assert not stray, f"modules outside the layers {sorted(LAYERS)}: {stray}"


def test_imports_point_downward():
    upward = {(m, t) for m, ts in graph().items() for t in ts
              if layer(m) >= 0 and layer(t) > layer(m)}
    assert upward - KNOWN_UPWARD == set(), "upward imports (move the code, or pass a callback down)"
    assert KNOWN_UPWARD - upward == set(), "fixed: remove these from KNOWN_UPWARD"


def cycles(g: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert found - KNOWN_CYCLES == set(), "modules that import each other in a circle"
    assert KNOWN_CYCLES - found == set(), "fixed: remove these from KNOWN_CYCLES"


def test_the_checker_sees_an_upward_import_and_a_cycle():
    g = {"pstoraged.engine.a": {"pstoraged.control.b"}, "pstoraged.control.b": set(),
         "pstoraged.frontends.x": {"pstoraged.frontends.y"},
         "pstoraged.frontends.y": {"pstoraged.frontends.x"}}
    assert layer("pstoraged.control.b") > layer("pstoraged.engine.a")
    assert cycles(g) == {frozenset({"pstoraged.frontends.x", "pstoraged.frontends.y"})}
