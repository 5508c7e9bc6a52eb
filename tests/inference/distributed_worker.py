"""A worker of the data-parallel EM tests, started by ``torchrun`` (see test_em_distributed.py).

    torchrun --standalone --nproc_per_node=2 tests/inference/distributed_worker.py MODE DIR

Every process joins a gloo group (60 s timeout, by ``process_group_from_environment``, as
the command line does), fits on its shard of the data set that
``DIR/data.npy`` holds (rows split unevenly, in rank order) and writes what it got to
``DIR/rank<r>.pt``. MODE ``fit`` runs every case of ``CASES``; MODE ``errors`` gives
mismatched or invalid shards and records each error, the last one uncaught (so the process
exits non-zero); MODE ``all`` runs the fits, ``pyro-cwm fit-gmm`` with ``CLI_ARGS`` (writing
to ``DIR/cli``) and the errors (one launch). The test runs the
same cases in one process on the whole data set and compares; ``CASES``, ``options`` and
``fit`` are shared with it.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch

import inference.em.estimator as estimator
from inference import GaussianMixtureEM, em_pretrain, fit_experts_em
from inference.cli import main as main_cli
from inference.em.distributed import process_group_from_environment
from pyro_cwm import CWM
from pyro_cwm.data import two_planes
from pyro_cwm.models import MixtureOfExperts, ModuleExperts, PullPriorMeans

FAMILIES = ("full", "tied", "diag", "spherical", "constant")
SPLIT = 0.43  # rank 0's share of the rows: shards of different sizes


def make_data(n: int = 300, seed: int = 0) -> np.ndarray:
    """Three clusters in 3-D, float64 (n, 3)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 3.0, 1.0]])
    labels = rng.integers(0, 3, n)
    return centers[labels] + rng.normal(scale=[1.0, 0.6, 0.8], size=(n, 3))


# (name, source, options): source "tensor" (in memory) or "memmap" (read in chunks; the
# initialization then draws at most 200 of the 300 rows, the memory-mapped path).
CASES = [
    *[(f"{kind}-tensor", "tensor", {"covariance_type": kind, "init_params": "k-means++",
                                    "n_init": 2}) for kind in FAMILIES],
    *[(f"{kind}-memmap", "memmap", {"covariance_type": kind, "n_init": 2, "chunk_size": 37})
      for kind in FAMILIES],
    ("random-init", "tensor", {"init_params": "random", "covariance_type": "diag"}),
    ("random-from-data", "memmap", {"init_params": "random_from_data", "n_init": 3}),
    # A fixed number of steps: no float32 tolerance stops one process and two at the same
    # step (two processes sum in another order; at tol 1e-8 they alternate by an ulp).
    ("float32", "tensor", {"dtype": "float32", "init_params": "k-means++", "n_init": 2,
                           "tol": 0.0, "max_iter": 30}),
]
MEMMAP_INIT_ROWS = 200


CLI_ARGS = ["-k", "3", "--covariance-type", "diag", "--n-init", "2", "--init-params",
            "k-means++", "--tol", "1e-8", "--seed", "5"]


def options(case: dict) -> dict:
    return {"n_components": 3, "random_state": 7, "tol": 1e-8, "max_iter": 200, **case}


def fit(X, case: dict) -> dict[str, torch.Tensor]:
    """Fit on ``X`` (a shard, or the whole data set) and return what is compared."""
    gm = GaussianMixtureEM(**options(case))
    saved, estimator.MEMMAP_INIT_ROWS = estimator.MEMMAP_INIT_ROWS, MEMMAP_INIT_ROWS
    try:
        labels = gm.fit_predict(X)
    finally:
        estimator.MEMMAP_INIT_ROWS = saved
    out = {
        name: torch.as_tensor(np.asarray(getattr(gm, name)))
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_")
    }
    out["labels"] = torch.as_tensor(np.asarray(labels))
    out["lower_bound_"] = torch.tensor(gm.lower_bound_)
    out["lower_bounds_"] = torch.tensor(gm.lower_bounds_)
    out["n_iter_"] = torch.tensor(gm.n_iter_)
    out["converged_"] = torch.tensor(gm.converged_)
    return out


def shard_rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the data set that process ``rank`` of ``size`` holds."""
    cut = int(SPLIT * n)
    bounds = [0, cut, n] if size == 2 else np.linspace(0, n, size + 1).astype(int).tolist()
    return bounds[rank], bounds[rank + 1]


def load(directory: Path, source: str, start: int, stop: int):
    data = np.load(directory / "data.npy", mmap_mode="r")
    if source == "memmap":
        return data[start:stop]  # a numpy.memmap of this shard's rows
    return torch.from_numpy(np.array(data[start:stop]))


def stream(batches: list) -> dict[str, torch.Tensor]:
    """Stepwise EM: ``partial_fit`` on each batch in turn (k-means++ start, diag)."""
    gm = GaussianMixtureEM(3, covariance_type="diag", init_params="k-means++", random_state=1)
    for batch in batches:
        gm.partial_fit(batch)
    return {"means_": gm.means_, "covariances_": gm.covariances_, "weights_": gm.weights_,
            "lower_bound_": torch.tensor(gm.lower_bound_)}


def stream_batches(directory: Path, rank: int, size: int) -> list[torch.Tensor]:
    """Three minibatches of 100 rows; this process's share of each (all of it in one)."""
    data = torch.from_numpy(np.load(directory / "data.npy"))
    batches = torch.split(data, 100)
    return [b[slice(*shard_rows(len(b), rank, size))] for b in batches]


