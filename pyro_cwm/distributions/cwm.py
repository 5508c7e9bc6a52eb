r"""The Classifier Weighted Mixture distribution.

With a reference q on R^d, K invertible maps T_k and a classifier w: R^d -> simplex,

- sample: ``z ~ q, k ~ Categorical(w(z)), x = T_k(z)``;
- density: ``p(x) = sum_k q(z_k) w_k(z_k) |det dT_k^{-1}/dx|``, with ``z_k = T_k^{-1}(x)``.
  It integrates to one because the weights sum to one at every z; a constant w gives the
  plain mixture of the K push-forwards of q.
- component posterior: ``v_k(x)`` proportional to ``q(z_k) w_k(z_k) |det J_k|``.

With a context c the maps and the classifier take c as a second input; the distribution's
batch shape is then ``context.shape[:-1]``.
"""

from __future__ import annotations

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from torch import Size, Tensor, nn


class ClassifierWeightedMixture(TorchDistribution):
    """A mixture whose weights are a classifier evaluated in the reference space.

    Args:
        reference: the reference distribution q, event shape (d,), batch shape ().
        maps: a K-vectorized maps module (an instance of a class in
            [`MAPS`][pyro_cwm.nn.MAPS]) with ``forward`` and ``inverse``; it is held, not
            copied.
        classifier: a module ``(z, context) -> log-weights (..., K)``.
        context: optional context, shape (*batch_shape, context_dim), required when the maps
            or the classifier are conditional.
        validate_args: as in ``torch.distributions``.

    Raises:
        ValueError: if the parts disagree on d, K or the context dimension, or the context
            is missing, superfluous or of the wrong size.

    Note:
        The component choice is discrete, so ``has_rsample`` is False: a reparameterized
        sample cannot carry the gradient of the classifier. The Rao-Blackwellized ELBO
        sums the choice out using
        [`rsample_components`][pyro_cwm.distributions.ClassifierWeightedMixture.rsample_components].
    """

    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        reference: torch.distributions.Distribution,
        maps: nn.Module,
        classifier: nn.Module,
        context: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        dim, num_components = maps.dim, maps.num_components
        if tuple(reference.event_shape) != (dim,) or tuple(reference.batch_shape) != ():
            raise ValueError(
                f"reference must have event_shape ({dim},) and batch_shape (), got "
                f"{tuple(reference.event_shape)} and {tuple(reference.batch_shape)}"
            )
        if classifier.num_components != num_components:
            raise ValueError(
                f"classifier has {classifier.num_components} classes but maps has "
                f"{num_components} components"
            )
        context_dim = max(maps.context_dim, classifier.context_dim)
        if context_dim and context is None:
            raise ValueError(
                f"context is required: this CWM is conditional on {context_dim} features"
            )
        if context is not None:
            if not context_dim:
                raise ValueError("context was given but this CWM is unconditional (context_dim=0)")
            if not isinstance(context, Tensor):
                raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
            if context.dim() == 0 or context.shape[-1] != context_dim:
                raise ValueError(
                    f"context must have shape (..., {context_dim}), got {tuple(context.shape)}"
                )
        self.reference, self.maps, self.classifier, self.context = (
            reference,
            maps,
            classifier,
            context,
        )
        batch_shape = context.shape[:-1] if context is not None else Size()
        super().__init__(batch_shape, Size((dim,)), validate_args=validate_args)

    # The context is checked where it is used (``check_context``), so that a guide's CWM
    # site can name itself in the error; torch's constructor check could not.
    arg_constraints: dict[str, constraints.Constraint] = {}

    def check_context(self, site: str | None = None) -> None:
        """Raise a ValueError if the context holds NaN or inf (naming ``site`` if given)."""
        if self.context is not None and not torch.isfinite(self.context).all():
            where = f" of the CWM at site {site!r}" if site else ""
            raise ValueError(f"the context{where} contains NaN or inf")

    @property
    def num_components(self) -> int:
        return self.maps.num_components

    def expand(self, batch_shape, _instance=None) -> ClassifierWeightedMixture:
        new = self._get_checked_instance(ClassifierWeightedMixture, _instance)
        batch_shape = Size(batch_shape)
        new.reference, new.maps, new.classifier = self.reference, self.maps, self.classifier
        new.context = None
        if self.context is not None:
            new.context = self.context.expand(batch_shape + self.context.shape[-1:])
        super(ClassifierWeightedMixture, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def _component_context(self) -> Tensor | None:
        # The classifier is evaluated at K latent points per x: the context gets a K axis.
        return None if self.context is None else self.context.unsqueeze(-2)

    def joint_log_probs(self, value: Tensor) -> Tensor:
        """``log q(z_k) + log w_k(z_k) + log|det dT_k^{-1}/dx|`` for every k: shape (..., K).

        Their logsumexp over k is ``log_prob(value)``; normalized, the component posterior.
        """
        if self._validate_args:
            self.check_context()
            self._validate_sample(value)
            if not torch.isfinite(value).all():
                raise ValueError("value must be finite: it contains inf")
        z, ladj = self.maps.inverse(value, self.context)
        log_w = self.classifier(z, self._component_context()).diagonal(dim1=-2, dim2=-1)
        return self.reference.log_prob(z) + log_w + ladj

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density of ``value`` (..., d); returns shape ``broadcast(value[:-1], batch)``."""
        log_p = torch.logsumexp(self.joint_log_probs(value), dim=-1)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def component_log_probs(self, value: Tensor) -> Tensor:
        """Log of the component posterior v_k(x), normalized over the last dim (..., K)."""
        log_v = self.joint_log_probs(value)
        log_v = log_v - torch.logsumexp(log_v, dim=-1, keepdim=True)
        return log_v.expand(torch.broadcast_shapes(log_v.shape[:-1], self.batch_shape) + (-1,))

    def rsample_components(self, sample_shape=Size()) -> tuple[Tensor, Tensor]:
        """Reparameterized draws of every component's image and the classifier's weights.

        Draws ``z ~ q`` with shape ``sample_shape + batch_shape`` and returns
        ``(x, log_w)``: ``x[..., k, :] = T_k(z)``, shape ``(*sample, *batch, K, d)``, and
        ``log_w = log w(z)``, shape ``(*sample, *batch, K)``. Both are differentiable in the
        parameters of the maps and the classifier; the Rao-Blackwellized ELBO weights a
        function of ``x[..., k, :]`` by ``w_k(z)`` and sums over k.
        """
        if self._validate_args:
            self.check_context()
        shape = self._extended_shape(sample_shape)[:-1]
        z = self.reference.rsample(shape)
        return self.maps(z, self.context), self.classifier(z, self.context)

    def rsample_components_with_log_prob(
        self, sample_shape=Size()
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``rsample_components`` and the log-density at every image, ``(x, log_w,
        log_p)`` with ``log_p`` of shape ``(*sample, *batch, K)``.

        Where the maps share one inverse step (``maps.shares_inverse``: a flow applied
        after the components' location-scale layer) the density at the images costs no
        inversion: each image's shared point is known from drawing it. Otherwise it is
        ``log_prob`` at the images. Differentiable in every parameter.
        """
        if not getattr(self.maps, "shares_inverse", False):
            x, log_w = self.rsample_components(sample_shape)
            return x, log_w, self.log_prob(x.movedim(-2, 0)).movedim(0, -1)
        if self._validate_args:
            self.check_context()
        shape = self._extended_shape(sample_shape)[:-1]
        z = self.reference.rsample(shape)
        x, v, ladj_shared = self.maps.forward_shared(z, self.context)
        context = self._component_context()  # (..., 1, c): one per image
        points, ladj = self.maps.inverse_from_shared(v, context)  # (..., K images, K, d)
        inner = None if context is None else context.unsqueeze(-2)
        log_w_points = self.classifier(points, inner).diagonal(dim1=-2, dim2=-1)
        joint = self.reference.log_prob(points) + log_w_points + ladj
        log_p = joint.logsumexp(-1) + ladj_shared
        return x, self.classifier(z, self.context), log_p

    @property
    def mean(self) -> Tensor:
        """The mean (*batch, d), estimated as in
        [`moments`][pyro_cwm.distributions.ClassifierWeightedMixture.moments]."""
        return self.moments()[0]

    @property
    def variance(self) -> Tensor:
        """The marginal variances (*batch, d), estimated as in
        [`moments`][pyro_cwm.distributions.ClassifierWeightedMixture.moments]."""
        return self.moments()[1]

    @torch.no_grad()
    def moments(self, num_samples: int = 10_000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Mean and marginal variances, each (*batch, d), by Monte Carlo.

        The weights depend on the point, so neither has a closed form. Each of
        ``num_samples`` reference draws z contributes all K images weighted by w(z) (the
        component summed out); the draws come from a random state seeded with ``seed`` and
        then restored, so the same parameters give the same values.
        """
        device = self.reference.mean.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x, log_w = self.rsample_components((num_samples,))
        w = log_w.softmax(-1).unsqueeze(-1)
        mean = (w * x).sum(-2).mean(0)
        variance = (w * (x - mean.unsqueeze(-2)) ** 2).sum(-2).mean(0)
        return mean, variance

    def score_parts(self, value, *args, **kwargs):
        """Refused: an ELBO that asks for a CWM site's score parts would draw the component
        with a score-function gradient; the error says which ELBOs sum it out instead."""
        raise ValueError(
            "this CWM guide site needs the Rao-Blackwellized estimator, which sums out its "
            "discrete component choice: train with inference.CWMELBO(), or with "
            "pyro.infer.TraceEnum_ELBO() on pyro_cwm.guides.rao_blackwellize(guide); "
            "Trace_ELBO and TraceGraph_ELBO would use a high-variance score function"
        )

    def sample(self, sample_shape=Size()) -> Tensor:
        """Draw ``x = T_k(z)``, ``z ~ q``, ``k ~ Categorical(w(z))``: shape (*sample, *batch, d)."""
        with torch.no_grad():
            x, log_w = self.rsample_components(sample_shape)
            k = Categorical(logits=log_w).sample()
            index = k[..., None, None].expand(*k.shape, 1, x.shape[-1])
            return x.gather(-2, index).squeeze(-2)
