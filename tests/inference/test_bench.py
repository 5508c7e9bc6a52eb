"""The benchmark scripts run end to end on tiny settings (their figures are not tests)."""

import json
import math

import numpy as np
import pyro
import pytest

from inference.bench import density, em, settle, vi


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


@pytest.mark.parametrize("fit_defaults", [True, False])
def test_vi_bench_trains_with_fit_svi_defaults_unless_told_otherwise(
    tmp_path, monkeypatch, fit_defaults
):
    calls = []
    original = vi.fit_svi

    def recording(model, guide, *args, **kwargs):
        calls.append((type(guide).__name__, kwargs["loss"], kwargs["optim"]))
        return original(model, guide, *args, **kwargs)

    monkeypatch.setattr(vi, "fit_svi", recording)
    argv = ["--targets", "ring", "--methods", "AutoNormal,AutoCWM", "--steps", "3"]
    argv += ["--samples", "50", "--components", "2", "--out", str(tmp_path / "vi.json")]
    vi.main(argv + ([] if fit_defaults else ["--no-fit-defaults"]))
    assert [name for name, _, _ in calls] == ["AutoNormal", "AutoCWM"]
    if fit_defaults:  # what a user gets: fit_svi picks the optimizer and the loss
        assert all(loss is None and optim is None for _, loss, optim in calls)
    else:
        assert calls[0][1] is None and isinstance(calls[1][1], vi.CWMELBO)
        assert calls[1][1].num_particles == 4
        assert all(isinstance(optim, pyro.optim.PyroLRScheduler) for _, _, optim in calls)


def test_settle_bench_gives_each_target_at_each_length_with_its_map(tmp_path):
    out = tmp_path / "settle.json"
    argv = ["--targets", "funnel,tight-float64", "--steps", "3,6", "--samples", "60"]
    rows = settle.main(argv + ["--components", "2", "--out", str(out)])
    assert [(r["target"], r["steps"]) for r in rows] == [
        ("funnel", 3), ("funnel", 6), ("tight-float64", 3), ("tight-float64", 6)
    ]
    assert {r["map"] for r in rows if r["target"] == "funnel"} == {"iaf"}
    assert all(math.isfinite(r["kl"]) for r in rows[:2])
    assert all(math.isfinite(r["mean_err"]) and math.isfinite(r["sd_min"]) for r in rows[2:])
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit):
        settle.main(["--targets", "nope"])


def test_vi_bench_leaves_every_guide_on_an_enumerated_model_to_fit_svi_default_loss():
    # fit_svi gives AutoCWM CWMELBO and Pyro's guides (which see the discrete sites
    # hidden) TraceEnum_ELBO: the bench chooses neither.
    problem = vi.zoo_problem("mixture_enum", 0)
    for method in ("AutoCWM", "AutoNormal"):
        _, loss = vi.make_guide(method, problem.model, 2, problem, cwm_particles=None)
        assert loss is None, method


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


def test_em_bench_runs_and_both_fits_reach_the_same_likelihood(tmp_path):
    out = tmp_path / "em.json"
    rows = em.main(
        ["--sizes", "small", "--num-points", "3000", "--iters", "3", "--peers", "sklearn",
         "--out", str(out)]
    )
    assert [(r["family"], r["method"]) for r in rows] == [
        ("diag", "pyro-cwm"), ("diag", "sklearn"), ("full", "pyro-cwm"), ("full", "sklearn")
    ]
    # Same start, same number of iterations: the same fit (an end-to-end check).
    assert rows[0]["mean_loglik"] == pytest.approx(rows[1]["mean_loglik"], rel=1e-10)
    assert rows[2]["mean_loglik"] == pytest.approx(rows[3]["mean_loglik"], rel=1e-10)
    assert json.loads(out.read_text()) == rows


def test_em_bench_gives_both_dtypes_against_one_sklearn_time_with_their_rates():
    rows = em.main(
        ["--sizes", "small", "--num-points", "2000", "--iters", "2", "--peers", "sklearn",
         "--families", "spherical,tied", "--dtype", "float32,float64", "--threads", "1"]
    )
    assert [(r["family"], r["method"], r["dtype"]) for r in rows] == [
        (family, method, dtype)
        for family in ("spherical", "tied")
        for method, dtype in
        (("pyro-cwm", "float32"), ("pyro-cwm", "float64"), ("sklearn", "float64"))
    ]
    for r in rows:
        assert r["threads"] == 1 and r["scheme"] in ("origin", "sklearn")
        assert r["rel_loglik_vs_sklearn"] < 1e-6
        assert r["gflop_per_iter"] > 0 and 0 < r["peak_fraction"] < 2
        assert r["gflops"] == pytest.approx(r["gflop_per_iter"] * 2 / r["seconds"])
    ours, sklearn = rows[3], rows[5]  # tied: linear in x, so far fewer flops
    assert ours["gflop_per_iter"] < sklearn["gflop_per_iter"] / 10


