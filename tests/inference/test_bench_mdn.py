"""The MDN benchmark runs end to end on tiny settings, with and without a seed checkout."""

import json
import sys
import textwrap

from inference.bench import mdn

# A stand-in for a checkout of the seed MDN: the interface its README shows
# (``src.blocks.MixtureDensityNetwork(dim_in, dim_out, n_components, hidden_dim,
# noise_type)``, forward -> (log pi, mu, sigma)), written here, not the seed's code.
FAKE_SEED = textwrap.dedent(
    """
    import enum
    import torch
    from torch import nn

    NoiseType = enum.Enum("NoiseType", "DIAGONAL ISOTROPIC")

    class MixtureDensityNetwork(nn.Module):
        def __init__(self, dim_in, dim_out, n_components, hidden_dim, noise_type=None):
            super().__init__()
            self.k, self.d = n_components, dim_out
            self.net = nn.Sequential(
                nn.Linear(dim_in, hidden_dim), nn.Tanh(),
                nn.Linear(hidden_dim, n_components * (1 + 2 * dim_out)),
            )

        def forward(self, x):
            out = self.net(x)
            k, d = self.k, self.d
            log_pi = torch.log_softmax(out[..., :k], -1)
            mu = out[..., k : k + k * d].unflatten(-1, (k, d))
            sigma = out[..., k + k * d :].unflatten(-1, (k, d)).exp()
            return log_pi, mu, sigma
    """
)


def test_mdn_bench_runs_and_says_when_the_seed_is_missing(tmp_path, capsys):
    out = tmp_path / "mdn.json"
    argv = ["--steps", "20", "--seeds", "1", "--num-test", "200", "--out", str(out)]
    rows = mdn.main([*argv, "--models", "ours,ours-cwm,recipe,seed"])
    assert [r["model"] for r in rows] == ["ours", "ours-cwm", "recipe"]
    assert "seed: not available" in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows
    assert all(r["test_nll_mean"] < 2.0 for r in rows)


def test_mdn_bench_runs_a_seed_checkout(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "blocks.py").write_text(FAKE_SEED)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() prepends the checkout
    argv = ["--steps", "20", "--seeds", "1", "--num-test", "200", "--models", "seed"]
    rows = mdn.main([*argv, "--seed-mdn", str(tmp_path)])
    assert rows[0]["model"] == "seed" and rows[0]["test_nll_mean"] < 2.0
    sys.modules.pop("src.blocks", None)
    sys.modules.pop("src", None)
