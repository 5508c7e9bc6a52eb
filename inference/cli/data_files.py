"""Reading data files for the command line: CSV (optional header) and .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.cli.errors import CLIError


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def load_table(path: str | Path, name: str = "DATA") -> np.ndarray:
    """Read a numeric table, shape (N, D), from a ``.npy`` or delimited text file.

    Text files are comma-separated (or whitespace-separated if no comma is seen); a first
    line that is not numeric is taken as a header. A 1-D array becomes one column.

    Raises:
        CLIError: if the file is missing, unreadable, empty, not numeric, not 1-D/2-D, or
            contains NaN or inf. The message names ``name`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{name}: no such file: {path}")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with path.open() as handle:
                first = handle.readline()
            if not first.strip():
                raise CLIError(f"{name}: {path} holds no data")
            delimiter = "," if "," in first else None
            tokens = first.split(delimiter)
            skip = 0 if tokens and all(_is_number(t.strip()) for t in tokens) else 1
            array = np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2, dtype=float)
    except (ValueError, OSError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CLIError(f"{name}: cannot read {path} as a numeric table: {reason}") from None
    if not np.issubdtype(array.dtype, np.number):
        raise CLIError(f"{name}: {path} is not numeric (dtype {array.dtype})")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise CLIError(f"{name}: {path} must hold a 1-D or 2-D array, got shape {array.shape}")
    if array.size == 0:
        raise CLIError(f"{name}: {path} holds no data")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise CLIError(
            f"{name}: {path} contains NaN or inf (first at data row {int(np.argmax(bad))})"
        )
    return array.astype(np.float64)
