"""The GPU check: the CUDA tests and the GPU benchmarks in one time-bounded run.

`scripts/gpu-check.sh` (``make gpu-check``) installs the environment and then runs this
module, which runs each stage as a subprocess of the environment's Python with its own
timeout, keeps going when a stage fails or runs out of time (the report says which and
why), writes ``OUT/gpu-check.json`` and prints a Markdown table:

- ``environment``: the device's name, torch, CUDA, Python and CPU.
- ``pytest_cuda``: ``pytest -m cuda`` (skipped tests on a CPU; the counts are recorded).
- ``em_diag``, ``em_full``: `inference.bench.em` at N=1,000,000,
  D=64, K=64, ours on ``--device`` against scikit-learn on this machine's CPU cores, the
  same start and iterations (one for the full family: scikit-learn's full EM took two
  minutes per iteration on one thread at this size, much of it single-threaded numpy).
- ``vi_step_cost``: `inference.bench.vi` ``--step-cost``, AutoCWM
  against AutoNormal per SVI step on eight schools and the 100-D regression.
- ``scale``: `inference.bench.scale` on the linear regression at D = 100,000 (N = 2,000):
  AutoCWM's 2,000 steps, then AutoNormal and AutoLowRankMultivariateNormal at its wall
  time; set-up, step, peak GPU memory and accuracy against the exact posterior.
- ``density_probe``, ``density``: `inference.bench.density`'s
  image suite (CWM against the flows); the probe runs one epoch of each model, and the
  main run gets as many epochs (at most the suite's 30) as the time left allows.

Every stage's timeout is its own cap, shortened so that the stages after it keep their
reserve and the whole run ends within ``--budget`` seconds of ``--started-at`` (the shell
script's start, so the install counts). ``--tiny`` shrinks every size to seconds on a CPU
(the test suite runs ``--device cpu --tiny``).

The module imports only the standard library, so that it runs (and reports a failed
install) even where the environment's Python cannot import torch:

    python inference/bench/gpu_check.py --device cuda --out bench-out/gpu-check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 480.0
FINAL_MARGIN_S = 5.0  # kept free at the end for the report
DENSITY_MAX_EPOCHS = 30  # the image suite's own budget
DENSITY_TIME_SHARE = 0.8  # of the main run's timeout that its epochs may fill


@dataclass
class Stage:
    """One step of the check: a command of the environment's Python and its time limits.

    Attributes:
        name: key of the stage in the report.
        title: what the table calls it.
        argv: the command after the interpreter (``["-m", module, ...]``), or a function of
            the report so far that returns it (a stage sized by an earlier one).
        cap_s: its longest run (``math.inf``: whatever time is left).
        reserve_s: the time the stages before it leave for it.
        read: figures from the stage's output folder and log, called even after a failure
            or a timeout (what was written by then); the dict goes into the report.
        outputs: the files and folders it writes under the output folder, removed before
            it runs (a rerun into the same folder never reports an earlier run's figures).
    """

    name: str
    title: str
    argv: list[str] | Callable[[dict], list[str]]
    cap_s: float
    reserve_s: float
    read: Callable[[Path, Path], dict]
    outputs: tuple[str, ...] = ()


def environment() -> dict:
    """The device and software versions, as the report records them (imports torch)."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("pyro-ppl", "scikit-learn", "zuko", "numpy"):
        try:  # the installed versions, without the cost of importing them
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def json_lines(log: Path) -> list[dict]:
    """The JSON objects printed one per line in ``log`` (the rows a bench prints as it
    goes, so that a stage cut short by its timeout still reports what it finished)."""
    rows = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and line.endswith("}"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def read_environment(out: Path, log: Path) -> dict:
    rows = json_lines(log)
    return rows[-1] if rows else {}


def read_pytest(out: Path, log: Path) -> dict:
    """Counts from pytest's JUnit XML: passed, failed, errors, skipped."""
    path = out / "pytest-cuda.xml"
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in
              ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_rows(name: str, key: str | None = None) -> Callable[[Path, Path], dict]:
    """A reader of a benchmark's rows: from its JSON file ``name`` (under ``key`` where the
    file holds more), else the JSON lines of its log (a run cut short)."""

    def read(out: Path, log: Path) -> dict:
        path = out / name
        if not path.exists():
            return {"rows": json_lines(log)}
        saved = json.loads(path.read_text())
        return {"rows": saved[key] if key else saved}

    return read


def read_density(folder: str) -> Callable[[Path, Path], dict]:
    def read(out: Path, log: Path) -> dict:
        path = out / folder / "density.json"
        if not path.exists():
            return {}
        report = json.loads(path.read_text())
        keys = ("num_train", "num_test", "epochs", "batch_size", "components", "device")
        return {"settings": {k: report["args"].get(k) for k in keys}, "rows": report["rows"]}

    return read


def density_epochs(probe: dict, timeout_s: float, max_epochs: int = DENSITY_MAX_EPOCHS) -> int:
    """Epochs for the main density run: the probe's seconds per epoch of every model
    (one epoch, so an overestimate: it includes the warm-up) and its fixed cost (the
    stage's wall time less the models' training) against ``DENSITY_TIME_SHARE`` of
    ``timeout_s``; between 1 and ``max_epochs``."""
    rows = probe.get("figures", {}).get("rows", [])
    per_epoch = sum(r.get("s_per_epoch") or 0.0 for r in rows)
    if probe.get("status") != "ok" or per_epoch <= 0:
        return 1
    fixed = max(0.0, probe["wall_s"] - sum(r.get("time_s", 0.0) for r in rows))
    spare = DENSITY_TIME_SHARE * timeout_s - 1.5 * fixed  # the main run also evaluates gmm-diag
    return int(max(1, min(max_epochs, spare // per_epoch)))


def cuda_test_files(root: Path = ROOT / "tests") -> list[str]:
    """The test files that mention the ``cuda`` mark (collecting only these is faster
    than collecting the whole suite); the whole ``tests`` folder if none does."""
    files = sorted(
        str(path.relative_to(ROOT)) for path in root.rglob("test_*.py")
        if "mark.cuda" in path.read_text(errors="replace")
    )
    return files or [str(root.relative_to(ROOT))]


def plan(args: argparse.Namespace) -> list[Stage]:
    """The stages for ``--device`` and ``--tiny``: the sizes of every benchmark."""
    device, out = args.device, args.out
    threads = "1" if args.tiny else str(os.cpu_count() or 1)
    em_points: dict[str, int] = {}
    if args.tiny:
        em_size = ["--sizes", "small", "--num-points", "2000"]
        em_iters = {"diag": "2", "full": "2"}
        vi = ["--step-cost-components", "2", "--step-cost-steps", "5"]
        density = ["--num-train", "1000", "--num-test", "200", "--components", "4",
                   "--batch-size", "250"]
        scale = ["--dims", "300", "--points", "100", "--steps", "20", "--samples", "50"]
        max_epochs, caps = 2, {"pytest": 60, "em": 60, "vi": 60, "scale": 90, "probe": 60}
    else:
        em_size = ["--sizes", "large"]
        em_iters = {"diag": "10", "full": "1"}
        # scikit-learn's full EM at N=1,000,000 outran the stage's 150 s on 16 cores of an
        # H200 machine (its per-component numpy passes are single-threaded): a quarter of it
        em_points["full"] = 250_000
        vi = ["--step-cost-components", "2,4,8,16", "--step-cost-steps", "100"]
        scale = ["--dims", "100000"]
        density = []
        caps = {"pytest": 120, "em": 150, "vi": 100, "scale": 200, "probe": 60}
        max_epochs = DENSITY_MAX_EPOCHS
    flows = "cwm,realnvp,nsf"

    def em(family: str) -> list[str]:
        points = ["--num-points", str(em_points[family])] if family in em_points else []
        return ["-m", "inference.bench.em", *em_size, *points, "--families", family,
                "--iters", em_iters[family], "--threads", threads, "--device", device,
                "--peers", "sklearn", "--out", str(out / f"em-{family}.json")]

    def density_main(report: dict) -> list[str]:
        probe = next((s for s in report["stages"] if s["name"] == "density_probe"), {})
        epochs = density_epochs(probe, report["next_timeout_s"], max_epochs)
        return ["-m", "inference.bench.density", *density, "--epochs", str(epochs),
                "--models", f"{flows},gmm-diag", "--device", device,
                "--out", str(out / "density")]

    def em_title(family: str) -> str:
        if args.tiny:
            return "N=2,000, D=32, K=16"
        return f"N={em_points.get(family, 1_000_000):,}, D=64, K=64"

    return [
        Stage("environment", "environment", ["-c", ENVIRONMENT_CODE], 60, 5, read_environment),
        Stage(
            "pytest_cuda", "pytest -m cuda",
            ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
             f"--junitxml={out / 'pytest-cuda.xml'}", *cuda_test_files()],
            caps["pytest"], 30, read_pytest, ("pytest-cuda.xml",),
        ),
        *(
            Stage(
                f"em_{family}", f"EM {family}, {em_title(family)}, {em_iters[family]} iterations",
                em(family), caps["em"], 30, read_rows(f"em-{family}.json"), (f"em-{family}.json",),
            )
            for family in ("diag", "full")
        ),
        Stage(
            "vi_step_cost", "SVI step cost, AutoCWM / AutoNormal",
            ["-m", "inference.bench.vi", "--step-cost", "--step-cost-targets",
             "eight_schools,linreg100", *vi, "--device", device,
             "--out", str(out / "vi-step-cost.json")],
            caps["vi"], 30, read_rows("vi-step-cost.json", "rows"), ("vi-step-cost.json",),
        ),
        Stage(
            "scale", "AutoCWM at scale, linear regression",
            ["-m", "inference.bench.scale", "--targets", "linear", *scale,
             "--methods", "AutoCWM,AutoNormal,AutoLowRankMVN", "--threads", threads,
             "--device", device, "--out", str(out / "scale.json")],
            caps["scale"], 30, read_rows("scale.json"), ("scale.json",),
        ),
        Stage(
            "density_probe", "image density, 1-epoch probe",
            ["-m", "inference.bench.density", *density, "--epochs", "1", "--models", flows,
             "--device", device, "--out", str(out / "density-probe")],
            caps["probe"], 20, read_density("density-probe"), ("density-probe",),
        ),
        Stage(
            "density", "image density", density_main, math.inf, 30, read_density("density"),
            ("density",),
        ),
    ]


ENVIRONMENT_CODE = (
    "import json, runpy; "
    f"env = runpy.run_path({str(Path(__file__).resolve())!r})['environment']; "
    "print(json.dumps(env()))"
)


def run_stage(stage: Stage, argv: list[str], python: str, out: Path, timeout_s: float) -> dict:
    """Run one stage with a timeout (its whole process group is killed at the limit);
    its output goes to ``OUT/logs/NAME.log``. Returns its entry of the report."""
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for name in stage.outputs:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    command = [python, *argv]
    # The project first, then whatever the caller put there (packages carried as wheels).
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    started = time.perf_counter()
    status, returncode, error = "ok", None, None
    with open(log, "w") as sink:
        try:
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        except OSError as exc:
            process, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        if process is not None:
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended in between
                    pass
                process.wait()
                status, error = "timeout", f"killed after {timeout_s:.0f} s"
            else:
                if returncode != 0:
                    status, error = "failed", f"exit status {returncode}: {last_line(log)}"
    entry = {
        "name": stage.name,
        "title": stage.title,
        "status": status,
        "wall_s": round(time.perf_counter() - started, 2),
        "timeout_s": round(timeout_s, 1),
        "returncode": returncode,
        "command": " ".join(["python", *argv]),
        "log": str(log),
    }
    try:
        entry["figures"] = stage.read(out, log)
    except Exception as exc:  # a half-written output: record, keep going
        entry["figures"] = {}
        error = error or f"reading the figures: {type(exc).__name__}: {exc}"
    if error:
        entry["error"] = error
    return entry


def last_line(log: Path) -> str:
    """The last non-empty line of a log (the exception of a failed stage, usually)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_all(args: argparse.Namespace) -> dict:
    """Every stage in turn within the budget; the report is rewritten after each."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.started_at + args.budget
    report = {
        "device": args.device,
        "device_name": None,
        "tiny": args.tiny,
        "budget_s": args.budget,
        "stages": [
            {"name": "install", "title": "install", "status": args.install_status,
             "wall_s": round(args.install_seconds, 2), "figures": {}}
        ],
    }
    if (out / "install.log").exists():  # written by scripts/gpu-check.sh when it installs
        report["stages"][0]["log"] = str(out / "install.log")
    stages = plan(args)
    wanted = set(args.stages.split(",")) if args.stages else None
    for i, stage in enumerate(stages):
        reserve = sum(s.reserve_s for s in stages[i + 1:]) + FINAL_MARGIN_S
        timeout_s = min(stage.cap_s, deadline - time.time() - reserve)
        if wanted is not None and stage.name not in wanted:
            entry = {"name": stage.name, "title": stage.title, "status": "skipped",
                     "error": "not in --stages", "figures": {}}
        elif timeout_s < min(10.0, stage.reserve_s):
            entry = {"name": stage.name, "title": stage.title, "status": "skipped",
                     "error": f"no time left ({timeout_s:.0f} s)", "figures": {}}
        else:
            report["next_timeout_s"] = timeout_s
            argv = stage.argv(report) if callable(stage.argv) else stage.argv
            print(f"gpu-check: {stage.name} (at most {timeout_s:.0f} s)", flush=True)
            entry = run_stage(stage, argv, args.python, out, timeout_s)
            print(f"gpu-check: {stage.name} {entry['status']} in {entry['wall_s']:.1f} s",
                  flush=True)
        report.pop("next_timeout_s", None)
        report["stages"].append(entry)
        if stage.name == "environment":
            report["environment"] = entry.get("figures", {})
            report["device_name"] = device_name(args.device, report["environment"])
            if (entry["status"] == "ok" and args.device.startswith("cuda")
                    and not report["environment"].get("cuda_available")):
                entry["status"], entry["error"] = "failed", "torch sees no CUDA device"
        write(report, out, args.started_at)
    return report


def device_name(device: str, environment: dict) -> str:
    """The card's name on CUDA, the CPU's model otherwise."""
    if device.startswith("cuda") and environment.get("gpu"):
        return environment["gpu"]
    return environment.get("cpu") or cpu_model()


def write(report: dict, out: Path, started_at: float) -> None:
    report["wall_s"] = round(time.time() - started_at, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))


def summary(entry: dict) -> str:
    """The stage's main figures in a few words (for the table)."""
    figures, name = entry.get("figures") or {}, entry["name"]
    rows = figures.get("rows") or []
    if name == "environment" and figures:
        cuda = f", CUDA {figures['cuda_runtime']}" if figures.get("cuda_runtime") else ""
        return f"torch {figures.get('torch')}{cuda}, Python {figures.get('python')}"
    if name == "pytest_cuda" and figures:
        return (f"{figures['passed']} passed, {figures['failures']} failed, "
                f"{figures['errors']} errors, {figures['skipped']} skipped")
    if name.startswith("em_") and rows:
        by = {r["method"]: r for r in rows}
        ours, peer = by.get("pyro-cwm"), by.get("sklearn")
        if ours and peer:
            return (f"pyro-cwm {ours['seconds']:.2f} s ({ours['device']}) vs scikit-learn "
                    f"{peer['seconds']:.2f} s (cpu): {peer['seconds'] / ours['seconds']:.1f}x")
        r = ours or peer
        return f"{r['method']} {r['seconds']:.2f} s"
    if name == "vi_step_cost" and rows:
        targets = dict.fromkeys(r["target"] for r in rows)
        parts = []
        for target in targets:
            ratios = ", ".join(
                f"K={r['K']} {r['ratio']:.2f}x" for r in rows if r["target"] == target
            )
            parts.append(f"{target}: {ratios}")
        return "; ".join(parts)
    if name == "scale" and rows:
        parts = [
            f"{r['method']} {r['mean_err_max']:.3f} sd, {r['step_ms']:.1f} ms/step"
            for r in rows if "mean_err_max" in r
        ]
        cwm = next((r for r in rows if r["method"] == "AutoCWM" and "setup_s" in r), None)
        head = f"D={rows[0]['dim']:,}" + (
            f", AutoCWM set-up {cwm['setup_s']:.1f} s, {cwm['peak_mb']:.0f} MB" if cwm else ""
        )
        return f"{head}; worst mean error: " + ", ".join(parts)
    if name.startswith("density") and rows:
        settings = figures.get("settings", {})
        nll = ", ".join(f"{r['model'].split(' ')[0]} {r['nll_logit']:.3f}" for r in rows)
        epochs = settings.get("epochs")
        return (f"NLL (logit) {nll}; {epochs} epoch{'' if epochs == 1 else 's'} of "
                f"{settings.get('num_train'):,} points")
    return ""


def table(report: dict) -> str:
    """The report as a short Markdown table, a heading line first."""
    env = report.get("environment") or {}
    versions = f"torch {env.get('torch', '?')}"
    if env.get("cuda_runtime"):
        versions += f", CUDA {env['cuda_runtime']}"
    lines = [
        f"GPU check on {report.get('device_name') or report['device']} ({report['device']}"
        f"{', tiny sizes' if report['tiny'] else ''}; {versions}): "
        f"{report.get('wall_s', 0):.0f} s of {report['budget_s']:.0f}",
        "",
        "| stage | status | s | result |",
        "|---|---|---:|---|",
    ]
    for entry in report["stages"]:
        result = summary(entry)
        if entry.get("error"):
            result = f"{result} ({entry['error']})" if result else entry["error"]
        wall = entry.get("wall_s")
        lines.append(
            f"| {entry['title']} | {entry['status']} | "
            f"{'-' if wall is None else f'{wall:.1f}'} | {result.replace('|', '/')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python inference/bench/gpu_check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda or cpu: where our models run")
    p.add_argument("--tiny", action="store_true", help="sizes that take seconds on a CPU")
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu-check"))
    p.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for everything from --started-at")
    p.add_argument("--started-at", type=float, default=None,
                   help="Unix time the check began (default: now)")
    p.add_argument("--install-status", default="not run")
    p.add_argument("--install-seconds", type=float, default=0.0)
    p.add_argument("--stages", default=None, help="comma list: run only these stages")
    args = p.parse_args(argv)
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, not {args.device!r}")
    args.started_at = args.started_at or time.time()
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when no stage failed or timed out (skipped stages do not count)."""
    args = parse_args(argv)
    report = run_all(args)
    text = table(report)
    (args.out / "gpu-check.md").write_text(text + "\n")
    print(f"\n{text}\n\nreport: {args.out / 'gpu-check.json'}")
    bad = [s for s in report["stages"] if s["status"].startswith(("failed", "timeout"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
