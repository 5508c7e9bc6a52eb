"""Argument checks and small tensor helpers shared by the building blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_positive_int(name: str, value: int, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int >= 1 (>= 0 with ``allow_zero``), else raise.

    Raises:
        TypeError: if ``value`` is not an integer.
        ValueError: if it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    lowest = 0 if allow_zero else 1
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def check_hidden_dims(hidden_dims: Sequence[int], name: str = "hidden_dims") -> tuple[int, ...]:
    """Return ``hidden_dims`` as a tuple of positive ints, else raise naming ``name``."""
    if isinstance(hidden_dims, int):
        hidden_dims = (hidden_dims,)
    try:
        dims = tuple(hidden_dims)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {hidden_dims!r}") from None
    for h in dims:
        check_positive_int(f"every entry of {name}", h)
    return dims


def join_context(x: Tensor, context: Tensor | None) -> Tensor:
    """Concatenate ``x`` (..., d) and ``context`` (..., c) after broadcasting leading dims."""
    if context is None:
        return x
    shape = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat(
        (x.expand(*shape, x.shape[-1]), context.to(x.dtype).expand(*shape, context.shape[-1])),
        dim=-1,
    )
