"""``GaussianMixtureEM``: Gaussian mixtures fitted by EM, with scikit-learn's API, on torch.

The estimator keeps scikit-learn's constructor, methods, fitted attributes and sign
conventions (``sklearn.mixture.GaussianMixture``), and runs the EM loop of
``inference.em.loop`` on torch tensors wherever they live (CUDA included). Inputs may be
numpy arrays (results come back as numpy arrays), torch tensors (results stay tensors on
the fitted device) or memory-mapped arrays larger than memory (read in chunks, at a resident
memory that does not grow with the file: see ``inference.em.readers``).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from inference.em.distributed import (
    all_reduce_sum,
    check_shards,
    is_distributed,
    rank_and_size,
    shard_offset,
    shared_seed,
)
from inference.em.estep import origin_is_accurate
from inference.em.families import (
    GaussianMixtureParameters,
    SufficientStatistics,
    centered_statistics,
    chunk_statistics,
    covariances_from_cholesky,
    feature_width,
    m_step,
    num_parameters,
    precision_cholesky_from_precisions,
    precisions_from_cholesky,
    scale_from_covariances,
    second_order_features,
)
from inference.em.kmeans import kmeans, kmeans_plus_plus
from inference.em.loop import (
    expectation,
    feature_chunks,
    run_em,
    stepwise_statistics,
    weighted_log_probs,
)
from inference.em.readers import ChunkedData
from pyro_cwm.distributions.gaussian_mixture import (
    COVARIANCE_TYPES,
    GaussianMixture,
    check_covariance_type,
)

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
MEMMAP_INIT_ROWS = 100_000  # rows of a memory-mapped array used to initialize


def _distinct_rows(x: Tensor, sharded: bool) -> int:
    """The number of distinct rows of ``x`` (n, d), of every process's ``x`` if ``sharded``."""
    unique = torch.unique(x, dim=0)
    if not sharded:
        return unique.shape[0]
    offset, total = shard_offset(unique.shape[0])
    gathered = unique.new_zeros(total, x.shape[1])
    gathered[offset : offset + unique.shape[0]] = unique
    return torch.unique(all_reduce_sum(gathered), dim=0).shape[0]


