"""The Python examples of the README and of the site's pages run as written (with fewer
steps, so that the suite stays fast). The API reference (docs/api) has no examples."""

import re
from pathlib import Path

import pyro
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted(
    p for p in (REPO / "docs").rglob("*.md") if "api" not in p.relative_to(REPO / "docs").parts
)
BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
# Long settings in the examples, shortened for the test; each must occur in some page.
SHORTER = {
    "num_steps=2000": "num_steps=20",
    "epochs=100": "epochs=2",
    "range(100)": "range(2)",
    "range(200)": "range(2)",
    "num_samples=500, warmup_steps=300": "num_samples=20, warmup_steps=20",
}


def _blocks(page: str) -> list[str]:
    return [block for path, _, block in BLOCKS if path.name == page and path.parent == REPO]


def test_the_pages_have_the_examples_and_the_shortened_settings():
    assert len(_blocks("README.md")) == 3  # AutoCWM, a hand-written guide, EM
    text = "".join(block for _, _, block in BLOCKS)
    for long in SHORTER:
        assert long in text, f"{long!r} is in no example any more: update SHORTER"
    # The README's AutoCWM example is meant to be short, and the README to fit on a screen.
    autocwm = next(b for b in _blocks("README.md") if "AutoCWM(" in b)
    assert len([line for line in autocwm.splitlines() if line.strip()]) <= 15
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize(
    "page, index, source",
    BLOCKS,
    ids=[f"{page.relative_to(REPO)}:{index}" for page, index, _ in BLOCKS],
)
def test_example_runs(page, index, source, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for long, short in SHORTER.items():
        source = source.replace(long, short)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    name = f"{page.relative_to(REPO)} python block {index}"
    exec(compile(source, name, "exec"), {"__name__": "example"})
