"""The benchmark scripts run end to end on tiny settings (their figures are not tests)."""

import json
import math

from inference.bench import density, vi


def test_vi_bench_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "vi.json"
    rows = vi.main(
        [
            "--targets",
            "ring",
            "--methods",
            "AutoNormal,AutoCWM",
            "--steps",
            "5",
            "--samples",
            "100",
            "--out",
            str(out),
        ]
    )
    assert [r["method"] for r in rows] == ["AutoNormal", "AutoCWM"]
    assert all(math.isfinite(r["elbo"]) and math.isfinite(r["energy"]) for r in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_density_bench_runs_and_writes_its_table(tmp_path):
    rows = density.main(
        [
            "--num-train",
            "400",
            "--num-test",
            "200",
            "--epochs",
            "1",
            "--components",
            "4",
            "--models",
            "cwm,realnvp,gmm-diag",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["model"] for r in rows][:2] == ["cwm", "realnvp"]
    assert all(math.isfinite(r["nll_logit"]) for r in rows)
    assert (tmp_path / "density.json").exists()
