"""The EM loop: monotone likelihood, chunk invariance, memmaps and stepwise EM."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import inference.em.readers as readers
from inference import GaussianMixtureEM
from inference.em.families import chunk_statistics, m_step, second_order_features
from inference.em.loop import centered_expectation, expectation, feature_chunks, run_em
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES


def three_clusters(n=900, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, -1.0]])
    sds = np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    labels = rng.integers(0, 3, n)
    return means[labels] + sds[labels] * rng.standard_normal((n, 2)), means, sds


def random_start(x, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    resp = torch.rand(x.shape[0], k, generator=g, dtype=x.dtype)
    resp = resp / resp.sum(1, keepdim=True)
    stats = chunk_statistics(second_order_features(x, kind), resp.T, x.new_zeros(len(x)), kind, 2)
    return m_step(stats, kind, 0.0, 1.0)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_log_likelihood_never_decreases_without_regularization(kind, centered):
    x = torch.tensor(three_clusters()[0])
    run = run_em(
        lambda: [x], random_start(x, 4, kind), kind, max_iter=40, tol=0.0, reg_covar=0.0,
        centered=centered,
    )
    assert run.n_iter == 40
    assert (np.diff(run.lower_bounds) >= -1e-10).all()


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_chunked_statistics_equal_one_pass(kind):
    x = torch.tensor(three_clusters()[0])
    params = random_start(x, 4, kind)
    whole = expectation(feature_chunks([x], kind), params, kind)
    chunked = expectation(feature_chunks(torch.split(x, 77), kind), params, kind)
    for name in ("count", "log_likelihood", "resp", "first", "second"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12)
    whole = centered_expectation([x], params, kind)
    chunked = centered_expectation(torch.split(x, 77), params, kind)
    for name in ("count", "log_likelihood", "resp", "first", "second"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_both_schemes_give_the_same_em_step(kind):
    x = torch.tensor(three_clusters()[0])
    params = random_start(x, 4, kind)
    a = m_step(expectation(feature_chunks([x], kind), params, kind), kind, 1e-6, 1.0)
    b = m_step(centered_expectation([x], params, kind), kind, 1e-6, 1.0)
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12), name


def test_chunk_size_does_not_change_the_fit():
    x = three_clusters()[0]
    a = GaussianMixtureEM(3, random_state=0, tol=1e-8).fit(x)
    b = GaussianMixtureEM(3, random_state=0, tol=1e-8, chunk_size=50).fit(x)
    assert a.n_iter_ == b.n_iter_
    assert np.allclose(a.means_, b.means_, rtol=1e-10)
    assert a.lower_bound_ == pytest.approx(b.lower_bound_, rel=1e-12)


def test_memmap_is_read_in_chunks_and_gives_the_in_memory_fit(tmp_path):
    x = three_clusters(2000)[0]
    path = tmp_path / "x.dat"
    stored = np.memmap(path, dtype=np.float64, mode="w+", shape=x.shape)
    stored[:] = x
    stored.flush()
    mapped = np.memmap(path, dtype=np.float64, mode="r", shape=x.shape)
    options = dict(covariance_type="diag", random_state=0, tol=1e-8, chunk_size=128)
    a = GaussianMixtureEM(3, **options).fit(x)
    b = GaussianMixtureEM(3, **options).fit(mapped)
    assert np.allclose(a.means_, b.means_, rtol=1e-10)
    assert np.allclose(a.score_samples(x), b.score_samples(mapped), rtol=1e-10)


def test_memmap_with_nan_is_refused(tmp_path):
    x = three_clusters(300)[0]
    x[250, 0] = np.nan
    path = tmp_path / "x.dat"
    stored = np.memmap(path, dtype=np.float64, mode="w+", shape=x.shape)
    stored[:] = x
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixtureEM(3, chunk_size=100).fit(stored)


def stored_memmap(x: np.ndarray, path: Path, mode: str = "r") -> np.memmap:
    stored = np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)
    stored[:] = x
    stored.flush()
    del stored
    return np.memmap(path, dtype=x.dtype, mode=mode, shape=x.shape)


NOT_CONVERGED = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@NOT_CONVERGED
@pytest.mark.parametrize("mode", ["r", "r+", "c"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memmap_gives_the_in_memory_results_bit_for_bit(tmp_path, monkeypatch, dtype, mode):
    # Blocks of 3 chunks of 37 rows, and a last block and chunk that are cut short.
    monkeypatch.setattr(readers, "READ_BYTES", 3 * 37 * 2 * np.dtype(dtype).itemsize + 5)
    x = three_clusters(1000)[0].astype(dtype)
    mapped = stored_memmap(x, tmp_path / "x.dat", mode)
    options = dict(covariance_type="diag", random_state=0, tol=0.0, max_iter=5, chunk_size=37)
    a = GaussianMixtureEM(3, n_init=2, **options).fit(x)
    b = GaussianMixtureEM(3, n_init=2, **options).fit(mapped)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.lower_bounds_ == b.lower_bounds_
    assert np.array_equal(a.score_samples(x), b.score_samples(mapped))
    assert np.array_equal(a.predict_proba(x), b.predict_proba(mapped))
    assert np.array_equal(a.predict(x), b.fit_predict(mapped))
    assert np.array_equal(mapped, x)  # the pages dropped after reading come back unchanged


@NOT_CONVERGED
def test_copy_on_write_memmap_is_fitted_with_its_changes_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BYTES", 4096)
    x = three_clusters(3000)[0]
    mapped = stored_memmap(x, tmp_path / "x.dat", "c")
    mapped[::7] += 50.0  # in this process's pages only, not in the file
    changed = np.array(mapped)
    options = dict(random_state=0, tol=0.0, max_iter=4, chunk_size=100)
    a = GaussianMixtureEM(3, **options).fit(changed)
    b = GaussianMixtureEM(3, **options).fit(mapped)
    assert np.array_equal(a.means_, b.means_)
    assert np.array_equal(mapped, changed)


def test_memmap_initialization_rows_are_the_drawn_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BYTES", 1000)  # blocks of 62 rows of 16 bytes
    x = three_clusters(2000)[0]
    mapped = stored_memmap(x, tmp_path / "x.dat")
    data = readers.ChunkedData(mapped, torch.device("cpu"), torch.float64, True)
    rows = data.init_rows(300, torch.Generator().manual_seed(3))
    index = torch.randperm(2000, generator=torch.Generator().manual_seed(3))[:300].sort().values
    assert torch.equal(rows, torch.from_numpy(x)[index])


# Fits and scores a memmap's first sixteenth, then the whole memmap, in a fresh process;
# prints the growth of the peak resident memory from the first to the second (the part that
# grows with the data: the costs that do not, from thread pools to the k-means on the
# initialization rows, are paid by the first), and the file's pages still mapped at the end.
RESIDENT_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from inference import GaussianMixtureEM

    rows, dim, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = []
    for part in (x[: rows // 16], x):
        gm = GaussianMixtureEM(2, covariance_type="diag", init_params="random_from_data",
                               max_iter=2, tol=0.0, random_state=0)
        score = gm.fit(part).score(part)
        peaks.append(peak())
    mapped = 0
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if line[0] in "0123456789abcdef" and " " in line:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                mapped += int(line.split()[1]) * 1024
    print(json.dumps({"growth": peaks[1] - peaks[0], "mapped": mapped, "score": score}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's resident-set counts")
def test_a_pass_over_a_memmap_does_not_leave_the_file_resident(tmp_path):
    # 256 MiB: reading through the mapping alone, the peak resident memory grows by the file.
    rows, dim = 2**21, 32
    path = tmp_path / "big.f32"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(16):
            rng.standard_normal((rows // 16, dim), dtype=np.float32).tofile(f)
    file_bytes = rows * dim * 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-c", RESIDENT_CHILD, str(rows), str(dim), str(path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=repo,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert np.isfinite(report["score"])
    assert report["mapped"] < file_bytes / 64, report
    assert report["growth"] < file_bytes / 4, report


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_stepwise_em_on_a_stream_reaches_the_batch_likelihood(kind):
    x, _, _ = three_clusters(20_000, seed=1)
    batch = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    online = GaussianMixtureEM(3, covariance_type=kind, random_state=0)
    for chunk in np.array_split(x, 100):
        online.partial_fit(chunk)
    assert online.n_iter_ == 100
    assert online.score(x) == pytest.approx(batch.score(x), abs=5e-3)
    order_a, order_b = np.argsort(batch.means_[:, 0]), np.argsort(online.means_[:, 0])
    assert np.allclose(batch.means_[order_a], online.means_[order_b], atol=0.05)


def test_stepwise_em_first_batch_smaller_than_k():
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixtureEM(5).partial_fit(np.zeros((3, 2)))


def test_partial_fit_checks_the_number_of_features():
    gm = GaussianMixtureEM(2, random_state=0).partial_fit(three_clusters(100)[0])
    with pytest.raises(ValueError, match="features"):
        gm.partial_fit(np.zeros((10, 3)))
