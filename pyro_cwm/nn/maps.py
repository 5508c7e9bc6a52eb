"""Invertible maps T_1..T_K of a CWM, each family vectorized over the K components.

Every family is a module with

- ``forward(z, context=None) -> x``: all K images ``x_k = T_k(z)``; z (..., d) -> (..., K, d);
- ``inverse(x, context=None) -> (z, ladj)``: all K pre-images ``z_k = T_k^{-1}(x)``, shape
  (..., K, d), and ``ladj_k = log |det dT_k^{-1}/dx (x)|``, shape (..., K);
- ``set_location_scale(loc, scale)``: make every T_k the diagonal affine map
  ``z -> loc_k + scale_k * z`` (and, if conditional, independent of the context), used to copy
  an EM-fitted diagonal Gaussian mixture into a CWM.

The leading dimensions of the input and of the optional context (..., c) broadcast. The K
components are one extra tensor dimension, never a Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zuko
from torch import Tensor, nn

from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int, join_context
from pyro_cwm.nn.classifiers import mlp


class ComponentParams(nn.Module):
    """Per-component parameter vectors, shape (K, m), free or produced from a context.

    Unconditional (``context_dim == 0``): a free parameter of shape (K, m).
    Conditional: an MLP ``context (..., c) -> (..., K, m)``.
    """

    def __init__(
        self,
        num_components: int,
        size: int,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64,),
    ) -> None:
        super().__init__()
        self.num_components, self.size, self.context_dim = num_components, size, context_dim
        if context_dim == 0:
            self.value = nn.Parameter(torch.zeros(num_components, size))
        else:
            self.net = mlp(context_dim, num_components * size, hidden_dims)

    def forward(self, context: Tensor | None = None) -> Tensor:
        if self.context_dim == 0:
            return self.value
        return self.net(context).unflatten(-1, (self.num_components, self.size))

    @torch.no_grad()
    def set_constant(self, value: Tensor) -> None:
        """Make the parameters equal ``value`` (K, m) for every context."""
        if self.context_dim == 0:
            self.value.copy_(value)
        else:
            last = self.net[-1]
            last.weight.zero_()
            last.bias.copy_(value.reshape(-1))


class ComponentMaps(nn.Module):
    """Base class of the K-vectorized invertible maps (see
    [the module documentation][pyro_cwm.nn.maps])."""

    def __init__(self, dim: int, num_components: int, context_dim: int = 0) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_components = check_positive_int("num_components", num_components)
        self.context_dim = check_positive_int("context_dim", context_dim, allow_zero=True)
        # Maps whose K inverses share one costly step G^{-1} have forward_shared and
        # inverse_from_shared (FlowMaps with flow="iaf").
        self.shares_inverse = False

    def _init_params(self, size: int, hidden_dims: Sequence[int]) -> None:
        """Per-component parameters of length ``size``, all zero (the identity map)."""
        hidden_dims = check_hidden_dims(hidden_dims)
        self.params = ComponentParams(self.num_components, size, self.context_dim, hidden_dims)
        self.params.set_constant(torch.zeros(self.num_components, size))

    def _check_loc_scale(self, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.num_components, self.dim)
        loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
        for name, value in (("loc", loc), ("scale", scale)):
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite")
        if not (scale > 0).all():
            raise ValueError("scale must be positive")
        return loc, scale


class LocationScaleMaps(ComponentMaps):
    """Diagonal location-scale maps ``T_k(z) = loc_k + exp(log_scale_k) * z``.

    With ``context_dim > 0``, loc and log-scale are an MLP of the context (the seed's
    conditional CWM). Initialized at the identity.
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64,),
    ) -> None:
        super().__init__(dim, num_components, context_dim)
        self._init_params(2 * dim, hidden_dims)

    def loc_log_scale(self, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Locations and log-scales, each of shape (..., K, d)."""
        return self.params(context).chunk(2, dim=-1)

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        loc, log_scale = self.loc_log_scale(context)
        return loc + log_scale.exp() * z.unsqueeze(-2)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.loc_log_scale(context)
        z = (x.unsqueeze(-2) - loc) * torch.exp(-log_scale)
        ladj = -log_scale.sum(-1)
        return z, ladj.expand(z.shape[:-1])

    def set_location_scale(self, loc: Tensor, scale: Tensor) -> None:
        loc, scale = self._check_loc_scale(loc, scale)
        self.params.set_constant(torch.cat((loc, scale.log()), dim=-1))


class AffineMaps(ComponentMaps):
    """Full affine maps ``T_k(z) = loc_k + L_k z`` with ``L_k`` lower triangular.

    ``L_k = D_k (I + N_k)``: ``D_k`` diagonal with ``exp`` of a free parameter (so ``L_k``
    is invertible) and ``N_k`` strictly lower triangular, free. The push-forward of N(0, I)
    is N(loc_k, L_k L_k^T): a full-covariance component. Each row's correlation part is in
    units of that coordinate's own scale, so a step on ``N_k`` means the same whatever the
    component's widths: with free entries of ``L_k`` instead, a component 1e-4 wide in one
    coordinate made a step of 0.01 on an off-diagonal entry 100 of its widths, and ``L_k``
    ill-conditioned enough (condition 1e14 after 5 steps) to break its inverse.
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64,),
    ) -> None:
        super().__init__(dim, num_components, context_dim)
        self.register_buffer("_tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)
        self._init_params(2 * dim + self._tril.shape[1], hidden_dims)

    def _factors(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Locations (..., K, d), log-diagonal of D (..., K, d) and I + N (..., K, d, d)."""
        d = self.dim
        theta = self.params(context)
        loc, log_diag, off = theta[..., :d], theta[..., d : 2 * d], theta[..., 2 * d :]
        unit = torch.eye(d, dtype=theta.dtype, device=theta.device).expand(
            *theta.shape[:-1], d, d
        )
        if off.shape[-1]:
            strict = theta.new_zeros(unit.shape)
            strict[..., self._tril[0], self._tril[1]] = off
            unit = unit + strict
        return loc, log_diag, unit

    def loc_log_diag_tril(self, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Locations (..., K, d), log-diagonal (..., K, d) and scale matrices (..., K, d, d)."""
        loc, log_diag, unit = self._factors(context)
        return loc, log_diag, log_diag.exp().unsqueeze(-1) * unit

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        loc, log_diag, unit = self._factors(context)
        correlated = (unit @ z.unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
        return loc + log_diag.exp() * correlated

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loc, log_diag, unit = self._factors(context)
        scaled = ((x.unsqueeze(-2) - loc) * (-log_diag).exp()).unsqueeze(-1)
        shape = torch.broadcast_shapes(scaled.shape[:-2], unit.shape[:-2])
        z = torch.linalg.solve_triangular(
            unit.expand(*shape, self.dim, self.dim),
            scaled.expand(*shape, self.dim, 1),
            upper=False,
            unitriangular=True,
        ).squeeze(-1)
        return z, (-log_diag.sum(-1)).expand(z.shape[:-1])

    def set_location_scale(self, loc: Tensor, scale: Tensor) -> None:
        loc, scale = self._check_loc_scale(loc, scale)
        off = torch.zeros(self.num_components, self._tril.shape[1], dtype=loc.dtype)
        self.params.set_constant(torch.cat((loc, scale.log(), off), dim=-1))


class FlowMaps(ComponentMaps):
    """Flow maps ``T_k(z) = loc_k + scale_k * G^{-1}(z; k, c)``, or with ``flow="iaf"``
    ``T_k(z) = G(loc_k + scale_k * z; c)``.

    One conditional flow G, whose context is the one-hot component index k (and the CWM
    context c), serves all K maps; a location-scale layer places each component. The flow's
    output layers start at zero, so G starts as the identity and the CWM starts as its
    location-scale counterpart.

    Three flows: ``"nsf"``, zuko's coupling neural spline flow (both directions cost one
    pass); ``"maf"``, zuko's fully autoregressive affine flow, in which every coordinate's
    scale may depend on all coordinates before it (what a funnel needs: the scale of x_i is
    a function of v), whose inverse, used to sample, costs ``dim`` passes; and ``"iaf"``,
    the same flow applied after the location-scale layer and shared by the components
    (not conditioned on k): drawing costs one pass, and so does the density at the draws,
    since every component's reference point follows from the one point G^{-1}(x)
    (``forward_shared``); the density elsewhere costs ``dim`` passes.

    Args:
        flow: ``"nsf"``, ``"maf"`` or ``"iaf"``.
        transforms: number of transforms in G.
        bins: number of spline bins (``"nsf"`` only).
        flow_hidden_dims: hidden widths of G's conditioner networks.
        hidden_dims: hidden widths of the context network of the location-scale layer.
        passes: (``"maf"``, ``"iaf"``) the number of groups of coordinates in the
            autoregressive order: None, one per coordinate (fully autoregressive; a
            ``"maf"`` draw costs ``dim`` passes); 2, a coupling (two passes).
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64,),
        flow: str = "nsf",
        transforms: int = 2,
        bins: int = 8,
        flow_hidden_dims: Sequence[int] = (64, 64),
        passes: int | None = None,
    ) -> None:
        super().__init__(dim, num_components, context_dim)
        self.location_scale = LocationScaleMaps(dim, num_components, context_dim, hidden_dims)
        self.shares_inverse = flow == "iaf"
        common = {
            "features": dim,
            "context": (0 if self.shares_inverse else num_components) + context_dim,
            "transforms": check_positive_int("transforms", transforms),
            "hidden_features": check_hidden_dims(flow_hidden_dims, "flow_hidden_dims"),
        }
        if flow == "nsf":
            built = zuko.flows.NSF(bins=check_positive_int("bins", bins), passes=2, **common)
        elif flow in ("maf", "iaf"):
            if passes is not None and check_positive_int("passes", passes) >= dim:
                passes = None  # one pass per coordinate: fully autoregressive
            built = zuko.flows.MAF(passes=passes, **common)
        else:
            raise ValueError(f"flow must be 'nsf', 'maf' or 'iaf', got {flow!r}")
        self.flow = built.transform
        self.reset_flow()

    @torch.no_grad()
    def reset_flow(self) -> None:
        """Make G the identity (zero output layers of its conditioners)."""
        for t in self.flow.transforms:
            if hasattr(t, "hyper"):
                t.hyper[-1].weight.zero_()
                t.hyper[-1].bias.zero_()
            else:  # zuko's element-wise transform (1-D, no context): free parameters
                for p in t.parameters():
                    p.zero_()

    def _flow_context(self, like: Tensor, context: Tensor | None) -> Tensor | None:
        if self.shares_inverse:
            return None if context is None else context.unsqueeze(-2)
        onehot = torch.eye(self.num_components, dtype=like.dtype, device=like.device)
        if context is None:
            return onehot
        return join_context(onehot, context.unsqueeze(-2))

    def forward_shared(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(``flow="iaf"``) The images x (..., K, d) of z (..., d), and for each image its
        shared point v = G^{-1}(x) (..., K, d) and log|det dG^{-1}/dx| there (..., K)."""
        loc, log_scale = self.location_scale.loc_log_scale(context)
        inner = loc + log_scale.exp() * z.unsqueeze(-2)
        x, ladj = self.flow(self._flow_context(z, context)).call_and_ladj(inner)
        return x, inner, -ladj

    def inverse_from_shared(
        self, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(``flow="iaf"``) Every component's reference point (..., K, d) of a shared point
        v (..., d), and log|det| of that step (..., K): ``inverse`` without G^{-1}."""
        return self.location_scale.inverse(v, context)

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if self.shares_inverse:
            return self.forward_shared(z, context)[0]
        transform = self.flow(self._flow_context(z, context))
        u = transform.inv(z.unsqueeze(-2).expand(*z.shape[:-1], self.num_components, self.dim))
        loc, log_scale = self.location_scale.loc_log_scale(context)
        return loc + log_scale.exp() * u

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.shares_inverse:
            v, ladj_flow = self.flow(context).inv.call_and_ladj(x)
            z, ladj_affine = self.inverse_from_shared(v, context)
            return z, ladj_affine + ladj_flow.unsqueeze(-1)
        u, ladj_affine = self.location_scale.inverse(x, context)
        z, ladj_flow = self.flow(self._flow_context(x, context)).call_and_ladj(u)
        return z, ladj_affine + ladj_flow

    def set_location_scale(self, loc: Tensor, scale: Tensor) -> None:
        self.location_scale.set_location_scale(loc, scale)
        self.reset_flow()


MAPS: dict[str, type[ComponentMaps]] = {
    "location_scale": LocationScaleMaps,
    "affine": AffineMaps,
    "flow": FlowMaps,
}


# Named choices of a CWM's maps for command lines and benchmarks: the MAPS families plus
# presets of their options.
MAP_PRESETS: dict[str, tuple[str, dict]] = {
    "maf": ("flow", {"flow": "maf"}),
    "iaf": ("flow", {"flow": "iaf"}),
}
MAP_CHOICES: tuple[str, ...] = (*MAPS, *MAP_PRESETS)


def map_arguments(name: str | None) -> dict:
    """``map`` and ``map_options`` keyword arguments of ``CWM``/``AutoCWM`` for a name of
    ``MAP_CHOICES``: a family of ``MAPS`` as it is, or a preset: ``"maf"`` (the flow
    family with an autoregressive affine flow, ``map_options={"flow": "maf"}``) or
    ``"iaf"`` (that flow after the components, shared by them: what ``map="auto"`` picks
    for a funnel).
    None gives no arguments: the callee's default (AutoCWM's ``map="auto"``).

    Raises:
        ValueError: if ``name`` is not one of ``MAP_CHOICES``.
    """
    if name is None:
        return {}
    if name in MAP_PRESETS:
        kind, options = MAP_PRESETS[name]
        return {"map": kind, "map_options": dict(options)}
    if name not in MAPS:
        raise ValueError(f"map must be one of {MAP_CHOICES}, got {name!r}")
    return {"map": name, "map_options": None}


def build_maps(
    kind: str, dim: int, num_components: int, context_dim: int = 0, **options
) -> ComponentMaps:
    """Build the maps family ``kind`` (one of ``MAPS``).

    Raises:
        ValueError: if ``kind`` is unknown.
    """
    if kind not in MAPS:
        raise ValueError(f"map must be one of {sorted(MAPS)}, got {kind!r}")
    return MAPS[kind](dim, num_components, context_dim, **options)


def low_rank_update(z: Tensor, vectors: Tensor, factors: Tensor) -> Tensor:
    """``(I + U diag(factors - 1) U^T) z`` for points z (..., d), U = ``vectors`` (d, m)
    with orthonormal columns, ``factors`` (m,): the factors scale z along U."""
    return z + ((z @ vectors) * (factors - 1)) @ vectors.T


class PreconditionedMaps(nn.Module):
    """K maps followed by one fixed affine map shared by all: ``x_k = shift + A S_k(z)``.

    ``A`` and ``shift`` (d,) are buffers, not parameters: a preconditioner that makes the
    inner maps' parameters well scaled (AutoCWM sets it from the curvature of the log
    density at its best start). ``A`` is ``matrix`` (d, d, invertible); or, keeping
    memory and time O(d m) for large d, ``diag(matrix) (I + U diag(widths - 1) U^T)`` with
    ``matrix`` (d,) positive, U = ``vectors`` (d, m, orthonormal columns; none: m = 0) and
    ``widths`` (m,) positive. The inner maps module is held, not copied; its parameters
    live in the coordinates ``y = A^{-1}(x - shift)``.
    ``log|det dT_k^{-1}/dx| = ladj_inner - log|det A|``.

    Raises:
        ValueError: for shapes other than these.
    """

    def __init__(
        self,
        maps: nn.Module,
        shift: Tensor,
        matrix: Tensor,
        vectors: Tensor | None = None,
        widths: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.maps = maps
        self.dim, self.num_components = maps.dim, maps.num_components
        self.context_dim = maps.context_dim
        d = self.dim
        if shift.shape != (d,) or matrix.shape not in ((d, d), (d,)):
            raise ValueError(
                f"shift and matrix must have shapes ({d},) and ({d}, {d}) or ({d},), got "
                f"{tuple(shift.shape)} and {tuple(matrix.shape)}"
            )
        self.diagonal = matrix.dim() == 1
        if vectors is None:
            vectors, widths = matrix.new_zeros(d, 0), matrix.new_zeros(0)
        m = vectors.shape[-1]
        if not self.diagonal and m or vectors.shape != (d, m) or widths.shape != (m,):
            raise ValueError(
                f"vectors and widths must have shapes ({d}, m) and (m,), with a diagonal "
                f"matrix, got {tuple(vectors.shape)} and {tuple(widths.shape)}"
            )
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("matrix", matrix.detach().clone())
        self.register_buffer("vectors", vectors.detach().clone())
        self.register_buffer("widths", widths.detach().clone())
        if self.diagonal:
            self.register_buffer("inverse_matrix", self.matrix.reciprocal())
            log_abs_det = self.matrix.abs().log().sum() + self.widths.log().sum()
            self.register_buffer("log_abs_det", log_abs_det)
        else:
            self.register_buffer("inverse_matrix", torch.linalg.inv(self.matrix))
            self.register_buffer("log_abs_det", torch.linalg.slogdet(self.matrix)[1])

    def to_inner(self, x: Tensor) -> Tensor:
        """The preconditioned coordinates ``A^{-1}(x - shift)`` of points x (..., d)."""
        if not self.diagonal:
            return (x - self.shift) @ self.inverse_matrix.T
        z = (x - self.shift) * self.inverse_matrix
        if self.widths.shape[0]:
            z = low_rank_update(z, self.vectors, self.widths.reciprocal())
        return z

    def from_inner(self, y: Tensor) -> Tensor:
        """The points ``shift + A y`` of preconditioned coordinates y (..., d)."""
        if not self.diagonal:
            return self.shift + y @ self.matrix.T
        if self.widths.shape[0]:
            y = low_rank_update(y, self.vectors, self.widths)
        return self.shift + y * self.matrix

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.from_inner(self.maps(z, context))

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, ladj = self.maps.inverse(self.to_inner(x), context)
        return z, ladj - self.log_abs_det

    @property
    def shares_inverse(self) -> bool:
        return self.maps.shares_inverse

    def forward_shared(self, z: Tensor, context: Tensor | None = None):
        """The inner maps' ``forward_shared``, the images preconditioned."""
        inner, v, ladj = self.maps.forward_shared(z, context)
        return self.from_inner(inner), v, ladj - self.log_abs_det

    def inverse_from_shared(self, v: Tensor, context: Tensor | None = None):
        return self.maps.inverse_from_shared(v, context)
