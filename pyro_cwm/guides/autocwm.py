"""AutoCWM: an autoguide whose joint posterior over the unconstrained latents is a CWM."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
)
from pyro.poutine.util import site_is_subsample

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.guides.isolation import outside_handlers
from pyro_cwm.guides.laplace import (
    laplace_misfit,
    laplace_preconditioner,
    laplace_scales,
    log_joint_derivatives,
    newton_refine,
    secant_widths,
)
from pyro_cwm.guides.log_joint import (
    is_enumerated,
    max_plate_nesting,
    rowwise,
    structure_trace,
    unconstrained_log_joint,
    with_improper_fallback,
)
from pyro_cwm.guides.rao_blackwell import sample_components
from pyro_cwm.nn.checks import check_positive_int
from pyro_cwm.nn.cwm import CWM
from pyro_cwm.nn.maps import PreconditionedMaps


def init_to_prior_sample(site: dict | None = None, radius: float = 2.0):
    """Initialize a site at a draw from its prior, or uniformly in (-radius, radius) in
    unconstrained space where the prior cannot be sampled (improper priors)."""
    if site is None:
        return lambda site: init_to_prior_sample(site, radius)
    return with_improper_fallback(init_to_sample, radius)(site)


LOC_SCALE = "location_scale"
AUTO_MAF_MAX_DIM = 64
"""Largest latent dimension for which ``map="auto"`` picks the autoregressive flow: drawing
from it takes one pass per coordinate."""
AUTO_MAF_MISFIT = 1.0
"""Laplace misfit (nats, see ``pyro_cwm.guides.laplace.laplace_misfit``) at a mode above
which ``map="auto"`` picks the autoregressive flow."""


class AutoCWM(AutoContinuous):
    """A Classifier Weighted Mixture over all latent sites, packed into one vector.

    As ``AutoMultivariateNormal`` it packs the latent sites into one unconstrained vector, whose
    posterior is a
    [`ClassifierWeightedMixture`][pyro_cwm.distributions.ClassifierWeightedMixture]. Train it
    with [`CWMELBO`][inference.CWMELBO] or ``TraceEnum_ELBO``, which sum out the component
    choice ([`sample_latent`][pyro_cwm.guides.AutoCWM.sample_latent]); ``Trace_ELBO`` raises a
    TypeError. Latent sites in a subsampled plate need another autoguide in an ``AutoGuideList``.

    The start spreads the components over the modes: ``num_starts`` points climb the log
    density, and the components start at K of them far apart among the best, weights uniform.
    With ``laplace=True`` Newton steps refine the best start and its Laplace approximation
    preconditions the maps ([`get_posterior`][pyro_cwm.guides.AutoCWM.get_posterior] is unchanged).

    Args:
        model: a Pyro model.
        num_components: number of components K.
        hidden_dims: hidden widths of the classifier.
        map: ``"location_scale"``, ``"affine"``, ``"flow"`` ([`CWM`][pyro_cwm.nn.CWM]) or ``"auto"``
            (see ``map_chosen``): a MAF ``"flow"`` (at most ``AUTO_MAF_MAX_DIM`` dimensions) where
            the start finds no mode or a Laplace misfit over ``AUTO_MAF_MISFIT``, else loc-scale.
        init_loc_fn: per-site initialization of the first start.
        spread_init_fn: per-site initialization of the other starts (default
            [`init_to_prior_sample`][pyro_cwm.guides.autocwm.init_to_prior_sample]).
        init_scale: initial scale of the components (> 0) where there is no Laplace scale.
        map_options: options of an explicit ``map``, e.g. ``{"flow": "maf"}`` with ``"flow"``.
        num_starts: number of starting points (default 8 K, never fewer than K).
        start_steps: Adam steps of each start's climb (0: no climb).
        start_lr: step size of the climb.
        start_threshold: the components start within this many nats of the best point.
        laplace: use the curvature at the start (False where Hessians cannot be computed).
        newton_steps: maximum number of saddle-free Newton steps on the best start.
        laplace_max_dim: largest number of latent dimensions for ``laplace``.
        laplace_floor: narrowest width of an axis of the preconditioner (> 0).

    Raises:
        ValueError: for K < 1, ``init_scale <= 0``, ``laplace_floor <= 0``, ``map_options``
            with ``map="auto"``; at the first call, naming the site: a latent site in a
            subsampled plate, a discrete site not enumerated, a support without a bijection
            to unconstrained space, an observed site with NaN, or no continuous latent site.
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
        self._num_starts = max(num_components, num_starts or 8 * num_components)
        self._start_steps = check_positive_int("start_steps", start_steps, allow_zero=True)
        self._start_lr, self._start_threshold = start_lr, start_threshold
        self._laplace = bool(laplace)
        self._newton_steps = check_positive_int("newton_steps", newton_steps, allow_zero=True)
        self._laplace_max_dim = check_positive_int("laplace_max_dim", laplace_max_dim)
        if not (isinstance(laplace_floor, (int, float)) and laplace_floor > 0):
            raise ValueError(f"laplace_floor must be a positive float, got {laplace_floor!r}")
        self._laplace_floor = float(laplace_floor)
        self._best_is_mode = False
        self.laplace_misfit: float | None = None
        self._raw_model = model
        # Enumerated discrete sites are summed out by the ELBO, not guided.
        super().__init__(
            poutine.block(model, hide_fn=is_enumerated),
            init_loc_fn=with_improper_fallback(init_loc_fn),
        )

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
                raise ValueError(
                    f"AutoCWM cannot guide the site {name!r}: its support {support} has no "
                    "bijection to unconstrained space"
                ) from None
            if discrete:
                raise ValueError(
                    f"AutoCWM cannot guide the discrete site {name!r}: mark it for parallel "
                    "enumeration (pyro.infer.config_enumerate, or infer={'enumerate': "
                    "'parallel'}) so that CWMELBO or TraceEnum_ELBO sums it out, or hide it "
                    "from AutoCWM with poutine.block and guide it otherwise"
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
                        "with AutoNormal (or AutoDelta), combined in an AutoGuideList: "
                        "guide.append(AutoCWM(poutine.block(model, expose=[global sites]))) "
                        "and guide.append(AutoNormal(poutine.block(model, hide=[global "
                        "sites]))); then train with CWMELBO or TraceEnum_ELBO"
                    )

    def _initialize(self, args: tuple, kwargs: dict) -> None:
        """Create the CWM, its components spread over the modes found by the start."""
        dim = self.latent_dim
        locs, use_laplace = None, False
        self._best_is_mode, searched = False, False
        # In an AutoGuideList the other parts' sites would be drawn from their priors when
        # the model runs at AutoCWM's sites alone: its density is not the one to climb.
        if self.master is None:
            try:
                locs, use_laplace = self._model_start(args, kwargs)
                searched = use_laplace and self._newton_steps > 0
            except (RuntimeError, ValueError) as error:
                warnings.warn(
                    "AutoCWM: the start could not run the model at AutoCWM's sites alone "
                    f"({type(error).__name__}: {error}); the components start at "
                    "init_loc_fn's point",
                    stacklevel=2,
                )
        if locs is None:
            # No density to climb: every component starts near init_loc_fn's point.
            loc = self._init_loc()
            locs = loc + self._init_scale * torch.randn(self.num_components, dim).to(loc)
            locs[0] = loc
        eye = torch.eye(dim, dtype=locs.dtype, device=locs.device)
        shift, matrix = torch.zeros_like(locs[0]), eye
        scales = torch.full_like(locs, self._init_scale)
        precision = None  # the negative Hessian at the best start
        if use_laplace:
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
            funnel = searched and dim <= AUTO_MAF_MAX_DIM
            if funnel and self._best_is_mode:
                self.laplace_misfit = self._laplace_misfit(locs[0], precision, args, kwargs)
                funnel = self.laplace_misfit > AUTO_MAF_MISFIT
            map_name, map_options = ("flow", {"flow": "maf"}) if funnel else (LOC_SCALE, None)
        self.map_chosen = "maf" if map_options == {"flow": "maf"} else map_name
        self.cwm = CWM(
            dim,
            self.num_components,
            hidden_dims=self._hidden_dims,
            map=map_name,
            map_options=map_options,
        ).to(device=locs.device, dtype=locs.dtype)
        self.preconditioned_maps = PreconditionedMaps(self.cwm.maps, shift, matrix)
        weights = torch.full((self.num_components,), 1.0 / self.num_components)
        inner = self.preconditioned_maps.to_inner(locs)
        if self._best_is_mode:
            inner = self._separate(inner)
        self.cwm.set_gaussian_mixture(weights, inner, scales)

    def _model_start(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
        """Component locations from starts climbed up the model's log density."""
        starts = torch.stack(
            [self._init_loc()]
            + [self._spread_loc(args, kwargs) for _ in range(self._num_starts - 1)]
        )
        starts, log_p = self._climb(starts, args, kwargs)
        use_laplace = self._laplace and self.latent_dim <= self._laplace_max_dim
        if use_laplace:
            starts, log_p = self._refine_best(starts, log_p, args, kwargs)
            if not self._best_is_mode:
                mass = self._laplace_log_mass(starts, log_p, args, kwargs)
                if mass is not None:
                    return self._separate(self._select_starts(starts, mass)), use_laplace
        locs = self._select_starts(starts, log_p)
        return (locs if self._best_is_mode else self._separate(locs)), use_laplace

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
                for index in finite.split(chunk):
                    _, _, hess = log_joint_derivatives(self._log_joint(args, kwargs), starts[index])
                    eigenvalues = torch.linalg.eigvalsh(-hess)
                    positive = (eigenvalues > 0).all(-1) & torch.isfinite(eigenvalues).all(-1)
                    log_det = eigenvalues.clamp(min=torch.finfo(log_p.dtype).tiny).log().sum(-1)
                    mass[index] = torch.where(positive, log_p[index] - 0.5 * log_det, -math.inf)
        except (RuntimeError, ValueError):
            return None
        return mass if torch.isfinite(mass).any() else None

    def _laplace_start(self, locs: torch.Tensor, args: tuple, kwargs: dict):
        """The preconditioner and the component scales from the curvature at the starts.

        Returns ``(matrix, scales, precision)`` (the last: the negative Hessian at the
        best start, ``locs[0]``), or None where the Hessians cannot be computed (a
        model that is not twice differentiable) or are not finite.
        """
        log_joint = self._log_joint(args, kwargs)
        try:
            with poutine.block():
                _, _, hess = log_joint_derivatives(log_joint, locs)
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
                matrix = secant_widths(log_joint, locs[0], matrix, floor)
        except (RuntimeError, ValueError):
            return None
        return matrix, laplace_scales(-hess, matrix, self._init_scale), -hess[0]

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
                return laplace_misfit(self._log_joint(args, kwargs), mode, precision)
        except (RuntimeError, ValueError):
            return math.inf

    def _log_joint(self, args: tuple, kwargs: dict):
        """The model's log joint at packed unconstrained points (n, d) -> (n,); -inf at
        points where the model raises (see ``rowwise``): the start's climb, Newton's line
        search and the Laplace draws may reach parameters at which a model's own
        computation fails (gp_pois_regr's covariance, not positive definite at large
        amplitudes, made the whole start fall back to ``init_loc_fn``'s point)."""
        return rowwise(lambda u: unconstrained_log_joint(self._raw_model, self, u, *args, **kwargs))

    def _refine_best(self, starts: torch.Tensor, log_p: torch.Tensor, args: tuple, kwargs: dict):
        """Newton steps from the best start; kept only if they converge to a mode.

        Adam's climb stalls in narrow, strongly correlated ridges (kilpisjarvi's regression
        on uncentered years); Newton steps cross them. Where the log density has no mode
        (a funnel's neck) the steps would run away, so the climbed start is kept.
        """
        self._best_is_mode = False
        finite = torch.isfinite(log_p)
        if not finite.any() or self._newton_steps == 0:
            return starts, log_p
        best = int(torch.where(finite, log_p, -torch.inf).argmax())
        log_joint = self._log_joint(args, kwargs)
        with poutine.block():
            refined, converged = newton_refine(log_joint, starts[best], self._newton_steps)
            if converged:
                value = log_joint(refined[None])[0].detach()
                if torch.isfinite(value) and value >= log_p[best]:
                    starts, log_p = starts.clone(), log_p.clone()
                    starts[best], log_p[best] = refined, value
                    self._best_is_mode = True
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
        latent, log_density = sample_components(posterior, f"_{name}_base", f"_{name}_component")
        return pyro.sample(
            f"_{name}_latent",
            dist.Delta(latent, log_density=log_density, event_dim=1),
            infer={"is_auxiliary": True},
        )

    def get_posterior(self, *args, **kwargs) -> ClassifierWeightedMixture:
        """The CWM over the unconstrained latent vector (event shape (latent_dim,)).

        Its parameters are registered in Pyro's param store, so ``SVI`` optimizes them.
        """
        pyro.module(f"{self._pyro_name}.cwm", self.cwm)
        return ClassifierWeightedMixture(
            self.cwm.reference(), self.preconditioned_maps, self.cwm.classifier
        )

    def _sample_unconstrained(self, num_samples: int, seed: int) -> torch.Tensor:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return self.get_posterior().sample((num_samples,))
        finally:
            torch.random.set_rng_state(state)

    @torch.no_grad()
    def quantiles(
        self, quantiles, *args, num_samples: int = 20000, seed: int = 0, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of each latent site (Monte Carlo over the mixture).

        The CWM's marginals have no closed form: the quantiles of each unconstrained
        coordinate are estimated from ``num_samples`` draws (seeded) and then constrained;
        site transforms are monotone per coordinate for the usual supports.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles),) + site shape``.
        """
        samples = self._sample_unconstrained(num_samples, seed)
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
        medians = self.quantiles([0.5], num_samples=num_samples, seed=seed)
        return {name: value[0] for name, value in medians.items()}
