"""The README's Python examples run as written (with fewer steps, so that the suite stays fast)."""

import re
from pathlib import Path

import pyro
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# Long settings in the examples, shortened for the test; each must occur in the README.
SHORTER = {"num_steps=2000": "num_steps=20", "epochs=100": "epochs=2"}


def test_the_readme_has_the_examples_and_the_shortened_settings():
    assert len(BLOCKS) >= 4
    text = "".join(BLOCKS)
    for long in SHORTER:
        assert long in text, f"{long!r} is no longer in the README: update SHORTER"
    # The AutoCWM example is meant to be short.
    autocwm = next(b for b in BLOCKS if "AutoCWM(" in b)
    assert len([line for line in autocwm.splitlines() if line.strip()]) <= 15


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    source = BLOCKS[index]
    for long, short in SHORTER.items():
        source = source.replace(long, short)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "readme"})
