"""AutoCWM: an autoguide whose joint posterior over the unconstrained latents is a CWM."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
)
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import site_is_subsample

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.guides.curvature import LowRankCurvature, lbfgs_mode, low_rank_curvature
from pyro_cwm.guides.isolation import outside_handlers
from pyro_cwm.guides.laplace import (
    float64_log_joint,
    laplace_misfit,
    laplace_preconditioner,
    laplace_scales,
    log_joint_derivatives,
    newton_refine,
    secant_widths,
)
from pyro_cwm.guides.log_joint import (
    LOOP,
    MODEL_ERRORS,
    VECTORIZE_HINT,
    VMAP,
    is_enumerated,
    log_joint_route,
    max_plate_nesting,
    model_name,
    rowwise,
    structure_trace,
    unconstrained_log_joint,
    with_improper_fallback,
)
from pyro_cwm.guides.rao_blackwell import ImageDelta, _sample_components
from pyro_cwm.nn.checks import check_positive_int
from pyro_cwm.nn.cwm import CWM
from pyro_cwm.nn.maps import MAP_PRESETS, PreconditionedMaps


def init_to_prior_sample(site: dict | None = None, radius: float = 2.0):
    """Initialize a site at a draw from its prior, or uniformly in (-radius, radius) in
    unconstrained space where the prior cannot be sampled (improper priors)."""
    if site is None:
        return lambda site: init_to_prior_sample(site, radius)
    return with_improper_fallback(init_to_sample, radius)(site)


LOC_SCALE = "location_scale"
AUTO_FLOW = MAP_PRESETS["iaf"]
"""The maps ``map="auto"`` picks for a funnel or a far from Gaussian mode: one
autoregressive flow after the components, shared by them (``FlowMaps(flow="iaf")``,
two transforms), whose draws and density at the draws cost one pass per transform."""
AUTO_FLOW_MAX_DIM = 64
"""Largest latent dimension for which ``map="auto"`` picks the flow (its conditioner
networks grow with the square of the dimension)."""
AUTO_FLOW_MISFIT = 1.0
"""Laplace misfit (nats, see ``pyro_cwm.guides.laplace.laplace_misfit``) at a mode above
which ``map="auto"`` picks the flow."""
MODE_DECREMENT = 0.1
"""Above ``laplace_max_dim``: the L-BFGS end point counts as a mode where its decrement
``g^T A A^T g / 2`` under the low-rank curvature is below this many nats."""
LBFGS_ITERATIONS = 500
"""Above ``laplace_max_dim``: L-BFGS iterations of the climb from the best start to a mode."""
NEWTON_ATTEMPTS = 3
"""Runs of ``newton_steps`` Newton steps before the start concludes that there is no mode:
each from the highest point not yet tried, the end of a run that climbed included."""


class AutoCWM(AutoContinuous):
    """A Classifier Weighted Mixture over all latent sites, packed into one vector.

    As ``AutoMultivariateNormal`` it packs the latent sites into one unconstrained vector, with a
    [`ClassifierWeightedMixture`][pyro_cwm.distributions.ClassifierWeightedMixture] posterior.
    Train it with [`CWMELBO`][inference.CWMELBO] or ``TraceEnum_ELBO``, which sum out the
    component choice ([`sample_latent`][pyro_cwm.guides.AutoCWM.sample_latent]); ``Trace_ELBO``
    raises a TypeError. Local latent sites (subsampled plates) go to an ``AutoGuideList``.

    The start spreads the components over the modes: ``num_starts`` points climb the log
    density and the components start at K of them far apart among the best; with
    ``laplace=True`` Newton steps (L-BFGS above ``laplace_max_dim``) refine the best one, whose
    Laplace approximation (diagonal plus low rank above it) preconditions the maps.

    Args:
        model: a Pyro model.
        num_components: number of components K.
        hidden_dims: hidden widths of the classifier.
        map: ``"location_scale"``, ``"affine"``, ``"flow"`` ([`CWM`][pyro_cwm.nn.CWM]) or ``"auto"``
            (see ``map_chosen``): ``AUTO_FLOW`` (at most ``AUTO_FLOW_MAX_DIM`` dimensions) where
            the start finds no mode or a Laplace misfit over ``AUTO_FLOW_MISFIT``, else loc-scale.
        init_loc_fn: per-site initialization of the first start, which then climbs.
        spread_init_fn: per-site initialization of the other starts (default
            [`init_to_prior_sample`][pyro_cwm.guides.autocwm.init_to_prior_sample]).
        init_scale: scale of the components (> 0) where the start has no Laplace widths.
        map_options: options of an explicit ``map``, e.g. ``{"flow": "maf"}`` with ``"flow"``.
        num_starts: number of starts (default 8 K; K, not climbed, above ``laplace_max_dim``).
        start_steps: Adam steps of each climb (0: none; with K = ``num_starts`` = 1 and
            ``laplace=False`` the component starts at ``init_loc_fn``'s point).
        start_lr: step size of the climb.
        start_threshold: the components start within this many nats of the best point.
        laplace: use the curvature at the start (False where Hessians cannot be computed).
        newton_steps: saddle-free Newton steps of each of ``NEWTON_ATTEMPTS`` runs to a mode.
        laplace_max_dim: largest number of latent dimensions for ``laplace``.
        laplace_floor: narrowest width of an axis of the preconditioner (> 0).
        laplace_rank: Hessian-vector products (its rank) above ``laplace_max_dim``.
        create_plates: as in Pyro's autoguides, plates for the model's arguments (subsampling).

    Raises:
        ValueError: for K < 1, ``init_scale`` or ``laplace_floor`` <= 0, ``map_options`` with
            ``"auto"``; at the first call, naming a site it cannot guide or observed NaN.
    """

    def __init__(
        self,
        model: Callable,
        num_components: int = 4,
        hidden_dims: Sequence[int] = (32,),
        map: str = "auto",
        init_loc_fn: Callable = init_to_median,
        spread_init_fn: Callable = init_to_prior_sample,
        init_scale: float = 0.1,
        map_options: dict[str, Any] | None = None,
        num_starts: int | None = None,
        start_steps: int = 200,
        start_lr: float = 0.3,
        start_threshold: float = 20.0,
        laplace: bool = True,
        newton_steps: int = 20,
        laplace_max_dim: int = 200,
        laplace_floor: float = 0.1,
        laplace_rank: int = 128,
        *,
        create_plates: Callable | None = None,
    ) -> None:
        self.num_components = check_positive_int("num_components", num_components)
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        self._init_scale = float(init_scale)
        if map == "auto" and map_options:
            raise ValueError(
                f"map_options={map_options!r} needs an explicit map (map='auto' chooses its own)"
            )
        self._hidden_dims, self._map, self._map_options = tuple(hidden_dims), map, map_options
        self.map_chosen: str | None = None
        self._spread_init_fn = spread_init_fn
        self._num_starts = None if num_starts is None else max(num_components, num_starts)
        self._start_steps = check_positive_int("start_steps", start_steps, allow_zero=True)
        self._start_lr, self._start_threshold = start_lr, start_threshold
        self._laplace = bool(laplace)
        self._newton_steps = check_positive_int("newton_steps", newton_steps, allow_zero=True)
        self._laplace_max_dim = check_positive_int("laplace_max_dim", laplace_max_dim)
        if not (isinstance(laplace_floor, (int, float)) and laplace_floor > 0):
            raise ValueError(f"laplace_floor must be a positive float, got {laplace_floor!r}")
        self._laplace_floor = float(laplace_floor)
        self._laplace_rank = check_positive_int("laplace_rank", laplace_rank)
        self._best_is_mode = False
        self.laplace_misfit: float | None = None
        self._image_log_weights: torch.Tensor | None = None  # set by sample_latent
        # Enumerated discrete sites are summed out by the ELBO, not guided.
        super().__init__(
            poutine.block(model, hide_fn=is_enumerated),
            init_loc_fn=with_improper_fallback(init_loc_fn),
        )
        self.create_plates = create_plates
        # Held in a tuple, as AutoGuide holds the model: a PyroModule model (an nn.Module)
        # must not become a submodule of the guide.
        self._raw_model_ref = (model,)

    @property
    def _raw_model(self) -> Callable | None:
        """The model as given (enumerated sites included); None after unpickling."""
        ref = self.__dict__.get("_raw_model_ref")
        return ref[0] if ref else None

    def __getstate__(self) -> dict:
        # As AutoGuide drops its model: the model (maybe a local function) and the caches
        # built from it (closures, routes keyed by the model) are not part of the guide.
        state = dict(super().__getstate__())
        for key in ("_raw_model_ref", "_log_joint_routes", "_precise", "_image_log_weights"):
            state.pop(key, None)
        return state

    def _setup_prototype(self, *args, **kwargs) -> None:
        # The first call may come from inside an ELBO's handlers (a vectorized particle
        # plate, guide-side enumeration); the set-up runs the model on its own.
        with outside_handlers():
            self._check_sites(structure_trace(self.model, *args, **kwargs))
            super()._setup_prototype(*args, **kwargs)
            self._check_plates()
            # The prototype hides observed sites; their plates count for the particle plate.
            self.max_plate_nesting = max_plate_nesting(self._raw_model, *args, **kwargs)
            self._initialize(args, kwargs)

    def _check_sites(self, trace) -> None:
        """One clear error for a site that AutoCWM cannot guide or data it cannot use."""
        latent = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            sequential = [f.name for f in site["cond_indep_stack"] if not f.vectorized]
            if sequential and not site["is_observed"]:
                raise NotImplementedError(
                    f"AutoCWM cannot guide the site {name!r} inside the sequential plate "
                    f"{sequential[0]!r} (as Pyro's autoguides): make it a vectorized plate, "
                    "`with pyro.plate(...):`, or hide the site from AutoCWM with "
                    "poutine.block and guide it otherwise"
                )
            if site["is_observed"]:
                value = site["value"]
                if torch.is_tensor(value) and value.is_floating_point() and value.isnan().any():
                    raise ValueError(
                        f"the observed site {name!r} contains NaN: drop the missing values, or "
                        "model them (pyro.sample(..., obs_mask=...))"
                    )
                continue
            support = site["fn"].support
            try:
                discrete = support.is_discrete
                if not discrete:
                    biject_to(support)
            except NotImplementedError:
                if "sphere" in repr(support).lower():
                    raise ValueError(
                        f"AutoCWM cannot guide the spherical site {name!r}: its support has "
                        "no bijection to unconstrained space. Reparameterize it with "
                        "ProjectedNormalReparam, e.g. poutine.reparam(model, "
                        f"config={{{name!r}: ProjectedNormalReparam()}})"
                    ) from None
                raise ValueError(
                    f"AutoCWM cannot guide the site {name!r}: its support {support} has no "
                    "bijection to unconstrained space"
                ) from None
            if discrete:
                raise ValueError(
                    f"AutoCWM cannot guide the discrete site {name!r}. Enumerate it as "
                    "documented in https://pyro.ai/examples/enumeration.html: mark it for "
                    "parallel enumeration (pyro.infer.config_enumerate, or "
                    "infer={'enumerate': 'parallel'}) so that CWMELBO or TraceEnum_ELBO sums "
                    "it out; or hide it from AutoCWM, e.g. AutoCWM(poutine.block(model, "
                    f"hide=[{name!r}])), and guide it otherwise"
                )
            latent += 1
        if not latent:
            raise ValueError(
                "AutoCWM: the model has no continuous latent site to guide (enumerated and "
                "observed sites are not guided)"
            )

    def _check_plates(self) -> None:
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if (
                    frame.vectorized
                    and frame.full_size is not None
                    and frame.full_size > frame.size
                ):
                    raise ValueError(
                        f"AutoCWM cannot guide site {name!r}, which lies in the subsampled plate "
                        f"{frame.name!r}: guide the global sites with AutoCWM and the local ones "
                        "with AutoLocalNormal, combined in an AutoGuideList: "
                        "guide.append(cwm := AutoCWM(poutine.block(model, expose=[global "
                        "sites]))) and guide.append(AutoLocalNormal(poutine.block(model, "
                        "hide=[global sites]), given=cwm)); then train with CWMELBO or "
                        "TraceEnum_ELBO"
                    )

    def _initialize(self, args: tuple, kwargs: dict) -> None:
        """Create the CWM, its components spread over the modes found by the start."""
        dim = self.latent_dim
        locs, use_laplace, curvature = None, False, None
        self._best_is_mode, searched = False, False
        self._precise = None  # the log joint for curvature, set by _precise_log_joint
        # In an AutoGuideList the other parts' sites would be drawn from their priors when
        # the model runs at AutoCWM's sites alone: its density is not the one to climb.
        if self.master is None:
            try:
                locs, use_laplace, curvature = self._model_start(args, kwargs)
                searched = use_laplace and self._newton_steps > 0
            except (RuntimeError, ValueError) as error:
                warnings.warn(
                    "AutoCWM: the start could not run the model at AutoCWM's sites alone "
                    f"({type(error).__name__}: {error}); the components start at "
                    "init_loc_fn's point",
                    stacklevel=2,
                )
        # Components that start away from the mass travel to it during the fit; the ELBO
        # holds the classifier until they arrive (CWMELBO's warm-up).
        travelling = locs is None
        if locs is None:
            # No density to climb: every component starts near init_loc_fn's point.
            loc = self._init_loc()
            locs = loc + self._init_scale * torch.randn(self.num_components, dim).to(loc)
            locs[0] = loc
        self.register_buffer("travelling", torch.tensor(travelling, device=locs.device))
        # No preconditioner: the identity, held as a diagonal (O(d) memory at any size).
        shift, matrix = torch.zeros_like(locs[0]), torch.ones_like(locs[0])
        vectors = widths = None
        scales = torch.full_like(locs, self._init_scale)
        precision = None  # the negative Hessian at the best start
        if curvature is not None:
            # Widths along the preconditioner's axes are its own (at a mode, the Laplace ones).
            shift, matrix = locs[0], curvature.scale.to(locs.dtype)
            vectors, widths = curvature.vectors.to(locs.dtype), curvature.widths.to(locs.dtype)
            scales = torch.ones_like(locs)
        elif use_laplace:
            laplace = self._laplace_start(locs, args, kwargs)
            if laplace is not None:
                shift, (matrix, scales, precision) = locs[0], laplace
        map_name, map_options = self._map, self._map_options
        if map_name == "auto":
            # Newton's method found no mode: the density grows into a neck while the mass
            # lies in a mouth whose widths change along it (a funnel), which location-scale
            # components in one frame follow only by many of them travelling slowly; an
            # autoregressive map makes each coordinate's scale a function of those before.
            # Around a mode, the same holds where the widths change across the mode's
            # typical set, which the Laplace approximation's misfit measures.
            funnel = searched and dim <= AUTO_FLOW_MAX_DIM
            if funnel and self._best_is_mode:
                self.laplace_misfit = self._laplace_misfit(locs[0], precision, args, kwargs)
                funnel = self.laplace_misfit > AUTO_FLOW_MISFIT
            map_name, map_options = (LOC_SCALE, None)
            if funnel:
                map_name, map_options = AUTO_FLOW[0], dict(AUTO_FLOW[1])
        flow = (map_options or {}).get("flow") if map_name == "flow" else None
        self.map_chosen = flow if flow in ("maf", "iaf") else map_name
        self.cwm = CWM(
            dim,
            self.num_components,
            hidden_dims=self._hidden_dims,
            map=map_name,
            map_options=map_options,
            spread=False,  # set_gaussian_mixture below places the components
        ).to(device=locs.device, dtype=locs.dtype)
        self.preconditioned_maps = PreconditionedMaps(
            self.cwm.maps, shift, matrix, vectors, widths
        )
        weights = torch.full((self.num_components,), 1.0 / self.num_components)
        inner = self.preconditioned_maps.to_inner(locs)
        if self._best_is_mode:
            inner = self._separate(inner)
        self.cwm.set_gaussian_mixture(weights, inner, scales)
        self._precise = None  # it holds float64 copies of the data: not past the set-up

    def _starts(self) -> int:
        """The number of starts: ``num_starts``, by default 8 K, or K above
        ``laplace_max_dim`` dimensions (there every start's climb costs about as much as a
        step of the fit per climbing step, and the starts rarely find separate modes)."""
        if self._num_starts is not None:
            return self._num_starts
        large = self.latent_dim > self._laplace_max_dim
        return self.num_components * (1 if large else 8)

    def _model_start(
        self, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, bool, LowRankCurvature | None]:
        """Component locations from starts climbed up the model's log density, whether the
        dense Laplace start applies, and the low-rank curvature above ``laplace_max_dim``."""
        starts = torch.stack(
            [self._init_loc()]
            + [self._spread_loc(args, kwargs) for _ in range(self._starts() - 1)]
        )
        use_laplace = self._laplace and self.latent_dim <= self._laplace_max_dim
        curvature = None
        if self._laplace and not use_laplace:
            # L-BFGS from the best start replaces the climb where the curvature serves.
            starts, log_p, curvature = self._curvature_start(starts, args, kwargs)
            if curvature is None:
                starts, log_p = self._climb(starts, args, kwargs)
        else:
            starts, log_p = self._climb(starts, args, kwargs)
        if use_laplace:
            starts, log_p = self._refine_best(starts, log_p, args, kwargs)
            if not self._best_is_mode:
                mass = self._laplace_log_mass(starts, log_p, args, kwargs)
                if mass is not None:
                    return self._separate(self._select_starts(starts, mass)), use_laplace, None
        locs = self._select_starts(starts, log_p)
        return (locs if self._best_is_mode else self._separate(locs)), use_laplace, curvature

    def _curvature_start(
        self, starts: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, LowRankCurvature | None]:
        """Above ``laplace_max_dim``: L-BFGS from the best start, and the diagonal-plus-
        low-rank curvature at its end (``laplace_rank`` Hessian-vector products in blocks
        of K, ``pyro_cwm.guides.curvature.low_rank_curvature``).

        The end point replaces the start it came from, and counts as a mode where the
        curvature is positive and the decrement below ``MODE_DECREMENT`` nats; elsewhere
        the widths are floored at ``laplace_floor``. Where the model cannot be
        differentiated twice no curvature is kept.

        Returns:
            The starts, their log densities and the curvature (None where there is none).
        """
        self._best_is_mode = False
        with poutine.block(), torch.no_grad():
            log_p = self._log_joint(args, kwargs)(starts)
        finite = torch.isfinite(log_p)
        if not finite.any():
            return starts, log_p, None
        best = int(torch.where(finite, log_p, -torch.inf).argmax())
        rank, block = self._laplace_rank, self.num_components
        try:
            with poutine.block():
                log_joint, dtype = self._precise_log_joint(args, kwargs, starts[best])
                # The products in the model's dtype: in float64 they cost twice as much (a
                # 1,000-D logistic regression's set-up: 11 s against 6 s), and the widths
                # came out the same on the scale bench's regressions. The climb, too, runs
                # in the model's dtype until it stalls, then finishes in float64.
                native = self._log_joint(args, kwargs)
                coarse = None if dtype == starts.dtype else (native, starts.dtype)
                point, value = lbfgs_mode(
                    log_joint, starts[best].to(dtype), LBFGS_ITERATIONS, coarse=coarse
                )
                curvature = low_rank_curvature(native, point.to(starts.dtype), rank, block)
                with torch.enable_grad():
                    u = point[None].clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(log_joint(u).sum(), u)
        except (RuntimeError, ValueError):
            return starts, log_p, None
        decrement = 0.5 * (grad * curvature.inverse_hessian(grad.to(starts.dtype))).sum()
        if not all(torch.isfinite(t).all() for t in (grad, curvature.scale, curvature.widths)):
            return starts, log_p, None
        self._best_is_mode = curvature.positive and bool(decrement < MODE_DECREMENT)
        if not self._best_is_mode:
            curvature = curvature.floored(self._laplace_floor)
        starts, log_p = starts.clone(), log_p.clone()
        starts[best], log_p[best] = point.to(starts.dtype), value.to(log_p.dtype)
        return starts, log_p, curvature

    def _laplace_log_mass(
        self, starts: torch.Tensor, log_p: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        """The Laplace log-mass ``log p(u) - 1/2 log det(-H(u))`` of every start (-inf where
        the curvature is not positive definite); None where no start has one.

        Up to a constant it is the ELBO of a Gaussian component at u with the local
        Laplace covariance: what reverse KL rewards. Where the log density has no mode (a
        funnel, whose density grows into the neck while its mass lies in the mouth), the
        climbed starts sit deep in the neck, the highest of them deepest; ranked by mass,
        the components start where the mass is (Neal's 10-D funnel: the best start moves
        from v = -8 to v = -3; KL at 2,000 steps 1.10 -> 0.57).
        """
        finite = torch.isfinite(log_p).nonzero().flatten()
        chunk = max(1, 4096 // self.latent_dim)
        mass = torch.full_like(log_p, -math.inf)
        try:
            with poutine.block():
                log_joint, dtype = self._precise_log_joint(args, kwargs, starts[0])
                for index in finite.split(chunk):
                    _, _, hess = log_joint_derivatives(log_joint, starts[index].to(dtype))
                    eigenvalues = torch.linalg.eigvalsh(-hess)
                    positive = (eigenvalues > 0).all(-1) & torch.isfinite(eigenvalues).all(-1)
                    log_det = eigenvalues.clamp(min=torch.finfo(dtype).tiny).log().sum(-1)
                    value = torch.where(positive, log_p[index] - 0.5 * log_det, -math.inf)
                    mass[index] = value.to(mass.dtype)
        except (RuntimeError, ValueError):
            return None
        return mass if torch.isfinite(mass).any() else None

    def _laplace_start(self, locs: torch.Tensor, args: tuple, kwargs: dict):
        """The preconditioner and the component scales from the curvature at the starts.

        Returns ``(matrix, scales, precision)`` (the last: the negative Hessian at the
        best start, ``locs[0]``), or None where the Hessians cannot be computed (a
        model that is not twice differentiable) or are not finite.
        """
        try:
            with poutine.block():
                log_joint, dtype = self._precise_log_joint(args, kwargs, locs[0])
                _, _, hess = log_joint_derivatives(log_joint, locs.to(dtype))
        except (RuntimeError, ValueError):
            return None
        if not torch.isfinite(hess).all():
            return None
        # At a mode that Newton's method confirmed, the curvature is trusted in every
        # direction, however narrow: a posterior 1e-3 of its prior's width gets unit width
        # in Adam's coordinates. Elsewhere (a funnel's neck has no mode) narrow axes are
        # floored, since the mass lies far beyond the local curvature.
        floor = 0.0 if self._best_is_mode else self._laplace_floor
        matrix = laplace_preconditioner(-hess[0], floor)
        try:
            with poutine.block():
                matrix = secant_widths(log_joint, locs[0].to(dtype), matrix, floor)
        except (RuntimeError, ValueError):
            return None
        scales = laplace_scales(-hess, matrix, self._init_scale)
        # Computed in float64 where the model runs in it; the maps keep the model's dtype.
        return matrix.to(locs.dtype), scales.to(locs.dtype), -hess[0]

    def _laplace_misfit(
        self, mode: torch.Tensor, precision: torch.Tensor | None, args: tuple, kwargs: dict
    ) -> float:
        """The Laplace misfit at the mode (``pyro_cwm.guides.laplace.laplace_misfit``) with
        the negative Hessian ``precision`` there: 0 where it could not be computed (None;
        the location-scale maps are kept), inf where the model raises at every draw of
        the Laplace approximation."""
        if precision is None:
            return 0.0
        try:
            with poutine.block():
                log_joint, dtype = self._precise_log_joint(args, kwargs, mode)
                return laplace_misfit(log_joint, mode.to(dtype), precision.to(dtype))
        except (RuntimeError, ValueError):
            return math.inf

    def _log_joint(self, args: tuple, kwargs: dict):
        """The model's log joint at packed unconstrained points (n, d) -> (n,); -inf at
        points where the model raises (see ``rowwise``): the start's climb, Newton's line
        search and the Laplace draws may reach parameters at which a model's own
        computation fails (gp_pois_regr's covariance, not positive definite at large
        amplitudes, made the whole start fall back to ``init_loc_fn``'s point)."""
        return rowwise(lambda u: unconstrained_log_joint(self._raw_model, self, u, *args, **kwargs))

    def _precise_log_joint(self, args: tuple, kwargs: dict, point: torch.Tensor):
        """The log joint for Newton's steps and curvatures, and the dtype of its points:
        in float64 where the model runs in it (see
        ``pyro_cwm.guides.laplace.float64_log_joint``), else in the model's dtype."""
        if getattr(self, "_precise", None) is None:
            with poutine.block():
                self._precise = float64_log_joint(self._log_joint, args, kwargs, point.detach())
        return self._precise

    def _refine_best(self, starts: torch.Tensor, log_p: torch.Tensor, args: tuple, kwargs: dict):
        """Newton steps from the best start; kept only if they converge to a mode.

        Adam's climb stalls in narrow, strongly correlated ridges (kilpisjarvi's regression
        on uncentered years); Newton steps cross them. Where the log density has no mode
        (a funnel's neck) the steps would run away, so the climbed start is kept.

        Whether a mode is found must not depend on the seed: the steps run in float64
        where the model does, and up to ``NEWTON_ATTEMPTS`` runs of ``newton_steps``
        steps each start at the highest point not tried yet, where the end of a run that
        climbed without converging (a start far down a ridge) counts as a new point. A
        mode counts where it is at least as high as every start. On a flat-prior
        regression with a posterior correlation of -0.998 (float32), 2 of 8 seeds found
        no mode: one run of 20 steps in float32 ended 2e-3 nats short of its tolerance.

        Returns:
            The starts, the mode in place of the start it was reached from, and their log
            densities (in the dtype of the Newton steps).
        """
        self._best_is_mode = False
        finite = torch.isfinite(log_p)
        if not finite.any() or self._newton_steps == 0:
            return starts, log_p
        best = int(torch.where(finite, log_p, -torch.inf).argmax())
        log_joint, dtype = self._precise_log_joint(args, kwargs, starts[best])
        with poutine.block(), torch.no_grad():
            values = log_joint(starts.to(dtype))
        values = torch.where(finite, values, -math.inf)
        highest = values.max()
        if not torch.isfinite(highest):
            return starts, log_p
        # Values closer than their rounding are equal (in float32 the same point gives
        # log densities 1e-5 apart in batches of different sizes; a mode was refused).
        resolution = 4 * torch.finfo(dtype).eps * float(highest.abs())
        # points and origins: the places runs start from, and the start each came from
        points, tried = starts.to(dtype), ~torch.isfinite(values)
        origins = torch.arange(starts.shape[0])
        for _ in range(NEWTON_ATTEMPTS):
            if tried.all():
                break
            index = int(torch.where(tried, -math.inf, values).argmax())
            tried[index] = True
            with poutine.block():
                refined, converged = newton_refine(log_joint, points[index], self._newton_steps)
                with torch.no_grad():
                    value = log_joint(refined[None])[0]
            if not torch.isfinite(value) or value < values[index] - resolution:
                continue
            if converged and value >= highest - resolution:
                origin = int(origins[index])
                starts, log_p = starts.clone(), values[: starts.shape[0]].clone()
                starts[origin], log_p[origin] = refined.to(starts.dtype), value
                self._best_is_mode = True
                return starts, log_p
            if not converged and value > values[index]:
                # The run climbed: the next one goes on from where it ended.
                points = torch.cat((points, refined[None]))
                values = torch.cat((values, value[None]))
                tried = torch.cat((tried, torch.zeros(1, dtype=torch.bool)))
                origins = torch.cat((origins, origins[index : index + 1]))
        return starts, log_p

    def _spread_loc(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """One unconstrained latent vector drawn by ``spread_init_fn``."""
        model = InitMessenger(self._spread_init_fn)(self._raw_model)
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        parts = []
        for name in self._unconstrained_shapes:
            site = trace.nodes[name]
            parts.append(biject_to(site["fn"].support).inv(site["value"].detach()).reshape(-1))
        return torch.cat(parts)

    def _climb(self, starts: torch.Tensor, args: tuple, kwargs: dict):
        """A few vectorized Adam steps up the model's log density from every start."""
        log_joint = self._log_joint(args, kwargs)
        u = starts.clone().requires_grad_(self._start_steps > 0)
        optimizer = torch.optim.Adam([u], lr=self._start_lr)
        for _ in range(self._start_steps):
            # Hidden from outer handlers; grad on even if the setup runs under no_grad.
            with poutine.block(), torch.enable_grad():
                log_p = log_joint(u)
                finite = torch.isfinite(log_p)
                if not finite.any():
                    break
                optimizer.zero_grad()
                (-log_p[finite].sum()).backward()
            u.grad[~finite] = 0
            u.grad.nan_to_num_(0.0, 0.0, 0.0)
            optimizer.step()
        with poutine.block(), torch.no_grad():
            return u.detach(), log_joint(u)

    def _select_starts(self, starts: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """K starts far apart among those within ``start_threshold`` nats of the best.

        Farthest-point selection from the highest start: components begin on different
        modes whenever the starts found several, which keeps reverse-KL training from
        putting every component on one mode.

        Where the best start is a mode that Newton's method confirmed, the threshold is at
        most the depth of that mode's typical set, ``d/2 + 2 sqrt(d/2)`` nats (the mean of
        chi^2_d / 2 plus two sds; about its 95th percentile): starts further down lie in
        the tails of the mode (or on a separate mode with a few percent of the mass).
        Farthest-point selection picks exactly those, and a component started there is
        dropped by the classifier before it travels back (on the 2-D banana, 20 nats put
        components 4.6 sds out along the ridge; Adam moves them about 0.01 sd a step).
        Without a confirmed mode (a funnel's neck) the highest points are not where the
        mass is: the scores are then the starts' Laplace log-masses (see
        ``_laplace_log_mass``), and ``start_threshold`` applies as it is.
        """
        finite = torch.isfinite(log_p)
        if not finite.any():
            raise ValueError("AutoCWM: the model's log density is not finite at any start")
        threshold = self._start_threshold
        if self._best_is_mode:
            half = starts.shape[-1] / 2
            threshold = min(threshold, half + 2 * math.sqrt(half))
        good = finite & (log_p >= log_p[finite].max() - threshold)
        candidates, scores = starts[good], log_p[good]
        chosen = [int(scores.argmax())]
        for _ in range(1, self.num_components):
            gap = torch.cdist(candidates, candidates[chosen]).min(-1).values
            chosen.append(int(gap.argmax()))
        # Fewer candidates than components repeat a start: see _separate.
        return candidates[chosen].clone()

    def _separate(self, locs: torch.Tensor) -> torch.Tensor:
        """Component locations (K, d), each that repeats an earlier one moved by
        ``init_scale`` times a standard normal draw (coinciding components would never
        separate).

        At a mode that Newton's method confirmed, ``_initialize`` passes the
        preconditioned coordinates, where the local posterior widths are about one: in
        the model's coordinates ``init_scale`` can be 1e4 widths of a tightly identified
        direction (gp_pois_regr's GP values: log densities of -1e5 to -1e8 at the moved
        starts, from which the flow maps diverged within ten steps). Without a confirmed
        mode the preconditioner's widths are floored curvatures of a neck, not posterior
        widths, and the starts are moved in the model's coordinates.
        """
        locs = locs.clone()
        for k in range(1, locs.shape[0]):
            if (torch.cdist(locs[k : k + 1], locs[:k]) < 1e-6).any():
                locs[k] += self._init_scale * torch.randn_like(locs[k])
        return locs

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every latent site, as [`sample_latent`][pyro_cwm.guides.AutoCWM.sample_latent]
        draws the packed vector; returns a dict from site name to value.

        Each site is a ``Delta`` at the constrained value, inside the site's plates (made
        by ``create_plates`` where given), with the log-Jacobian of the constraint as its
        log-density. Under enumeration its value holds the K images on the left and its
        batch shape is the plates' (``pyro_cwm.guides.rao_blackwell.ImageDelta``).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        # The reference draw has one batch dimension per active plate dimension (particle
        # plates): a latent with more holds the K images along an enumeration dimension.
        outer = max((-f.dim for f in get_plates() if f.vectorized and f.dim is not None), default=0)
        enumerated = latent.dim() - 1 > outer
        if enumerated:
            self._require_broadcasting_model(latent, args, kwargs)
        result = {}
        for site, unconstrained in self._unpack_latent(latent):
            name, event_dim = site["name"], site["fn"].event_dim
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            log_density = 0.0
            if poutine.get_mask() is not False:
                ladj = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(ladj, ladj.dim() - value.dim() + event_dim)
            if enumerated:
                fn = ImageDelta(value, log_density, event_dim)
            else:
                fn = dist.Delta(value, log_density=log_density, event_dim=event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, fn)
        return result

    def _require_broadcasting_model(self, latent: torch.Tensor, args: tuple, kwargs: dict):
        """Raise a TypeError where the K images are enumerated (``TraceEnum_ELBO``) but the
        model does not broadcast over them: it would fail inside with a bare shape error,
        or broadcast wrongly. The start chose the model's route; in a guide list, which
        runs no start (and whose model hides the other parts' sites), two of the images
        choose it here, with the ELBO's plate nesting, the random state left as it was."""
        model = self._raw_model
        if model is None:
            return
        if log_joint_route(self) is None:
            points = latent.detach().reshape(-1, latent.shape[-1])[:2]
            devices = [points.device] if points.is_cuda else []
            own = self.max_plate_nesting
            self.max_plate_nesting = max(own, latent.dim() - 2)  # the ELBO's, from the images
            try:
                with torch.random.fork_rng(devices), outside_handlers(), torch.no_grad():
                    self._log_joint(args, kwargs)(points)
            except MODEL_ERRORS:
                pass  # the model fails at single points too: its own error follows
            finally:
                self.max_plate_nesting = own
        if log_joint_route(self) in (VMAP, LOOP):
            raise TypeError(
                f"AutoCWM: TraceEnum_ELBO enumerates the component images, which runs the "
                f"model {model_name(model)} on all K images in one call, but the model does "
                "not broadcast over them. Train with inference.CWMELBO, which runs such a "
                f"model point by point (for a guide list: make the model broadcast). "
                f"{VECTORIZE_HINT}."
            )

    def sample_latent(self, *args, **kwargs) -> torch.Tensor:
        """Draw the packed latent vector through three auxiliary sites.

        ``_{name}_base``: z ~ N(0, I) (reparameterized); ``_{name}_component``: k ~
        Categorical(w(z)), marked for parallel enumeration; ``_{name}_latent``: the image
        u = T_k(z) as a Delta whose log-density makes the three sites' total
        ``log q_CWM(u)``. Under ``TraceEnum_ELBO`` (or [`CWMELBO`][inference.CWMELBO])
        the component is enumerated: u holds all K images along the enumeration
        dimension, and the ELBO weights each by w_k(z), the Rao-Blackwellized estimator.
        Otherwise (``Predictive``, plain sampling) one component is drawn.
        """
        posterior = self.get_posterior(*args, **kwargs)
        name = self._pyro_name
        latent, log_density, log_weights = _sample_components(
            posterior, f"_{name}_base", f"_{name}_component"
        )
        # The K images' weights (None where one image is drawn), for a guide list's local
        # part, whose centre must follow the mixture's mass (AutoLocalNormal).
        self._image_log_weights = None if log_weights is None else log_weights.detach()
        return pyro.sample(
            f"_{name}_latent",
            dist.Delta(latent, log_density=log_density, event_dim=1),
            infer={"is_auxiliary": True},
        )

    def get_posterior(self, *args, **kwargs) -> ClassifierWeightedMixture:
        """The CWM over the unconstrained latent vector (event shape (latent_dim,)).

        Its parameters are registered in Pyro's param store, so ``SVI`` optimizes them.
        """
        # Read past PyroModule's attribute hook, which would register the maps a second
        # time under ``preconditioned_maps``: one tensor under two names breaks JIT ELBOs.
        cwm, maps = self._modules["cwm"], self._modules["preconditioned_maps"]
        pyro.module(f"{self._pyro_name}.cwm", cwm)
        return ClassifierWeightedMixture(cwm.reference(), maps, cwm.classifier)

    def _sample_unconstrained(self, args: tuple, kwargs: dict, num_samples: int, seed: int):
        """``num_samples`` draws (n, latent_dim) of the CWM, from a random state seeded
        with ``seed`` and then restored (the CPU's and, for a CUDA guide, its device's)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        device = self._modules["preconditioned_maps"].shift.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.get_posterior(*args, **kwargs).sample((num_samples,))

    @torch.no_grad()
    def quantiles(
        self, quantiles, *args, num_samples: int = 20000, seed: int = 0, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of each latent site (Monte Carlo over the mixture).

        The CWM's marginals have no closed form: the quantiles of each unconstrained
        coordinate are estimated from ``num_samples`` draws (seeded: the same seed gives
        the same values, and [`median`][pyro_cwm.guides.AutoCWM.median] equals the 0.5
        quantile) and then constrained; site transforms are monotone per coordinate for
        the usual supports. The guide is set up from ``*args, **kwargs`` if it has not run.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles),) + site shape``.
        """
        samples = self._sample_unconstrained(args, kwargs, num_samples, seed)
        q = torch.as_tensor(quantiles, dtype=samples.dtype, device=samples.device)
        latents = torch.quantile(samples, q, dim=0)
        result: dict[str, list] = {}
        for latent in latents:
            for site, value in self._unpack_latent(latent):
                result.setdefault(site["name"], []).append(biject_to(site["fn"].support)(value))
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args, num_samples: int = 20000, seed: int = 0, **kwargs):
        """Marginal posterior medians of each latent site.

        See [`quantiles`][pyro_cwm.guides.AutoCWM.quantiles].
        """
        medians = self.quantiles([0.5], *args, num_samples=num_samples, seed=seed, **kwargs)
        return {name: value[0] for name, value in medians.items()}

    @torch.no_grad()
    def _loc_scale(self, *args, num_samples: int = 20000, seed: int = 0, **kwargs):
        """The mean and standard deviation of each unconstrained coordinate (the CWM's
        seeded [`moments`][pyro_cwm.distributions.ClassifierWeightedMixture.moments]): the
        Gaussian summary that Pyro's ``AutoContinuous`` guides give as ``(loc, scale)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        mean, variance = self.get_posterior(*args, **kwargs).moments(num_samples, seed)
        return mean, variance.sqrt()
