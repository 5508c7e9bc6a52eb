"""Classifiers: the weight functions w: R^d (x context) -> simplex of a CWM.

A classifier returns log-weights, normalized over its last dimension, for a latent point z
and an optional context. Leading dimensions of ``z`` and ``context`` broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int, join_context


def mlp(
    in_features: int,
    out_features: int,
    hidden_dims: Sequence[int],
    activation: type[nn.Module] = nn.SiLU,
) -> nn.Sequential:
    """A fully connected network ``in -> hidden_dims... -> out`` with ``activation`` between."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_dims:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class SoftmaxClassifier(nn.Module):
    """Softmax MLP classifier ``w(z, c) = softmax(f([z, c]))`` over ``num_components``.

    Args:
        dim: dimension d of the latent point z.
        num_components: number of classes K.
        hidden_dims: widths of the hidden layers; ``()`` gives multinomial logistic regression.
        context_dim: dimension c of an optional context concatenated to z (0: none).
        activation: the hidden activation module class.

    Raises:
        ValueError: if a dimension is not a positive integer.
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        hidden_dims: Sequence[int] = (64,),
        context_dim: int = 0,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_components = check_positive_int("num_components", num_components)
        self.context_dim = check_positive_int("context_dim", context_dim, allow_zero=True)
        self.net = mlp(
            dim + context_dim, num_components, check_hidden_dims(hidden_dims), activation
        )
        # Start as the uniform mixture: the output layer is zero, so w(z) = 1/K everywhere.
        self.set_constant(torch.zeros(num_components))

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-weights ``log w(z, c)``, shape ``broadcast(z, c)[:-1] + (K,)``."""
        return torch.log_softmax(self.net(join_context(z, context)), dim=-1)

    @torch.no_grad()
    def set_constant(self, log_weights: Tensor) -> None:
        """Make the classifier constant: last layer weight zero, bias ``log_weights`` (K,)."""
        last = self.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(log_weights, dtype=last.bias.dtype))


class ConstantWeights(nn.Module):
    """A constant classifier ``w(z) = softmax(logits)``: the CWM becomes a plain mixture.

    Args:
        num_components: number of components K.
        logits: optional initial logits, shape (K,); zeros (uniform weights) by default.
    """

    def __init__(self, num_components: int, logits: Tensor | None = None) -> None:
        super().__init__()
        self.num_components = check_positive_int("num_components", num_components)
        self.context_dim = 0
        if logits is None:
            logits = torch.zeros(num_components)
        if logits.shape != (num_components,):
            raise ValueError(
                f"logits must have shape ({num_components},), got {tuple(logits.shape)}"
            )
        self.logits = nn.Parameter(logits.clone())

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-weights, shape ``z.shape[:-1] + (K,)``."""
        log_w = torch.log_softmax(self.logits, dim=-1).to(z.dtype)
        return log_w.expand(*z.shape[:-1], self.num_components)

    @torch.no_grad()
    def set_constant(self, log_weights: Tensor) -> None:
        """Set the weights to ``exp(log_weights)`` (normalized), shape (K,)."""
        self.logits.copy_(torch.as_tensor(log_weights, dtype=self.logits.dtype))
