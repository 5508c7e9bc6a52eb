"""scikit-learn's shipped 8x8 digits (1,797 images, no download), dequantized for flows.

Pixels are counts 0..16. Dequantization adds ``u ~ U(0, 1)`` and divides by 17, giving a
density on [0, 1)^64 whose likelihood lower-bounds the discrete one; the logit map of
[`LogitTransform`][pyro_cwm.data.LogitTransform] then takes it to R^64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from pyro_cwm.data.images import LogitTransform

LEVELS = 17  # pixel values 0..16


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A fixed stratified split of the digits: ``(x_train, y_train, x_test, y_test)``.

    Images are rows of 64 pixel counts (float32); labels are int64.

    Raises:
        ValueError: if ``test_fraction`` is not in (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


class Dequantize:
    """Pixel counts -> logit space: ``z = logit(a + (1 - 2a)(v + u) / 17)``.

    Calling it with a generator draws ``u ~ U(0, 1)`` (training, likelihood bounds); with
    None it uses ``u = 1/2`` (deterministic predictions). ``log_det`` is
    ``log|dz/dv|`` per image, so that ``log p(v + u) = log p_model(z) + log_det``.
    """

    def __init__(self, alpha: float = 0.05, levels: int = LEVELS) -> None:
        self.logit = LogitTransform(alpha)
        self.levels = levels

    def _unit(self, v: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is None:
            u = torch.full_like(v, 0.5)
        else:
            u = torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        return (v + u) / self.levels

    def __call__(self, v: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.logit(self._unit(v, generator))

    def with_log_det(
        self, v: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(z, log|dz/dv|)`` for images ``v`` (..., d)."""
        unit = self._unit(v, generator)
        z = self.logit(unit)
        log_det = self.logit.log_abs_det_jacobian(unit, z).sum(-1)
        return z, log_det - v.shape[-1] * math.log(self.levels)

    def to_pixels(self, z: Tensor) -> np.ndarray:
        """Model-space points back to pixel intensities in [0, 16] (for pictures)."""
        unit = self.logit.inv(z).clamp(0, 1)
        return (unit * self.levels - 0.5).clamp(0, self.levels - 1).cpu().numpy()
