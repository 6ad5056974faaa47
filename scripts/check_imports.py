"""Check that the package's imports point one way: ``python scripts/check_imports.py`` (part of ``make lint``).

The package is a stack of units (``LAYERS``, lowest first); a module may import from its own
unit and from units below it, never from one above. Within a unit there must be no import
cycle, and no module of the package imports another inside a function (a function-local
import is how an import cycle hides). Exit code 1 and one line per violation otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "opd_cli"

# lowest first: the shared types, then each stage's package, then what wires them together
LAYERS = [
    "errors",
    "batch",
    "contracts",
    "dist",
    "progress",
    "cpu_linear",
    "config.schema",
    "tasks",
    "envs",
    "objectives",
    "models",
    "rollout",
    "teacher",
    "config.rundir",
    "config.validate",
    "training",
    "analysis",
    "commands",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> int:
    """The index in LAYERS of the longest unit that is ``module`` or a package above it."""
    best = -1
    for i, unit in enumerate(LAYERS):
        if (module == unit or module.startswith(unit + ".")) and (best < 0 or len(unit) > len(LAYERS[best])):
            best = i
    if best < 0:
        raise SystemExit(f"check_imports: {module} belongs to no unit of LAYERS; add it")
    return best


def imports_of(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported opd_cli module, line, inside a function) for every import of the package."""
    out = []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd_cli"):
            base = node.module.removeprefix("opd_cli").removeprefix(".")
            # `from opd_cli.objectives import math` imports the submodule
            names = [f"{base}.{a.name}" if base else a.name for a in node.names]
            for name in names:
                target = name if (PACKAGE / (name.replace(".", "/") + ".py")).exists() else base
                out.append((target, node.lineno, id(node) not in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("opd_cli."):
                    out.append((a.name.removeprefix("opd_cli."), node.lineno, id(node) not in top))
    return sorted({(m, line, nested) for m, line, nested in out if m})


def main() -> int:
    problems, graph = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        if not mod:
            continue
        graph[mod] = set()
        for target, line, nested in imports_of(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE.parents[1])}:{line}"
            if nested:
                problems.append(f"{where}: imports opd_cli.{target} inside a function; import it at the top")
            if unit_of(target) > unit_of(mod):
                problems.append(
                    f"{where}: {mod} ({LAYERS[unit_of(mod)]}) imports opd_cli.{target} ({LAYERS[unit_of(target)]}), "
                    "a unit above it"
                )
            graph[mod].add(target)
    # cycles: depth-first search over module imports
    state: dict[str, int] = {}

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for nxt in sorted(graph.get(mod, ())):
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[mod] = 2

    for mod in sorted(graph):
        if not state.get(mod):
            visit(mod, [mod])
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
