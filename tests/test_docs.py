"""The site builds with ``mkdocs build --strict`` (``make docs``): the pages of docs/, the
notebooks rendered as tutorials (not executed here: tests/test_notebooks.py runs them) and
the API reference from the docstrings.

A docstring that griffe cannot parse (a documented argument missing from the signature, a
parameter without a type) or a cross-reference that does not resolve is a warning, and a
warning fails the build. mkdocs is installed by the ``dev`` extra: a missing install fails
here rather than skipping.

Docstrings link with mkdocs-autorefs: ``[`CWM`][pyro_cwm.nn.CWM]``, by the identifier under
which ``docs/api`` documents the target; what is not documented is plain ``code``. Sphinx
roles (``:class:`CWM```) are not links in mkdocs: they render as literal text, and nothing
checks their targets, so they are rejected here, in the rendered pages and in the sources.

Docstrings, module docstrings included, are Markdown read both rendered and in ``help()``:
formulas are plain text (in ``code`` or a fenced ```` ```text ```` block), tables are pipe
tables. reST math (``.. math::``, ``:math:``), reST table borders and ``::`` literal-block
markers are rejected, in the rendered pages and in the docstrings. A docstring that refers to
its module's docstring links the module's section of the reference
(``[the module documentation][pyro_cwm.models.mdn]``), which the test of the references
then checks.
"""

import ast
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The source trees whose docstrings and comments must not use Sphinx roles.
SOURCES = ["pyro_cwm", "inference"]

# A Sphinx cross-reference role (``:class:`X```, ``:py:meth:`X```, ...).
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc):`")
# What any reST role (``:math:`x```, ...) becomes once Markdown renders it: ``:role:<code>``.
RENDERED_ROLE = re.compile(r":(?:py:)?[a-z]+:<code>")
# The text of a Sphinx role after rendering, whatever markup surrounds it.
ROLE_TEXT = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc):")
# reST block markup Markdown leaves as text: a ``word::`` literal-block marker ending a
# paragraph, or a directive (``.. note::``).
REST_BLOCK = re.compile(r"\w::\s*</p>|\.\. [a-z-]+::")
# reST markup that stays text once the tags are stripped (or, in a docstring, in help()): a
# math role, a simple-table border (``=====  =====``), a grid-table border (``+-----+``),
# or a ``::`` literal-block marker ending a line.
REST_TEXT = re.compile(
    r":math:|^[ \t]*={3,}(?:[ \t]+={3,})+[ \t]*$|^[ \t]*\+[-=]{3,}\+|\S::[ \t]*$", re.M
)
# The same in a docstring, plus a directive (``.. math::``) at the start of a line.
REST_SOURCE = re.compile(r"^[ \t]*\.\. [a-z-]+::|" + REST_TEXT.pattern, re.M)
# An autorefs cross-reference in a docstring or comment: [`text`][identifier].
AUTOREF = re.compile(r"\[`[^`\]]+`\]\[([^\]]*)\]")
# One with plain link text, to an identifier of our packages (a module, say):
# [the module documentation][pyro_cwm.models.mdn]. The text may wrap over lines.
TEXT_AUTOREF = re.compile(r"\[[^`\[\]]+\]\[((?:pyro_cwm|inference)(?:\.\w+)*)\]")
# Any Markdown reference link, [text][identifier], whatever the text.
REFERENCE_LINK = re.compile(r"\[[^\]]*\]\[[^\]]*\]")
# "the module docstring": not a link, and the reference pages show no docstring by that name.
MODULE_DOCSTRING = re.compile(r"\bmodule(?:'s)?\s+doc\s*strings?\b", re.I)

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
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYRO_CWM_DOCS_EXECUTE": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
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


def _pages(site: Path) -> list[Path]:
    pages = sorted(site.glob("**/*.html"))
    assert site / "api" / "guides" / "index.html" in pages
    return pages


def _anchors(site: Path) -> set[str]:
    anchors = set()
    for page in site.joinpath("api").glob("*/index.html"):
        anchors.update(re.findall(r'id="([\w.]+)"', page.read_text(encoding="utf-8")))
    return anchors


def _in_code_block(page: str, text: str) -> bool:
    """Whether ``text`` occurs in ``page`` inside a ``<pre>`` block."""
    at = page.find(text)
    return at >= 0 and page.rfind("<pre", 0, at) > page.rfind("</pre>", 0, at)


