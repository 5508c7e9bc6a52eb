"""The dependency direction of the two import packages: ``inference`` imports ``pyro_cwm``,
``pyro_cwm`` never imports ``inference`` (not even inside a function)."""

import ast
from pathlib import Path

import pytest

PYRO_CWM = Path(__file__).resolve().parents[1] / "pyro_cwm"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    return found


SOURCES = sorted(PYRO_CWM.rglob("*.py"))


def test_there_are_sources():
    assert len(SOURCES) > 10


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PYRO_CWM.parent)))
def test_pyro_cwm_never_imports_inference(path):
    bad = [
        f"line {line}: {module}"
        for line, module in imported_modules(path)
        if module == "inference" or module.startswith("inference.")
    ]
    assert not bad, f"{path} imports the fitting side: {bad}"
