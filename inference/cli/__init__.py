"""The ``pyro-cwm`` command line.

Each command is one module of this package with ``register(subparsers)``, which adds its
parser and sets ``run`` as the parser's default; adding a command is adding its module
name to ``COMMANDS``. A command signals bad input by raising
[`CLIError`][inference.cli.CLIError]: the user sees one line on stderr and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from inference.cli.errors import CLIError

COMMANDS = ["demo", "fit_density", "fit_gmm", "vi"]

__all__ = ["CLIError", "COMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-cwm",
        description="Classifier Weighted Mixtures and other mixture models for Pyro.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"inference.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CLIError as error:
        print(f"pyro-cwm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
