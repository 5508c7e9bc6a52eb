"""The VAE bench: its exact evidence against scipy, and a short run of both parts."""

import json

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from inference.bench import vae


def test_squares_evidence_matches_scipy_quad():
    x = torch.tensor([[1.7, -0.2], [0.05, 3.1]])
    expected = 0.0
    for value in x.flatten().tolist():
        # Near +-sqrt(value) the integrand has its modes; tell quad where they are.
        modes = [-(value**0.5), value**0.5] if value > 0 else None
        density, _ = integrate.quad(
            lambda z, v=value: stats.norm.pdf(z) * stats.norm.pdf(v, z * z, vae.NOISE),
            -12,
            12,
            points=modes,
            limit=200,
        )
        expected += np.log(density)
    assert vae.squares_log_evidence(x) == pytest.approx(expected, abs=1e-6)


def test_iaf_encoder_is_matched_to_the_four_component_cwm():
    features = torch.nn.Identity()
    iaf = vae.make_encoder("iaf", features, 128, 4)
    cwm4 = vae.make_encoder("cwm4", features, 128, 4)
    assert vae.parameter_count(iaf) == pytest.approx(vae.parameter_count(cwm4), rel=0.05)
    z = iaf(torch.randn(3, 128)).rsample()
    assert z.shape == (3, 4)


def test_vae_bench_runs_both_parts(tmp_path, capsys):
    out = tmp_path / "vae.json"
    rows = vae.main(
        ["--seeds", "0", "--steps", "5", "--epochs", "1", "--iwae", "30",
         "--encoders", "normal,cwm2", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == rows
    assert [r["encoder"] for r in rows if r["part"] == "digits"] == ["normal", "cwm2"]
    for row in rows:
        assert np.isfinite(row["neg_elbo"]) and row["step_ms"] > 0
    for row in rows:
        if row["part"] == "digits":  # the IWAE bound is at least the ELBO
            assert row["neg_ll"] <= row["neg_elbo"] + 1e-6
        else:
            assert row["gap"] > -0.05  # an ELBO above the exact evidence would be a bug
            assert row["worst_gap"] >= row["gap"] - 0.05 and len(row["worst_x"]) in (1, 2)
    assert "test -log p (IWAE)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        vae.main(["--encoders", "gaussian"])
