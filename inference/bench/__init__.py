"""Benchmarks: scripts that print figures side by side with named peers (not tests).

Run one with ``python -m inference.bench.<name> --help``.
"""

import json
from pathlib import Path


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write a bench's rows as JSON to ``path`` (its folder created); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return out
