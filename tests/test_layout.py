"""The package's layout: no import circle among srpo_core's modules, every module importable, and
README's layout section naming every module."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import srpo_core

ROOT = Path(srpo_core.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="srpo_core."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            out[info.name] = Path(spec.origin)
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """srpo_core modules `name` imports, at module level or inside functions (a lazy import still
    ties the two modules together), resolved to the modules that exist."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("srpo_core."):
                found.add(t)
    return found


def test_no_import_circle_in_srpo_core():
    mods = modules()
    known = set(mods)
    graph = {name: {t for t in imports_of(name, path, known) if not name.startswith(t + ".")} for name, path in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a circle between rooms
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not sccs, "import circles: " + "; ".join(" <-> ".join(c) for c in sccs)


def test_the_checker_finds_a_circle(tmp_path):
    """The walk above sees lazy imports in both directions (so the test can fail)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from srpo_core.b import g\n")
    assert imports_of("srpo_core.a", a, {"srpo_core.a", "srpo_core.b"}) == {"srpo_core.b"}


def test_readme_layout_lists_every_module():
    text = (ROOT.parent / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([\w/]+(?:\.py)?)`", section))
    missing = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("theory/", "tiny/", "benchmarks/", "verifiers/", "server/", "engine/", "store/", "compare/", "methods/", "tasks/")):
            rel = rel.split("/", 1)[0] + "/" + rel.split("/", 1)[1]
        if rel.endswith("__init__.py") or rel.endswith("__main__.py") or Path(rel).name.startswith("_"):
            continue
        if rel not in listed and rel.removesuffix(".py") not in listed:
            missing.append(rel)
    assert not missing, f"README's Layout section does not name: {missing}"
