"""The pyro-cwm command line: outputs of fit-density and one-line errors for bad files."""

import json
import re

import numpy as np
import pytest
import torch

from inference.cli import main
from pyro_cwm import CWM

FAST = ["--epochs", "2", "--no-progress", "-k", "3", "--hidden", "8"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fit_density_on_a_csv_with_header_writes_model_report_and_plot(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "points.csv"
    np.savetxt(path, rng.standard_normal((300, 2)), delimiter=",", header="a,b", comments="")
    out = tmp_path / "out"
    code, stdout, _ = run(["fit-density", str(path), "--out", str(out), *FAST], capsys)
    assert code == 0 and "fit-density:" in stdout
    assert {p.name for p in out.iterdir()} == {"model.pt", "report.json", "density.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["num_points"] == 300 and report["dim"] == 2 and report["epochs"] == 2
    saved = torch.load(out / "model.pt", weights_only=True)
    cwm = CWM(**saved["config"])
    cwm.load_state_dict(saved["state_dict"])
    assert report["num_parameters"] == sum(p.numel() for p in cwm.parameters())
    data = torch.tensor(np.loadtxt(path, delimiter=",", skiprows=1), dtype=torch.float32)
    with torch.no_grad():
        nll = -cwm().log_prob(data).mean().item()
    assert nll == pytest.approx(report["nll_per_point_all_data"], rel=1e-5)


def test_fit_density_conditional_from_npy(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, (200, 1))
    table = np.hstack([np.sin(x) + 0.1 * rng.standard_normal((200, 1)), x])
    path = tmp_path / "table.npy"
    np.save(path, table)
    out = tmp_path / "out"
    code, _, _ = run(
        ["fit-density", str(path), "--context-columns", "1", "--out", str(out), *FAST], capsys
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dim"] == 1 and report["context_dim"] == 1
    assert (out / "density.png").exists()


def test_fit_density_on_a_built_in_example(tmp_path, capsys):
    code, _, _ = run(
        ["fit-density", "--example", "ring", "--num-points", "400", "--out", str(tmp_path), *FAST],
        capsys,
    )
    assert code == 0 and (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("1,2\n3,oops\n", "cannot read"),
        ("1,2\nnan,3\n", "NaN or inf"),
        ("1,2\n3\n", "cannot read"),
        ("", "cannot read|no data"),
    ],
)
def test_bad_files_give_one_line_and_exit_code_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    code, _, err = run(["fit-density", str(path), "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("pyro-cwm fit-density: error: DATA")
    assert re.search(message, lines[0])


def test_wrong_shapes_and_options_give_exit_code_2(tmp_path, capsys):
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((4, 3, 2)))
    code, _, err = run(["fit-density", str(cube), *FAST], capsys)
    assert code == 2 and "1-D or 2-D" in err
    table = tmp_path / "t.npy"
    np.save(table, np.random.default_rng(0).standard_normal((20, 2)))
    code, _, err = run(["fit-density", str(table), "--context-columns", "2", *FAST], capsys)
    assert code == 2 and "--context-columns" in err
    code, _, err = run(["fit-density", str(table), *FAST[:-4], "-k", "50"], capsys)
    assert code == 2 and "--components" in err
    strings = tmp_path / "s.npy"
    np.save(strings, np.array([["a", "b"]]))
    code, _, err = run(["fit-density", str(strings), *FAST], capsys)
    assert code == 2 and "DATA" in err


def test_argument_errors_exit_with_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit-density", "--example", "nope"])
    assert info.value.code == 2
