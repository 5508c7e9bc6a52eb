"""``pyro-cwm fit-gmm``: report, labels and plot; K chosen by BIC; one-line errors."""

import json

import numpy as np
import pytest

from inference import GaussianMixtureEM
from inference.cli import main
from tests.inference.test_em import three_clusters


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def clusters_csv(tmp_path):
    path = tmp_path / "points.csv"
    np.savetxt(path, three_clusters(600)[0], delimiter=",", header="a,b", comments="")
    return path


def test_writes_report_labels_and_plot_matching_the_estimator(tmp_path, clusters_csv, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(
        ["fit-gmm", str(clusters_csv), "-k", "3", "--covariance-type", "diag", "--out", str(out)],
        capsys,
    )
    assert code == 0 and "fit-gmm: K=3" in stdout
    assert {p.name for p in out.iterdir()} == {"report.json", "labels.csv", "gmm.png"}
    report = json.loads((out / "report.json").read_text())
    x = np.loadtxt(clusters_csv, delimiter=",", skiprows=1)
    ref = GaussianMixtureEM(3, covariance_type="diag", random_state=0).fit(x)
    assert np.allclose(report["means"], ref.means_)
    assert np.allclose(report["covariances"], ref.covariances_)
    assert report["mean_log_likelihood"] == pytest.approx(ref.score(x))
    assert report["bic"] == pytest.approx(ref.bic(x))
    assert np.array_equal(np.loadtxt(out / "labels.csv"), ref.predict(x))


def test_select_k_by_bic_finds_the_three_clusters(tmp_path, clusters_csv, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["fit-gmm", str(clusters_csv), "--select-k", "1..5", "--out", str(out)],
                          capsys)
    assert code == 0 and "chosen by BIC among 1..5" in stdout
    report = json.loads((out / "report.json").read_text())
    bics = [row["bic"] for row in report["scores"]]
    assert [row["k"] for row in report["scores"]] == [1, 2, 3, 4, 5]
    assert report["k"] == 3 == report["scores"][int(np.argmin(bics))]["k"]


def test_built_in_example_in_more_dimensions_writes_no_plot(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((200, 3)))
    code, _, _ = run(["fit-gmm", str(path), "-k", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and not (tmp_path / "o" / "gmm.png").exists()
    code, _, _ = run(
        ["fit-gmm", "--example", "moons", "--num-points", "300", "-k", "4",
         "--out", str(tmp_path / "m")],
        capsys,
    )
    assert code == 0 and (tmp_path / "m" / "gmm.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-k", "1000"], "exceeds the number of points"),
        (["-k", "3", "--reg-covar", "-1"], "reg_covar"),
        (["-k", "3", "--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(clusters_csv, tmp_path, capsys, argv, message):
    code, _, err = run(["fit-gmm", str(clusters_csv), "--out", str(tmp_path), *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_bad_k_range_is_an_argument_error(clusters_csv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit-gmm", str(clusters_csv), "--select-k", "0..3"])
    assert info.value.code == 2
    assert "K values must be >= 1" in capsys.readouterr().err


def test_nan_in_the_file(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("1,2\n3,nan\n4,5\n")
    code, _, err = run(["fit-gmm", str(path), "-k", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "NaN" in err