def test_flow_gmm_bench_runs_and_writes_its_table_and_samples(tmp_path):
    from inference.bench import flow_gmm

    rows = flow_gmm.main(
        ["--epochs", "1", "--transforms", "1", "--hidden", "16", "--no-progress",
         "--skip-moons", "--out", str(tmp_path)]
    )
    assert [r["method"] for r in rows][:3] == ["FlowGMM", "GaussianNB", "QDA (reg_param by CV)"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert (tmp_path / "samples.png").exists() and (tmp_path / "report.json").exists()


def test_vi_bench_nuts_starts_from_the_laplace_mass_matrix():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import MCMC

    cov = torch.tensor([[1.0, 0.99], [0.99, 1.0]], dtype=torch.float64)
    loc = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def model():
        pyro.sample("x", dist.MultivariateNormal(loc, cov))

    initial, inverse_mass = vi.laplace_start(model, (), seed=0)
    assert torch.allclose(initial["x"], loc) and torch.allclose(inverse_mass, cov)
    kernel = vi.LaplaceNUTS(model, inverse_mass, adapt_mass_matrix=False)
    MCMC(kernel, num_samples=5, warmup_steps=5, initial_params=initial,
         disable_progbar=True).run()
    (used,) = kernel.mass_matrix_adapter.inverse_mass_matrix.values()
    assert torch.allclose(used, cov)


def test_experts_bench_runs_on_one_seed():
    from inference.bench import experts

    rows = experts.main(["--seeds", "42"])
    ours = [r for r in rows if r["method"] == "ours"]
    assert {r["model"] for r in ours} == {"MoM", "MoE"}
    assert all(r["success"] for r in ours)  # the seed's own data set: both planes found


REFPOST = vi.DEFAULT_REFPOST
NEW_POSTERIORS = ["diamonds", "nes", "hmm_drive_0"]


@pytest.mark.parametrize("target", ["mixture_enum", "hierarchical", "logistic", "linreg100"]
                         + NEW_POSTERIORS)
def test_vi_bench_runs_each_new_target(target, tmp_path):
    if target in NEW_POSTERIORS and not REFPOST.is_dir():
        pytest.skip("shared/refpost not present")
    rows = vi.main(["--targets", target, "--methods", "AutoNormal,AutoCWM", "--steps", "3",
                    "--samples", "50", "--components", "2", "--out", str(tmp_path / "vi.json")])
    assert [r["method"] for r in rows] == ["AutoNormal", "AutoCWM"]
    for r in rows:
        assert not r["note"].startswith("failed"), r["note"]
        assert math.isfinite(r["energy"]) and math.isfinite(r["mean_err"])
        assert 0 < r["sd_min"] <= r["sd_max"]
        if target == "hierarchical":  # local latents in a subsampled plate: a guide list
            assert "AutoGuideList" in r["note"] and math.isnan(r["k_hat"])
        else:
            assert math.isfinite(r["elbo"])
        if target in ("mixture_enum", "linreg100"):  # log Z known: KL = log Z - ELBO
            assert r["kl"] == pytest.approx(vi.zoo_problem(target, 0).log_z - r["elbo"])


def test_vi_bench_runs_nuts_on_full_data_for_a_subsampled_model(tmp_path):
    rows = vi.main(["--targets", "hierarchical", "--methods", "NUTS", "--nuts-warmup", "5",
                    "--nuts-samples", "5", "--samples", "50", "--out", str(tmp_path / "v.json")])
    assert rows[0]["note"] == "full data" and math.isfinite(rows[0]["energy"])


def test_vi_bench_notes_a_method_that_fails_and_goes_on(tmp_path, monkeypatch):
    def broken(problem, method, args):
        if method == "AutoMVN":
            raise RuntimeError("cannot apply\nsecond line")
        return original(problem, method, args)

    original = vi.run_vi
    monkeypatch.setattr(vi, "run_vi", broken)
    rows = vi.main(["--targets", "ring", "--methods", "AutoMVN,AutoNormal", "--steps", "2",
                    "--samples", "50", "--out", str(tmp_path / "vi.json")])
    assert rows[0]["note"] == "failed: RuntimeError: cannot apply"
    assert math.isnan(rows[0]["energy"]) and math.isfinite(rows[1]["energy"])
    assert "failed: RuntimeError" in vi.table(rows)


def test_vi_bench_fits_each_seed_on_one_target_and_summarizes_them(tmp_path, capsys):
    rows = vi.main(
        ["--targets", "ring", "--methods", "AutoNormal", "--steps", "5", "--samples", "100"]
        + ["--fit-seeds", "3,4", "--out", str(tmp_path / "vi.json")]
    )
    assert [r["fit_seed"] for r in rows] == [3, 4]
    assert rows[0]["energy"] != rows[1]["energy"]  # two fits, one set of reference draws
    summary = capsys.readouterr().out.split("over fit seeds 3,4:")[1].splitlines()[2]
    energy = sorted(r["energy"] for r in rows)
    expected = [sum(energy) / 2, sum(energy) / 2, energy[1]]
    assert [float(v) for v in summary.split()[3:6]] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(SystemExit):
        vi.main(["--targets", "ring", "--fit-seeds", "1,x"])
    with pytest.raises(SystemExit):
        vi.main(["--targets", "ring", "--fit-seeds", "1,1"])


def test_vi_bench_rejects_unknown_targets_and_methods():
    with pytest.raises(SystemExit):
        vi.main(["--targets", "nope"])
    with pytest.raises(SystemExit):
        vi.main(["--targets", "ring", "--methods", "AutoNope"])

def test_density_toy_suite_runs_and_writes_its_table_split_and_figure(tmp_path):
    rows = density.main(
        ["--suite", "toy", "--toys", "rings", "--num-train", "600", "--num-test", "300",
         "--epochs", "1", "--components", "3", "--models", "gmm,cwm,nsf-s,cwm-split",
         "--out", str(tmp_path)]
    )
    assert [r["model"] for r in rows] == [
        "gmm-diag (EM)", "cwm", "nsf-s", "cwm [maps frozen]", "cwm [classifier frozen]"
    ]
    for r in rows:
        assert math.isfinite(r["nll"]) and r["gap"] == pytest.approx(r["nll"] - r["exact_nll"])
    # Every CWM starts from the same EM fit.
    assert len({r["nll_em_start"] for r in rows if "nll_em_start" in r}) == 1
    report = json.loads((tmp_path / "toy.json").read_text())
    assert report["classifier_share"][0]["toy"] == "rings"
    assert (tmp_path / "toy-rings.png").exists()


def test_density_digits_suite_runs_in_bits_per_dim(tmp_path):
    rows = density.main(
        ["--suite", "digits", "--epochs", "1", "--num-train", "1437", "--components", "2",
         "--models", "gmm,cwm", "--out", str(tmp_path)]
    )
    assert [r["model"] for r in rows] == ["gmm-diag (EM)", "cwm"]
    # Bits per dimension of 17-level pixels: positive, and near log2(17) = 4.1 at worst.
    assert all(0 < r["bits_per_dim"] < 6 for r in rows)
    assert (tmp_path / "digits.json").exists()


def test_density_step_suite_counts_the_classifier_flops(tmp_path):
    from inference.bench import density_step
    from inference.bench.density_models import MODELS

    cwm = MODELS["cwm"](2, 4)  # classifier 2 -> 64 -> 64 -> 4
    assert density_step.classifier_flops(cwm, 10) == 3 * 2 * 10 * 4 * (2 * 64 + 64 * 64 + 64 * 4)
    rows = density.main(
        ["--suite", "step", "--models", "cwm,nsf-s", "--batch-size", "32", "--components", "4",
         "--out", str(tmp_path)]
    )
    assert rows[0]["fraction_of_peak"] > 0 and rows[1]["classifier_flops"] is None
    assert (tmp_path / "step.json").exists()


def test_vi_step_cost_times_every_guide_on_each_target_and_writes_its_rows(tmp_path):
    out = tmp_path / "step.json"
    rows = vi.main(
        ["--step-cost", "--step-cost-targets", "eight_schools,linreg100",
         "--step-cost-components", "2", "--step-cost-steps", "3", "--out", str(out)]
    )
    assert [(r["target"], r["K"], r["device"]) for r in rows] == [
        ("eight_schools", 2, "cpu"), ("linreg100", 2, "cpu")
    ]
    assert all(r["autonormal_s"] > 0 and r["autocwm_s"] > 0 for r in rows)
    assert all(r["autoiafnormal_s"] > 0 and r["autocwm_auto_s"] > 0 for r in rows)
    assert rows[0]["auto_map"] in ("maf", "iaf", "location_scale")
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit):
        vi.main(["--step-cost", "--step-cost-targets", "ring"])


