"""The package's imports run one way: cli → pipeline → report → stages → models / cache / data →
presets, runtime, options, errors, fileio, metrics, plots."""

from __future__ import annotations

import ast
from pathlib import Path

import agiqa

PACKAGE = Path(agiqa.__file__).parent
LAYERS = {"cli": 0, "pipeline": 1, "report": 2, "stages": 3, "models": 4,
          "cache": 4, "data": 4, "presets": 5, "runtime": 5, "errors": 5, "fileio": 5, "metrics": 5,
          "options": 5, "plots": 5, "tomlio": 5}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agiqa."):
            found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("agiqa.")]
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__", "__main__"} <= set(LAYERS), tops - set(LAYERS)


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if layer not in LAYERS:
            continue
        upward += [f"{path.relative_to(PACKAGE)}:{line}: {layer} -> {target}"
                   for line, target in _imports(path)
                   if target in LAYERS and LAYERS[target] < LAYERS[layer]]
    assert not upward, "\n".join(upward)


def test_benchmarks_and_tests_import_no_test_module():
    """Shared fixtures live in tests/conftest.py; no module imports a test module or conftest."""
    checkout = PACKAGE.parents[1]  # an installed wheel has neither folder: nothing to check
    for path in [*(checkout / "benchmarks").glob("*.py"), *(checkout / "tests").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] in ("tests", "conftest") for n in names), path
