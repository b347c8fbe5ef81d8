"""The package's shape is checked, not hoped for: layers (import-linter; without it the test is skipped, and
fails where CI is set), no import cycles, no module reaching into another's private names, no module over
450 lines."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from conftest import dev_tool

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gsmkit"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, resolved to absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def test_lint_imports_contracts_hold():
    exe = dev_tool("lint-imports", "import-linter")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for module, path in modules.items():
        for target, names, line in _imports(module, path):
            if not target.startswith("gsmkit") or target == module:
                continue
            offences += [f"{path.relative_to(ROOT)}:{line}: {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
            if any(part.startswith("_") and part != "__main__" for part in target.split(".")):
                offences.append(f"{path.relative_to(ROOT)}:{line}: imports private module {target}")
    assert not offences, "\n".join(offences)


def test_no_import_cycles_inside_the_package():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(module, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != module:
                    graph[module].add(candidate)
                    break
    # the package root (gsmkit/__init__.py) only holds the version: every module may read it
    for deps in graph.values():
        deps.discard("gsmkit")
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_no_module_is_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"split these along their seams (max {MAX_LINES} lines): {big}"