# Mixtures of experts: (name, constructor options); float64 two planes.
EXPERTS = [
    ("softmax", {"gate": "softmax", "n_init": 2, "max_iter": 8}),
    ("dirichlet-hyper", {"gate": "dirichlet", "optimize": ("noise", "prior_mean", "prior_cov"),
                         "regularizer": PullPriorMeans(0.5), "max_iter": 25}),
    ("modules", {"gate": "dirichlet", "max_iter": 10}),
    ("hard", {"gate": "dirichlet", "mode": "hard", "n_init": 2, "max_iter": 12}),
    ("per-sample", {"gate": "per_sample", "max_iter": 15}),
]


def experts_data(rank: int = 0, size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y, _ = two_planes(150, seed=3, dtype=torch.float64)
    start, stop = shard_rows(X.shape[0], rank, size)
    return X[start:stop], Y[start:stop]


def fit_experts(name: str, case: dict, X, Y) -> dict[str, torch.Tensor]:
    """The state and trace of a mixture of experts fitted by ``fit_experts_em``."""
    torch.manual_seed(0)  # the modules' first parameters
    case = dict(case)
    if name == "modules":
        modules = [torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)]
        case["experts"] = ModuleExperts(modules, 2, steps=20, lr=0.1)
    model = MixtureOfExperts(2, 2, seed=4, tol=1e-8, **case)
    fit_experts_em(model, X, Y)
    return {**model.state_dict(), "lower_bound": torch.tensor(model.history_["lower_bound"]),
            "log_likelihood": torch.tensor(model.history_["log_likelihood"])}


def pretrain(X) -> dict[str, torch.Tensor]:
    """The state of a CWM started by ``em_pretrain`` on ``X``."""
    torch.manual_seed(0)  # the classifier's hidden layer, which the pretraining keeps
    cwm = CWM(X.shape[1], 3).double()
    em_pretrain(cwm, X, random_state=3, n_init=2)
    return cwm.state_dict()


def run_fits(directory: Path, rank: int, size: int) -> dict:
    start, stop = shard_rows(np.load(directory / "data.npy", mmap_mode="r").shape[0], rank, size)
    results = {name: fit(load(directory, source, start, stop), case) for name, source, case in
               CASES}
    results["em_pretrain"] = pretrain(load(directory, "tensor", start, stop))
    results["partial_fit"] = stream(stream_batches(directory, rank, size))
    for name, case in EXPERTS:
        results[f"experts-{name}"] = fit_experts(name, case, *experts_data(rank, size))
    gm = GaussianMixtureEM(2, random_state=None).fit(load(directory, "tensor", start, stop))
    results["seedless"] = {"means_": gm.means_}  # rank 0's seed: the same fit everywhere
    if rank == 0:  # the methods other than fitting are local: rank 0 alone may call them
        gm.sample(4), gm.score(gm.means_), gm.bic(gm.means_), gm.predict_proba(gm.means_)
    return results


def run_errors(directory: Path, rank: int, size: int) -> dict:
    """Bad shards; every error is recorded, the last (mismatched widths) is raised."""
    data = torch.from_numpy(np.load(directory / "data.npy"))
    start, stop = shard_rows(data.shape[0], rank, size)
    shard = data[start:stop]
    errors = {}
    if rank == 1:
        np.save(directory / "nan-rank1.npy", np.where(np.arange(len(shard))[:, None] == 5,
                                                      np.nan, shard.numpy()))
        nan_memmap = np.load(directory / "nan-rank1.npy", mmap_mode="r")
    else:
        nan_memmap = np.load(directory / "data.npy", mmap_mode="r")[start:stop]
    bad = {
        "dtype": shard.float() if rank == 1 else shard,
        "nan-memmap": nan_memmap,
        "nan": torch.where(torch.arange(len(shard))[:, None] == 3, torch.nan, shard)
        if rank == 1 else shard,
        "features": torch.cat([shard, shard[:, :1]], 1) if rank == 1 else shard,
    }
    X, Y = experts_data(rank, size)
    experts = {  # a mixture of experts: rank 1's X has a column too many
        "experts-features": (MixtureOfExperts(2, 2, gate="dirichlet"),
                             torch.cat([X, X[:, :1]], 1) if rank == 1 else X, Y),
    }
    fits = [(name, lambda X=X: GaussianMixtureEM(3, random_state=0).fit(X))
            for name, X in bad.items()]
    fits[-1:-1] = [(name, lambda a=args: fit_experts_em(*a)) for name, args in experts.items()]
    for name, run in fits:
        try:
            run()
        except ValueError as error:
            errors[name] = str(error)
            (directory / f"error-{name}-rank{rank}.txt").write_text(str(error))
            if name == "features":
                raise
    return errors


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    with process_group_from_environment(torch.device("cpu"), timeout=timeout):
        rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if mode in ("fit", "all"):
            torch.save(run_fits(directory, rank, size), directory / f"rank{rank}.pt")
        if mode == "all":
            code = main_cli(["fit-gmm", str(directory / "data.npy"), *CLI_ARGS, "--out",
                             str(directory / "cli")])
            if code != 0:
                raise SystemExit(code)
        if mode in ("errors", "all"):
            run_errors(directory, rank, size)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
