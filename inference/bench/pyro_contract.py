"""Pyro's own autoguide tests, run with AutoCWM added beside AutoNormal.

Pyro's test modules for autoguides (``tests/infer/test_autoguide.py`` and
``tests/infer/autoguide/test_inference.py`` of a Pyro checkout) are copied to a temporary
folder, AutoCWM is added to every parametrization that lists ``AutoNormal`` or
``AutoMultivariateNormal``, and the AutoCWM cases alone run under pytest. With ``--elbo
enum`` (the default) a case that trains with a score-function ELBO (``Trace_ELBO``,
``TraceGraph_ELBO`` and their JIT versions), which AutoCWM refuses by design, trains with
``TraceEnum_ELBO`` (``JitTraceEnum_ELBO``) instead; ``--elbo as-is`` keeps them.

    python -m inference.bench.pyro_contract --pyro PATH_TO_PYRO_CHECKOUT

prints one line per case (passed, failed with the first line of its error, skipped) and a
count, and writes them as JSON (``--out``). Nothing of Pyro's is kept in this project: the
tests are read from the checkout named, which should match the installed ``pyro-ppl``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from inference.bench import write_rows

MODULES = ("tests/infer/test_autoguide.py", "tests/infer/autoguide/test_inference.py")
SUPPORT = (
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/common.py",
    "tests/integration_tests/test_conjugate_gaussian_models.py",
)
ANCHORS = ("AutoNormal", "AutoMultivariateNormal")
PARAM_NAMES = ("auto_class", "Guide", "continuous_class", "guide_class")

# Added to Pyro's conftest: keep the AutoCWM cases only, swap score-function ELBOs for the
# enumerating ones (``--cwm-elbo enum``), and record every outcome.
PLUGIN = """

# --- added by inference.bench.pyro_contract -------------------------------------------
import json as _json

from pyro_cwm.guides import AutoCWM as _AutoCWM

_OUTCOMES = []


def _has_autocwm(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(value is _AutoCWM for value in params.values())


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _has_autocwm(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # In the AutoCWM cases, a score-function ELBO, passed as a parameter or named in the
    # test's body, becomes the enumerating one.
    patched = {}
    if item.config.getoption("--cwm-elbo") == "enum":
        from pyro.infer import (JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO,
                                Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO,
                                TraceMeanField_ELBO)
        swap = {Trace_ELBO: TraceEnum_ELBO, TraceGraph_ELBO: TraceEnum_ELBO,
                TraceMeanField_ELBO: TraceEnum_ELBO, JitTrace_ELBO: JitTraceEnum_ELBO,
                JitTraceGraph_ELBO: JitTraceEnum_ELBO}
        for name, value in item.funcargs.items():
            if value in swap:
                item.funcargs[name] = swap[value]
        for name, value in vars(item.module).items():
            if isinstance(value, type) and value in swap:
                patched[name] = value
        for name, value in patched.items():
            setattr(item.module, name, swap[value])
    try:
        yield
    finally:
        for name, value in patched.items():
            setattr(item.module, name, value)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.outcome == "failed":
            text = str(report.longrepr)
            errors = [line for line in text.splitlines() if line.startswith("E ")]
            message = errors[0][1:].strip() if errors else text.splitlines()[-1]
        _OUTCOMES.append({"case": report.nodeid, "outcome": report.outcome,
                          "phase": report.when, "error": message[:300]})


def pytest_sessionfinish(session):
    path = session.config.getoption("--cwm-report")
    if path:
        with open(path, "w") as f:
            _json.dump(_OUTCOMES, f, indent=1)
"""


def add_autocwm(source: str) -> str:
    """Pyro's test module with AutoCWM in every parametrization listing an anchor class."""
    lines = source.splitlines()
    names, kinds = "|".join(PARAM_NAMES), "|".join(ANCHORS)
    out, in_list, added = [], False, False
    for line in lines:
        stripped = line.strip()
        if re.match(rf'^"({names})",?$', stripped) or re.search(
            rf'parametrize\(\s*"({names})"', line
        ):
            in_list, added = True, False
        # One-line lists: [AutoDelta, AutoNormal, AutoGuideList]
        single = re.search(rf"\[([^\[\]]*\b(?:{kinds})\b[^\[\]]*)\]", line)
        if in_list and single and "parametrize" in line:
            line = line.replace(single.group(0), "[" + single.group(1) + ", AutoCWM]")
            in_list = False
        out.append(line)
        if in_list and not added and stripped.rstrip(",") in ANCHORS:
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}AutoCWM,")
            added = True
        if in_list and stripped.startswith("]"):
            in_list = False
    text = "\n".join(out) + "\n"
    return text.replace("import pyro\n", "import pyro\nfrom pyro_cwm.guides import AutoCWM\n", 1)


def prepare(pyro_checkout: Path, folder: Path) -> list[Path]:
    """Copy Pyro's autoguide tests into ``folder`` with AutoCWM added; return the modules."""
    for name in SUPPORT + MODULES:
        source = pyro_checkout / name
        if not source.is_file():
            raise FileNotFoundError(f"--pyro: {source} not found (a Pyro checkout?)")
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if not target.parent.joinpath("__init__.py").exists():
            target.parent.joinpath("__init__.py").write_text("")
    conftest = folder / "tests" / "conftest.py"
    text = conftest.read_text()
    text = text.replace(
        "def pytest_addoption(parser):\n",
        "def pytest_addoption(parser):\n"
        '    parser.addoption("--cwm-elbo", default="enum")\n'
        '    parser.addoption("--cwm-report", default="")\n',
        1,
    )
    conftest.write_text(text + PLUGIN)
    modules = [folder / name for name in MODULES]
    for module in modules:
        module.write_text(add_autocwm(module.read_text()))
    return modules


def run(pyro_checkout: Path, elbo: str, extra: list[str], timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        modules = prepare(pyro_checkout, folder)
        report = folder / "report.json"
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
            "--rootdir", str(folder), f"--cwm-elbo={elbo}", f"--cwm-report={report}",
            *[str(m.relative_to(folder)) for m in modules], *extra,
        ]  # fmt: skip
        subprocess.run(command, cwd=folder, timeout=timeout, check=False)
        return json.loads(report.read_text()) if report.exists() else []


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pyro", required=True, type=Path, help="a Pyro checkout (its tests/)")
    p.add_argument("--elbo", choices=("enum", "as-is"), default="enum")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--out", default="bench-out/pyro_contract.json")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)
    rows = run(args.pyro, args.elbo, args.pytest_args, args.timeout)
    for row in rows:
        print(f"{row['outcome']:8} {row['case']}")
        if row["error"]:
            print(f"         {row['error']}")
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "skipped")}
    print(f"AutoCWM cases: {len(rows)}; " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
