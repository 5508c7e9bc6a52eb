"""``pyro-cwm demo`` with tiny settings: its files and its table."""

import json
import math

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
    # AutoCWM's maps per target: location-scale on the ring, the autoregressive flow on
    # the funnel.
    assert [r["map"] for r in rows] == [None, "location_scale", None, "iaf"]
    assert "AutoCWM (iaf)" in stdout
    for r in rows:  # KL = log Z - ELBO with log Z = 0, and IS log Z >= ELBO on average
        assert r["kl"] == pytest.approx(-r["elbo"])
        assert r["is_log_z"] >= r["elbo"] - 1e-6


def test_demo_rejects_unknown_targets(capsys):
    assert main(["demo", "--targets", "nope"]) == 2
    assert "--targets" in capsys.readouterr().err


MODEL_FILE = """
import pyro
import pyro.distributions as dist
import torch

def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, scale), obs=y)

def data():
    return (torch.tensor([1.0, 2.0, 0.5, 1.5]),)
"""


def test_vi_on_a_users_model_file(tmp_path, capsys):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    code = main(["vi", f"{path}:model", "--args", "data", "--steps", "30", "--samples", "100",
                 "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "| guide | ELBO |" in stdout
    assert {p.name for p in out.iterdir()} == {"AutoNormal.nc", "AutoCWM.nc", "vi.png",
                                               "table.json"}
    idata = az.from_netcdf(out / "AutoCWM.nc")
    assert set(idata.posterior.data_vars) == {"mu", "scale"}
    assert "log_likelihood" in idata.groups()
    rows = json.loads((out / "table.json").read_text())
    assert [r["guide"] for r in rows] == ["AutoNormal", "AutoCWM"]


@pytest.mark.parametrize(
    "target, message",
    [("nofile.py:model", "no such file"), ("{path}:missing", "no callable"),
     ("{path}", "FILE.py:MODEL")],
)
def test_vi_bad_targets_give_one_line(tmp_path, capsys, target, message):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    assert main(["vi", target.format(path=path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_vi_with_the_autoregressive_flow_map(tmp_path, capsys):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    code = main(["vi", f"{path}:model", "--args", "data", "--map", "maf", "--steps", "10",
                 "--samples", "50", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "table.json").read_text())
    assert [r["map"] for r in rows] == [None, "maf"]
    assert all(math.isfinite(r["elbo"]) for r in rows)


MIXTURE_FILE = """
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

@config_enumerate
def mixture(x):
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z], 1.0), obs=x)

x = (torch.tensor([-2.5, -2.0, -1.5, 1.5, 2.0, 2.5]),)
"""


def test_vi_on_a_mixture_with_enumerated_assignments(tmp_path, capsys):
    # AutoNormal needs the enumerated site hidden and TraceEnum_ELBO; AutoCWM sums it out.
    path = tmp_path / "mixture.py"
    path.write_text(MIXTURE_FILE)
    out = tmp_path / "out"
    code = main(["vi", f"{path}:mixture", "--args", "x", "--steps", "10", "--samples", "100",
                 "--components", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "enumerated sites z" in captured.out
    rows = json.loads((out / "table.json").read_text())
    assert [r["guide"] for r in rows] == ["AutoNormal", "AutoCWM"]
    assert all(math.isfinite(r["elbo"]) and math.isfinite(r["is_log_z"]) for r in rows)
    for guide in ("AutoNormal", "AutoCWM"):
        idata = az.from_netcdf(out / f"{guide}.nc")
        assert set(idata.posterior.data_vars) == {"locs"}  # z is summed out, not drawn
        assert idata.posterior["locs"].shape[-1] == 2
        assert idata.log_likelihood["x"].shape[-1] == 6
