"""The package's layout holds (docs/design.md): the measuring kernel and the methods depend on no
experiment, the root stays small, no module grows past a few hundred lines, and no two modules
import each other at import time.  Read with ``ast``: nothing here is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdecli"
UPPER = ("kdecli.experiments", "kdecli.sweeps", "kdecli.cli", "kdecli.render")
MAX_ROOT_MODULES = 12
MAX_LINES = 700


def _name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, top_level: bool = False, root: Path = PACKAGE.parent) -> set[str]:
    """The kdecli modules ``path`` imports: anywhere in it, or (``top_level``) as it is imported
    (module body, ``if`` and ``try`` blocks; not inside functions or classes).  ``root``: the
    folder that holds the package (to resolve relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes, found = list(tree.body) if top_level else list(ast.walk(tree)), set()
    package = _name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in nodes:
        if top_level and isinstance(node, (ast.If, ast.Try)):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            nodes.extend(s for h in getattr(node, "handlers", []) for s in h.body)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                stem = package[: len(package) - node.level + 1]
                base = ".".join([*stem, base] if base else stem)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "kdecli" or name.startswith("kdecli.")}


@pytest.mark.parametrize("folder", ["measure", "methods"])
def test_kernel_and_methods_import_no_experiment(folder: str) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for name in _imports(path)
        if any(name == upper or name.startswith(upper + ".") for upper in UPPER)
    }
    assert not wrong, sorted(wrong)


def test_root_keeps_few_modules() -> None:
    root = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_module_is_too_long() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def test_no_import_cycle() -> None:
    """No module imports, as it is imported, one that imports it back (through any chain); a
    package importing its own parent package is not a cycle (the parent is already loading)."""
    modules = _modules()

    def ancestor(name: str, of: str) -> bool:
        return of.startswith(name + ".")

    graph = {
        name: sorted(
            other
            for other in _imports(path, top_level=True)
            if other in modules and other != name and not ancestor(other, name)
        )
        for name, path in modules.items()
    }
    cycles, done = [], set()

    def visit(name: str, chain: list[str]) -> None:
        if name in chain:
            cycles.append(chain[chain.index(name) :] + [name])
            return
        if name in done:
            return
        for other in graph[name]:
            visit(other, [*chain, name])
        done.add(name)

    for name in graph:
        visit(name, [])
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_the_import_reader_sees_every_form(tmp_path: Path) -> None:
    """Absolute, relative and function-local imports are all seen (so the checks above can fail)."""
    module = tmp_path / "kdecli" / "measure" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import kdecli.cli\nfrom ..sweeps import grid\n"
        "def f():\n    from kdecli.render.table import x\n",
        encoding="utf-8",
    )
    found = _imports(module, root=tmp_path)
    assert {"kdecli.cli", "kdecli.sweeps", "kdecli.sweeps.grid", "kdecli.render.table"} <= found
    assert "kdecli.render.table" not in _imports(module, top_level=True, root=tmp_path)
