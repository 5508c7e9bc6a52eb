"""Sums over the training points in the EM steps of a mixture of experts.

The experts and gates write every sum over the points of their EM steps (statistics,
counts, gradients of data terms) through [`point_sums`][pyro_cwm.models.point_sums.point_sums].
By default that is this process's points alone. A fitting loop that splits the points
across processes (data-parallel EM, in ``inference``) installs with
[`using_point_sums`][pyro_cwm.models.point_sums.using_point_sums], for the duration of the
fit, a [`PointSums`][pyro_cwm.models.point_sums.PointSums] whose sums also add the other
processes' sums; the models themselves never communicate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T", Tensor, list[Tensor])

__all__ = ["PointSums", "point_sums", "using_point_sums"]


class PointSums:
    """Sums over the points of one process: every method is the identity (or a lookup).

    A subclass for data split across processes overrides the methods so that each returns
    the value for all the points: ``total`` sums over the processes, ``count`` is the
    number of points of all of them, ``rows`` reads rows at global indices (the shards in
    process order being the data set), ``offset`` is the global index of this process's
    first point.
    """

    distributed = False
    offset = 0  # the global index of this process's first point

    def total(self, values: T) -> T:
        """Sums over this process's points (a tensor or a list of tensors) -> over all points."""
        return values

    def count(self, num_rows: int) -> int:
        """The number of points, given this process's ``num_rows``."""
        return num_rows

    def rows(self, values: Tensor, index: Tensor) -> Tensor:
        """``values`` (n, ...) of this process's points at global indices ``index`` (m,)."""
        return values[index]

    def total_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient (of a sum over this process's points) by its total."""


_CURRENT: list[PointSums] = [PointSums()]


def point_sums() -> PointSums:
    """The [`PointSums`][pyro_cwm.models.point_sums.PointSums] in effect (one process by
    default)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def using_point_sums(sums: PointSums) -> Iterator[PointSums]:
    """Make ``sums`` the one in effect inside the block (nested blocks stack)."""
    _CURRENT.append(sums)
    try:
        yield sums
    finally:
        _CURRENT.pop()
