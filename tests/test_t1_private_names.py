"""No module reaches into another module's private names or the segment log's arrays.

A class's `_name` attributes and methods are for the module that defines it;
other modules use its public methods and properties. An AST scan of
`pstoraged/` flags `x._name` where `x` is not `self`/`cls` and no class of
the same module defines `_name`, `from module import _name` across modules,
and touches of SegmentLog's per-segment state (`segs.live`, `segs.state`, ...)
outside segments.py (its query methods and `columns()` are the way in).
Exceptions are listed below with their reason; a new reach-in fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pstoraged"

# (module path relative to pstoraged/, attribute or imported name): why it is allowed
ALLOWED: dict[tuple[str, str], str] = {
    # argparse has no public name for the object add_subparsers() returns; the
    # CLI's per-group builders take it as a parameter and are typed with it
    ("control/cli.py", "_SubParsersAction"):
        "the type of argparse's add_subparsers() result",
}

# SegmentLog attributes other modules may read: geometry and the allocation counter
SEGMENT_LOG_PUBLIC = {"backing", "sb", "size", "count", "reserve", "next_seq"}


def defined_private_names(tree: ast.Module) -> set[str]:
    """Private names the module's classes define: methods, class attributes,
    `self._x = ...` assignments and __slots__ entries."""
    out: set[str] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                out.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        out.add(t.id)
                        if t.id == "__slots__" and node.value is not None:
                            out.update(c.value for c in ast.walk(node.value)
                                       if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return {n for n in out if n.startswith("_")}


def segment_log_state() -> set[str]:
    """SegmentLog's own state: what its __init__ assigns, less SEGMENT_LOG_PUBLIC."""
    tree = ast.parse((ROOT / "engine" / "segments.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentLog")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = {n.attr for n in ast.walk(init)
             if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    return {n for n in names if not n.startswith("_")} - SEGMENT_LOG_PUBLIC


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def reach_ins(rel: str, source: str, seg_state: set[str]) -> list[tuple[str, int, str]]:
    """(module, line, what) for every reach-in in one module's source."""
    tree = ast.parse(source)
    own = defined_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if is_private(node.attr):
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr not in own:
                    found.append((rel, node.lineno, node.attr))
            elif (node.attr in seg_state and rel != "engine/segments.py"
                    and ((isinstance(base, ast.Name) and base.id == "segs")
                         or (isinstance(base, ast.Attribute) and base.attr == "segs"))):
                found.append((rel, node.lineno, f"segs.{node.attr}"))
        elif isinstance(node, ast.ImportFrom):
            inside = node.level > 0 or (node.module or "").startswith("pstoraged")
            for alias in node.names:
                if inside and is_private(alias.name):
                    found.append((rel, node.lineno, alias.name))
    return found


def scan() -> list[tuple[str, int, str]]:
    seg_state = segment_log_state()
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        out += [f for f in reach_ins(rel, path.read_text(), seg_state)
                if (f[0], f[2]) not in ALLOWED]
    return out


def test_no_module_uses_another_modules_private_names():
    found = scan()
    assert not found, "private names or segment arrays used outside their module " \
        "(add a public method, or list a justified exception in ALLOWED):\n" + \
        "\n".join(f"  pstoraged/{m}:{line}: {what}" for m, line, what in found)


def test_every_exception_is_still_needed():
    seg_state = segment_log_state()
    used = set()
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        used |= {(m, what) for m, _, what in reach_ins(rel, path.read_text(), seg_state)}
    assert set(ALLOWED) <= used, f"stale exceptions: {sorted(set(ALLOWED) - used)}"


def test_the_checker_sees_reach_ins():
    seg_state = {"live", "state"}
    src = (
        "from .engine import _helper\n"
        "class Own:\n"
        "    __slots__ = ('_mine',)\n"
        "    def _step(self): return self._other\n"
        "def f(eng, o, segs):\n"
        "    o._mine; o._step()\n"  # defined by a class of this module: fine
        "    eng._maybe_commit()\n"
        "    eng.segs.live[3]; segs.state.count(1); eng.segs.size\n"
        "    eng.__class__\n"
    )
    found = {(line, what) for _, line, what in reach_ins("x.py", src, seg_state)}
    assert found == {(1, "_helper"), (7, "_maybe_commit"), (8, "segs.live"), (8, "segs.state")}
    assert reach_ins("engine/segments.py", "segs.live[0]\n", seg_state) == []
    assert {"live", "state", "erase", "pending_free", "open"} <= segment_log_state()