class GaussianMixtureEM(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by EM: scikit-learn's ``GaussianMixture`` API on torch.

    Parameters, methods and fitted attributes are scikit-learn's unless said otherwise. The
    data may be a numpy array, a tensor (fitted on its device) or a ``numpy.memmap``, read in
    blocks and never loaded whole (``inference.em.readers``; the results are bit for bit
    those of the array in memory). Fitted attributes (``weights_``, ``means_``, ...) are
    numpy arrays after a fit on numpy data, else tensors on the fitting device. Under
    ``torchrun``, [`fit`][inference.GaussianMixtureEM.fit], ``fit_predict`` and
    ``partial_fit`` take this process's shard; every process ends with the fit of them all.

    Args:
        n_components: number of components K.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"`` or
            ``"constant"`` (every component ``constant_variance * I``, not estimated).
        tol: convergence threshold on the change of the mean log-likelihood.
        reg_covar: added to the diagonal of the covariances (keeps them positive definite).
        max_iter: EM iterations per initialization.
        n_init: initializations; the one with the best lower bound is kept.
        init_params: ``"kmeans"``, ``"k-means++"``, ``"random"`` or ``"random_from_data"``.
        weights_init (numpy.ndarray | torch.Tensor | None): initial weights (K,).
        means_init (numpy.ndarray | torch.Tensor | None): initial means (K, d).
        precisions_init (numpy.ndarray | torch.Tensor | None): scikit-learn's, per family.
        random_state (int | numpy.random.RandomState | None): seed (None: rank 0's seed).
        warm_start: start the next ``fit`` from the last solution.
        verbose: 0 silent; 1 shows a progress bar per initialization.
        constant_variance: the fixed variance of the ``"constant"`` family.
        chunk_size: rows per E-step chunk (memory; not results); None: sized to the device.
        learning_decay: ``decay`` in (0.5, 1] of the steps ``(t + offset) ** -decay`` of
            [`partial_fit`][inference.GaussianMixtureEM.partial_fit].
        learning_offset: ``offset`` in those step sizes.
        device (torch.device | str | None): where to fit; None: the input's device (or CPU).
        dtype (torch.dtype | str | None): float32 or float64; None: the input's float dtype.

    Raises:
        ValueError: an invalid parameter (named), NaN/inf or non-2-D data, fewer points than
            components, a covariance not positive definite (increase ``reg_covar``); under a
            process group a bad shard raises on every process.
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start: bool = False,
        verbose: int = 0,
        constant_variance: float = 1.0,
        chunk_size: int | None = None,
        learning_decay: float = 0.7,
        learning_offset: float = 2.0,
        device=None,
        dtype=None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.constant_variance = constant_variance
        self.chunk_size = chunk_size
        self.learning_decay = learning_decay
        self.learning_offset = learning_offset
        self.device = device
        self.dtype = dtype

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_params")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # ----------------------------------------------------------------- checks and data

    def _check_parameters(self) -> None:
        def check_int(name, value, low):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def check_real(name, value, low, strict=False):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < low or (strict and value == low):
                relation = ">" if strict else ">="
                raise ValueError(f"{name} must be a finite number {relation} {low}, got {value!r}")

        check_int("n_components", self.n_components, 1)
        check_int("max_iter", self.max_iter, 0)
        check_int("n_init", self.n_init, 1)
        check_real("tol", self.tol, 0.0)
        check_real("reg_covar", self.reg_covar, 0.0)
        check_real("constant_variance", self.constant_variance, 0.0, strict=True)
        check_real("learning_offset", self.learning_offset, 0.0)
        if not (isinstance(self.learning_decay, numbers.Real) and 0.5 < self.learning_decay <= 1):
            raise ValueError(f"learning_decay must be in (0.5, 1], got {self.learning_decay!r}")
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 1)
        check_covariance_type(self.covariance_type)
        if self.init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {INIT_PARAMS}, got {self.init_params!r}")

    def _torch_dtype(self, default: torch.dtype) -> torch.dtype:
        if self.dtype is None:
            return default
        names = {"float32": torch.float32, "float64": torch.float64}
        dtype = names.get(str(self.dtype).replace("torch.", ""), self.dtype)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        return dtype

    def _validate(self, X, *, reset: bool, min_rows: int = 1) -> ChunkedData:
        """Check ``X`` and wrap it for the fitting device and dtype."""
        if reset or not self.__sklearn_is_fitted__():
            device = torch.device(self.device) if self.device is not None else None
            fitted_dtype = None
        else:
            device, fitted_dtype = self._params.means.device, self._params.means.dtype
        if isinstance(X, Tensor):
            values, is_numpy = self._validate_tensor(X, min_rows), False
            default = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float64
            device = device or X.device
        elif isinstance(X, np.memmap):
            if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
                raise ValueError(f"X must be a 2-D numeric array, got {X.ndim}-D {X.dtype}")
            if X.shape[0] < min_rows:
                raise ValueError(f"X must have at least {min_rows} rows, got {X.shape[0]}")
            values, is_numpy = X, True
            default = torch.float32 if X.dtype == np.float32 else torch.float64
        else:
            array = validate_data(
                self,
                X,
                dtype=[np.float64, np.float32],
                ensure_min_samples=min_rows,
                reset=reset,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                values = torch.from_numpy(np.ascontiguousarray(array))
            values, is_numpy = values, True
            default = values.dtype
        if isinstance(values, Tensor) or isinstance(X, np.memmap):
            self._check_n_features(values.shape[1], reset)
        dtype = fitted_dtype or self._torch_dtype(default)
        return ChunkedData(values, device or torch.device("cpu"), dtype, is_numpy)

    def _validate_shard(self, X, *, reset: bool, min_rows: int) -> ChunkedData:
        """``_validate`` for fitting: under a process group, every process's shard is
        checked together (same width and dtype), so that a bad shard raises a ValueError on
        every process instead of leaving the others waiting."""
        data, error = None, None
        try:
            data = self._validate(X, reset=reset, min_rows=min_rows)
        except ValueError as caught:
            if not is_distributed():
                raise
            error = caught
        if data is None:
            check_shards(0, torch.float64, error)  # raises on every process
        else:
            check_shards(data.dim, data.dtype)
        return data.shard()

    def _validate_tensor(self, X: Tensor, min_rows: int) -> Tensor:
        if X.is_complex():
            raise ValueError("Complex data not supported: X must be real")
        if not (X.is_floating_point() or X.dtype in (torch.int32, torch.int64, torch.bool)):
            raise ValueError(f"X must be a real tensor, got dtype {X.dtype}")
        if X.dim() != 2:
            raise ValueError(
                f"Expected 2D tensor X of shape (n_samples, n_features), got {X.dim()}-D "
                f"{tuple(X.shape)}"
            )
        if X.shape[0] < min_rows:
            raise ValueError(f"X must have at least {min_rows} rows, got {X.shape[0]}")
        if not torch.isfinite(X).all():
            raise ValueError("Input X contains NaN or infinity.")
        return X

    def _check_n_features(self, n_features: int, reset: bool) -> None:
        if reset:
            self.n_features_in_ = n_features
        elif n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _chunk_size(self, dim: int, device: torch.device, dtype: torch.dtype) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # Rows whose E-step buffers (features and log-densities, see inference.em.estep)
        # take about 4 MB per thread on a CPU (cache sized; with more threads, fewer
        # parallel regions, which a loaded machine makes expensive), 2**26 numbers on a
        # GPU (few kernel launches). The centered scheme cuts a chunk further
        # (inference.em.loop).
        kind = self.covariance_type
        width = (dim + 1 if kind == "tied" else feature_width(dim, kind)) + self.n_components
        if device.type == "cuda":
            return max(256, 2**26 // width)
        budget = 2**22 * torch.get_num_threads()
        return max(256, budget // (width * dtype.itemsize))

    def _centered(self, dtype: torch.dtype) -> bool:
        """Whether E-steps of the fitted model (scoring, labels) whiten every difference.

        In float32 unless the fitted parameters keep the moments about the origin accurate
        (``inference.em.estep.origin_is_accurate``, the EM loop's own rule); never in
        float64. See inference.em.estep.
        """
        if dtype != torch.float32:
            return False
        params = self._params.shifted(self._shift)
        return not origin_is_accurate(params, self.covariance_type)

    def _generator(self, shared: bool = False) -> torch.Generator:
        """A CPU generator seeded from ``random_state``; ``shared``: under a process group,
        with rank 0's seed (a collective: for the fitting methods, which every process
        calls)."""
        state = self.random_state
        if isinstance(state, np.random.RandomState):
            seed = int(state.randint(2**31 - 1))
        elif state is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        elif isinstance(state, numbers.Integral):
            seed = int(state)
        else:
            raise ValueError(f"random_state must be None, an int or a RandomState, got {state!r}")
        return torch.Generator().manual_seed(shared_seed(seed) if shared else seed)

    def _user_tensor(self, name: str, value, shape: tuple, like: Tensor) -> Tensor:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
        tensor = tensor.to(device=like.device, dtype=like.dtype)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or inf")
        return tensor

    # ------------------------------------------------------------------ initialization

    def _initial_parameters(
        self, data: ChunkedData, shift: Tensor, generator: torch.Generator
    ) -> GaussianMixtureParameters:
        """Parameters (of the data shifted by ``-shift``) from ``init_params``/``*_init``."""
        given = (self.weights_init, self.means_init, self.precisions_init)
        if all(value is not None for value in given) and self.covariance_type != "constant":
            # Everything is given: what init_params would compute is overridden anyway.
            k, d = self.n_components, data.dim
            like = torch.zeros((), dtype=data.dtype, device=data.device)
            return self._apply_user_init(
                GaussianMixtureParameters(like.new_zeros(k), like.new_zeros(k, d), like, like),
                shift,
            )
        x = data.init_rows(MEMMAP_INIT_ROWS, generator) - shift
        n, k, kind = x.shape[0], self.n_components, self.covariance_type
        # Under a process group x is this process's part of the initialization rows; every
        # draw below is made for all of them, from the same generator on every process.
        sharded = is_distributed()
        offset, total = shard_offset(n) if sharded else (0, n)
        if self.init_params == "kmeans":
            labels = kmeans(x, k, generator, sharded=sharded)[1]
            counts = all_reduce_sum(torch.bincount(labels, minlength=k))
            if counts.min() == 0:
                distinct = _distinct_rows(x, sharded)
                if distinct < k:
                    raise ValueError(
                        f"n_components ({k}) is larger than the number of distinct points "
                        f"({distinct}): k-means cannot initialize every component"
                    )
            resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        elif self.init_params == "random":
            resp = torch.rand(total, k, generator=generator, dtype=x.dtype)[offset : offset + n]
            resp = resp.to(x.device)
            resp = resp / resp.sum(1, keepdim=True)
        else:
            if self.init_params == "k-means++":
                index = kmeans_plus_plus(x, k, generator, sharded=sharded)[0]
            else:
                index = torch.randperm(total, generator=generator)[:k].to(x.device)
            index = index - offset
            mine = (index >= 0) & (index < n)  # the seeds in this shard
            resp = x.new_zeros(n, k)
            resp[index[mine], torch.arange(k, device=x.device)[mine]] = 1.0
        params = m_step(self._statistics(x, resp), kind, self.reg_covar, self.constant_variance)
        return self._apply_user_init(params, shift)

    def _statistics(self, x: Tensor, resp: Tensor) -> SufficientStatistics:
        """Statistics of in-memory data (n, d) with given responsibilities (n, K)."""
        kind, size = self.covariance_type, self._chunk_size(x.shape[1], x.device, x.dtype)
        zeros = x.new_zeros(x.shape[0])
        pieces = zip(torch.split(x, size), torch.split(resp, size), torch.split(zeros, size))
        if x.dtype != torch.float32:
            parts = (
                chunk_statistics(second_order_features(xc, kind), rc.T, lc, kind, x.shape[1])
                for xc, rc, lc in pieces
            )
        else:  # moments about the responsibility-weighted means, for accuracy
            moment, mass = all_reduce_sum([resp.T @ x, resp.sum(0)])
            center = moment / (mass + 10 * torch.finfo(x.dtype).eps).unsqueeze(-1)
            parts = (
                centered_statistics(xc.unsqueeze(0) - center.unsqueeze(1), rc.T, lc, kind, center)
                for xc, rc, lc in pieces
            )
        return all_reduce_sum(functools.reduce(operator.add, parts))

    def _apply_user_init(
        self, params: GaussianMixtureParameters, shift: Tensor
    ) -> GaussianMixtureParameters:
        k, d, kind = self.n_components, params.means.shape[1], self.covariance_type
        like = params.means
        if self.weights_init is not None:
            weights = self._user_tensor("weights_init", self.weights_init, (k,), like)
            if (weights < 0).any() or (weights > 1).any():
                raise ValueError("weights_init must be in [0, 1]")
            if abs(weights.sum().item() - 1.0) > 1e-6:
                raise ValueError(f"weights_init must sum to 1, got {weights.sum().item():.6g}")
            params.weights = weights
        if self.means_init is not None:
            params.means = self._user_tensor("means_init", self.means_init, (k, d), like) - shift
        if self.precisions_init is not None:
            if kind == "constant":
                raise ValueError("precisions_init is not used by the 'constant' family")
            shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[kind]
            precisions = self._user_tensor("precisions_init", self.precisions_init, shape, like)
            params.precisions_cholesky = precision_cholesky_from_precisions(precisions, kind)
            params.covariances = covariances_from_cholesky(params.precisions_cholesky, kind)
        return params

    # ------------------------------------------------------------------------- fitting

    def fit(self, X, y=None) -> GaussianMixtureEM:
        """Fit by EM, ``n_init`` times from different starts, keep the best; returns self.

        Under a process group ``X`` is this process's shard (the shards in rank order are
        the data set). The sums of the E-steps, of the initialization and of the convergence
        test go through [`all_reduce_sum`][inference.em.distributed.all_reduce_sum]: every
        process must call ``fit`` with the same parameters (``random_state=None`` takes rank
        0's seed). Methods other than the fits act on this process's data only.

        Args:
            X (numpy.ndarray | torch.Tensor): data (N, d): numpy array, torch tensor
                (fitted on its device unless ``device`` is set) or ``numpy.memmap`` (read
                in chunks at a resident memory that does not grow with the file).
            y (None): ignored.
        """
        self._fit(X)
        return self

    def fit_predict(self, X, y=None):
        """Fit and return the component labels of ``X`` (N,).

        Fits as [`fit`][inference.GaussianMixtureEM.fit] does, then labels ``X`` by one more
        E-step (so that ``fit_predict(X)`` equals ``fit(X).predict(X)``).
        """
        data = self._fit(X)
        return self._output(self._per_chunk(data, lambda log_joint: log_joint.argmax(-1)), data)

    def _fit(self, X) -> ChunkedData:
        """``fit``; returns the validated data."""
        self._check_parameters()
        do_init = not (self.warm_start and self.__sklearn_is_fitted__())
        data = self._validate_shard(X, reset=do_init, min_rows=2)
        if data.total_rows < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {data.total_rows}"
            )
        size = self._chunk_size(data.dim, data.device, data.dtype)
        shift = data.mean(size)
        chunks = data.chunks(size, shift)
        generator = self._generator(shared=True)
        kind = self.covariance_type
        best, best_bound = None, -math.inf
        for _ in range(self.n_init if do_init else 1):
            if do_init:
                start, bound = self._initial_parameters(data, shift, generator), -math.inf
            else:
                start = self._params.to(device=data.device, dtype=data.dtype).shifted(shift)
                bound = self.lower_bound_
            run = run_em(
                lambda: chunks,
                start,
                kind,
                max_iter=self.max_iter,
                tol=self.tol,
                reg_covar=self.reg_covar,
                constant_variance=self.constant_variance,
                lower_bound=bound,
                progress=self.verbose > 0 and rank_and_size()[0] == 0,
                centered=None,  # per iteration: inference.em.estep.origin_is_accurate
            )
            if best is None or run.lower_bound > best_bound:
                best, best_bound = run, run.lower_bound
        if not best.converged and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._shift = shift
        self._publish(best.params.shifted(-shift), data.is_numpy)
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best_bound
        self.lower_bounds_ = best.lower_bounds
        self._centered_steps = best.centered_steps  # a diagnostic (inference.bench.em)
        return data

    def partial_fit(self, X, y=None) -> GaussianMixtureEM:
        """One stepwise-EM update from a minibatch ``X`` (N_b, d); returns self.

        The first call initializes from ``X`` with ``init_params`` (and ``*_init``); each
        call then runs an E-step on ``X``, mixes its per-point statistics into the
        running ones with step size ``(t + learning_offset) ** -learning_decay`` (the
        first call: 1), and runs an M-step. For data that arrive as a stream:

            for chunk in stream:
                gm.partial_fit(chunk)

        ``n_iter_`` counts the updates and ``lower_bound_`` is the mean log-likelihood
        of the last minibatch before its update.
        """
        self._check_parameters()
        first = not (self.__sklearn_is_fitted__() and hasattr(self, "_running"))
        data = self._validate_shard(X, reset=first, min_rows=1)
        size = self._chunk_size(data.dim, data.device, data.dtype)
        kind = self.covariance_type
        if first:
            if data.total_rows < self.n_components:
                raise ValueError(
                    "the first partial_fit batch needs n_samples >= n_components, got "
                    f"n_components = {self.n_components}, n_samples = {data.total_rows}"
                )
            shift = data.mean(size)
            params = self._initial_parameters(data, shift, self._generator(shared=True))
            self._running, self._updates, self._shift = None, 0, shift
        else:
            shift = self._shift
            params = self._params.shifted(shift)
        stats = expectation(feature_chunks(data.chunks(size, shift), kind), params, kind)
        stats = all_reduce_sum(stats)  # the minibatches of every process
        step = (self._updates + self.learning_offset) ** -self.learning_decay
        self._running = stepwise_statistics(self._running, stats, step)
        params = m_step(self._running, kind, self.reg_covar, self.constant_variance)
        self._updates += 1
        self._publish(params.shifted(-shift), data.is_numpy)
        self.converged_ = False
        self.n_iter_ = self._updates
        self.lower_bound_ = (stats.log_likelihood / stats.count).item()
        self.lower_bounds_ = [*getattr(self, "lower_bounds_", [])[-999:], self.lower_bound_]
        return self

    # --------------------------------------------------------------------- publishing

    def _publish(self, params: GaussianMixtureParameters, as_numpy: bool) -> None:
        self._params = params
        kind = self.covariance_type
        values = {
            "weights_": params.weights,
            "means_": params.means,
            "covariances_": params.covariances,
            "precisions_": precisions_from_cholesky(params.precisions_cholesky, kind),
            "precisions_cholesky_": params.precisions_cholesky,
        }
        for name, value in values.items():
            setattr(self, name, value.cpu().numpy() if as_numpy else value)

    def _output(self, tensor: Tensor, data: ChunkedData):
        return tensor.cpu().numpy() if data.is_numpy else tensor

    def parameters(self) -> GaussianMixtureParameters:
        """The fitted parameters as tensors on the fitting device."""
        check_is_fitted(self)
        return self._params

    def distribution(self) -> GaussianMixture:
        """The fitted mixture as a distribution, on the fitting device.

        A [`GaussianMixture`][pyro_cwm.distributions.GaussianMixture].
        """
        check_is_fitted(self)
        p, kind = self._params, self.covariance_type
        return GaussianMixture(
            p.means, scale_from_covariances(p.covariances, kind), kind, probs=p.weights
        )

    # ----------------------------------------------------------------------- inference

    def _per_chunk(self, data: ChunkedData, reduce) -> Tensor:
        """``reduce`` of the weighted log-densities (n, K) of every chunk, row by row.

        The (N, K) table of all the points is never held (unless ``reduce`` keeps it). The
        rows go straight into one output tensor: many small results kept between the large
        temporaries of the chunks would fragment the heap (hundreds of MB of it resident
        for N = 4M).
        """
        params = self._params.shifted(self._shift)
        size = self._chunk_size(data.dim, data.device, data.dtype)
        centered, out, start = self._centered(data.dtype), None, 0
        for x in data.chunks(size, self._shift):
            part = reduce(weighted_log_probs(x, params, self.covariance_type, centered))
            if out is None:
                out = part.new_empty((data.num_rows, *part.shape[1:]))
            out[start : start + part.shape[0]] = part
            start += part.shape[0]
        return out

    def _log_densities(self, data: ChunkedData) -> Tensor:
        return self._per_chunk(data, lambda log_joint: torch.logsumexp(log_joint, -1))

    def _prepare(self, X) -> ChunkedData:
        check_is_fitted(self)
        return self._validate(X, reset=False)

    def score_samples(self, X):
        """Log-density of every point of ``X`` (N,)."""
        data = self._prepare(X)
        return self._output(self._log_densities(data), data)

    def score(self, X, y=None) -> float:
        """Mean log-likelihood of ``X`` (higher is better, as in scikit-learn)."""
        data = self._prepare(X)
        return self._log_densities(data).mean().item()

    def predict(self, X):
        """The most probable component of every point (N,)."""
        data = self._prepare(X)
        return self._output(self._per_chunk(data, lambda log_joint: log_joint.argmax(-1)), data)

    def predict_proba(self, X):
        """Responsibilities ``p(k | x_n)``, shape (N, K), rows summing to one."""
        data = self._prepare(X)
        resp = self._per_chunk(data, lambda log_joint: torch.softmax(log_joint, -1))
        return self._output(resp, data)

    def sample(self, n_samples: int = 1):
        """Draw ``(X, y)``: ``n_samples`` points (n, d) and their components (n,).

        Deterministic for an int ``random_state``, like scikit-learn's. Returned as numpy
        arrays if the model was fitted on numpy data, else as tensors.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        dist = self.distribution()
        device = self._params.means.device
        seed = int(torch.randint(2**62, (1,), generator=self._generator()))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x, k = dist.sample_with_components((n_samples,))
        if isinstance(self.means_, np.ndarray):
            return x.cpu().numpy(), k.cpu().numpy()
        return x, k

    def _n_parameters(self) -> int:
        return num_parameters(self.covariance_type, self.n_components, self.n_features_in_)

    def bic(self, X) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        n = self._prepare(X).num_rows
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        n = self._prepare(X).num_rows
        return -2 * self.score(X) * n + 2 * self._n_parameters()


__all__ = ["COVARIANCE_TYPES", "INIT_PARAMS", "GaussianMixtureEM"]
