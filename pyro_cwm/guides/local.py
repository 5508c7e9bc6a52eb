"""The local part of a guide list: Normal local latents that follow the global sites' draw."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from operator import attrgetter

import torch
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

# Per step, the centre of the globals moves this fraction of the way to their draw.
CENTER_RATE = 0.01


class AutoLocalNormal(AutoNormal):
    """``AutoNormal`` on local sites whose locations and log-scales move with the globals.

    For the unconstrained value u of a local site in group i (event entries e),
    ``u_ie ~ N(loc_ie + a_e . (g - c), scale_ie exp(b_e . (g - c)))``: g is the
    unconstrained vector of the global sites that ``given`` drew in the same guide call,
    c a running mean of those draws (an AutoCWM's K images weighted by its classifier;
    each move of c is absorbed by loc and scale, so q stays the same), and a, b are
    shared by the groups, so every minibatch informs them.
    With a, b = 0 (the start) it is ``AutoNormal``; a linear mean covers the conditionals
    of a Gaussian hierarchy exactly, so the globals' marginals lose mean field's
    shrinkage (in the spirit of Pyro's ``AutoHierarchicalNormalMessenger`` and
    ``AutoStructured``). In an ``AutoGuideList``, after ``given``:

    ```python
    guide = AutoGuideList(model)
    guide.append(cwm := AutoCWM(poutine.block(model, expose=["mu"])))
    guide.append(AutoLocalNormal(poutine.block(model, hide=["mu"]), given=cwm))
    ```

    Args:
        model: the model with the global sites hidden.
        given: the autoguide on the global sites; it must run first in each guide call.
        init_loc_fn: the locations' start, as for ``AutoNormal``.
        init_scale: the scales' start, as for ``AutoNormal``.

    Raises:
        TypeError: for a ``given`` that is not an autoguide.
        RuntimeError: when called before ``given`` has drawn in this guide call.
    """

    def __init__(
        self,
        model: Callable,
        given: AutoGuide,
        *,
        init_loc_fn: Callable = init_to_feasible,
        init_scale: float = 0.1,
    ) -> None:
        if not isinstance(given, AutoGuide):
            raise TypeError(f"given must be a Pyro autoguide, got {type(given).__name__}")
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale)
        self._given = weakref.ref(given)
        self._drawn: dict | None = None
        self._drawn_log_weights: torch.Tensor | None = None
        self._fresh = False
        given.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self._drawn, self._fresh = output, True
        # An AutoCWM's K images under enumeration, and their weights w_k(u).
        self._drawn_log_weights = getattr(module, "_image_log_weights", None)

    def _read_structure(self) -> None:
        """The global sites, and the number of plate dimensions of the model."""
        given = self._given().prototype_trace
        self._global_sites = [
            (name, site) for name, site in given.iter_stochastic_nodes()
            if not site_is_subsample(site)
        ]  # fmt: skip
        frames = [
            frame
            for trace in (self.prototype_trace, given)
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        self._nesting = max((-frame.dim for frame in frames), default=0)

    def _globals_vector(self, values: dict) -> torch.Tensor:
        """The unconstrained global vector of ``values``: shape (*extra, G)."""
        nesting, parts, extra = self._nesting, [], torch.Size()
        for name, site in self._global_sites:
            u = biject_to(site["fn"].support).inv(values[name])
            proto = biject_to(site["fn"].support).inv(site["value"].detach())
            event_dim = site["fn"].event_dim + proto.dim() - site["value"].dim()
            width = nesting + event_dim
            u = u.reshape((1,) * max(0, width - u.dim()) + u.shape)
            batch, region = u.shape[: u.dim() - width], proto.shape
            region = (1,) * max(0, width - len(region)) + tuple(region)
            u = u.expand(batch + torch.Size(region))
            parts.append(u.reshape(*batch, -1))
            extra = torch.broadcast_shapes(extra, batch)
        return torch.cat([p.expand(*extra, p.shape[-1]) for p in parts], -1)

    def _current_globals(self) -> torch.Tensor:
        self._require_fresh()
        self._fresh = False
        return self._globals_vector(self._drawn)

    def _require_fresh(self) -> None:
        if self._drawn is None or not self._fresh:
            raise RuntimeError(
                "AutoLocalNormal: its given guide has not drawn the global sites in this guide "
                "call; append it after the given guide in the AutoGuideList"
            )

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._read_structure()
        globals_ = self._current_globals()
        self._fresh = True  # forward reads the same draw
        center = globals_.detach().reshape(-1, globals_.shape[-1]).mean(0)
        self.register_buffer("globals_center", center)
        self.loc_weights, self.scale_weights = PyroModule(), PyroModule()
        for name, event_dim in self._event_dims.items():
            # The locations are full size here (outside the plates): so are the weights.
            shape = attrgetter(name)(self.locs).shape
            shape = shape[len(shape) - event_dim :]
            zeros = torch.zeros(shape + center.shape, dtype=center.dtype, device=center.device)
            for root in (self.loc_weights, self.scale_weights):
                deep_setattr(root, name, torch.nn.Parameter(zeros.clone()))

    def _shift(self, name: str, weights: torch.Tensor, globals_: torch.Tensor) -> torch.Tensor:
        centred = globals_ - self.globals_center
        width = self._nesting + self._event_dims[name]
        centred = centred.reshape(centred.shape[:-1] + (1,) * width + centred.shape[-1:])
        return (weights * centred).sum(-1)

    def forward(self, *args, **kwargs) -> dict:
        self._require_fresh()
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._globals = self._current_globals()
        if torch.is_grad_enabled():
            # The centre follows the globals' mean, so the weights act around it and not
            # through an offset that the locations and scales could equally absorb.
            with torch.no_grad():
                drawn = self._mean_draw(self._globals.detach())
                self._recentre(self.globals_center.lerp(drawn, CENTER_RATE))
        return super().forward(*args, **kwargs)

    def _mean_draw(self, globals_: torch.Tensor) -> torch.Tensor:
        """The mean (G,) of this call's global draws (*extra, G); K images of an AutoCWM
        weighted by its classifier: an image without weight (a component left far from
        the mass) must not pull the centre away from where q is."""
        log_weights = self._drawn_log_weights
        if log_weights is None or globals_.dim() < 2 or globals_.shape[0] != log_weights.shape[0]:
            return globals_.reshape(-1, globals_.shape[-1]).mean(0)
        k = log_weights.shape[0]
        weights = log_weights.reshape(k, -1).exp().mean(1).to(globals_.dtype)
        images = globals_.reshape(k, -1, globals_.shape[-1]).mean(1)
        return (weights @ images) / weights.sum()

    @torch.no_grad()
    def _recentre(self, center: torch.Tensor) -> None:
        """Move the centre, and the locations and scales with it: q is unchanged."""
        step = center - self.globals_center
        to_scale = biject_to(self.scale_constraint)
        for name in self._event_dims:
            raw_loc = attrgetter(name + "_unconstrained")(self.locs)
            raw_loc.add_((attrgetter(name)(self.loc_weights) * step).sum(-1))
            raw = attrgetter(name + "_unconstrained")(self.scales)
            grow = (attrgetter(name)(self.scale_weights) * step).sum(-1).exp()
            raw.copy_(to_scale.inv(to_scale(raw) * grow))
        self.globals_center.copy_(center)

    def _get_loc_and_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = super()._get_loc_and_scale(name)
        globals_ = self._globals
        loc = loc + self._shift(name, attrgetter(name)(self.loc_weights), globals_)
        scale = scale * self._shift(name, attrgetter(name)(self.scale_weights), globals_).exp()
        return loc, scale

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict:
        """The local sites' medians given the globals at ``given``'s median."""
        self._globals = self._globals_vector(self._given().median(*args, **kwargs))
        return super().median(*args, **kwargs)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """The local sites' quantiles given the globals at ``given``'s median."""
        self._globals = self._globals_vector(self._given().median(*args, **kwargs))
        return super().quantiles(quantiles, *args, **kwargs)
