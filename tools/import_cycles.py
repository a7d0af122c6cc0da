#!/usr/bin/env python
"""Lists import cycles among fewstep's modules (module-level and function-level imports alike); exit 1 if any.

    python tools/import_cycles.py
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set) -> set:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out


def find_cycles(graph: dict) -> list:
    cycles, state, stack = [], {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif not state.get(w):
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if not state.get(v):
            visit(v)
    return cycles


def main() -> int:
    files = {module_name(p): p for p in (ROOT / "fewstep").rglob("*.py")}
    known = set(files)
    graph = {m: imports(p, m, known) - {m} for m, p in files.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".") or d not in files or files[d].name != "__init__.py"}
    cycles = find_cycles(graph)
    for c in cycles:
        print("cycle: " + " -> ".join(c))
    print(f"{len(files)} modules, {sum(len(v) for v in graph.values())} internal imports, {len(cycles)} cycles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
