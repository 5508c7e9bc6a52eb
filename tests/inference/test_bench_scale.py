"""inference.bench.scale: the exact posterior it judges by, and one small run."""

import json

import pytest
import torch

from inference.bench import scale


def test_linear_posterior_is_the_dense_gaussian_posterior_on_both_routes():
    for num_points, dim in ((40, 10), (10, 40)):  # D <= N, and D > N (Woodbury)
        x, y = scale.make_target("linear", dim, num_points)[1]
        mean, sd = scale.linear_posterior(x, y)
        x, y = x.double(), y.double()
        cov = torch.linalg.inv(torch.eye(dim, dtype=x.dtype) + x.T @ x)
        assert torch.allclose(mean, cov @ x.T @ y, atol=1e-8)
        assert torch.allclose(sd, cov.diagonal().sqrt(), atol=1e-8)


def test_a_small_run_reports_every_column_and_gives_the_others_autocwms_time(tmp_path):
    out = tmp_path / "scale.json"
    rows = scale.main(
        ["--dims", "6", "--points", "40", "--steps", "30", "--samples", "200",
         "--methods", "AutoCWM,AutoNormal", "--threads", "1", "--out", str(out),
         "--timeout", "300"]
    )
    assert [(r["target"], r["method"]) for r in rows] == [
        ("linear", "AutoCWM"), ("linear", "AutoNormal"),
        ("logistic", "AutoCWM"), ("logistic", "AutoNormal"),
    ]
    assert all("error" not in r and r["setup_s"] >= 0 and r["peak_mb"] >= 0 for r in rows)
    assert rows[0]["steps"] == 30 and rows[1]["steps"] >= 20
    assert rows[0]["sd_ratio_min"] > 0 and "mean_err_max" not in rows[2]
    assert json.loads(out.read_text()) == rows


def test_the_step_cost_runs_both_guides_side_by_side(tmp_path):
    rows = scale.main(
        ["--step-cost", "--targets", "linear", "--dims", "6", "--points", "40", "--steps", "3",
         "--threads", "1", "--out", str(tmp_path / "cost.json")]
    )
    (row,) = rows
    assert row["autocwm_step_ms"] > 0 and row["autonormal_step_ms"] > 0
    assert row["ratio"] == pytest.approx(row["autocwm_step_ms"] / row["autonormal_step_ms"])
    assert row["ratio_over_K"] == pytest.approx(row["ratio"] / 4)
