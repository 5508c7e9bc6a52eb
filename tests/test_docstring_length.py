"""Public docstrings stay short: what, shapes, args, returns, raises, at most 40 lines.

Measurements, benchmark figures and the history of past defaults belong on the benchmarks
page, not in a docstring. Public means: the names in the packages' ``__all__``, the public
methods and properties of those classes (those defined in our packages), the packages' module
docstrings, and what the API reference renders (``::: identifier`` in ``docs/api``).
"""

import importlib
import inspect
import re
from pathlib import Path

from tests.test_docs import PACKAGES

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 40
OURS = ("pyro_cwm", "inference")


def _ours(obj) -> bool:
    name = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    return name.split(".")[0] in OURS


def _resolve(identifier: str):
    """The object documented as ``identifier`` (a module, or attributes of one), or None."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def _rendered_identifiers() -> list[str]:
    found = []
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        found += re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    return found


def _public_objects():
    """(qualified name, object) of every public module, class, function and method."""
    roots = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        roots.append((package, module))
        roots += [(f"{package}.{name}", getattr(module, name)) for name in module.__all__]
    roots += [(identifier, _resolve(identifier)) for identifier in _rendered_identifiers()]
    seen = set()
    for name, obj in roots:
        if obj is None or id(obj) in seen:
            continue
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
            continue  # constants: their __doc__ is their type's
        if not _ours(obj):
            continue
        seen.add(id(obj))
        yield name, obj
        if not inspect.isclass(obj):
            continue
        for cls in obj.__mro__:
            if not _ours(cls):
                continue
            for attr, member in vars(cls).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not (inspect.isroutine(member) or isinstance(member, property)):
                    continue
                if id(member) in seen:
                    continue
                seen.add(id(member))
                yield f"{cls.__module__}.{cls.__qualname__}.{attr}", member


def _lines(obj) -> int:
    doc = obj.__doc__ if not isinstance(obj, property) else obj.fget.__doc__
    return len(inspect.cleandoc(doc).splitlines()) if isinstance(doc, str) else 0


def test_walk_finds_the_public_api():
    names = {name for name, _ in _public_objects()}
    assert {"inference.fit_svi", "pyro_cwm.guides.AutoCWM", "pyro_cwm.CWM"} <= names
    assert any(name.endswith("AutoCWM.get_posterior") for name in names)


def test_no_public_docstring_is_longer_than_40_lines():
    long = sorted(
        (lines, name) for name, obj in _public_objects() if (lines := _lines(obj)) > MAX_LINES
    )
    assert not long, (
        f"public docstrings over {MAX_LINES} lines (move measurements and history to the "
        "benchmarks page):\n" + "\n".join(f"  {name}: {lines} lines" for lines, name in long)
    )