def _sources() -> list[Path]:
    return sorted(path for tree in SOURCES for path in REPO.joinpath(tree).rglob("*.py"))


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """The docstrings of a source file (module, classes, functions), with their first line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                found.append((node.body[0].lineno, docstring))
    return found


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
    anchors = _anchors(site)
    missing = []
    for package in PACKAGES:
        for name in _public_names(package):
            # A re-export from a subpackage (pyro_cwm.CWM) is documented in the subpackage.
            if f"{package}.{name}" not in anchors and not any(
                a.startswith(f"{package}.") and a.endswith(f".{name}") for a in anchors
            ):
                missing.append(f"{package}.{name}")
    assert not missing, "public names missing from docs/api: " + ", ".join(missing)


def test_cross_references_are_links(site):
    # The docstrings' [`text`][identifier] references became links to the documented object.
    guides = _page(site, "guides")
    assert 'href="../inference/#inference.CWMELBO"><code>CWMELBO</code></a>' in guides
    models = _page(site, "models")
    assert 'href="#pyro_cwm.models.Gate"><code>Gate</code></a>' in models


def test_module_docstrings_render(site):
    # The modules whose docstrings the classes refer to have a section, linked from the
    # classes; their Markdown tables and formula blocks render as such.
    models = _page(site, "models")
    assert 'id="pyro_cwm.models.mdn"' in models
    assert 'href="#pyro_cwm.models.mdn">the module documentation</a>' in models
    assert '<td><code>"isotropic_across_components"</code></td>' in models
    assert _in_code_block(models, "B_k^{-1} = A_k^{-1}")  # a fenced block in a list item
    distributions = _page(site, "distributions")
    link = 'href="#pyro_cwm.distributions.gaussian_mixture">the module documentation</a>'
    assert link in distributions
    assert "<td><code>Sigma_k = L L^T</code> for every k</td>" in distributions
    assert 'id="pyro_cwm.nn.maps"' in _page(site, "nn")
    assert 'id="inference.svi.elbo"' in _page(site, "inference")


def test_no_sphinx_roles_or_rest_blocks_in_rendered_pages(site):
    found = []
    for page in _pages(site):
        raw = page.read_text(encoding="utf-8")
        text = html.unescape(re.sub(r"<[^>]+>", "", raw))
        name = page.relative_to(site)
        found += [f"{name}: {m.group()}" for m in RENDERED_ROLE.finditer(raw)]
        found += [f"{name}: {m.group()}" for m in ROLE_TEXT.finditer(text)]
        found += [f"{name}: {m.group()!r}" for m in REST_BLOCK.finditer(raw)]
        found += [f"{name}: {m.group()!r}" for m in REST_TEXT.finditer(text)]
    assert not found, "reST markup rendered literally:\n" + "\n".join(found)


def test_no_sphinx_roles_in_sources():
    # Also the docstrings no page renders (modules, private helpers): help() shows them.
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SPHINX_ROLE.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "Sphinx roles (write [`Name`][full.path] or ``name``):\n" + "\n".join(found)


def test_no_rest_markup_in_docstrings():
    # Module docstrings are not all rendered, but help() shows them as written.
    found = []
    for path in _sources():
        for first, docstring in _docstrings(path):
            for match in REST_SOURCE.finditer(docstring):
                number = first + docstring.count("\n", 0, match.start())
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group().strip()!r}")
    assert not found, (
        "reST markup in docstrings (formulas: ``code`` or a ```text block; tables: pipe "
        "tables; literal blocks: fenced):\n" + "\n".join(found)
    )


def test_module_docstring_mentions_are_links():
    # "see the module docstring" leads a reader of the reference nowhere: link the module.
    found = []
    for path in _sources():
        for first, docstring in _docstrings(path):
            links = [link.span() for link in REFERENCE_LINK.finditer(docstring)]
            for match in MODULE_DOCSTRING.finditer(docstring):
                if not any(start <= match.start() < end for start, end in links):
                    number = first + docstring.count("\n", 0, match.start())
                    found.append(f"{path.relative_to(REPO)}:{number}: {match.group()!r}")
    assert not found, (
        "unlinked mentions of a module docstring (write "
        "[the module documentation][package.module]):\n" + "\n".join(found)
    )


def test_cross_references_in_sources_resolve(site):
    # The strict build checks the references of rendered docstrings only; this checks every
    # [`text`][identifier] in the sources against the documented identifiers.
    anchors = _anchors(site)
    unresolved = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in [*AUTOREF.finditer(text), *TEXT_AUTOREF.finditer(text)]:
            if match.group(1) not in anchors:
                number = text.count("\n", 0, match.start()) + 1
                unresolved.append(f"{path.relative_to(REPO)}:{number}: {match.group(1)}")
    assert not unresolved, "references to undocumented identifiers:\n" + "\n".join(unresolved)


def test_the_site_has_its_sections(site):
    # Getting started, the user guide and the benchmarks are pages of their own.
    for page in ["getting-started", "benchmarks", "benchmarks/variational-inference"] + [
        f"guide/{p.stem}" for p in REPO.joinpath("docs", "guide").glob("*.md")
    ]:
        assert site.joinpath(page, "index.html").is_file(), f"no page {page}"
    index = site.joinpath("index.html").read_text(encoding="utf-8")
    assert "material" in index.lower()  # the theme
    assert site.joinpath("figures", "ring.png").is_file()


def test_every_notebook_is_a_tutorial_page(site):
    notebooks = sorted(REPO.joinpath("notebooks").glob("*.ipynb"))
    nav = REPO.joinpath("mkdocs.yml").read_text(encoding="utf-8")
    for notebook in notebooks:
        assert f"notebooks/{notebook.name}" in nav, f"{notebook.name} is not in the nav"
        page = site / "notebooks" / notebook.stem / "index.html"
        assert page.is_file(), f"{notebook.name} was not rendered"
        html_text = page.read_text(encoding="utf-8")
        # The notebook's code cells and its title are on the page.
        assert "jp-CodeCell" in html_text or "highlight-ipynb" in html_text
        first = json.loads(notebook.read_text(encoding="utf-8"))["cells"][0]["source"]
        title = "".join(first).splitlines()[0].lstrip("# ").split(":")[0]
        assert html.escape(title, quote=False) in html_text, f"{notebook.name}: no title"


def test_readme_links_resolve():
    # The README links the site's pages by their paths in the repository.
    text = REPO.joinpath("README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [link for link in links if not REPO.joinpath(link).exists()]
    assert not missing, f"README links to missing files: {missing}"
