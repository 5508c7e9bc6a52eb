"""The API reference builds from the docstrings with ``mkdocs build --strict`` (``make docs``).

A docstring that griffe cannot parse (a documented argument missing from the signature, a
parameter without a type) or a cross-reference that does not resolve is a warning, and a
warning fails the build. mkdocs is installed by the ``dev`` extra: a missing install fails
here rather than skipping.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The packages whose ``__all__`` the reference must cover.
PACKAGES = [
    "pyro_cwm",
    "pyro_cwm.distributions",
    "pyro_cwm.nn",
    "pyro_cwm.guides",
    "pyro_cwm.models",
    "pyro_cwm.data",
    "inference",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import mkdocs  # noqa: F401  (installed by the dev extra; fail, do not skip, without it)

    out = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert not warnings, "mkdocs build warned:\n" + "\n".join(warnings)
    return out


def _page(site: Path, name: str) -> str:
    path = site / "api" / name / "index.html"
    assert path.is_file(), f"no page {path.relative_to(site)}"
    return path.read_text(encoding="utf-8")


def _public_names(package: str) -> list[str]:
    init = REPO.joinpath(*package.split("."), "__init__.py")
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{package} has no __all__")


def test_key_pages_render_the_docstrings(site):
    guides = _page(site, "guides")
    assert 'id="pyro_cwm.guides.AutoCWM"' in guides
    assert "num_components" in guides and "number of components K" in guides

    inference = _page(site, "inference")
    for name in ("fit_svi", "CWMELBO", "GaussianMixtureEM", "psis_diagnostic"):
        assert f'id="inference.{name}"' in inference
    # The Args section became a parameter table, not a heading with nothing under it.
    assert "maximum number of steps" in inference
    assert "<table" in inference

    distributions = _page(site, "distributions")
    assert 'id="pyro_cwm.distributions.ClassifierWeightedMixture"' in distributions


def test_every_public_name_is_documented(site):
    anchors = set()
    for page in site.joinpath("api").glob("*/index.html"):
        anchors.update(re.findall(r'id="([\w.]+)"', page.read_text(encoding="utf-8")))
    missing = []
    for package in PACKAGES:
        for name in _public_names(package):
            # A re-export from a subpackage (pyro_cwm.CWM) is documented in the subpackage.
            if f"{package}.{name}" not in anchors and not any(
                a.startswith(f"{package}.") and a.endswith(f".{name}") for a in anchors
            ):
                missing.append(f"{package}.{name}")
    assert not missing, "public names missing from docs/api: " + ", ".join(missing)
