"""Progress of the loops: a bar when interactive; in a log, no bar and one summary line."""

import logging
import re
import sys
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from sklearn.exceptions import ConvergenceWarning

import inference.progress as progress_module
from inference import (
    GaussianMixtureEM,
    fit_bayesian_gmm_map_em,
    fit_density,
    fit_experts_em,
    fit_flow_gmm,
    fit_svi,
    sample_bayesian_gmm_nuts,
)
from inference.progress import Progress
from pyro_cwm import CWM
from pyro_cwm.models import BayesianGMM, FlowGMM, MixtureOfExperts

SUMMARY = re.compile(r"^(?P<name>[\w -/]+): \d+ \w+ in \d+\.\d s")


def gaussian_model(y):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def run_svi(progress):
    pyro.clear_param_store()
    fit_svi(
        gaussian_model, AutoNormal(gaussian_model), torch.randn(10), num_steps=3, progress=progress
    )


def run_density(progress):
    fit_density(
        CWM(2, 2, hidden_dims=(4,)),
        torch.randn(40, 2),
        epochs=2,
        batch_size=16,
        em_pretraining=False,
        progress=progress,
    )


def run_flow_gmm(progress):
    torch.manual_seed(0)
    model = FlowGMM(2, 2, transforms=1, hidden_features=(8,))
    fit_flow_gmm(
        model, torch.randn(20, 2), torch.arange(20) % 2, epochs=2, batch_size=10, progress=progress
    )


def run_map_em(progress):
    torch.manual_seed(0)
    data = torch.cat([torch.randn(15, 2) - 3, torch.randn(15, 2) + 3]).double()
    fit_bayesian_gmm_map_em(BayesianGMM(2, 2, "diag"), data, max_iter=3, progress=progress)


def run_nuts(progress):
    torch.manual_seed(0)
    data = torch.cat([torch.randn(10, 2) - 3, torch.randn(10, 2) + 3]).double()
    sample_bayesian_gmm_nuts(
        BayesianGMM(2, 2, "diag"),
        data,
        num_samples=4,
        warmup_steps=2,
        max_tree_depth=2,
        progress=progress,
    )


def run_gaussian_em(progress):
    data = torch.randn(30, 2, dtype=torch.float64)
    with warnings.catch_warnings():  # 3 iterations do not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        GaussianMixtureEM(
            2, covariance_type="diag", max_iter=3, tol=0.0, random_state=0, verbose=int(progress)
        ).fit(data)


def run_experts(progress):
    torch.manual_seed(0)
    X = torch.randn(30, 1, dtype=torch.float64)
    Y = torch.cat([X[:15], -X[15:]]) + 0.1 * torch.randn(30, 1, dtype=torch.float64)
    fit_experts_em(MixtureOfExperts(2, 1, max_iter=3, n_init=1, progress=progress), X, Y)


LOOPS = {
    "fit_svi": run_svi,
    "fit_density": run_density,
    "fit_flow_gmm": run_flow_gmm,
    "MAP-EM": run_map_em,
    "sample_bayesian_gmm_nuts": run_nuts,
    "EM": run_gaussian_em,
    "EM experts 1/1": run_experts,
}


@pytest.fixture
def unconfigured_logging(monkeypatch):
    """As in a script that never configures logging (pytest's own handlers aside)."""
    monkeypatch.setattr(progress_module, "_logging_configured", lambda: False)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_a_log_gets_one_summary_line_and_no_bar(name, capsys, unconfigured_logging):
    LOOPS[name](True)
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar refreshes
    summaries = [line for line in err.splitlines() if SUMMARY.match(line)]
    assert len(summaries) == 1, err
    assert SUMMARY.match(summaries[0])["name"] == name


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_progress_false_writes_nothing(name, capsys, unconfigured_logging):
    LOOPS[name](False)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert not [line for line in err.splitlines() if SUMMARY.match(line)], err


def test_configured_logging_gets_the_summary_at_info(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="inference"):
        run_svi(True)
    records = [r for r in caplog.records if r.name == "inference.progress"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].getMessage().startswith("fit_svi: 3 steps in ")
    assert "loss " in records[0].getMessage()
    assert "\r" not in capsys.readouterr().err


def test_a_level_above_info_silences_the_summary(capsys, unconfigured_logging, monkeypatch):
    monkeypatch.setattr(logging.getLogger("inference"), "level", logging.WARNING)
    run_svi(True)
    assert not [line for line in capsys.readouterr().err.splitlines() if SUMMARY.match(line)]


def test_interactive_output_gets_a_tqdm_bar_and_no_summary(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    monkeypatch.setattr(progress_module, "_logging_configured", lambda: False)
    bar = Progress(range(3), "demo", unit="steps")
    for step in bar:
        bar.set_postfix(loss=f"{step:.1f}")
    bar.close()
    err = capsys.readouterr().err
    assert "demo" in err and "loss=2.0" in err  # tqdm's bar, with the postfix
    assert not SUMMARY.match(err.strip().splitlines()[-1])


def test_summary_counts_iterations_and_shows_the_postfix():
    bar = Progress(range(10), "demo", enabled=False, unit="steps", initial=4)
    for step in bar:
        bar.set_postfix(loss="1.5", val="2")
        if step == 6:
            break
    assert re.fullmatch(
        r"demo: 7 steps in \d+\.\d s \(resumed at 4\), loss 1\.5, val 2", bar.summary()
    )


def test_a_jupyter_kernel_and_a_terminal_are_interactive(monkeypatch, capsys):
    class ZMQInteractiveShell:
        config = {"IPKernelApp": {}}

    fake = types.SimpleNamespace(get_ipython=lambda: ZMQInteractiveShell())
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress_module.interactive()
    monkeypatch.setattr(fake, "get_ipython", lambda: None)  # IPython imported, no kernel
    assert not progress_module.interactive()  # (pytest's captured stderr is no terminal)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert progress_module.interactive()
