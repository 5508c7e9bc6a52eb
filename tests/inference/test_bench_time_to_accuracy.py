"""The time-to-accuracy bench (inference.bench.time_to_accuracy): columns, counts, reach."""

import json
import math

import pytest

from inference.bench import time_to_accuracy as tta
from inference.bench import vi


def test_first_within_finds_where_a_running_error_stays_below_the_level():
    errors = [0.5, 0.2, 0.3, 0.1, 0.09, 0.1]
    assert tta.first_within(errors, 0.25) == 3  # 0.2 at 1 does not stay: 0.3 follows
    assert tta.first_within(errors, 0.1) == 3  # at the level counts as within
    assert tta.first_within(errors, 0.5) == 0
    assert tta.first_within(errors, 0.095) is None  # the last one is above
    assert tta.first_within([0.1, math.nan, 0.1], 0.2) == 2  # NaN is not within
    assert tta.first_within([], 1.0) is None


@pytest.mark.skipif(not vi.DEFAULT_REFPOST.is_dir(), reason="shared/refpost not present")
def test_time_to_accuracy_bench_counts_and_reaches(tmp_path):
    out = tmp_path / "rows.json"
    rows = tta.main(
        ["--targets", "blr", "--steps", "40", "--checkpoints", "4", "--samples", "300"]
        + ["--nuts-warmup", "15", "--nuts-samples", "20", "--nuts-check-every", "5"]
        + ["--laplace-nuts", "--out", str(out)]
    )
    assert [r["method"] for r in rows] == ["AutoCWM", "NUTS", "NUTS (Laplace)"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    cwm, *nuts = rows
    # AutoCWM: each SVI step evaluates K images x particles (>= 1) with their gradient,
    # on top of the start (its climb, its Hessians at d points each).
    assert cwm["grad_evals"] == cwm["gradient_points"] + cwm["hessian_rows"]
    assert cwm["gradient_points"] >= cwm["steps"] * cwm["K"]
    assert cwm["hessian_rows"] == cwm["hessian_points"] * cwm["dim"] > 0
    trajectory = cwm["trajectory"]
    assert [p["step"] for p in trajectory] == [10, 20, 30, 40]
    assert trajectory[-1]["mean_err"] == cwm["mean_err"]
    grads = [p["grads"] for p in trajectory]
    assert grads == sorted(grads) and grads[-1] == cwm["grad_evals"]
    steps_grads = (grads[-1] - grads[0]) / (trajectory[-1]["step"] - trajectory[0]["step"])
    assert steps_grads >= cwm["K"] and steps_grads == int(steps_grads)  # no start in there
    assert cwm["reach"]["E"]["at"] == 40  # the last checkpoint is at E
    level = cwm["reach"]["E+"]["level"]
    assert level == cwm["mean_err"] + cwm["slack"] and cwm["slack"] == 0.01  # 10,000 draws
    reached = tta.first_within([p["mean_err"] for p in trajectory], level)
    assert cwm["reach"]["E+"]["at"] == trajectory[reached]["step"]
    assert cwm["reach"]["E+"]["s"] <= cwm["time_s"] and 0 < cwm["setup_s"] < cwm["time_s"]
    for row in nuts:
        per_iteration = row["grads_per_iteration"]
        assert len(per_iteration) == 15 + 20 and row["draws"] == 20 and not row["capped"]
        assert row["grad_evals"] == row["setup_grads"] + sum(per_iteration)
        assert all(1 <= g <= 2**10 for g in per_iteration[15:])  # a tree (+ a cache refill)
        assert row["warmup_grads"] == row["setup_grads"] + sum(per_iteration[:15])
        assert [p["draws"] for p in row["trajectory"]] == [5, 10, 15, 20]
        assert row["trajectory"][-1]["grads"] == row["grad_evals"]
        assert set(row["reach"]) == {"E", "E+", "0.1"}
        errors = [p["mean_err"] for p in row["trajectory"]]
        for name, reach in row["reach"].items():
            assert reach["level"] == cwm["reach"][name]["level"]  # AutoCWM's levels
            reached = tta.first_within(errors, reach["level"])
            if reached is None:
                assert reach["at"] is None and math.isnan(reach["s"])
            else:
                point = row["trajectory"][reached]
                assert (reach["at"], reach["s"]) == (point["draws"], point["time_s"])
    assert nuts[1]["laplace_mass"] is True and nuts[1]["setup_grads"] > 0
    assert nuts[0]["setup_grads"] > 0  # the initial point and the step-size search


def test_gradient_counter_restores_what_it_wraps():
    import pyro.ops.integrator

    from pyro_cwm.guides import log_joint

    before = (pyro.ops.integrator.potential_grad, log_joint.unconstrained_log_joint)
    with tta.GradientCounter():
        assert pyro.ops.integrator.potential_grad is not before[0]
    assert (pyro.ops.integrator.potential_grad, log_joint.unconstrained_log_joint) == before


def test_unknown_target_is_refused():
    with pytest.raises(SystemExit):
        tta.main(["--targets", "nope"])
