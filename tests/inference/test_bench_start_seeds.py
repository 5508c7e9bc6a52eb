"""The seed bench of AutoCWM's start (inference.bench.start_seeds)."""

import json

import pytest

from inference.bench import start_seeds


def test_start_seeds_bench_reports_each_seed_and_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = start_seeds.main(
        ["--targets", "flat_regression", "--seeds", "0,1", "--steps", "100", "--samples", "500"]
        + ["--out", str(out)]
    )
    assert [row["seed"] for row in rows] == [0, 1]
    for row in rows:
        assert row["map"] == "location_scale" and row["mode"]
        assert {"mean_err", "sd_min", "sd_max", "ok", "warned"} <= set(row)
    assert json.loads(out.read_text())["rows"] == rows
    assert "flat_regression" in capsys.readouterr().out


def test_start_seeds_bench_start_only_and_unknown_targets(tmp_path):
    rows = start_seeds.main(
        ["--targets", "flat_regression_wide", "--seeds", "3", "--start-only"]
        + ["--out", str(tmp_path / "rows.json")]
    )
    assert rows[0]["map"] == "location_scale" and "mean_err" not in rows[0]
    with pytest.raises(SystemExit):
        start_seeds.main(["--targets", "nope"])
