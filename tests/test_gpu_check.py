"""The GPU check runs end to end on a CPU at tiny sizes, so it cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
BENCH_STAGES = ["environment", "pytest_cuda", "em_diag", "em_full", "vi_step_cost", "scale",
                "density_probe", "density"]


def test_the_script_runs_every_stage_on_a_cpu_and_writes_the_report(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--tiny", "--no-install",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "VENV": sys.prefix},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["install", *BENCH_STAGES]
    assert stages["install"]["status"] == "skipped (--no-install)"
    for name in BENCH_STAGES:
        assert stages[name]["status"] == "ok", stages[name]
        assert stages[name]["figures"] and stages[name]["wall_s"] > 0
    assert report["device"] == "cpu" and report["device_name"] == gpu_check.cpu_model()
    assert report["environment"]["torch"]
    assert stages["pytest_cuda"]["figures"]["failures"] == 0
    assert {r["method"] for r in stages["em_full"]["figures"]["rows"]} == {"pyro-cwm", "sklearn"}
    assert {r["target"] for r in stages["vi_step_cost"]["figures"]["rows"]} == {
        "eight_schools", "linreg100"
    }
    scale = stages["scale"]["figures"]["rows"]
    assert [r["method"] for r in scale] == ["AutoCWM", "AutoNormal", "AutoLowRankMVN"]
    assert all(r["dim"] == 300 and r["sd_ratio_min"] > 0 for r in scale)
    assert [r["model"] for r in stages["density"]["figures"]["rows"]][:3] == [
        "cwm", "realnvp", "nsf"
    ]
    # The table is printed and written, one line per stage.
    table = (out / "gpu-check.md").read_text()
    assert table.strip() in result.stdout
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 10


def stage(argv):
    return gpu_check.Stage("probe", "probe", argv, 10.0, 1.0, lambda out, log: {})


def test_a_stage_that_fails_or_runs_out_of_time_is_recorded_and_the_run_goes_on(tmp_path):
    failed = gpu_check.run_stage(
        stage([]), ["-c", "print('boom'); raise SystemExit(3)"], sys.executable, tmp_path, 10.0
    )
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert "boom" in failed["error"]
    # What an earlier run left in the folder is removed first: no stale figures.
    (tmp_path / "old.json").write_text("{}")
    rerun = gpu_check.Stage(
        "rerun", "rerun", [], 10.0, 1.0, lambda out, log: {"left": (out / "old.json").exists()},
        ("old.json",),
    )
    entry = gpu_check.run_stage(rerun, ["-c", "pass"], sys.executable, tmp_path, 10.0)
    assert entry["status"] == "ok" and entry["figures"] == {"left": False}
    slow = gpu_check.run_stage(
        stage([]), ["-c", "import time; time.sleep(60)"], sys.executable, tmp_path, 0.5
    )
    assert slow["status"] == "timeout" and slow["wall_s"] < 30


def test_stages_are_skipped_when_the_budget_is_spent(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--tiny", "--budget", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert code == 0
    assert [s["status"] for s in report["stages"][1:]] == ["skipped"] * len(BENCH_STAGES)
    assert "no time left" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("status", "timeout_s", "expected"),
    [("ok", 1000.0, 30), ("ok", 100.0, 7), ("ok", 10.0, 1), ("timeout", 1000.0, 1)],
)
def test_density_epochs_fill_the_time_left(status, timeout_s, expected):
    probe = {
        "status": status,
        "wall_s": 12.0,  # 2 s of it fixed cost
        "figures": {"rows": [{"s_per_epoch": 4.0, "time_s": 4.0},
                             {"s_per_epoch": 6.0, "time_s": 6.0}]},
    }
    # 0.8 * timeout - 1.5 * 2 s of fixed cost, at 10 s per epoch of all models.
    assert gpu_check.density_epochs(probe, timeout_s) == expected


def test_cuda_without_a_device_is_a_failure_in_the_report(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = gpu_check.main(
        ["--device", "cuda", "--stages", "environment", "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    environment = report["stages"][1]
    assert code == 1
    assert environment["status"] == "failed" and "no CUDA" in environment["error"]
    assert report["device_name"] == gpu_check.cpu_model()


def test_bad_device_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "tpu"])
