"""Data for the command line: CSV (optional header) and .npy files, built-in examples, devices."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from inference.cli.errors import CLIError
from pyro_cwm.data.toy import EXAMPLES, make_example


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


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data source of a command: a file, or ``--example`` with ``--num-points``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "data", nargs="?", help="CSV (optional header) or .npy file, one point per row"
    )
    source.add_argument("--example", choices=sorted(EXAMPLES), help="use a built-in example")
    parser.add_argument("--num-points", type=int, default=5000, help="points drawn for --example")


def read_data(args: argparse.Namespace) -> np.ndarray:
    """The table (N, D) named by ``add_data_arguments``'s options (``args.seed`` seeds
    the examples). Raises CLIError for a bad file or ``--num-points``."""
    if args.example:
        if args.num_points < 2:
            raise CLIError(f"--num-points must be >= 2, got {args.num_points}")
        return make_example(args.example, args.num_points, seed=args.seed).double().numpy()
    return load_table(args.data)


def parse_device(text: str) -> torch.device:
    """``--device`` as a torch device; CLIError if malformed or CUDA is not available."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise CLIError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA device is available")
    return device
