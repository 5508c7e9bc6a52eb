"""``pyro-cwm demo`` with tiny settings: its files and its table."""

import json

import arviz as az
import pytest

from inference.cli import main


def test_demo_writes_inference_data_plots_and_table(tmp_path, capsys):
    code = main(["demo", "--steps", "30", "--samples", "200", "--out", str(tmp_path),
                 "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "| target | guide |" in stdout and "ArviZ summary" in stdout
    names = {p.name for p in tmp_path.iterdir()}
    for target in ("ring", "funnel"):
        assert {f"{target}_AutoNormal.nc", f"{target}_AutoCWM.nc", f"pairs_{target}.png",
                f"loss_{target}.png"} <= names
    idata = az.from_netcdf(tmp_path / "ring_AutoCWM.nc")
    assert idata.posterior["x"].shape[-1] == 2
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [(r["target"], r["guide"]) for r in rows] == [
        ("ring", "AutoNormal"), ("ring", "AutoCWM"),
        ("funnel-10d", "AutoNormal"), ("funnel-10d", "AutoCWM"),
    ]
    for r in rows:  # KL = log Z - ELBO with log Z = 0, and IS log Z >= ELBO on average
        assert r["kl"] == pytest.approx(-r["elbo"])
        assert r["is_log_z"] >= r["elbo"] - 1e-6


def test_demo_rejects_unknown_targets(capsys):
    assert main(["demo", "--targets", "nope"]) == 2
    assert "--targets" in capsys.readouterr().err
