"""The project's import graph: which of its modules imports which, with each file's line count.

    python bench/imports.py

The layers are driver/__init__.py's list (bottom first) under agent.py, the entry point. Exits 1, naming the
arrow, on a circle, an arrow back up a layer, an import of agent.py, a driver file over MAX_LINES, or
sandbox.py/prepare.py importing the driver. Lazy imports inside functions count: a circle is a circle."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500                # a driver file stays readable top to bottom
STANDALONE = ("prepare", "sandbox", "train")  # the harness and the jail: nothing of the driver in them


def layers() -> list[str]:
    """driver/__init__.py's docstring lists the files bottom first, one per line: `    name   what it is for`."""
    doc = ast.get_docstring(ast.parse((ROOT / "driver" / "__init__.py").read_text())) or ""
    return [f"driver.{m.group(1)}" for m in re.finditer(r"^ {4}(\w+) {2,}", doc, re.M)]


def project_modules() -> dict[str, Path]:
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"driver.{p.stem}": p for p in (ROOT / "driver").glob("*.py") if p.stem != "__init__"})
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "driver":  # from driver import pool
                out |= {f"driver.{a.name}" for a in node.names if f"driver.{a.name}" in known}
            elif node.module in known:
                out.add(node.module)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def problems(graph: dict[str, set[str]], order: list[str], sizes: dict[str, int]) -> list[str]:
    rank = {m: i for i, m in enumerate(order)}
    out = [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target == "agent":
                out.append(f"{source} imports agent.py (the entry point): nothing may")
            elif source in STANDALONE and target.startswith("driver."):
                out.append(f"{source} imports {target}: {source}.py imports nothing of the driver")
            elif source in rank and target in rank and rank[target] >= rank[source]:
                out.append(f"{source} -> {target}: an arrow back up (driver/__init__.py lists {target} above)")
            elif source.startswith("driver.") and source not in rank:
                out.append(f"{source} is not in driver/__init__.py's list of layers")
    out += [f"{m}: {n} lines (over {MAX_LINES})" for m, n in sizes.items() if m.startswith("driver.") and n > MAX_LINES]
    return out


def main() -> int:
    modules = project_modules()
    graph = {name: imports_of(path, set(modules)) for name, path in modules.items()}
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    order = layers()
    rank = {m: i for i, m in enumerate(order)}
    shown = sorted(modules, key=lambda m: (m.startswith("driver."), rank.get(m, -1), m))
    print(f"{'module':20s} {'lines':>5s}  imports (project modules only)")
    for name in shown:
        print(f"{name:20s} {sizes[name]:5d}  {', '.join(sorted(graph[name], key=lambda m: rank.get(m, -1))) or '-'}")
    print(f"{'total':20s} {sum(sizes.values()):5d}")
    found = problems(graph, order, sizes)
    for line in found:
        print(f"PROBLEM {line}")
    print("no circle, no arrow back up" if not found else f"{len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
