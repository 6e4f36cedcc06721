"""The layout the README's Architecture section describes, measured from the code's own imports.

Layers point one way: the commands -> `run` (a job) -> `results` -> the science (`data`, `models`,
`synthetic`) and `download` -> the core modules directly in `stellarlab/`. A module may import its own
layer or a lower one, never a higher one; no import cycle; no module over 500 lines; at most 10 modules
directly in `stellarlab/`; and the project cites only documents it holds.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "stellarlab"
CORE = {"errors", "files", "labels", "grids", "config", "checks", "metrics"}
LAYER = {"data": 1, "models": 1, "synthetic": 1, "download": 1, "results": 2, "run": 3, "compare": 4, "commands": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    parts = module.split(".")
    return 0 if len(parts) == 1 or parts[1] in CORE else LAYER[parts[1]]


def imports() -> dict[str, set[str]]:
    """Module -> the stellarlab modules it imports (at any depth of the file: lazy imports count too)."""

    def resolve(name: str) -> str | None:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stellarlab"):
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("stellarlab")]
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def test_at_most_ten_modules_directly_in_the_package_and_none_over_500_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_layers_point_one_way():
    upward = [f"{a} -> {b}" for a, targets in imports().items() for b in targets if layer(b) > layer(a)]
    assert not upward


def test_no_import_cycle():
    graph = imports()
    # a package's __init__ only re-exports (lazily) what its modules define: an edge into it is not a cycle
    graph = {a: {b for b in targets if not (MODULES[b].name == "__init__.py" and b != a)} for a, targets in graph.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])
        done.add(node)

    for module in MODULES:
        visit(module, [])


def test_the_project_cites_only_documents_it_holds():
    pattern = re.compile(r"shared/|\.\./shared|design[ -]note|the issue|coursework|#\d{2,}\b", re.I)
    found = []
    for folder in ("stellarlab", "conf", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml", ".md") and path != Path(__file__):
                found += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert not found
    for doc in re.findall(r"docs/[\w.-]+\.md", "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))):
        assert (ROOT / doc).is_file(), doc
