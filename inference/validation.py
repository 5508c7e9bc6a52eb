"""Checks of user data: one place that turns arrays into tensors or says clearly what is wrong."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_data_tensor(
    data,
    name: str = "data",
    *,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    min_rows: int = 1,
) -> Tensor:
    """Return ``data`` as a finite floating tensor of shape (N, d).

    A tensor keeps its device and floating dtype unless ``device``/``dtype`` are given; a
    numpy array or nested list becomes a tensor of ``dtype`` (default: torch's default).

    Raises:
        TypeError: if ``data`` is not numeric.
        ValueError: if it is not 2-D, has the wrong number of columns, fewer than
            ``min_rows`` rows, or contains NaN or inf.
    """
    if not isinstance(data, Tensor):
        try:
            array = np.asarray(data)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a numeric array or tensor: {error}") from None
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
        data = torch.as_tensor(
            array.astype(np.float64, copy=False), dtype=dtype or torch.get_default_dtype()
        )
    elif not (data.is_floating_point() or data.dtype in (torch.int32, torch.int64, torch.bool)):
        raise TypeError(f"{name} must be a real tensor, got dtype {data.dtype}")
    if not data.is_floating_point():
        data = data.to(dtype or torch.get_default_dtype())
    data = data.to(device=device, dtype=dtype)
    if data.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_points, dim), got shape {tuple(data.shape)}")
    if dim is not None and data.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got {data.shape[1]}")
    if data.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {data.shape[0]}")
    finite = torch.isfinite(data).all(dim=1)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        raise ValueError(f"{name} contains NaN or inf (first at row {row})")
    return data
