"""The layers: the shared base package `tandem` imports nothing from the sides above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE_THE_BASE = {"edge", "cloud", "benchmarks", "tandem_cli"}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages that a module imports anywhere (functions included); relative
    imports stay inside the base and are left out."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
    return packages


def test_the_base_package_imports_no_side_above_it() -> None:
    modules = sorted((ROOT / "tandem").rglob("*.py"))
    assert modules
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & ABOVE_THE_BASE)
        for path in modules
        if imported_packages(path) & ABOVE_THE_BASE
    }
    assert not wrong, f"the base package imports from above it: {wrong}"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from cloud.training import x\n    import edge.student\n")
    assert imported_packages(module) == {"os", "cloud", "edge"}