def test_out_of_core_bench_writes_the_memmap_fits_it_and_reports_the_peak_memory(tmp_path):
    from inference.bench import out_of_core

    path, out = tmp_path / "x.f32", tmp_path / "ooc.json"
    args = ["--rows", "3000", "--dim", "4", "--components", "3", "--iters", "2",
            "--block-rows", "1000", "--path", str(path)]
    assert out_of_core.main([*args, "--make-only"]) is None
    data = np.fromfile(path, dtype=np.float32).reshape(3000, 4)  # three blocks, one stream
    assert np.isfinite(data).all() and len(np.unique(data, axis=0)) == 3000
    record = json.loads((tmp_path / "x.f32.json").read_text())
    assert out_of_core.is_made(path, record)
    assert not out_of_core.is_made(path, {**record, "seed": 1})
    report = out_of_core.main([*args, "--out", str(out), "--delete"])
    assert not path.exists() and json.loads(out.read_text()) == report
    assert report["processes"] == 1 and report["n_iter"] == 2
    assert len(report["seconds_per_iteration"]) == 2 and len(report["lower_bounds"]) == 2
    assert math.isfinite(report["lower_bound"]) and report["lower_bound"] > -20
    process = report["per_process"][0]
    assert process["rows"] == [0, 3000]
    assert process["peak_rss_bytes"] >= process["rss_before_fit_bytes"] > 0
    assert report["peak_rss_bytes"] == process["peak_rss_bytes"]
