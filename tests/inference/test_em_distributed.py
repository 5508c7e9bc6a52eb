"""Data-parallel EM under ``torchrun`` (gloo, CPU, two processes) equals EM in one process.

Each process fits [`GaussianMixtureEM`][inference.GaussianMixtureEM] on its own shard; the
statistics, counts and k-means sums are summed across processes, so every process must end
with the fit of the concatenated data in one process: same parameters (1e-10 in float64),
lower bounds, iterations and labels. One launch runs every case (``distributed_worker.py``);
another gives mismatched shards, which must fail on every process, not hang.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from inference.cli import main
from inference.em.distributed import (
    all_reduce_sum,
    check_shards,
    is_distributed,
    shard_bounds,
    shard_offset,
)
from inference.em.families import SufficientStatistics
from inference.em.kmeans import _draw_by_weight, kmeans_plus_plus
from tests.inference import distributed_worker as worker

WORKER = Path(worker.__file__)
REPO = WORKER.parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def launch(mode: str, directory: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), mode, str(directory),
    ]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One launch for every check: the fits, then the bad shards (the process fails)."""
    directory = tmp_path_factory.mktemp("em-distributed")
    np.save(directory / "data.npy", worker.make_data())
    return directory, launch("all", directory)


def test_single_process_reduction_is_the_identity():
    assert not is_distributed()
    x = torch.arange(3.0)
    assert all_reduce_sum(x) is x
    stats = SufficientStatistics(*(torch.ones(()) for _ in range(5)))
    assert all_reduce_sum(stats) is stats
    check_shards(3, torch.float64)
    with pytest.raises(ValueError, match="bad shard"):
        check_shards(3, torch.float64, ValueError("bad shard"))


def test_weighted_draws_are_inverse_cdf_and_skip_zero_weights():
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    uniforms = torch.tensor([0.0, 0.2, 0.25, 0.9, 1 - 1e-16], dtype=torch.float64)
    assert _draw_by_weight(weights, uniforms, 0, sharded=False).tolist() == [1, 1, 3, 3, 3]
    assert _draw_by_weight(weights, uniforms, 0, sharded=True).tolist() == [1, 1, 3, 3, 3]


def test_kmeans_plus_plus_seeds_are_distinct_rows_of_the_data():
    x = torch.from_numpy(worker.make_data())
    index, seeds = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(0))
    assert index.unique().numel() == 5
    assert torch.equal(seeds, x[index])
    assert shard_bounds(10) == (0, 10) and shard_offset(10) == (0, 10)


def test_torchrun_two_processes_fit_what_one_fits_and_fail_together(launched):
    directory, result = launched
    output = result.stdout + result.stderr
    assert all((directory / f"rank{r}.pt").exists() for r in range(2)), output
    fits = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, source, case in worker.CASES:
        check_fit(directory, name, source, case, fits)
    check_cli(directory, output)
    torch.testing.assert_close(fits[0]["seedless"]["means_"], fits[1]["seedless"]["means_"],
                               rtol=0, atol=0)
    pretrained = worker.pretrain(worker.load(directory, "tensor", 0, worker.make_data().shape[0]))
    streamed = worker.stream(worker.stream_batches(directory, 0, 1))
    references = [("em_pretrain", pretrained), ("partial_fit", streamed)]
    for name, case in worker.EXPERTS:  # mixtures of experts, data-parallel
        references.append((f"experts-{name}", worker.fit_experts(name, case,
                                                                *worker.experts_data())))
    num_points = worker.experts_data()[0].shape[0]
    for rank, rank_fits in enumerate(fits):
        for name, expected in references:
            for key, value in expected.items():
                if key == "gate.concentration" and value.shape[0] == num_points:
                    # A per-sample gate: each process holds its own points' posteriors.
                    value = value[slice(*worker.shard_rows(num_points, rank, 2))]
                torch.testing.assert_close(rank_fits[name][key], value, rtol=1e-10, atol=1e-10,
                                           msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
    # The bad shards: one ValueError on every process, the last one ends the launch.
    assert result.returncode != 0
    assert "same number of features and dtype" in output
    for rank in range(2):
        features = (directory / f"error-features-rank{rank}.txt").read_text()
        assert "rank 0: 3 features, float64, rank 1: 4 features, float64" in features
        dtype = (directory / f"error-dtype-rank{rank}.txt").read_text()
        assert "rank 1: 3 features, float32" in dtype
    found = {"nan": "NaN", "nan-memmap": "NaN", "experts-features": "must have 2 columns"}
    for case, message in found.items():  # found by rank 1, told to rank 0
        assert message in (directory / f"error-{case}-rank1.txt").read_text()
        assert "rank(s) [1] is invalid" in (directory / f"error-{case}-rank0.txt").read_text()


def check_cli(directory: Path, output: str) -> None:
    """``pyro-cwm fit-gmm`` under torchrun: rank 0's report is the one-process report."""
    assert output.count("fit-gmm: K=3") == 1, output  # rank 0 alone reports
    assert main(["fit-gmm", str(directory / "data.npy"), *worker.CLI_ARGS, "--out",
                 str(directory / "cli-one")]) == 0
    got = json.loads((directory / "cli" / "report.json").read_text())
    expected = json.loads((directory / "cli-one" / "report.json").read_text())
    assert (got["processes"], expected["processes"]) == (2, 1)
    for key in ("weights", "means", "covariances", "bic", "mean_log_likelihood"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-10, err_msg=key)
    assert (got["n_iter"], got["converged"]) == (expected["n_iter"], expected["converged"])
    labels = np.loadtxt(directory / "cli" / "labels.csv")
    assert np.array_equal(labels, np.loadtxt(directory / "cli-one" / "labels.csv"))


def check_fit(directory: Path, name: str, source: str, case: dict, fits: list[dict]) -> None:
    """Both processes hold the fit of the whole data set in one process."""
    whole = worker.load(directory, source, 0, worker.make_data().shape[0])
    reference = worker.fit(whole, case)
    tolerance = 1e-4 if case.get("dtype") == "float32" else 1e-10
    for rank, rank_fits in enumerate(fits):
        got = rank_fits[name]
        for key in ("weights_", "means_", "covariances_", "precisions_cholesky_",
                    "lower_bounds_"):
            torch.testing.assert_close(got[key], reference[key], rtol=tolerance, atol=tolerance,
                                       msg=lambda m, key=key, rank=rank: f"{name}, rank {rank}, "
                                       f"{key}: {m}")
        assert got["n_iter_"] == reference["n_iter_"], name
        assert bool(got["converged_"]) == bool(reference["converged_"]), name
    labels = torch.cat([rank_fits[name]["labels"] for rank_fits in fits])
    assert torch.equal(labels, reference["labels"]), name
